"""`fulora demo` end to end, reduced, on a fresh folder; then a rerun that skips finished work."""

import pandas as pd

from fulora.demo import run_demo


def test_demo_end_to_end_and_rerun(tmp_path, capsys):
    table = run_demo(tmp_path, per_class=8, synthetic_per_class=4)
    assert list(table["regime"]) == ["real only", "real only", "hybrid", "hybrid"]
    assert set(table["label space"]) == {"all_outputs", "test_classes"}
    assert (table["# synthetic"] == [0, 0, 20, 20]).all()
    saved = pd.read_csv(tmp_path / "results.csv")
    assert len(saved) == 4 and (tmp_path / "results.md").read_text().startswith("| regime |")
    for path in (
        "lora/demo_lora.safetensors",
        "lora/samples/step-000060.png",
        "synthetic/manifest.csv",
        "synthetic/contact_brain.png",
        "eval-hybrid/confusion_matrix_all_outputs.png",
        "classify-real-only/best.pt",
    ):
        assert (tmp_path / path).is_file(), path
    out = capsys.readouterr().out
    assert "NOT pretrained" in out and "ACC" in out
    lora_done = (tmp_path / "lora" / "done.json").stat().st_mtime_ns
    run_demo(tmp_path, per_class=8, synthetic_per_class=4)
    assert (tmp_path / "lora" / "done.json").stat().st_mtime_ns == lora_done  # not retrained
