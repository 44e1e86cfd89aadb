"""LoRA training with the tiny in-process SD model on CPU."""

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from fulora.cli import main
from fulora.config import check_process_device
from fulora.data.readers import read_any
from fulora.errors import ConfigError, DataError, ImageLoadError
from fulora.io import file_hash
from fulora.lora import base as base_module
from fulora.lora.formats import read_lora
from fulora.lora.train import LoraTrainConfig, add_lora_adapters, resize_of_run, train_lora


def _cfg(tiny_model, **kw):
    base = dict(
        base=str(tiny_model),
        rank=4,
        alpha=4,
        resolution=64,
        bucket_step=16,
        repeats=1,
        max_steps=6,
        optimizer="adamw",
        unet_lr=1e-2,
        text_encoder_lr=1e-2,
        seed=0,
        sample_steps=2,
        output_name="test_lora",
    )
    base.update(kw)
    return LoraTrainConfig(**base)


def test_only_lora_parameters_are_trainable(tiny_model):
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )
    add_lora_adapters(pipe.unet, pipe.text_encoder, LoraTrainConfig(rank=4, alpha=4))
    for module in (pipe.unet, pipe.text_encoder):
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


def test_training_changes_only_the_lora_and_the_loss_falls(tiny_model, lora_images, tmp_path):
    before = {p: file_hash(p) for p in tiny_model.rglob("*.safetensors")}
    record = train_lora(
        read_any(lora_images),
        tmp_path / "run",
        _cfg(tiny_model, max_steps=60, sample_every=30),
        progress=False,
    )
    out = tmp_path / "run"
    assert {p: file_hash(p) for p in tiny_model.rglob("*.safetensors")} == before
    lora = read_lora(out / "pytorch_lora_weights.safetensors")
    ups = {k: v for k, v in lora.tensors.items() if ".lora_B." in k}
    unet_ups = [v for k, v in ups.items() if k.startswith("unet.")]
    assert unet_ups and all(v.abs().max() > 0 for v in unet_ups)  # B starts at zero: trained
    # clip skip 2: the last text-encoder layer is not used, so its LoRA gets no gradient
    last = max(int(k.split("layers.")[1].split(".")[0]) for k in ups if "layers." in k)
    for key, value in ups.items():
        if key.startswith("text_encoder."):
            assert (value.abs().max() > 0) == (f"layers.{last}." not in key), key
    loss = pd.read_csv(out / "loss.csv")["loss"]
    assert len(loss) == 60 and loss[-15:].mean() < 0.9 * loss[:15].mean()
    for name in (
        "config.yaml",
        "log.txt",
        "done.json",
        "loss.png",
        "test_lora.safetensors",
        "train_manifest.csv",
        "samples/step-000030.png",
        "samples/step-000060.png",
    ):
        assert (out / name).is_file(), name
    # kohya bucket_no_upscale at resolution 64, step 16 (see tests/lora/test_parity.py)
    assert record["steps"] == 60 and record["buckets"] == {"64x48": 6}
    assert record["optimizer"] == "AdamW"  # 8-bit AdamW needs CUDA
    # the GPU suite's figure: steps/s without the first two (warm-up) steps
    assert record["steady_steps_per_s"] > 0 and record["steps_per_s"] > 0
    meta = read_lora(out / "test_lora.safetensors").metadata
    assert json.loads(meta["fulora_captions"]) == {
        "brain": "a photo of fetal brain",
        "femur": "a photo of fetal femur",
    }
    assert meta["fulora_dataset_sha256"] == record["dataset_sha256"]
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "60"
    # 3 images per plane (conftest's lora_images), each captioned with one tag
    assert json.loads(meta["ss_tag_frequency"]) == {
        "brain": {"a photo of fetal brain": 3},
        "femur": {"a photo of fetal femur": 3},
    }


