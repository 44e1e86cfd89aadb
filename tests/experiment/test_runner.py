"""The experiment runner: skip finished stages, rerun changed ones, --from, kill and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from fulora.experiment.config import load_experiment
from fulora.experiment.runner import run_experiment

from .conftest import write_config


def _finished(folder: Path, pattern: str) -> list[Path]:
    """The files ``pattern`` matches, less a killed writer's ``.<name>.tmp.png`` (Path.glob's
    ``*`` matches a leading dot, unlike the shell's)."""
    return [p for p in sorted(folder.glob(pattern)) if not p.name.startswith(".")]


def _mtimes(folder: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in _finished(folder, pattern)}


def test_outputs_of_a_finished_experiment(finished_experiment):
    run = finished_experiment
    plan = pd.read_csv(run / "plan.csv")
    kinds = ["lora", "generate", "classify", "audit", "evaluate", "embedding"]
    assert list(plan["kind"].unique()) == kinds
    # LoRA, generation, 3 regimes x 2 seeds, audit, evaluations, the report's t-SNE points
    assert len(plan) == 1 + 1 + 6 + 1 + 6 + 1
    # the t-SNE stage ran the first hybrid classifier on real, synthetic and target images
    points = pd.read_csv(run / "embedding" / "embedding.csv")
    # (a group needs 5 images of a plane: this small run made 4 synthetic ones per plane)
    assert set(points["group"]) == {"real training", "target cohort"}
    assert set(points["plane"]) == {"abdomen", "brain", "femur"}
    assert points[["x", "y"]].notna().to_numpy().all()
    assert json.loads((run / "embedding" / "stage.json").read_text())["label"] == "HB"
    for folder in plan["folder"]:
        assert (run / folder / "done.json").is_file(), folder
        assert json.loads((run / folder / "stage.json").read_text())["key"]
    assert (run / "config.yaml").is_file() and (run / "done.json").is_file()
    assert len(pd.read_csv(run / "data" / "train.csv")) == 18
    table = pd.read_csv(run / "results" / "results.csv", keep_default_na=False)
    assert len(table) == 6  # 3 regimes x 2 label spaces, one target
    assert set(table["Data"]) == {"ES", "HB", "HB-filtered"} and set(table["seeds"]) == {2}
    hb = table[(table["Data"] == "HB") & (table["space"] == "all_outputs")].iloc[0]
    assert hb["LoRA"] == "r4" and hb["# synthetic"] == 12 and hb["Model"] == "tiny_cnn"
    for name in ("ACC", "F-score", "AUC"):
        assert 0 <= hb[f"{name} ci_low"] <= hb[f"{name} ci_high"] <= 100
    # The seed mean in the table is the mean of the two evaluations' numbers.
    accs = [
        json.loads((run / f / "metrics.json").read_text())["spaces"]["all_outputs"]["metrics"][
            "accuracy"
        ]
        for f in plan["folder"]
        if f.startswith("evaluate/target/HB/")
    ]
    assert abs(hb["ACC"] - sum(accs) / 2) < 0.01
    md = (run / "results" / "results.md").read_text()
    assert "| Data | LoRA | Model | # real | # synthetic | ACC |" in md and " ± " in md
    # Each hybrid regime against the only real-only one (no baseline key in this config).
    effects = pd.read_csv(run / "results" / "effects.csv", keep_default_na=False)
    assert set(zip(effects["Data"], effects["baseline"], strict=True)) == {
        ("HB", "ES"),
        ("HB-filtered", "ES"),
    }
    es = table[(table["Data"] == "ES") & (table["space"] == "all_outputs")].iloc[0]
    hb_effect = effects[(effects["Data"] == "HB") & (effects["space"] == "all_outputs")].iloc[0]
    assert abs(hb_effect["ACC diff"] - (hb["ACC"] - es["ACC"])) < 0.02
    assert hb_effect["ACC diff ci_low"] <= hb_effect["ACC diff"] <= hb_effect["ACC diff ci_high"]
    assert "against the baseline" in md
    assert "What each regime does against its baseline" in (run / "report/report.html").read_text()


