"""Training and evaluation with tiny models on phantom data (fast), and on the real samples."""

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fulora.classify import train as train_module
from fulora.classify.registry import create_model
from fulora.classify.train import ClassifyConfig, load_classifier, train_classifier
from fulora.cli import main
from fulora.data.manifest import Manifest
from fulora.data.phantom import PhantomConfig, generate_phantom
from fulora.errors import ConfigError, DataError
from fulora.evaluate.result import Evaluation
from fulora.evaluate.run import EvaluateConfig, evaluate_model


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    source = generate_phantom(
        root / "source", PhantomConfig(per_class=12, domain="source", grid=False)
    )
    target = generate_phantom(
        root / "target", PhantomConfig(per_class=6, domain="target", grid=False)
    )
    return root, source, target


def _cfg(tmp_path, **kw):
    base = dict(
        arch="tiny_cnn",
        pretrained=False,
        image_size=48,
        epochs=3,
        batch_size=16,
        lr=0.01,
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return ClassifyConfig(**base)


def test_train_reload_and_evaluate(phantom, tmp_path):
    _, source, target = phantom
    record = train_classifier([source], tmp_path / "run", _cfg(tmp_path), progress=False)
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "train_manifest.csv",
        "val_manifest.csv",
        "history.csv",
        "loss_curve.png",
        "best.pt",
        "last.pt",
        "log.txt",
        "done.json",
    ):
        assert (run / name).is_file(), name
    assert record["weights"] == "none (random init)" and record["epochs_run"] == 3
    train_m, val_m = (
        Manifest.read(run / "train_manifest.csv"),
        Manifest.read(run / "val_manifest.csv"),
    )
    assert len(train_m) + len(val_m) == len(source)
    assert not set(train_m.frame["patient"]) & set(val_m.frame["patient"])
    model, meta = load_classifier(run)
    assert meta["classes"] == ["other", "abdomen", "brain", "femur", "thorax"]
    assert meta["weights"] == "none (random init)"
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 5)

    cfg = EvaluateConfig(n_bootstrap=50, cache_dir=str(tmp_path / "cache"))
    result = evaluate_model(run, target, tmp_path / "eval", cfg, progress=False)
    out = tmp_path / "eval"
    for name in (
        "predictions.csv",
        "metrics.json",
        "metrics.csv",
        "per_class.csv",
        "confusion_matrix_all_outputs.png",
        "confusion_matrix_test_classes.png",
        "reliability.png",
        "done.json",
    ):
        assert (out / name).is_file(), name
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == len(target)
    probs = predictions[[f"p_{c}" for c in meta["classes"]]].to_numpy()
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["spaces"]) == {"all_outputs", "test_classes"}
    assert set(saved["per_domain"]) == {"phantom-target"}
    acc = result["spaces"]["all_outputs"]["metrics"]["accuracy"]
    low, high = result["spaces"]["all_outputs"]["ci95"]["accuracy"]
    assert low <= acc <= high
    assert result["spaces"]["all_outputs"]["bootstrap"]["unit"] == "patient"
    # what the results table reads back: the same numbers, typed
    read = Evaluation.read(out)
    assert read.classes == meta["classes"] and read.images == len(target)
    assert read.spaces["all_outputs"].metrics["accuracy"] == acc
    assert read.spaces["all_outputs"].ci95["accuracy"] == (low, high)
    assert (
        read.spaces["test_classes"].unit == "patient"
        and read.spaces["test_classes"].resamples == 50
    )
    assert read.per_domain["phantom-target"].images == len(target)
    assert np.allclose(read.probabilities(), probs) and len(read.labels()) == len(target)


def test_an_evaluation_folder_that_is_broken_is_named(tmp_path):
    with pytest.raises(DataError, match=f"cannot read the evaluation in {tmp_path}"):
        Evaluation.read(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"classes": ["brain"]}))
    (tmp_path / "predictions.csv").write_text("path,label\n")
    with pytest.raises(DataError, match=r"metrics.json has no 'test_classes' entry: rerun"):
        Evaluation.read(tmp_path)