def test_resume_reproduces_the_uninterrupted_run(tiny_model, lora_images, tmp_path):
    data = read_any(lora_images)
    cfg = _cfg(tiny_model, max_steps=8, checkpoint_every=2, batch_size=2, repeats=2)
    train_lora(data, tmp_path / "full", cfg, progress=False)
    full = pd.read_csv(tmp_path / "full" / "loss.csv")

    def crash(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lora(data, tmp_path / "cut", cfg, progress=False, on_step=crash)
    cut = tmp_path / "cut"
    assert not (cut / "test_lora.safetensors").exists()  # no half-written LoRA
    assert [
        p.name for p in sorted((cut / "checkpoints").iterdir()) if not p.name.startswith(".")
    ] == ["step-000002", "step-000004"]
    train_lora(data, cut, cfg, resume="latest", progress=False)
    resumed = pd.read_csv(cut / "loss.csv")
    assert list(resumed["step"]) == list(range(1, 9))
    torch.testing.assert_close(
        torch.tensor(resumed["loss"].to_numpy()),
        torch.tensor(full["loss"].to_numpy()),
        atol=1e-6,
        rtol=0,
    )


def test_a_lora_trained_before_kohyas_resize_is_finished_with_box_not_retrained(
    tiny_model, lora_images, tmp_path
):
    """Until session 25 fulora shrank images with PIL's BOX filter; a run folder saved then has
    no 'resize' in its config.yaml, which means that, not the new default."""
    import yaml

    data, run = read_any(lora_images), tmp_path / "run"
    cfg = _cfg(tiny_model, max_steps=1, resize="box")
    train_lora(data, run, cfg, progress=False)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["resize"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    finished = file_hash(run / "test_lora.safetensors")
    with pytest.raises(ConfigError, match=r"\(resize: 'box' there, 'area' here\)"):
        train_lora(data, run, replace(cfg, resize="area"), progress=False)
    assert train_lora(data, run, cfg, progress=False)["steps"] == 1  # done: nothing to do
    assert file_hash(run / "test_lora.safetensors") == finished
    assert resize_of_run(run) == "box"


def test_a_finished_lora_is_not_trained_over_with_other_settings(tiny_model, lora_images, tmp_path):
    """A rerun with another setting once retrained in place, and the finished LoRA was lost."""
    shutil.copytree(lora_images, tmp_path / "images")  # one image is replaced below
    data, run = read_any(tmp_path / "images"), tmp_path / "run"
    cfg = _cfg(tiny_model, max_steps=2, checkpoint_every=1)
    train_lora(data, run, cfg, progress=False)
    finished = file_hash(run / "test_lora.safetensors")
    other = _cfg(tiny_model, max_steps=2, checkpoint_every=1, rank=8)
    with pytest.raises(ConfigError, match=r"\(rank: \d+ there, 8 here\); give its values to use"):
        train_lora(data, run, other, progress=False)
    with pytest.raises(ConfigError, match=r"--resume: .*\(rank: \d+ there, 8 here\).*--config"):
        train_lora(data, run, other, resume="latest", progress=False)
    assert file_hash(run / "test_lora.safetensors") == finished
    # other images, same settings: once "nothing to do" (finished) or resumed on them
    brain = data.select(labels=["brain"])
    for resume in (None, "latest"):
        with pytest.raises(ConfigError, match="trained on other images than these"):
            train_lora(brain, run, cfg, resume=resume, progress=False)
    assert train_lora(data, run, cfg, progress=False)["steps"] == 2  # done: nothing to do
    assert file_hash(run / "test_lora.safetensors") == finished
    # the same names, other bytes (a dataset re-exported in place): once "nothing to do" too
    replaced = data.paths[1]
    original = replaced.read_bytes()
    with Image.open(replaced) as img:
        flipped = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.save(replaced)
    for resume in (None, "latest"):
        with pytest.raises(ConfigError, match=f"as they were: {replaced} changed since"):
            train_lora(data, run, cfg, resume=resume, progress=False)
    assert file_hash(run / "test_lora.safetensors") == finished
    replaced.write_bytes(original)  # the images it trained on again
    # a resumed run may train longer: it goes on from the last checkpoint
    longer = _cfg(tiny_model, max_steps=3, checkpoint_every=1)
    assert train_lora(data, run, longer, resume="latest", progress=False)["steps"] == 3
    assert list(pd.read_csv(run / "loss.csv")["step"]) == [1, 2, 3]


@pytest.mark.parametrize("mode", ["sample", "mean"])
def test_cached_latents_are_the_vaes_own_draws(tiny_model, lora_images, mode):
    """Reference: diffusers' ``DiagonalGaussianDistribution`` (``latent_dist.sample(generator)``,
    what kohya caches, and ``.mode()``), on the same bucketed pixels, times the VAE's scaling
    factor; the draw of image ``i`` comes from its own seed, so a second caching is identical."""
    from fulora.lora.data import ImageCaptions, build_examples, cache_latents

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_model, safety_checker=None, requires_safety_checker=False
    )
    cfg = _cfg(tiny_model, cached_latent=mode, seed=5)
    examples = build_examples(read_any(lora_images), cfg)
    dataset = ImageCaptions(examples, pipe.tokenizer, center_crop=False, resolution=64)
    cached = cache_latents(pipe.vae, dataset, cfg, torch.device("cpu"), progress=False)
    again = cache_latents(pipe.vae, dataset, cfg, torch.device("cpu"), progress=False)
    assert len(cached) == len(examples) > 1
    scaling = pipe.vae.config.scaling_factor
    down = 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # 8 for SD's VAE, 2 for the tiny
    with torch.no_grad():
        for i, latent in enumerate(cached):
            dist = pipe.vae.encode(dataset.pixels(i).unsqueeze(0)).latent_dist
            if mode == "sample":
                draw = dist.sample(generator=torch.Generator().manual_seed(5 * 1_000_033 + i))
            else:
                draw = dist.mode()
            side = tuple(s // down for s in examples[i].bucket[::-1])  # bucket is (w, h)
            assert latent.shape == draw[0].shape == (4, *side)
            torch.testing.assert_close(latent, draw[0] * scaling, rtol=0, atol=1e-6)
            assert torch.equal(latent, again[i])
    # and the training batches carry exactly these latents instead of pixels
    dataset.latents = cached
    item = dataset[1]
    assert "pixels" not in item and torch.equal(item["latents"], cached[1])


def test_latent_caching_off_also_trains(tiny_model, lora_images, tmp_path):
    record = train_lora(
        read_any(lora_images),
        tmp_path / "run",
        _cfg(tiny_model, cache_latents=False, max_steps=3),
        progress=False,
    )
    assert record["steps"] == 3


def test_missing_base_model(lora_images, tmp_path, monkeypatch):
    data = read_any(lora_images)
    with pytest.raises(ConfigError, match="base model path .* does not exist"):
        train_lora(data, tmp_path / "a", _cfg(tmp_path / "no-such-model"), progress=False)
    monkeypatch.setattr(base_module, "_hub_reachable", lambda timeout=3.0: False)
    started = time.time()
    with pytest.raises(ConfigError) as err:
        train_lora(data, tmp_path / "b", _cfg("someone/unknown-model"), progress=False)
    assert time.time() - started < 30  # it does not hang on a download
    assert "--base PATH" in str(err.value) and "someone/unknown-model" in str(err.value)


def test_a_device_this_machine_lacks_is_refused_before_the_model_loads(lora_images, tmp_path):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ConfigError, match="'cuda:7': this machine has"):
        # a missing base model would be named first if the model were loaded first
        train_lora(read_any(lora_images), tmp_path / "a", _cfg(tmp_path / "none", device="cuda:7"))
    assert not (tmp_path / "a").exists()
    check_process_device("cuda", 2)  # accelerate launch: each process takes its own GPU
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        check_process_device("cuda:1", 2)


def test_a_run_sets_its_own_device_and_precision_in_a_process_that_ran_accelerate(
    tiny_model, lora_images, tmp_path
):
    """accelerate refused a second precision in one process ("restart your runtime"): an
    experiment's second LoRA variant with another mixed_precision, or a notebook."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    Accelerator(mixed_precision="bf16", cpu=True)  # what ran before in this process
    cfg = _cfg(tiny_model, device="cpu", max_steps=1)
    record = train_lora(read_any(lora_images), tmp_path / "lora", cfg, progress=False)
    assert record["device"] == "cpu" and record["mixed_precision"] == "no"


def test_bad_training_data(tiny_model, lora_images, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(lora_images, folder)
    (folder / "manifest.csv").unlink()
    victim = sorted((folder / "femur").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(ImageLoadError, match=victim.name):
        train_lora(read_any(folder), tmp_path / "a", _cfg(tiny_model), progress=False)
    shutil.copy(lora_images / "femur" / victim.name, victim)
    (folder / "brain" / "duplicate_text_for_each_image.txt").unlink()
    with pytest.raises(DataError, match=r"no caption for .*brain.* has no caption file"):
        train_lora(read_any(folder), tmp_path / "b", _cfg(tiny_model), progress=False)
    assert (
        train_lora(
            read_any(folder),
            tmp_path / "c",
            _cfg(tiny_model, caption_source="paper", max_steps=1),
            progress=False,
        )["steps"]
        == 1
    )
    with pytest.raises(ConfigError, match="no caption for plane"):
        train_lora(
            read_any(folder),
            tmp_path / "d",
            _cfg(tiny_model, caption_source="config", captions={"brain": "x"}),
            progress=False,
        )
    (folder / "thorax").mkdir()
    with pytest.raises(DataError, match="thorax holds no images"):
        read_any(folder)


def test_an_image_whose_bucket_rounds_to_nothing_is_named_before_any_work(tiny_model, tmp_path):
    """kohya's no-upscale bucket of a 640x392 image at resolution 64, step 64: shrunk to 82x50,
    its height rounds to 0 and kohya's own code divides by it (as fulora's did: a
    ZeroDivisionError traceback for `lora train --resolution 64` on the paper's images)."""
    from fulora.lora.buckets import select_bucket

    with pytest.raises(ValueError, match=r"640x392 image shrunk .* \(82x50 px\) has a side"):
        select_bucket((640, 392), resolution=64, step=64)
    assert select_bucket((640, 392), resolution=64, step=16).bucket == (80, 48)
    wide = tmp_path / "data" / "brain" / "wide.png"
    wide.parent.mkdir(parents=True)
    Image.new("L", (640, 392), 128).save(wide)
    (wide.parent / "duplicate_text_for_each_image.txt").write_text("a photo of fetal brain")
    with pytest.raises(DataError, match=f"{wide.name}: .*--bucket-step.*--resolution; now 64"):
        train_lora(read_any(wide.parents[1]), tmp_path / "a", _cfg(tiny_model, bucket_step=64))
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_cli_on_the_real_spanish_images(sample_data, tiny_model, tmp_path, capsys, monkeypatch):
    """`fulora lora train` on the paper's 100 LoRA images, small resolution, then `fulora lora
    inspect` on its file (through ``main``, in this process: a process of its own would only add
    its imports, ~10 s on 2 cores; tests/test_cli.py runs the console script itself)."""
    monkeypatch.chdir(tmp_path)
    paper = Path(__file__).parents[2] / "configs" / "lora-paper.yaml"
    code = main(
        ["-q", "lora", "train", "--base", str(tiny_model), "--data"]
        + [str(sample_data / "spain_lora_train"), "--out", "run", "--config", str(paper)]
        + ["--resolution", "64", "--set", "bucket_step=16", "--rank", "4", "--alpha", "4"]
        + ["--max-steps", "5", "--set", "sample_steps=2", "--checkpoint-every", "0"]
        + ["--sample-every", "0"]
    )
    assert code == 0, capsys.readouterr().err[-3000:]
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert done["steps"] == 5 and done["images"] == 100
    assert sum(done["buckets"].values()) == 100
    assert all(int(w) > int(h) for w, h in (b.split("x") for b in done["buckets"]))  # landscape
    capsys.readouterr()
    assert main(["lora", "inspect", str(tmp_path / "run" / "fetal_ultrasound.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "kohya LoRA" in printed
    assert "rank 4, alpha 4.0" in printed and "a photo of fetal ultrasound" in printed


def test_a_diverged_lora_stops_and_saves_nothing_from_then_on(tiny_model, lora_images, tmp_path):
    """Learning rates far too high turn the LoRA's weights into NaN (fp32 on the CPU: no
    mixed-precision scaler skips the step): training stops at that step and says what to
    change, and no LoRA file, sample grid or done.json is written."""
    from fulora.errors import NonFiniteError

    cfg = _cfg(tiny_model, unet_lr=1e30, text_encoder_lr=1e30, checkpoint_every=0)
    with pytest.raises(NonFiniteError, match=r"LoRA after step \d.*--unet-lr and --text-encoder"):
        train_lora(read_any(lora_images), tmp_path / "run", cfg, progress=False)
    assert not list((tmp_path / "run").glob("*.safetensors"))
    assert not (tmp_path / "run" / "samples").exists()
    assert not (tmp_path / "run" / "done.json").exists()


@pytest.mark.parametrize("overflowing", [{3, 7}, set(range(2, 30))])
def test_a_lora_whose_updates_mixed_precision_keeps_skipping_stops(
    tiny_model, lora_images, tmp_path, monkeypatch, overflowing
):
    """fp16's scaler skips a step whose loss overflowed, so the weights stay finite; weights
    grown too large for fp16 overflow at every step, and the LoRA learns nothing more. An
    overflow now and then is normal (the run goes on); ten steps in a row stop it, saying what
    to change, with no LoRA file written. CPU runs in fp32 without a scaler, so the skipped
    update is played here: no optimiser step, an infinite loss."""
    from fulora.errors import NonFiniteError
    from fulora.lora import train as train_module

    optimise = train_module._optimise

    def scaler_skips(state, loss):
        if state.step not in overflowing:
            return optimise(state, loss)
        state.optimizer.zero_grad(set_to_none=True)
        state.lr_scheduler.step()
        return float("inf")

    monkeypatch.setattr(train_module, "_optimise", scaler_skips)
    cfg = _cfg(tiny_model, max_steps=16, checkpoint_every=0)
    out = tmp_path / "run"
    if len(overflowing) < train_module.MAX_NONFINITE_IN_A_ROW:
        train_lora(read_any(lora_images), out, cfg, progress=False)
        assert (out / "done.json").is_file()
        return
    with pytest.raises(NonFiniteError, match=r"last 10 steps \(to step 12\).*--unet-lr"):
        train_lora(read_any(lora_images), out, cfg, progress=False)
    assert not list(out.glob("*.safetensors")) and not (out / "done.json").exists()


def test_training_speed_leaves_out_saving_the_lora(tiny_model, lora_images, tmp_path, monkeypatch):
    """The steps/s the GPU suite reports end with the last step: a refactor once let them run
    on through saving the LoRA and the last sample grid, which cut the H200's figure for the
    paper recipe from 4.7 to 1.2 steps/s. The steady window lies inside the training window,
    so its rate can never fall below (steps - warm-up) / training seconds."""
    from fulora.lora import train as train_module

    real = train_module.save_final

    def slow_save(*args, **kwargs):
        time.sleep(2.0)  # a large LoRA's file on a slow disk
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_final", slow_save)
    record = train_lora(read_any(lora_images), tmp_path / "run", _cfg(tiny_model), progress=False)
    steady_steps = record["steps"] - train_module.WARMUP_STEPS
    # seconds_training is rounded to 0.01 s, up to 1% of this tiny run's half a second
    seconds = record["seconds_training"] + 0.005
    assert record["steady_steps_per_s"] >= steady_steps / seconds
    assert record["steps"] / record["steps_per_s"] == pytest.approx(seconds - 0.005, abs=0.006)


@pytest.mark.gpu
def test_device_cpu_trains_on_the_cpu_beside_a_gpu(tiny_model, lora_images, tmp_path):
    """accelerate once took the GPU whatever the device (so did the demo's ``--device cpu``)."""
    record = train_lora(
        read_any(lora_images),
        tmp_path / "lora",
        _cfg(tiny_model, device="cpu", max_steps=2),
        progress=False,
    )
    assert record["device"] == "cpu" and record["mixed_precision"] == "no"


@pytest.mark.gpu
def test_the_paper_lora_recipe_runs_as_the_paper_ran_it_on_cuda(tiny_model, lora_images, tmp_path):
    """8-bit AdamW (bitsandbytes), fp16 mixed precision, clip skip 2: what the record says is
    what ran (no silent fallback to torch's AdamW or to fp32), and the loss stays finite."""
    pytest.importorskip("bitsandbytes")
    cfg = _cfg(
        tiny_model,
        optimizer="adamw8bit",
        repeats=2,
        max_steps=8,
        unet_lr=1e-3,
        text_encoder_lr=1e-3,
    )
    assert (cfg.optimizer, cfg.mixed_precision, cfg.clip_skip) == ("adamw8bit", "fp16", 2)
    record = train_lora(read_any(lora_images), tmp_path / "lora", cfg, progress=False)
    assert record["optimizer"] == "AdamW8bit" and record["mixed_precision"] == "fp16"
    assert record["device"].startswith("cuda") and record["peak_gpu_memory_gb"] > 0
    loss = pd.read_csv(tmp_path / "lora" / "loss.csv")["loss"]
    assert len(loss) == 8 and np.isfinite(loss).all()


def test_a_bucket_far_from_the_base_models_size_is_warned_of(
    tiny_model, lora_images, tmp_path, caplog
):
    """The paper recipe's 512 px buckets on a 64 px model once trained without a word."""
    data = read_any(lora_images)
    for resolution, far in ((64, False), (160, True)):
        cfg = _cfg(tiny_model, max_steps=1, resolution=resolution, sample_every=0)
        caplog.clear()
        with caplog.at_level("WARNING", logger="fulora"):
            train_lora(data, tmp_path / str(resolution), cfg, progress=False)
        warned = "the commonest training bucket" in caplog.text
        assert warned == far, caplog.text
        assert not far or "the pixels of 64x64" in caplog.text
