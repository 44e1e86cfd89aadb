import numpy as np
import pytest
import torch

from fulora.data.cache import PreprocessCache
from fulora.data.dataset import ManifestDataset
from fulora.data.manifest import Manifest
from fulora.errors import DataError, ImageLoadError


@pytest.fixture
def mixed(tmp_path, make_png):
    """Images of different modes and sizes, one per row."""
    records = []
    for i, (mode, label) in enumerate(
        [("L", "brain"), ("RGB", "femur"), ("RGBA", "brain"), ("I;16", "thorax"), ("P", "femur")]
    ):
        path = make_png(tmp_path / f"{i}.png", mode, size=(80 + 10 * i, 60), seed=i)
        records.append({"path": str(path), "label": label})
    return Manifest.from_records(records)


@pytest.mark.parametrize(
    ("mode", "channels", "expect"), [("L", None, 1), ("L", 3, 3), ("RGB", None, 3), ("RGB", 1, 1)]
)
def test_items(mixed, mode, channels, expect):
    ds = ManifestDataset(
        mixed, ["brain", "femur", "thorax"], size=(32, 40), mode=mode, channels=channels
    )
    assert len(ds) == 5
    image, target = ds[1]
    assert image.shape == (expect, 32, 40) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target == 1
    assert [ds[i][1] for i in range(5)] == [0, 1, 0, 2, 1]


def test_bad_image_raises_with_name_or_is_skipped_and_counted(mixed, tmp_path):
    bad = mixed.paths[2]
    bad.write_bytes(bad.read_bytes()[:60])
    ds = ManifestDataset(mixed, size=(16, 16))
    with pytest.raises(ImageLoadError, match=rf"{bad.name}.*row 2"):
        ds[2]
    skipping = ManifestDataset(mixed, size=(16, 16), on_error="skip")
    assert len(skipping) == 4
    assert [p for p, _ in skipping.skipped] == [str(bad)]


def test_missing_file_and_unknown_class(mixed):
    mixed.paths[0].unlink()
    with pytest.raises(ImageLoadError, match="does not exist"):
        ManifestDataset(mixed, size=(16, 16))[0]
    with pytest.raises(DataError, match=r"label 'thorax' .* row 3 .* not one of the classes"):
        ManifestDataset(mixed, ["brain", "femur"])
    with pytest.raises(DataError, match="no images"):
        ManifestDataset(mixed.subset([False] * 5))


def test_cache_matches_direct_decoding_and_is_keyed_by_content(mixed, tmp_path, make_png):
    cache = PreprocessCache(tmp_path / "cache", size=(24, 24))
    direct = ManifestDataset(mixed, size=(24, 24))
    cached = ManifestDataset(mixed, cache=cache)
    for i in range(len(mixed)):
        assert torch.equal(direct[i][0], cached[i][0])
    assert cache.misses == 5 and cache.hits == 0
    cached[0]
    assert cache.hits == 1
    # new content at the same path is a new entry, never a stale one
    path = mixed.paths[0]
    before = cache.entry(path)
    make_png(path, "L", size=(80, 60), seed=99)
    assert cache.entry(path) != before
    assert torch.equal(cached[0][0], ManifestDataset(mixed, size=(24, 24))[0][0])
    # another size is another entry
    assert PreprocessCache(tmp_path / "cache", size=(32, 32)).entry(path) != cache.entry(path)


def test_damaged_cache_entry_is_recomputed(mixed, tmp_path):
    cache = PreprocessCache(tmp_path / "cache", size=(24, 24))
    first = cache.get(mixed.paths[0])
    cache.entry(mixed.paths[0]).write_bytes(b"garbage")
    assert np.array_equal(cache.get(mixed.paths[0]), first)


def test_transform_and_dataloader(mixed):
    ds = ManifestDataset(mixed, size=(16, 16), transform=lambda x: x * 2, in_memory=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    images, targets = next(iter(loader))
    assert images.shape == (5, 1, 16, 16) and images.max() > 1.0
    assert targets.tolist() == [0, 1, 0, 2, 1]


def test_an_item_costs_the_same_in_a_large_manifest(mixed, monkeypatch):
    """Loading an item must not rebuild the manifest's path list: it did, once per item, so an
    epoch cost time in the square of the images (900 images, 10 tiny_cnn epochs: 5.5 million
    Path objects; the fit took 65.9 s instead of 18.0 s on a 2-core AMD EPYC)."""
    built = []
    paths = Manifest.paths.fget
    monkeypatch.setattr(Manifest, "paths", property(lambda m: built.append(1) or paths(m)))
    ds = ManifestDataset(mixed, size=(16, 16))
    before = len(built)
    for i in range(len(ds)):
        ds[i]
    ds.uint8_tensor()
    assert len(built) == before


def test_real_african_images_load(sample_data):
    from fulora.data.readers import read_african

    m = read_african(sample_data / "african_dev")
    ds = ManifestDataset(m, size=(64, 64), on_error="skip")
    assert len(ds) == 217 and not ds.skipped
    assert ds[0][0].shape == (1, 64, 64)