def test_resume_reproduces_the_uninterrupted_run(phantom, tmp_path, monkeypatch):
    _, source, _ = phantom
    cfg = _cfg(tmp_path, augment="da", epochs=3)
    train_classifier([source], tmp_path / "full", cfg, progress=False)
    full = pd.read_csv(tmp_path / "full" / "history.csv")

    calls = {"n": 0}
    original = train_module._write_csv

    def crash_after_two_epochs(path, rows):
        original(path, rows)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_write_csv", crash_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(
            [source], tmp_path / "cut", _cfg(tmp_path, augment="da", epochs=3), progress=False
        )
    assert not (tmp_path / "cut" / "done.json").exists()
    # an unfinished run is no model to evaluate (its best.pt was once taken for the model),
    # unless its best.pt is passed itself
    _, _, target = phantom
    with pytest.raises(DataError, match=r"has not finished .*epoch 2.*pass .*best.pt itself"):
        evaluate_model(tmp_path / "cut", target, tmp_path / "early", progress=False)
    evaluate_model(tmp_path / "cut" / "best.pt", target, tmp_path / "early", progress=False)
    monkeypatch.setattr(train_module, "_write_csv", original)
    train_classifier(
        [source], tmp_path / "cut", _cfg(tmp_path, augment="da", epochs=3), progress=False
    )
    resumed = pd.read_csv(tmp_path / "cut" / "history.csv")
    cols = ["train_loss", "val_loss", "val_accuracy"]
    assert np.allclose(full[cols].to_numpy(), resumed[cols].to_numpy(), rtol=0, atol=1e-6)
    # done: a rerun is a no-op; another config in the same folder is refused
    assert (
        train_classifier(
            [source], tmp_path / "cut", _cfg(tmp_path, augment="da", epochs=3), progress=False
        )["epochs_run"]
        == 3
    )
    with pytest.raises(ConfigError, match="another configuration .*epochs"):
        train_classifier([source], tmp_path / "cut", _cfg(tmp_path, augment="da", epochs=4))
    # other images, same settings: once "nothing to do", the run on the first images answering
    fewer = source.subset(source.frame["label"] != "femur")
    with pytest.raises(ConfigError, match="trained on other images than these"):
        train_classifier([fewer], tmp_path / "cut", _cfg(tmp_path, augment="da", epochs=3))


def test_a_finished_run_does_not_answer_for_images_replaced_in_place(phantom, tmp_path):
    """The same names, other bytes (a dataset re-exported in place): a rerun once said "nothing
    to do" and reported the run on the old images. Runs from before the content hashes were
    recorded are still taken by path and label."""
    _, source, _ = phantom
    images = source.with_values()  # the phantom's images, copied: one is replaced below
    copies = [tmp_path / "data" / f"{k}.png" for k in range(len(source))]
    (tmp_path / "data").mkdir()
    for original, copied in zip(source.paths, copies, strict=True):
        shutil.copyfile(original, copied)
    images.frame["path"] = [str(c) for c in copies]
    cfg = _cfg(tmp_path, epochs=1)
    done = train_classifier([images], tmp_path / "run", cfg, progress=False)
    assert train_classifier([images], tmp_path / "run", cfg, progress=False) == done
    trained_on = Manifest.read(tmp_path / "run" / "train_manifest.csv").paths
    with Image.open(trained_on[0]) as img:
        flipped = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.save(trained_on[0])
    with pytest.raises(ConfigError, match=f"as they were: {trained_on[0]} changed since"):
        train_classifier([images], tmp_path / "run", cfg, progress=False)
    trained_on[1].unlink()
    with pytest.raises(ConfigError, match=r"changed since \(and 1 more\)"):
        train_classifier([images], tmp_path / "run", cfg, progress=False)
    trained_on[0].unlink()
    with pytest.raises(ConfigError, match=f"{trained_on[0]} is gone since"):
        train_classifier([images], tmp_path / "run", cfg, progress=False)
    saved = pd.read_csv(tmp_path / "run" / "train_manifest.csv", dtype=str)
    saved.drop(columns="content_hash").to_csv(tmp_path / "run" / "train_manifest.csv", index=False)
    assert train_classifier([images], tmp_path / "run", cfg, progress=False) == done


