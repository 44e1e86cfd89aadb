"""`fulora demo` end to end, reduced, on a fresh folder; then a rerun that skips finished work."""

import pandas as pd

from fulora.demo import run_demo


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
    out = capsys.readouterr().out
    assert "fulora:phantom-sd" in out and "ACC" in out and "report.html" in out
    lora_done = (tmp_path / "lora" / "r16" / "done.json").stat().st_mtime_ns
    run_demo(tmp_path, per_class=6, synthetic_per_class=4, report=False, lora_steps=20)
    assert (tmp_path / "lora" / "r16" / "done.json").stat().st_mtime_ns == lora_done
    assert "0 stages run, 21 already done" in capsys.readouterr().out
