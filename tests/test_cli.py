"""The console script: real subprocess runs, clear errors without tracebacks."""

import json
import subprocess
import sys

import pytest

from fulora.cli import main


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fulora", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_inspect_african_dev_subprocess(sample_data):
    result = run_cli("data", "inspect", str(sample_data / "african_dev"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "217 images" in out
    assert "abdomen 60, brain 60, femur 61, thorax 36" in out
    assert "Algeria 48, Egypt 48, Ghana 36, Malawi 49, Uganda 36" in out
    assert "L 169, RGB 48" in out and "500x400 (49)" in out
    assert "problems none found" in out


def test_inspect_json_and_problems(tmp_path, make_png, capsys):
    make_png(tmp_path / "brain" / "ok.png")
    bad = make_png(tmp_path / "femur" / "cut.png", size=(200, 200))
    bad.write_bytes(bad.read_bytes()[:100])
    assert main(["data", "inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 2 and report["labels"] == {"brain": 1, "femur": 1}
    assert len(report["problems"]) == 1 and "cut.png" in report["problems"][0]


def test_inspect_reports_missing_images_of_a_csv(sample_data, capsys):
    assert main(["data", "inspect", str(sample_data / "manifests" / "spain_other_train.csv")]) == 0
    out = capsys.readouterr().out
    assert "230 images" in out and "missing file" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "inspect", "/nonexistent/x.csv"], "does not exist"),
        (["data", "manifest", "/nonexistent", "--out", "m.csv"], "does not exist"),
    ],
)
def test_errors_are_one_clear_line(args, message, tmp_path):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_manifest_command_balances_and_splits(sample_data, tmp_path, capsys):
    out = tmp_path / "m.csv"
    assert (
        main(
            [
                "data",
                "manifest",
                str(sample_data / "african_dev"),
                str(sample_data / "spain_lora_train"),
                "--out",
                str(out),
                "--labels",
                "brain",
                "femur",
                "--balance",
                "15",
                "--val-fraction",
                "0.2",
            ]
        )
        == 0
    )
    from fulora.data.manifest import Manifest

    m = Manifest.read(out)
    assert m.counts("label") == {"brain": 15, "femur": 15}
    train = set(m.select(split="train").frame["patient"])
    val = set(m.select(split="val").frame["patient"])
    assert val and not (train & val)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("fulora ")