def test_bad_inputs(phantom, tmp_path):
    _, source, target = phantom
    missing = source.with_values()
    missing.frame.loc[0, "path"] = str(tmp_path / "gone.png")
    with pytest.raises(DataError, match="gone.png"):
        train_classifier([missing], tmp_path / "a", _cfg(tmp_path), progress=False)
    with pytest.raises(DataError, match="validation set is empty"):
        train_classifier(
            [source],
            tmp_path / "b",
            _cfg(tmp_path),
            progress=False,
            val=source.subset([False] * len(source)),
        )
    # a --val of training images picks the epoch that fits them best: at their path, or copied
    with pytest.raises(DataError, match=r"6 of the 12 validation images in .* are in the train"):
        brain = [m.select(labels=["brain"]) for m in (source, target)]
        val = Manifest.concat([m.subset(np.arange(len(m)) < 6) for m in brain])
        train_classifier([source], tmp_path / "v", _cfg(tmp_path), progress=False, val=val)
    copied = tmp_path / "val" / "renamed.png"
    copied.parent.mkdir()
    shutil.copyfile(source.paths[3], copied)
    copy_row = Manifest.from_records([{"path": copied, "label": source.labels[3]}])
    val = Manifest.concat([target, copy_row])
    with pytest.raises(DataError, match=f"byte-for-byte copies .* same bytes as {source.paths[3]}"):
        train_classifier([source], tmp_path / "v", _cfg(tmp_path), progress=False, val=val)
    assert not (tmp_path / "v" / "config.yaml").exists()
    with pytest.raises(DataError, match="all synthetic"):
        train_classifier(
            [source.with_values(source="synthetic")], tmp_path / "c", _cfg(tmp_path), progress=False
        )
    train_classifier(
        [source.select(labels=["brain", "femur"])],
        tmp_path / "d",
        _cfg(tmp_path, epochs=1),
        progress=False,
    )
    with pytest.raises(
        DataError,
        match=r"test label 'abdomen' \(row 0, .*not a class the model knows \(brain, femur\)",
    ):
        evaluate_model(tmp_path / "d", target, tmp_path / "e", progress=False)
    with pytest.raises(DataError, match="no trained model"):
        evaluate_model(tmp_path / "nothing", target, tmp_path / "f", progress=False)
    # the folder above a run (an experiment's arch folder holds one per seed) names it
    with pytest.raises(DataError, match=r"holds 1 such run folder\(s\): \S+[/\\]d$"):
        load_classifier(tmp_path)
    with pytest.raises(DataError, match="has no images"):
        evaluate_model(tmp_path / "d", target.subset([False] * len(target)), tmp_path / "g")
    # a zero-shot test of the images the classifier trained on (once inflated numbers)
    with pytest.raises(
        DataError, match=r"\d+ of the 12 test images .* are in the classifier's training set"
    ):
        evaluate_model(tmp_path / "d", source.select(labels=["brain"]), tmp_path / "leak")
    # ... and one copied under another name into a test set otherwise unseen
    copied = tmp_path / "copies" / "brain" / "renamed.png"
    copied.parent.mkdir(parents=True)
    shutil.copyfile(source.select(labels=["brain"]).paths[1], copied)
    test = target.select(labels=["brain", "femur"])
    test = Manifest.concat([test, Manifest.from_records([{"path": copied, "label": "brain"}])])
    with pytest.raises(
        DataError, match=r"1 of the \d+ test images .* byte-for-byte copies of images in the cl"
    ):
        evaluate_model(tmp_path / "d", test, tmp_path / "copy", progress=False)
    assert not (tmp_path / "copy").exists()
    evaluate_model(tmp_path / "d", test.subset(test.frame["path"] != str(copied)), tmp_path / "j")
    # one plane: nothing to tell apart (once a 1-class model at 100% accuracy)
    brain = source.select(labels=["brain"])
    with pytest.raises(DataError, match=r"all of one plane \(brain\) in .*: a classifier needs"):
        train_classifier([brain], tmp_path / "h", _cfg(tmp_path), progress=False)
    with pytest.raises(ConfigError, match=r"'classes' names one plane \(brain\)"):
        _cfg(tmp_path, classes=["Brain"])
    # too few patients to hold out a fifth of: the message says what to pass instead
    few = source.subset(source.frame["patient"].isin(sorted(set(source.frame["patient"]))[:4]))
    with pytest.raises(DataError, match=r"only 4 patient\(s\) in [^+]*: give a validation set"):
        train_classifier([few], tmp_path / "i", _cfg(tmp_path), progress=False)


