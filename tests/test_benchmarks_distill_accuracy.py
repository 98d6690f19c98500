"""benchmarks/distill_accuracy.py on a tiny digits config: results rows,
learning curves (JSON, PNG), the Markdown table, resume, bad input."""

import json

import pytest
import tiny_run
import yaml
from benchmark_scripts import load
TINY = dict(tiny_run.TINY, dataset="digits", eval_nets=2)


@pytest.fixture(scope="module")
def script():
    return load("distill_accuracy")


def test_rows_curves_and_table(script, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    argv = ["--config", str(config), "--out", str(out), "--seed", "2"]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "rows.json").read_text())
    assert [r["method"] for r in rows] == ["addressable memory", "addressable memory, undistilled start",
                                           "ImageMemory", "ImageMemory, undistilled start", "random real subset",
                                           "full training set"]
    for r in rows:
        assert r["dataset"] == "digits" and r["ipc"] == 1 and r["network"] == "mlp" and r["nets"] == 2
        assert 0 <= r["mean"] <= 100 and r["std"] >= 0 and r["wall_seconds"] >= 0 and r["device"] == "cpu"
        assert "--seed 2" in r["command"]
    assert rows[0]["iterations"] == 4 and rows[1]["iterations"] is None and rows[4]["iterations"] is None
    curves = json.loads((out / "curve.json").read_text())
    assert set(curves) == {"addressable", "image"}
    assert [p["iteration"] for p in curves["addressable"]] == [0, 2, 4]
    assert "| digits | 1 | addressable memory | mlp | 4 |" in printed
    assert (out / "curve.png").stat().st_size > 1000
    # a finished run resumes to the same rows
    assert script.main(argv + ["--resume"]) == 0
    again = json.loads((out / "rows.json").read_text())
    assert [(r["mean"], r["std"]) for r in again] == [(r["mean"], r["std"]) for r in rows]


def test_bad_input_is_one_line(script, tmp_path, capsys):
    assert script.main(["--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "no config file" in capsys.readouterr().err
