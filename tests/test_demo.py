"""`fulora demo` end to end, reduced, on a fresh folder; then a rerun that skips finished work."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score

from fulora.cli import main
from fulora.data.manifest import Manifest
from fulora.demo import demo_experiment, run_demo
from fulora.errors import ConfigError
from fulora.experiment.layout import ExperimentLayout


@pytest.mark.parametrize(
    "device, message",
    [("gpu", "'device' must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"), ("cuda:7", "CUDA")],
)
def test_demo_refuses_a_device_before_any_work(tmp_path, device, message):
    with pytest.raises(ConfigError, match=message):
        run_demo(tmp_path / "run", device=device)
    assert not (tmp_path / "run").exists()  # no phantom image made first


def test_demo_device_flag_reaches_the_experiment(tmp_path, capsys, monkeypatch):
    """``fulora demo --device``: every stage of the demo's experiment runs on that device."""
    assert demo_experiment(tmp_path, device="cuda")["device"] == "cuda"
    assert demo_experiment(tmp_path)["device"] == "cpu"  # the demo is sized for a CPU
    seen = {}
    monkeypatch.setattr("fulora.demo.run_demo", lambda out, **kw: seen.update(kw, out=out))
    assert main(["demo", "--out", str(tmp_path / "d"), "--device", "auto"]) == 0
    assert seen["device"] == "auto" and seen["out"] == str(tmp_path / "d")
    monkeypatch.undo()
    assert main(["demo", "--out", str(tmp_path / "e"), "--device", "cuda:7"]) == 2
    assert "--device cpu" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_demo_end_to_end_with_report_and_rerun(tmp_path, capsys):
    table = run_demo(tmp_path, per_class=6, synthetic_per_class=4, lora_steps=20)
    assert list(table["Data"][::2]) == ["real-only", "hybrid", "hybrid-filtered"]
    assert set(table["space"]) == {"all_outputs", "test_classes"}
    assert list(table["# synthetic"][:4]) == [0, 0, 20, 20] and set(table["seeds"]) == {3}
    saved = pd.read_csv(tmp_path / "results" / "results.csv")
    assert len(saved) == 6 and "| Data |" in (tmp_path / "results" / "results.md").read_text()
    for path in (
        "experiment.yaml",
        "lora/r16/demo_lora.safetensors",
        "lora/r16/samples/step-000020.png",
        "synthetic/r16/manifest.csv",
        "synthetic/r16/contact_brain.png",
        "evaluate/phantom-target/hybrid/tiny_cnn/seed-1/confusion_matrix_all_outputs.png",
        "classify/real-only/tiny_cnn/seed-0/best.pt",
        "audit/r16/similarity.png",
        "report/report.html",
    ):
        assert (tmp_path / path).is_file(), path
    _check_numbers_against_the_predictions(tmp_path, table)
    out = capsys.readouterr().out
    assert "fulora:phantom-sd" in out and "ACC" in out and "report.html" in out
    # ... and each hybrid regime against real-only, as results/effects.csv has it
    assert "Against real-only" in out and (tmp_path / "results" / "effects.csv").is_file()
    lora_done = (tmp_path / "lora" / "r16" / "done.json").stat().st_mtime_ns
    run_demo(tmp_path, per_class=6, synthetic_per_class=4, report=False, lora_steps=20)
    assert (tmp_path / "lora" / "r16" / "done.json").stat().st_mtime_ns == lora_done
    assert "0 stages run, 21 already done" in capsys.readouterr().out


def _check_numbers_against_the_predictions(run, table):
    """Every ACC and F-score of the table, recomputed with scikit-learn (the reference) from the
    evaluations' predictions.csv and averaged over seeds; the synthetic counts from the
    generation and audit manifests the classifiers trained on."""
    layout = ExperimentLayout(run)
    generated = Manifest.read(layout.synthetic_manifest("r16"))
    kept = Manifest.read(layout.filtered("r16"))
    assert len(generated) == 20 and set(kept.frame["path"]) <= set(generated.frame["path"])
    # the filter rule, image by image: the audit classifier names the prompted plane with at
    # least 0.5 probability and the image is no near-copy (this reduced demo's classifier is
    # weak, so it may keep none; the full demo keeps some)
    audited = pd.read_csv(layout.audit("r16") / "synthetic_audit.csv")
    rule = audited["agrees"] & (audited["p_label"] >= 0.5) & ~audited["near_copy"]
    assert (audited["keep"] == rule).all()
    assert set(audited.loc[rule, "path"]) == set(kept.frame["path"])
    expected_synthetic = {"real-only": 0, "hybrid": len(generated), "hybrid-filtered": len(kept)}
    for _, row in table[table["space"] == "all_outputs"].iterrows():
        regime = row["Data"]
        assert row["# synthetic"] == expected_synthetic[regime], regime
        acc, f1 = [], []
        for seed in range(3):
            folder = layout.evaluation(
                "phantom-target", layout.classifier(regime, "tiny_cnn", seed)
            )
            predictions = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
            acc.append(100 * accuracy_score(predictions["label"], predictions["predicted"]))
            present = sorted(set(predictions["label"]))
            f1.append(
                100
                * f1_score(
                    predictions["label"],
                    predictions["predicted"],
                    labels=present,
                    average="macro",
                    zero_division=0,
                )
            )
        assert row["ACC"] == pytest.approx(np.mean(acc), abs=0.006), regime
        assert row["F-score"] == pytest.approx(np.mean(f1), abs=0.006), regime
