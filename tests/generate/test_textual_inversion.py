"""A1111's textual-inversion embeddings against A1111's own code.

Reference: ``tests/reference/a1111_textual_inversion.json``, recorded by A1111's
``EmbeddingDatabase`` lookup, its ``tokenize_line`` with embeddings and its
``EmbeddingsWithFixes`` (retyped from its source in a scratch script) on fulora's shipped
phantom-sd tokenizer and text encoder; the file's ``source`` field says how.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fulora.errors import ConfigError, DataError
from fulora.generate.config import GenerateConfig
from fulora.generate.inversions import load_textual_inversions, read_embedding
from fulora.generate.prompts import EmbeddingNames, a1111_chunks
from fulora.lora.conditioning import chunked_embeddings

_REFERENCE = Path(__file__).parents[1] / "reference"
RECORDED = json.loads((_REFERENCE / "a1111_textual_inversion.json").read_text())
# A1111's three layouts: its own training's .pt, a diffusers concept .bin, emb_params
_LAYOUTS = (".pt", ".bin", ".safetensors")


@pytest.fixture(scope="module")
def phantom_text():
    from transformers import CLIPTextModel, CLIPTokenizer

    from fulora.shipped import PHANTOM_SD, shipped_model

    folder = shipped_model(PHANTOM_SD)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    return tokenizer, CLIPTextModel.from_pretrained(
        folder / "text_encoder", dtype=torch.float32
    ).eval()


def _vectors(count: int, seed: int, width: int = 64) -> torch.Tensor:
    return torch.randn((count, width), generator=torch.Generator().manual_seed(seed))


def _save(path: Path, vectors: torch.Tensor) -> Path:
    """An embedding file in the layout its suffix stands for."""
    if path.suffix == ".pt":  # A1111's Embedding.save
        data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}}
        torch.save(data | {"name": path.stem, "step": 10}, path)
    elif path.suffix == ".bin":
        torch.save({f"<{path.stem}>": vectors}, path)
    else:
        from safetensors.torch import save_file

        save_file({"emb_params": vectors.contiguous()}, path)
    return path


@pytest.fixture(scope="module")
def recorded_embeddings(tmp_path_factory) -> Path:
    """The recorded embeddings, as files of A1111's three layouts, in one folder."""
    folder = tmp_path_factory.mktemp("embeddings")
    for i, (name, (count, seed)) in enumerate(RECORDED["embeddings"].items()):
        _save(folder / f"{name}{_LAYOUTS[i % 3]}", _vectors(count, seed))
    (folder / "badprobe.preview.png").write_bytes(b"")  # A1111's previews: passed over
    return folder


@pytest.mark.parametrize("key", sorted(RECORDED["chunks"]))
def test_prompts_with_embeddings_are_chunked_as_automatic1111_does(phantom_text, key):
    """Names matched in each piece's tokens, the longest first ("fetal echo" before "fetal"),
    not inside other words; an embedding's placeholders weighted as its piece; moved whole
    to the next chunk where it does not fit; the comma backtrack moving its placeholders and
    leaving its vectors in the chunk before (A1111's own behaviour)."""
    tokenizer = phantom_text[0]
    counts = {name: count for name, (count, _) in RECORDED["embeddings"].items()}
    chunks = a1111_chunks(
        tokenizer, RECORDED["prompts"][key], embeddings=EmbeddingNames(tokenizer, counts)
    )
    laid_out = [
        [chunk.ids, chunk.weights, [[at - 1, name] for at, name in chunk.fixes]] for chunk in chunks
    ]
    assert laid_out == RECORDED["chunks"][key]


@pytest.mark.parametrize("key", sorted(RECORDED["z"]))
def test_prompts_with_embeddings_are_encoded_as_automatic1111_does(
    phantom_text, recorded_embeddings, key
):
    """The embeddings read from files of A1111's three layouts, put in place of the token
    embeddings as A1111's EmbeddingsWithFixes puts them: each token's and channel's sums as
    A1111's within 1e-5 (without the vectors, the sums differ by far more)."""
    tokenizer, text_encoder = phantom_text
    prompt, clip_skip = key.rsplit("/", 1)
    inversions = load_textual_inversions([str(recorded_embeddings)], tokenizer, 64)
    chunks = a1111_chunks(tokenizer, RECORDED["prompts"][prompt], embeddings=inversions.names)
    [z] = chunked_embeddings(
        text_encoder, [[chunks]], int(clip_skip), "cpu", True, inversions.vectors
    )
    expected = RECORDED["z"][key]
    for got, want in (
        (z[0].sum(-1), expected["per_token"]),
        (z[0].sum(0), expected["per_channel"]),
    ):
        assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-4)
    if chunks[0].fixes:  # the vectors matter
        placeholders = [chunk._replace(fixes=()) for chunk in chunks]
        [plain] = chunked_embeddings(text_encoder, [[placeholders]], int(clip_skip), "cpu")
        assert (plain - z).abs().max() > 1e-2