def _cli(capsys, *args: str) -> str:
    """``fulora -q ARGS`` through ``main``, in this process (a process of its own adds only its
    imports, ~9 s on 2 cores); its standard output, after checking it succeeded."""
    capsys.readouterr()
    code = main(["-q", *args])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    return printed.out


def test_cli_source_to_target(phantom, tmp_path, capsys, monkeypatch):
    root, _, _ = phantom
    monkeypatch.chdir(tmp_path)  # the relative --out and --cache-dir
    _cli(
        capsys,
        "classify",
        "train",
        "--train",
        str(root / "source"),
        "--arch",
        "tiny_cnn",
        "--pretrained",
        "false",
        "--image-size",
        "48",
        "--epochs",
        "2",
        "--seeds",
        "0",
        "1",
        "--out",
        "run",
        "--cache-dir",
        "cache",
    )
    assert (tmp_path / "run" / "seed-1" / "best.pt").is_file()
    printed = _cli(
        capsys,
        "evaluate",
        "--model",
        "run/seed-0",
        "--test",
        str(root / "target"),
        "--out",
        "eval",
        "--bootstrap",
        "20",
        "--cache-dir",
        "cache",
    )
    assert "all_outputs" in printed and "test_classes" in printed
    assert (tmp_path / "eval" / "metrics.json").is_file()
    # A refusal
    bad = ["classify", "train", "--train", str(root / "source"), "--arch", "nonsense_net"]
    assert main([*bad, "--pretrained", "false", "--out", str(tmp_path / "x")]) == 2
    assert "unknown architecture 'nonsense_net'" in capsys.readouterr().err


def test_real_spain_to_african_through_the_cli(sample_data, tmp_path, capsys, monkeypatch):
    """Train from scratch on the 100 Spanish LoRA images, evaluate zero-shot on 217 African."""
    monkeypatch.chdir(tmp_path)
    _cli(
        capsys,
        "classify",
        "train",
        "--train",
        str(sample_data / "spain_lora_train"),
        "--arch",
        "tiny_cnn",
        "--pretrained",
        "false",
        "--image-size",
        "64",
        "--epochs",
        "3",
        "--out",
        "run",
        "--cache-dir",
        "cache",
    )
    _cli(
        capsys,
        "evaluate",
        "--model",
        "run",
        "--test",
        str(sample_data / "african_dev"),
        "--out",
        "eval",
        "--bootstrap",
        "50",
        "--cache-dir",
        "cache",
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 217 and metrics["test_classes"] == [
        "abdomen",
        "brain",
        "femur",
        "thorax",
    ]
    assert "other" in metrics["classes"]
    assert set(metrics["per_domain"]) == {"Algeria", "Egypt", "Ghana", "Malawi", "Uganda"}


def test_a_classifier_whose_every_step_mixed_precision_skips_stops(phantom, tmp_path, monkeypatch):
    """Weights grown too large for the autocast type stay finite (the loss scaler skips each
    step whose loss overflowed) but overflow at every step, so the classifier learns nothing
    more: an epoch whose every step was skipped stops the run, saying what to change. Played
    on the CPU with torch's CPU loss scaler and weights scaled by 1e37."""
    from fulora.classify import train as train_module
    from fulora.errors import NonFiniteError

    start_fit = train_module.start_fit

    def overflowing_fit(model, cfg, amp):
        fit = start_fit(model, cfg, amp)
        fit.scaler = torch.amp.GradScaler("cpu")
        with torch.no_grad():
            for weight in model.parameters():
                weight.mul_(1e37)
        return fit

    monkeypatch.setattr(train_module, "start_fit", overflowing_fit)
    _, source, _ = phantom
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"every one of the \d+ steps of epoch 1.*--lr"):
        train_classifier([source], out, _cfg(tmp_path, epochs=3), progress=False)
    assert not (out / "best.pt").exists() and not (out / "done.json").exists()


