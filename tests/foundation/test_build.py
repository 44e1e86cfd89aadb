"""Building the foundation model: a miniature of the recipe, end to end, on CPU."""

import json

import pytest
import torch

from fulora.errors import ConfigError
from fulora.foundation import build as build_module
from fulora.foundation.build import FoundationConfig, build_foundation, read_loss
from fulora.foundation.corpus import CAPTION_WORDS, corpus_image
from fulora.io import file_hash
from fulora.planes import PAPER_PLANES

from .helpers import plain_diffusers_image


def _mini(**kw) -> FoundationConfig:
    base = dict(
        corpus_size=48,
        vae_steps=4,
        vae_batch_size=4,
        unet_steps=6,
        unet_batch_size=4,
        warmup_steps=2,
        checkpoint_every=2,
        keep_work=True,
    )
    base.update(kw)
    return FoundationConfig(**base)


@pytest.fixture(scope="module")
def mini_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("foundation") / "model"
    record = build_foundation(out, _mini(), progress=False)
    return out, record


def test_corpus_is_deterministic_and_never_names_a_plane():
    a, b = corpus_image(3, 11), corpus_image(3, 11)
    assert (a.pixels == b.pixels).all() and a.caption == b.caption
    assert a.pixels.shape == (48, 64) and a.pixels.dtype.name == "uint8"
    captions = {corpus_image(0, i).caption for i in range(60)}
    assert len(captions) > 10  # the machines vary, and the captions say how
    words = {w for c in captions for w in c.replace(",", " ").split()}
    assert words <= set(CAPTION_WORDS) | {"a", "of"}
    organs = {"skull", "head", "brain", "stomach", "heart", "bone", "femur", "spine", "chest"}
    assert not words & (set(PAPER_PLANES) | organs | {"fetal", "plane"})
    assert len({corpus_image(0, i).anatomy for i in range(60)}) == 5  # every anatomy is in it


def test_build_writes_a_plain_diffusers_folder_with_a_card(mini_build):
    out, record = mini_build
    pipe, image = plain_diffusers_image(out)
    assert pipe.unet.dtype == torch.float32  # stored in fp16, loads in any dtype
    assert image.shape == (48, 64, 3)
    card = (out / "MODEL_CARD.md").read_text()
    for path in (out / "unet").glob("*.safetensors"):
        assert file_hash(path) in card  # the card's sha256 of every file
    assert record["parameters"]["unet"] > 1_000_000
    assert {r["stage"] for r in read_loss(out / "loss.csv")} == {"vae", "unet"}
    for name in ("loss_vae.png", "loss_unet.png", "samples.png", "config.yaml", "done.json"):
        assert (out / name).is_file()


def test_interrupted_build_resumes_exactly(mini_build, tmp_path, monkeypatch):
    reference, _ = mini_build
    original = build_module._Trainer.save

    def save_then_die(self):
        original(self)
        if self.name == "unet" and self.step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(build_module._Trainer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_foundation(tmp_path / "model", _mini(), progress=False)
    monkeypatch.setattr(build_module._Trainer, "save", original)
    assert not (tmp_path / "model" / "done.json").exists()
    build_foundation(tmp_path / "model", _mini(), progress=False)
    assert read_loss(tmp_path / "model" / "loss.csv") == read_loss(reference / "loss.csv")


def test_a_finished_build_is_kept_and_another_recipe_refused(mini_build):
    out, record = mini_build
    assert build_foundation(out, _mini(), progress=False)["finished"] == record["finished"]
    with pytest.raises(ConfigError, match="unet_steps"):
        build_foundation(out, _mini(unet_steps=7), progress=False)


def test_a_diverged_build_stops_before_its_checkpoint_takes_nan_weights(tmp_path):
    """A learning rate far too high turns the VAE's weights into NaN: the build stops at that
    step, naming the flag to lower, and its checkpoint keeps only finite weights (it is what a
    90-minute build resumes from)."""
    from fulora.errors import NonFiniteError

    out = tmp_path / "model"
    with pytest.raises(NonFiniteError, match=r"vae stage after step \d.*--vae-lr"):
        build_foundation(out, _mini(vae_lr=1e30), progress=False)
    assert not (out / "done.json").exists()
    for checkpoint in (out / "work").glob("*.pt"):
        state = torch.load(checkpoint, weights_only=False)["modules"]
        assert all(t.isfinite().all() for m in state.values() for t in m.values()), checkpoint


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("corpus_size", 0, "'corpus_size' must be at least 1"),
        ("height", 50, "multiples of 16"),
        ("caption_dropout", 1.0, "caption_dropout"),
    ],
)
def test_bad_recipes_are_refused_before_any_work(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        build_foundation(tmp_path / "m", _mini(**{key: value}), progress=False)
    assert not (tmp_path / "m").exists()


def test_done_record_is_json(mini_build):
    out, _ = mini_build
    done = json.loads((out / "done.json").read_text())
    assert set(done["build_seconds"]) == {"vae", "unet", "total"}
