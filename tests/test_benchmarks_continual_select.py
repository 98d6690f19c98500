"""benchmarks/continual_select.py on tiny split-digits runs: the setting is
chosen by val RA on the choosing seeds, reported on other seeds, resumed;
overlapping seeds and bad settings are refused."""

import json
import statistics

import pytest
import yaml
from benchmark_scripts import load

from continual_helpers import TINY


@pytest.fixture(scope="module")
def script():
    return load("continual_select")


def test_chooses_on_val_and_reports_other_seeds(script, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "methods": ["replay-uint8", "compressed", "addressable"]}))
    out = tmp_path / "select"
    argv = ["--config", str(config), "--grid", "distill.outer_lr=0.001,0.1", "--choose-seeds", "5",
            "--report-seeds", "6", "7", "--out", str(out)]
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "select.json").read_text())
    val = summary["val_ra"]
    assert set(val) == {"outer_lr=0.001", "outer_lr=0.1"}
    best = max(val, key=lambda s: statistics.mean(val[s]))
    assert summary["chosen"] == {"distill.outer_lr": float(best.split("=")[1])}
    assert set(summary["report"]) == {"6", "7"}
    for seed in ("6", "7"):
        report = yaml.safe_load((out / "report" / f"seed{seed}" / "config.yaml").read_text())
        assert report["seed"] == int(seed) and report["distill"]["outer_lr"] == summary["chosen"]["distill.outer_lr"]
    assert "| addressable |" in printed and "| replay-uint8 |" in printed and "mean val RA" in printed
    assert script.main(argv) == 0  # every run resumes from its finished folder, to the same report
    assert json.loads((out / "select.json").read_text())["report"] == summary["report"]


def test_refuses_overlapping_seeds_and_bad_settings(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["--config", "configs/continual-split-digits.yaml", "--choose-seeds", "1", "--report-seeds",
                     "1", "2", "--out", str(tmp_path / "a")])
    assert "must differ" in capsys.readouterr().err
    assert script.main(["--config", "configs/continual-split-digits.yaml", "--grid", "distill.iterations=0",
                        "--out", str(tmp_path / "b")]) == 2
    assert "iterations must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