def test_filtered_regime_trains_on_the_audited_images(finished_experiment):
    run = finished_experiment
    plan = pd.read_csv(run / "plan.csv")
    kinds = list(plan["kind"])
    # The real-only classifiers come before the audit, which comes before hybrid classifiers.
    assert kinds.index("audit") > kinds.index("classify")
    assert plan["stage"][kinds.index("audit") + 1].startswith("classify/HB")
    audit = json.loads((run / "audit/r4/audit.json").read_text())
    # every seed of the real-only classifier labels the images, their probabilities averaged
    assert audit["consistency"]["classifier"].endswith("classify/ES/tiny_cnn/seed-0")
    assert [Path(p).parts[-3:] for p in audit["consistency"]["ensemble"]] == [
        ("ES", "tiny_cnn", "seed-1")
    ]
    kept = audit["filtering"]["kept"]
    filtered = pd.read_csv(run / "audit/r4/filtered.csv")
    assert len(filtered) == kept and (filtered["agrees"]).all()
    done = json.loads((run / "classify/HB-filtered/tiny_cnn/seed-0/done.json").read_text())
    assert done["train_synthetic"] == kept
    text = (run / "report" / "report.html").read_text()
    assert "Synthetic data audit" in text


def test_rerun_skips_change_reruns_and_from(experiment_config, tmp_path, capsys):
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    out = tmp_path / "run"
    first = run_experiment(load_experiment(path), out)
    assert first["ran"] == 7 and first["skipped"] == 0  # with the report's t-SNE points
    lora = _mtimes(out, "lora/r4/*.safetensors")
    images = _mtimes(out, "synthetic/r4/*/*.png")
    assert lora and len(images) == 12

    again = run_experiment(load_experiment(path), out)
    assert again["ran"] == 0 and again["skipped"] == 7
    assert not (out / "superseded").exists()  # nothing changed: nothing to keep
    assert _mtimes(out, "synthetic/r4/*/*.png") == images

    # A classifier setting changed: classifiers, evaluations and the t-SNE points rerun, LoRA
    # and images do not; the old folders are kept under superseded/.
    changed = load_experiment(path, ["classify.settings.epochs=3"])
    third = run_experiment(changed, out)
    assert third["ran"] == 5 and third["skipped"] == 2
    assert _mtimes(out, "lora/r4/*.safetensors") == lora
    assert _mtimes(out, "synthetic/r4/*/*.png") == images
    kept = sorted(p.name for p in (out / "superseded").iterdir())
    assert len([k for k in kept if not k.startswith("experiment-")]) == 5
    # ... and so are the experiment's own config, plan, tables and report of the run before.
    (previous,) = [out / "superseded" / k for k in kept if k.startswith("experiment-")]
    assert {"config.yaml", "done.json", "plan.csv", "results"} <= {
        p.name for p in previous.iterdir()
    }
    assert "epochs: 3" not in (previous / "config.yaml").read_text()
    assert (out / "results" / "results.csv").is_file() and (out / "done.json").is_file()
    assert (
        json.loads((out / "classify/ES/tiny_cnn/seed-0/done.json").read_text())["epochs_run"] == 3
    )

    # --from evaluate: only the evaluations, the t-SNE points (and results, report) run again.
    capsys.readouterr()
    fourth = run_experiment(changed, out, from_stage="evaluate")
    assert fourth["ran"] == 3 and fourth["skipped"] == 4
    dry = run_experiment(changed, out, dry_run=True)
    assert set(dry["stages"].values()) == {"done"}

    # The LoRA folder deleted by hand: it runs again under the same key, and so does every
    # stage that read it, directly or not (on a GPU the new LoRA's images differ); the
    # real-only classifier and its evaluation read nothing that changed.
    shutil.rmtree(out / "lora" / "r4")
    dry = run_experiment(changed, out, dry_run=True)["stages"]
    assert {name for name, state in dry.items() if state == "done"} == {
        "classify/ES/tiny_cnn/seed-0",
        "evaluate/target/ES/tiny_cnn/seed-0",
    }
    fifth = run_experiment(changed, out)
    assert fifth["ran"] == 5 and fifth["skipped"] == 2
    ran = pd.read_csv(out / "stages.csv").query("state == 'ran'")["stage"]
    assert set(ran) == {name for name, state in dry.items() if state != "done"}