def test_a_diverged_training_stops_and_its_model_is_not_evaluated(phantom, tmp_path):
    """A learning rate far too high turns the weights into NaN: training stops after that epoch
    and says what to change, saving nothing of it; a model file with NaN weights is not
    evaluated (every NaN output would count as a prediction of the first class)."""
    from fulora.errors import NonFiniteError
    from fulora.evaluate.run import evaluate_model

    _, source, target = phantom
    diverged = tmp_path / "diverged"
    cfg = _cfg(tmp_path, lr=1e30, epochs=2)
    with pytest.raises(
        NonFiniteError, match=r"after epoch 1 .* \(lr 1e\+30: --lr with a new --out"
    ):
        train_classifier([source], diverged, cfg, progress=False)
    assert not (diverged / "best.pt").exists() and not (diverged / "done.json").exists()

    train_classifier([source], tmp_path / "run", _cfg(tmp_path, epochs=1), progress=False)
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(NonFiniteError, match=rf"nan.pt has weights .*: {name}\)"):
        evaluate_model(tmp_path / "nan.pt", target, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_preloaded_uint8_training_set(phantom, tmp_path):
    """The device-resident path (used on GPU) runs the same protocol on CPU too."""
    _, source, _ = phantom
    record = train_classifier(
        [source],
        tmp_path / "run",
        _cfg(tmp_path, preload=True, augment="da", epochs=2),
        progress=False,
    )
    assert record["epochs_run"] == 2
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["train_loss"].notna().all() and (history["images_per_s"] > 0).all()


def test_speed_settings_need_their_switch(tmp_path):
    with pytest.raises(ConfigError, match="'compile_mode' is a setting of torch.compile"):
        _cfg(tmp_path, compile_mode="reduce-overhead")
    with pytest.raises(ConfigError, match="'amp_dtype' is a setting of mixed precision"):
        _cfg(tmp_path, amp=False, amp_dtype="bf16")


def _train_with_and_without(source, tmp_path, setting: str, **kw) -> dict[bool, Path]:
    """Two 2-epoch runs of ``_cfg(**kw)``, with ``setting`` off and on; their folders."""
    runs = {}
    for on in (False, True):
        cfg = _cfg(tmp_path, epochs=2, select="last", **kw, **{setting: on})
        runs[on] = tmp_path / f"run-{setting}-{on}"
        train_classifier([source], runs[on], cfg, progress=False)
    return runs


def _assert_same_training(runs: dict[bool, Path], weights_atol: float) -> None:
    """The two runs' histories within 1e-3 and their best.pt weights within ``weights_atol``,
    with the same keys in the same order."""
    history = {on: pd.read_csv(folder / "history.csv") for on, folder in runs.items()}
    for column in ("train_loss", "train_accuracy", "val_loss", "val_f1_macro"):
        assert np.allclose(history[True][column], history[False][column], rtol=1e-3, atol=1e-3), (
            column
        )
    plain, other = (
        torch.load(runs[on] / "best.pt", weights_only=False)["model"] for on in (False, True)
    )
    assert list(other) == list(plain)
    for key in plain:
        assert torch.allclose(other[key].float(), plain[key].float(), atol=weights_atol), key


@pytest.mark.slow  # inductor compiles on CPU: about 30 s with a cold cache
def test_a_compiled_classifier_trains_the_same_and_saves_plain_weights(phantom, tmp_path):
    """torch.compile changes how the steps run, not what they compute: the history and the
    weights match the uncompiled run's within float rounding, and best.pt holds the module's own
    keys (a compiled wrapper's would carry an ``_orig_mod.`` prefix no loader expects)."""
    runs = _train_with_and_without(phantom[1], tmp_path, "compile")
    _assert_same_training(runs, weights_atol=1e-4)
    model, _ = load_classifier(runs[True])
    assert not model.training


def test_the_fused_sgd_makes_the_same_update(phantom, tmp_path):
    """torch's fused SGD against its default (foreach) implementation over a whole run: the same
    history and weights within float rounding (the reference is torch's own optimizer). SGD's
    update is linear in the gradient, so rounding stays rounding."""
    runs = _train_with_and_without(phantom[1], tmp_path, "fused_optimizer", optimizer="sgd")
    _assert_same_training(runs, weights_atol=1e-5)


def test_the_fused_adamw_makes_torchs_default_update(phantom, tmp_path):
    """torch's fused AdamW against its default (foreach) implementation, as ``start_fit`` builds
    them: three steps on the same gradients give the same weights within float rounding.

    Not compared over a whole run, as SGD is: Adam divides by sqrt(v), so a gradient made of
    rounding noise (a convolution's bias ahead of BatchNorm, which removes it) becomes a step of
    about lr whose sign the rounding sets. How the two kernels round depends on the CPU's vector
    unit: on an AVX2-only AMD EPYC the two runs' weights differed by 0.0185 after 6 steps and
    their validation losses by 0.008, where an earlier machine had kept within 1e-3.
    """
    cfg = _cfg(tmp_path, optimizer="adamw", weight_decay=0.01)
    torch.manual_seed(0)
    template, _ = create_model("tiny_cnn", 5, pretrained=False, log=False)
    fits = {
        on: train_module.start_fit(
            copy.deepcopy(template), replace(cfg, fused_optimizer=on), amp=None
        )
        for on in (False, True)
    }
    assert fits[True].optimizer.defaults["fused"] and not fits[False].optimizer.defaults["fused"]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) * 1e-2 for p in template.parameters()]
        for fit in fits.values():
            for param, grad in zip(fit.model.parameters(), grads, strict=True):
                param.grad = grad.clone()
            fit.optimizer.step()
    params = zip(
        template.parameters(), *(fit.model.parameters() for fit in fits.values()), strict=True
    )
    for start, plain, fused in params:
        assert not torch.equal(plain, start)  # three steps of about lr 1e-2 each
        assert torch.allclose(fused, plain, atol=1e-6, rtol=0)


