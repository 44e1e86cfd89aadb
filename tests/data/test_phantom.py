import json
import time

import numpy as np
import pytest
from PIL import Image

from fulora.cli import main
from fulora.data.phantom import (
    PHANTOM_PLANES,
    STYLES,
    PhantomConfig,
    generate_phantom,
    phantom_grid,
    render,
)
from fulora.data.readers import read_any, read_plane_folders
from fulora.errors import ConfigError, WriteError


@pytest.mark.parametrize("plane", PHANTOM_PLANES)
@pytest.mark.parametrize("domain", ["source", "target"])
def test_render_is_deterministic_and_sized(plane, domain):
    a = render(plane, domain, seed=3, index=5)
    assert a.dtype == np.uint8 and a.shape == STYLES[domain].size
    assert np.array_equal(a, render(plane, domain, seed=3, index=5))
    assert not np.array_equal(a, render(plane, domain, seed=3, index=6))
    assert not np.array_equal(a, render(plane, domain, seed=4, index=5))
    # a fan on a black screen: dark corners, bright content
    assert a[-1, 0] == 0 and a[-1, -1] == 0 and a.max() > 200


def test_domains_differ_like_two_machines():
    """Target images: a noise floor in the fluid, brighter tissue, on-screen text."""
    src = np.stack([render("abdomen", "source", 0, i, size=(200, 288)) for i in range(6)])
    tgt = np.stack([render("abdomen", "target", 0, i, size=(200, 288)) for i in range(6)])
    floor = lambda a: np.percentile(a[a > 0], 10)  # noqa: E731
    assert floor(tgt) >= floor(src) + 4
    assert np.median(tgt[tgt > 0]) > np.median(src[src > 0])
    corner = (slice(None), slice(2, 40), slice(4, 60))  # where the target machine writes text
    assert tgt[corner].max() > 150 and src[corner].max() == 0


def test_planes_are_distinguishable_by_simple_statistics():
    """Different planes give different images (a sanity check, not a classifier)."""
    means = {
        p: np.mean([render(p, "source", 0, i).mean() for i in range(4)]) for p in PHANTOM_PLANES
    }
    assert len({round(v, 1) for v in means.values()}) == len(PHANTOM_PLANES)


def test_generate_writes_a_training_folder_and_resumes(tmp_path):
    config = PhantomConfig(
        per_class=3, domain="both", seed=1, planes=["brain", "femur"], grid=False
    )
    m = generate_phantom(tmp_path, config)
    assert len(m) == 12
    assert m.counts("domain") == {"phantom-source": 6, "phantom-target": 6}
    assert set(m.frame["patient"]) == {
        f"{d}-{i:05d}" for d in ("source", "target") for i in range(3)
    }
    # also a LoRA training layout, with the paper's captions
    folders = read_plane_folders(tmp_path)
    assert set(folders.frame["caption"]) == {"a photo of fetal brain", "a photo of fetal femur"}
    assert read_any(tmp_path).fingerprint() == m.fingerprint()
    # resume: existing images are kept, missing ones redone identically
    victim = m.paths[4]
    original = victim.read_bytes()
    victim.unlink()
    kept = m.paths[0].stat().st_mtime_ns
    generate_phantom(tmp_path, config)
    assert victim.read_bytes() == original and m.paths[0].stat().st_mtime_ns == kept


def test_images_rendered_on_threads_are_those_rendered_one_by_one(tmp_path, monkeypatch):
    config = PhantomConfig(per_class=3, domain="both", planes=["brain", "thorax"])
    threaded = generate_phantom(tmp_path / "threads", config)
    monkeypatch.setattr("os.cpu_count", lambda: 1)  # one thread: render() in a plain loop
    serial = generate_phantom(tmp_path / "serial", config)
    for a, b in zip(threaded.paths, serial.paths, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert (tmp_path / "threads/grid.png").read_bytes() == (
        tmp_path / "serial/grid.png"
    ).read_bytes()
    # the grid generate_phantom reads from its PNGs is the grid rendered afresh
    rendered = phantom_grid(
        tmp_path / "rendered.png",
        planes=["brain", "thorax"],
        domains=["source", "target"],
        per_row=3,
    )
    assert rendered.read_bytes() == (tmp_path / "serial/grid.png").read_bytes()


def test_a_failed_write_stops_the_rendering(tmp_path, monkeypatch):
    """A write that fails (a full disk) ends the run at once: the renders not yet started are
    cancelled, not finished in the background first."""
    from fulora.data import phantom

    rendered, real_render = [], phantom.render
    monkeypatch.setattr(phantom, "render", lambda *a: rendered.append(a) or real_render(*a))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(WriteError, match="the disk is full") as error:
        generate_phantom(tmp_path, PhantomConfig(per_class=40, grid=False))
    # the error is held (as by a caller that logs it): nothing may go on rendering meanwhile
    time.sleep(1.0)
    assert error.value and len(rendered) < 20  # of 200 (a few were under way on the threads)
    assert not list(tmp_path.rglob("*.png"))


def test_bad_config():
    """Refused by the config itself, before any folder is made."""
    with pytest.raises(ConfigError, match="draws .*not cervix"):
        PhantomConfig(planes=["cervix"])
    with pytest.raises(ConfigError, match="'per_class' must be at least 1, got 0"):
        PhantomConfig(per_class=0)


def test_cli_writes_a_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "data",
                "phantom",
                str(out),
                "--per-class",
                "2",
                "--domain",
                "target",
                "--planes",
                "brain",
                "thorax",
                "--size",
                "96",
                "128",
            ]
        )
        == 0
    )
    for name in ("config.yaml", "manifest.csv", "log.txt", "done.json", "grid.png"):
        assert (out / name).is_file(), name
    done = json.loads((out / "done.json").read_text())
    assert done["images"] == 4 and done["domains"] == {"phantom-target": 4}
    assert Image.open(out / "brain" / "target-00000.png").size == (128, 96)
    assert "4 images" in capsys.readouterr().out


def test_cli_rejects_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("per_clas: 3\n")
    assert main(["data", "phantom", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'per_clas'" in err and "p.yaml" in err
    assert not (tmp_path / "o").exists()