def test_killed_mid_generation_resumes_without_redoing_work(experiment_config, tmp_path, capsys):
    """SIGKILL during generation; the rerun keeps the LoRA and the finished images.

    The killed run is a process of its own; the rerun runs here (a CLI process would only add
    its imports, about 10 s on 2 cores).
    """
    experiment_config["generate"]["settings"].update(per_class=10, batch_size=1, steps=3)
    experiment_config["report"]["enabled"] = False
    path = write_config(tmp_path / "experiment.yaml", experiment_config)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fulora", "-q", "experiment", "run", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*command, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(_finished(out, "synthetic/r4/*/*.png")) < 6:
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "synthetic/r4/done.json").exists(), "generation finished before the kill"
    lora = _mtimes(out, "lora/r4/*")
    before = _mtimes(out, "synthetic/r4/*/*.png")
    assert lora and 6 <= len(before) < 30

    capsys.readouterr()
    run_experiment(load_experiment(path), out)
    printed = capsys.readouterr().out
    assert "lora/r4: done, skipped" in printed and "generate/r4: resuming" in printed
    assert _mtimes(out, "lora/r4/*") == lora  # not retrained
    after = _mtimes(out, "synthetic/r4/*/*.png")
    assert len(after) == 30
    assert {k: after[k] for k in before} == before  # finished images not regenerated
    assert not list(out.glob("synthetic/r4/*/.*.tmp*"))  # the killed write's file is gone
    done = json.loads((out / "synthetic/r4/done.json").read_text())
    assert done["images"] == 30
    assert (out / "done.json").is_file() and (out / "results" / "results.csv").is_file()


def test_a_second_experiment_run_into_the_same_folder_stops_before_writing(
    experiment_config, tmp_path
):
    import pytest

    from fulora.errors import FolderInUseError
    from fulora.runs import RunDir

    path = write_config(tmp_path / "exp.yaml", experiment_config)
    out = tmp_path / "run"
    holder = RunDir(out, command="fulora experiment run (the first)").start()
    before = sorted(p.name for p in out.iterdir())  # the lock files and the holder's log
    try:
        with pytest.raises(FolderInUseError, match="the first"):
            run_experiment(load_experiment(path), out)
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        holder.close()


def test_an_interrupted_stage_says_whether_it_resumes_or_restarts(tmp_path):
    from fulora.experiment.stages import Stage
    from fulora.experiment.stages import partial_word as _partial_word

    cases = [  # kind, files the interrupted stage left, what the runner says
        ("lora", [], "restarting (no checkpoint)"),
        ("lora", ["checkpoints/step-20/adapter.safetensors"], "resuming"),
        ("classify", ["config.yaml"], "restarting (no checkpoint)"),
        ("classify", ["last.pt"], "resuming"),
        ("generate", [], "restarting (no checkpoint)"),
        ("generate", ["brain/00000-1.png"], "resuming"),
        # killed during its first write: a temporary file is no finished image
        ("generate", ["brain/.00000-1.k3j2.tmp.png"], "restarting (no checkpoint)"),
        ("lora", ["checkpoints/.step-20-x/lora.safetensors"], "restarting (no checkpoint)"),
        ("audit", [], "rerunning"),
    ]
    for i, (kind, files, word) in enumerate(cases):
        folder = tmp_path / str(i)
        for name in files:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(b"")
        assert _partial_word(Stage(kind, kind, folder, "k", lambda: None)) == word, (kind, files)