def test_embedding_layouts_read_alike(tmp_path):
    vectors = _vectors(3, 7)
    for suffix in _LAYOUTS:
        assert torch.equal(read_embedding(_save(tmp_path / f"e{suffix}", vectors)), vectors)
    single = tmp_path / "one.bin"
    torch.save({"<one>": vectors[0]}, single)  # a one-vector concept
    assert read_embedding(single).shape == (1, 64)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (
            lambda p: torch.save(
                {"string_to_param": {"*": _vectors(1, 1), "#": _vectors(1, 2)}}, p
            ),
            "holds 2 terms",
        ),
        (lambda p: torch.save({"clip_g": _vectors(1, 1), "clip_l": _vectors(1, 2)}, p), "SDXL"),
        (lambda p: torch.save({"a": 1, "b": "text"}, p), "holds no embedding"),
        (lambda p: torch.save({"step": torch.nn.Linear(1, 1)}, p), "needs code to load"),
        (lambda p: p.write_bytes(b"not a file torch reads"), "cannot read it"),
    ],
)
def test_files_that_hold_no_embedding_a1111_reads_are_refused(tmp_path, write, message):
    path = tmp_path / "bad.pt"
    write(path)
    with pytest.raises(DataError, match=message):
        read_embedding(path)


def test_embeddings_fulora_cannot_use_as_a1111_does_are_refused(phantom_text, tmp_path):
    tokenizer = phantom_text[0]
    for folder in "abc":
        (tmp_path / folder).mkdir()
    _save(tmp_path / "a" / "grain.pt", _vectors(1, 1))
    _save(tmp_path / "b" / "grain.bin", _vectors(1, 2))
    _save(tmp_path / "c" / "Grain.pt", _vectors(1, 1))
    with pytest.raises(ConfigError, match="both named 'grain'"):
        load_textual_inversions([str(tmp_path / "a"), str(tmp_path / "b")], tokenizer, 64)
    with pytest.raises(ConfigError, match="'Grain': its name reads as 'grain' does"):
        load_textual_inversions([str(tmp_path / "a"), str(tmp_path / "c")], tokenizer, 64)
    with pytest.raises(DataError, match="1 to 75 vectors of 32"):
        load_textual_inversions([str(tmp_path / "a")], tokenizer, 32)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="no embedding file"):
        load_textual_inversions([str(tmp_path / "notes.txt")], tokenizer, 64)
    with pytest.raises(ConfigError, match="does not exist"):
        load_textual_inversions([str(tmp_path / "missing.pt")], tokenizer, 64)


def test_a1111_ti_hashes_are_read_and_checked():
    from fulora.generate.infotext import generate_settings, read_a1111_parameters

    text = (
        "a photo, grain\nNegative prompt: badprobe\nSteps: 20, Sampler: Euler, CFG scale: 7, "
        'Seed: 1, Size: 512x512, TI hashes: "grain: 0123456789ab, badprobe: ba9876543210, '
        'grain: 0123456789ab"'
    )
    read = generate_settings(read_a1111_parameters(text), "brain")
    assert read["embedding_hashes"] == {"grain": "0123456789ab", "badprobe": "ba9876543210"}
    with pytest.raises(ConfigError, match="give their files or folder with --embeddings"):
        GenerateConfig(base="unused", embedding_hashes=read["embedding_hashes"])
    with pytest.raises(ConfigError, match="not one hash per embedding name"):
        generate_settings(
            read_a1111_parameters(text.replace('grain: 0123456789ab"', 'grain: 1"')), "b"
        )
    with pytest.raises(ConfigError, match="is not a hash"):
        GenerateConfig(base="unused", embeddings=["x"], embedding_hashes={"grain": "xyz"})


