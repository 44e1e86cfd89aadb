"""The console script: real subprocess runs, clear errors without tracebacks."""

import json
import subprocess
import sys

import pytest

from fulora.cli import _STAGES, build_parser, main


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
    assert report["missing"] == 0  # unreadable is not missing


def test_inspect_reports_missing_images_of_a_csv(sample_data, capsys):
    assert main(["data", "inspect", str(sample_data / "manifests" / "spain_other_train.csv")]) == 0
    out = capsys.readouterr().out
    assert "230 images" in out and "missing file" in out
    # Every image missing: the likely cause and the flag for it, not a claim of --no-images.
    assert "none of the 230 images is where the CSV is" in out and "--images FOLDER" in out
    assert "--no-images" not in out and "none could be opened" in out
    csv = str(sample_data / "manifests" / "spain_other_train.csv")
    assert main(["data", "inspect", csv, "--json", "--no-images"]) == 0
    assert json.loads(capsys.readouterr().out)["missing"] == 230


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


@pytest.mark.parametrize(
    ("args", "said"),
    [
        # argparse of Python 3.11 names an unknown flag only; the command's own close ones
        (
            ["generate", "--out", "g", "--per-plane", "2"],
            "fulora generate: error: unrecognized arguments: --per-plane 2 "
            "(did you mean --planes or --per-class for --per-plane?)",
        ),
        (
            ["experiment", "run", "x.yaml", "--outt", "r", "--dry-rum"],
            "fulora experiment run: error: unrecognized arguments: --outt r --dry-rum "
            "(did you mean --out for --outt, --dry-run for --dry-rum?)",
        ),
        (
            ["data", "inspect", "x", "--zzzz"],
            "fulora data inspect: error: unrecognized arguments: --zzzz\n",  # no hint
        ),
    ],
)
def test_an_unknown_flag_is_named_with_the_commands_flags_close_to_it(args, said, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert said in capsys.readouterr().err


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("fulora ")


@pytest.mark.parametrize("stage", list(_STAGES))
def test_a_stage_built_alone_has_every_command_and_flag_it_has_in_the_full_parser(
    stage, cli_commands
):
    """``main`` builds only the named stage's flags; they must be the full parser's own."""
    full, alone = (
        {
            path: command.format_help()
            for path, command in cli_commands(parser).items()
            if path[:1] == (stage,)
        }
        for parser in (build_parser(), build_parser(only=stage))
    )
    assert alone == full and len(full[(stage,)]) > 100


# Measured on a 2-core machine before stages were built alone: `fulora --help` took 7.7 s, all
# of it importing every stage's config module (torch, scikit-learn, SciPy, matplotlib).
@pytest.mark.parametrize(
    ("args", "prints", "not_imported"),
    [
        (["--help"], "usage: fulora", ["torch", "sklearn", "scipy", "matplotlib"]),
        (["--version"], "fulora ", ["torch", "sklearn", "scipy", "matplotlib"]),
        (["report", "--help"], "usage: fulora report", ["torch", "sklearn", "scipy"]),
        (["generate", "--help"], "usage: fulora generate", ["sklearn", "matplotlib"]),
    ],
)
def test_a_command_imports_only_what_its_stage_needs(args, prints, not_imported):
    code = (
        "import sys\nfrom fulora.cli import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit:\n    pass\n"
        "print(' '.join(sorted(sys.modules)), file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    modules = set(result.stderr.split())
    assert "fulora.cli" in modules and result.stdout.startswith(prints), result.stdout[:200]
    assert not modules & set(not_imported)