def test_inputs_changed_in_place_make_their_stages_stale(
    experiment_config, phantom_domains, tmp_path
):
    """Patient ids rewritten, or an image's pixels replaced: the stages reading them rerun."""
    import shutil

    from fulora.experiment.runner import plan_experiment

    data = tmp_path / "data"
    shutil.copytree(phantom_domains, data)
    experiment_config["data"] = {
        "lora": [str(data / "source")],
        "train": [str(data / "source")],
        "targets": {"target": str(data / "target")},
    }
    path = write_config(tmp_path / "exp.yaml", experiment_config)

    def keys():
        plan = plan_experiment(load_experiment(path), tmp_path / "run")
        return {s.name: s.key for s in plan.stages}

    before = keys()
    assert keys() == before  # nothing changed, nothing stale
    manifest = data / "source" / "manifest.csv"
    frame = pd.read_csv(manifest)
    frame.assign(patient=frame["patient"].astype(str) + "-b").to_csv(manifest, index=False)
    patients = keys()
    assert patients["classify/ES/tiny_cnn/seed-0"] != before["classify/ES/tiny_cnn/seed-0"]
    assert patients["lora/r4"] == before["lora/r4"]  # LoRA training reads no patient ids
    target = sorted((data / "target").glob("brain/*.png"))
    shutil.copyfile(target[1], target[0])  # the target cohort: same path, other pixels
    pixels = keys()
    evaluations = [name for name in pixels if name.startswith("evaluate/")]
    assert evaluations and all(pixels[n] != patients[n] for n in evaluations)
    assert pixels["lora/r4"] == patients["lora/r4"]


_CLASSIFY_KEYED_AT_DEFAULTS = """amp arch augment balance batch_size channels_last classes
early_stopping epochs extra image_size imagenet_weights label_smoothing lr max_per_class
max_synthetic_per_class momentum normalize optimizer preload pretrained resize schedule seed
select synthetic_ratio val_fraction val_metric weight_decay weights""".split()
_GENERATE_KEYED_AT_DEFAULTS = """batch_size channels_last clip_skip color compile contact_sheet
dtype fuse_lora fuse_qkv guidance height lora_scale negative_prompt per_class planes prompts
sampler seed steps vae_slicing vae_tiling width""".split()


def test_settings_added_later_keep_the_stage_keys_of_existing_experiments():
    """A generation setting added after experiments existed (at its default, which keeps the old
    behaviour) stays out of the stage key, so upgrading fulora re-runs no generation."""
    from fulora.experiment.planner import _config_payload
    from fulora.generate.run import GenerateConfig

    payload = _config_payload(GenerateConfig(compile=True))
    assert "compile_mode" not in payload and "inductor_tuning" not in payload
    assert payload["compile"] is True  # settings from before are keyed as they were
    tuned = _config_payload(GenerateConfig(compile=True, compile_mode="max-autotune"))
    assert tuned["compile_mode"] == "max-autotune"  # set otherwise: keyed (it can move pixels)
    assert _config_payload(GenerateConfig(rng="nv"))["rng"] == "nv"  # session 28's noise sources
    assert (
        _config_payload(GenerateConfig(seed_scheme="consecutive"))["seed_scheme"] == "consecutive"
    )
    assert "eta_noise_seed_delta" not in payload and "emphasis" not in payload
    assert _config_payload(GenerateConfig(emphasis="none"))["emphasis"] == "none"
    later = {"variation_seed", "variation_strength", "seed_resize_from_width", "eta_ancestral"}
    later |= {"schedule_type", "beta_schedule_alpha", "beta_schedule_beta"}
    later |= {"skip_early_cfg", "ngms", "ngms_all_steps", "pad_conds", "old_prompt_editing"}
    assert not (later | {"seed_resize_from_height", "eta_ddim"}) & set(payload)
    typed = _config_payload(GenerateConfig(sampler="Euler", schedule_type="exponential"))
    assert typed["schedule_type"] == "exponential"
    varied = GenerateConfig(seed_scheme="consecutive", variation_seed=3, variation_strength=0.5)
    assert _config_payload(varied)["variation_seed"] == 3
    ensd = GenerateConfig(sampler="Euler a", eta_noise_seed_delta=31337)
    assert _config_payload(ensd)["eta_noise_seed_delta"] == 31337
    from fulora.classify.train import ClassifyConfig

    payload = _config_payload(ClassifyConfig())
    assert not {"amp_dtype", "compile", "compile_mode", "fused_optimizer"} & set(payload)
    assert _config_payload(ClassifyConfig(amp_dtype="bf16"))["amp_dtype"] == "bf16"
    assert _config_payload(ClassifyConfig(fused_optimizer=True))["fused_optimizer"] is True
    # at the defaults, exactly the settings keyed before session 9: a field added since that is
    # not in planner._IN_KEY_WHEN_SET (or _NOT_IN_KEY) fails here, not in users' experiments
    assert set(payload) == set(_CLASSIFY_KEYED_AT_DEFAULTS)
    assert set(_config_payload(GenerateConfig())) == set(_GENERATE_KEYED_AT_DEFAULTS)
    from fulora.experiment.config import EvaluateStage

    keyed = ("n_bootstrap", "seed")  # the evaluation key's settings (batch_size changes nothing)
    assert _config_payload(EvaluateStage(n_bootstrap=200), keyed) == {"n_bootstrap": 200}
    assert _config_payload(EvaluateStage(seed=3), keyed) == {"n_bootstrap": 1000, "seed": 3}