def test_bf16_on_a_gpu_without_it_stops_before_training(phantom, tmp_path, monkeypatch):
    _, source, _ = phantom
    monkeypatch.setattr(train_module, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    cfg = _cfg(tmp_path, amp_dtype="bf16")
    with pytest.raises(ConfigError, match="Tesla T4 has none: use --amp-dtype fp16"):
        train_classifier([source], tmp_path / "run", cfg, progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "speed",
    [
        dict(amp=False, channels_last=False),  # the paper preset's fp32
        dict(amp=True, amp_dtype="fp16", channels_last=True),  # fulora's defaults on CUDA
        dict(amp=True, amp_dtype="bf16", channels_last=True),
        dict(amp=True, amp_dtype="fp16", channels_last=True, fused_optimizer=True),
        dict(amp=True, amp_dtype="fp16", channels_last=True, preload=True, augment="da"),
    ],
    ids=["fp32", "fp16-channels-last", "bf16-channels-last", "fp16-fused", "fp16-preload-da"],
)
def test_each_precision_trains_on_cuda_and_keeps_fp32_weights(phantom, tmp_path, speed):
    """Each autocast type trains (finite losses) and saves fp32 weights: autocast computes in
    half precision but must never turn the weights themselves into halves."""
    if speed.get("amp_dtype") == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    _, source, _ = phantom
    cfg = _cfg(tmp_path, epochs=2, device="cuda", **speed)
    record = train_classifier([source], tmp_path / "run", cfg, progress=False)
    assert record["device"].startswith("cuda") and record["epochs_run"] == 2
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert np.isfinite(history[["train_loss", "val_loss"]].to_numpy()).all()
    weights = torch.load(tmp_path / "run" / "best.pt", weights_only=False)["model"]
    floats = [t for t in weights.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)