def test_embeddings_make_their_images_and_are_written_as_a1111_writes_them(tiny_model, tmp_path):
    """Through ``generate`` on the tiny model: a prompt's and a negative prompt's embeddings
    (from a folder) change the images; the PNG text lists each used once under "TI hashes",
    the prompt's first, with its file's hash; --a1111's reading names them back, and the
    same settings with another file of that name are refused before any image, as is a rerun
    into the folder once a file has changed."""
    from fulora.generate.infotext import generate_settings, read_a1111_parameters
    from fulora.generate.run import generate
    from fulora.io import file_hash

    folder = tmp_path / "embeddings"
    folder.mkdir()
    grain = _save(folder / "grain.safetensors", _vectors(2, 3, width=32) * 3)
    blur = _save(folder / "blurry.pt", _vectors(3, 4, width=32) * 3)
    _save(folder / "unused.bin", _vectors(1, 5, width=32))
    common = dict(planes=["brain"], per_class=2, batch_size=2, steps=4, width=64, height=48)
    common |= dict(seed=5, seed_scheme="consecutive", device="cpu", contact_sheet=0)
    common |= dict(prompts={"brain": "fetal brain, grain"}, negative_prompt="blurry, grain")

    def made(out, **settings):
        generate(out, GenerateConfig(base=str(tiny_model), **(common | settings)), progress=False)
        return {p.name: np.asarray(Image.open(p)) for p in sorted((out / "brain").glob("*.png"))}

    plain = made(tmp_path / "plain")
    embedded = made(tmp_path / "embedded", embeddings=[str(folder)])
    for key, pixels in embedded.items():
        assert np.abs(pixels.astype(int) - plain[key].astype(int)).mean() > 0.5
    with Image.open(next((tmp_path / "embedded" / "brain").glob("*.png"))) as image:
        text = image.text["parameters"]
    listed = f"grain: {file_hash(grain)[:12]}, blurry: {file_hash(blur)[:12]}"
    assert f'TI hashes: "{listed}"' in text
    read = generate_settings(read_a1111_parameters(text), "brain")
    assert read["embedding_hashes"] == {
        "grain": file_hash(grain)[:12],
        "blurry": file_hash(blur)[:12],
    }
    other = tmp_path / "other"
    other.mkdir()
    _save(other / "grain.pt", _vectors(2, 9, width=32))
    _save(other / "blurry.pt", _vectors(3, 4, width=32) * 3)
    hashes = {"embedding_hashes": read["embedding_hashes"]}
    with pytest.raises(ConfigError, match="'grain': .* has the hash"):
        made(tmp_path / "refused", embeddings=[str(other)], **hashes)
    assert not list((tmp_path / "refused").rglob("*.png"))
    _save(grain, _vectors(2, 8, width=32))  # the file changed, its path and settings not
    with pytest.raises(ConfigError, match="other textual-inversion embeddings"):
        made(tmp_path / "embedded", embeddings=[str(folder)])


@pytest.mark.gpu
def test_embeddings_are_put_in_place_on_cuda_in_fp16(tiny_model, tmp_path):
    """On CUDA in fp16 the embedding's vectors, read in fp32, are cast to the text encoder's
    dtype where they go: the images are finite and not the plain prompt's."""
    from fulora.generate.run import generate

    folder = tmp_path / "embeddings"
    folder.mkdir()
    _save(folder / "grain.safetensors", _vectors(2, 3, width=32) * 3)
    common = dict(planes=["brain"], per_class=2, batch_size=2, steps=4, width=64, height=48)
    common |= dict(seed=5, device="cuda", dtype="fp16", rng="gpu", contact_sheet=0)
    common |= dict(prompts={"brain": "fetal brain, grain"})
    images = {}
    for name, settings in (("plain", {}), ("embedded", {"embeddings": [str(folder)]})):
        cfg = GenerateConfig(base=str(tiny_model), **(common | settings))
        generate(tmp_path / name, cfg, progress=False)
        images[name] = [np.asarray(Image.open(p)) for p in sorted((tmp_path / name).rglob("*.png"))]
    for plain, embedded in zip(images["plain"], images["embedded"], strict=True):
        assert embedded.std() > 0
        assert np.abs(embedded.astype(int) - plain.astype(int)).mean() > 0.5