def _dry_runs_around(finished_experiment, tmp_path, caplog, unsaid: str, rewrite) -> dict:
    """A copy of the finished experiment dry-run (``unsaid`` not in its warnings), ``rewrite``
    (called with the copy's folder) making a record as an older fulora wrote it, and dry-run
    again: the stages' states (the warnings of both runs in ``caplog``)."""
    out = tmp_path / "run"
    shutil.copytree(finished_experiment, out)
    config = load_experiment(finished_experiment.parent / "experiment.yaml")
    with caplog.at_level("WARNING", logger="fulora"):
        run_experiment(config, out, dry_run=True)
    assert unsaid not in caplog.text
    rewrite(out)
    with caplog.at_level("WARNING", logger="fulora"):
        return run_experiment(config, out, dry_run=True)["stages"]


def _without(key: str, was: str):
    """A rewrite dropping ``key`` (asserted to hold ``was``) from the generation's done.json."""

    def rewrite(out: Path) -> None:
        done = out / "synthetic" / "r4" / "done.json"
        record = json.loads(done.read_text())
        assert record.pop(key) == was
        done.write_text(json.dumps(record))

    return rewrite


def test_a_lora_done_with_the_former_resize_stays_done_and_is_said(
    finished_experiment, tmp_path, caplog
):
    """Before session 25 a LoRA shrank its images with PIL's BOX filter (its config.yaml names
    no resize): the stage keeps its LoRA, and the run says how it was trained."""
    import yaml

    names = []

    def as_before_session_25(out: Path) -> None:
        saved = next(out.glob("lora/*/config.yaml"))
        settings = yaml.safe_load(saved.read_text())
        assert settings.pop("resize") == "area"
        saved.write_text(yaml.safe_dump(settings))
        names.append(f"lora/{saved.parent.name}")

    unsaid = "images shrunk with"
    states = _dry_runs_around(finished_experiment, tmp_path, caplog, unsaid, as_before_session_25)
    assert states[names[0]] == "done"
    assert f"{names[0]}: done, trained on images shrunk with 'box'" in caplog.text
    assert "--from lora" in caplog.text and "lora.settings.resize: box" in caplog.text


def test_a_generation_done_with_a_sampler_since_renamed_stays_done_and_is_said(
    finished_experiment, tmp_path, caplog
):
    """Before session 24 the default DPM++ 2M Karras was diffusers' (its done.json names no
    scheduler): the stage keeps its images, and the run says which sampler made them."""
    unsaid = "images from the sampler"  # made with the sampler it names
    rewrite = _without("scheduler", "A1111DPMSolverMultistepScheduler")
    states = _dry_runs_around(finished_experiment, tmp_path, caplog, unsaid, rewrite)
    assert states["generate/r4"] == "done"
    assert "generate/r4: done, with images from the sampler 'DPM++ 2M Karras (diffusers)'" in (
        caplog.text
    )
    assert "--from generate" in caplog.text


def test_a_generation_rounded_before_session_34_stays_done_and_is_said(
    finished_experiment, tmp_path, caplog
):
    """Before session 34 the pixels were rounded as diffusers rounds them (its done.json names
    no pixel_rounding): the stage keeps its images, and the run says how they were rounded."""
    unsaid = "rounded to 8 bits"  # floored, as its config says
    rewrite = _without("pixel_rounding", "floor")
    states = _dry_runs_around(finished_experiment, tmp_path, caplog, unsaid, rewrite)
    assert states["generate/r4"] == "done"
    assert "generate/r4: done, with pixels rounded to 8 bits by 'round'" in caplog.text
    assert "--from generate" in caplog.text
