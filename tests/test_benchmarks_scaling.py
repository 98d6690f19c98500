"""Smoke tests of benchmarks/scaling.py (1 and 2 gloo processes) and
benchmarks/meta_batch.py on the tiny digits job."""

import json

import pytest
import yaml
from benchmark_scripts import load as load_script
from tiny_run import tiny


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(iterations=4, eval_every=2).to_dict()))
    return path


def test_scaling_one_and_two_processes(tmp_path, tiny_yaml, capsys):
    scaling = load_script("scaling")
    out = tmp_path / "s.json"
    assert scaling.main(["--config", str(tiny_yaml), "--processes", "1,2", "--iterations", "2",
                         "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["processes"], r["meta_batch"]) for r in rows] == [(1, 2), (2, 2)]
    parameters = rows[0]["parameters"]
    assert rows[0]["exchanged_bytes"] == 0 and rows[1]["exchanged_bytes"] == (parameters + 1) * 4
    assert all(r["seconds"] > 0 and r["peak_bytes"] > 0 for r in rows)
    assert "received/iter" in capsys.readouterr().out


def test_scaling_refuses_idle_processes(tiny_yaml):
    scaling = load_script("scaling")
    with pytest.raises(SystemExit):
        scaling.main(["--config", str(tiny_yaml), "--processes", "1,4", "--meta-batch", "2"])


def test_meta_batch_at_equal_compute(tmp_path, tiny_yaml, capsys):
    meta_batch = load_script("meta_batch")
    out = tmp_path / "m.json"
    assert meta_batch.main(["--config", str(tiny_yaml), "--meta-batch", "1,2", "--seeds", "0",
                            "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["meta_batch"], r["iterations"]) for r in rows] == [(1, 4), (2, 2)]
    assert all(0 <= r["test_mean"] <= 100 for r in rows)
    with pytest.raises(SystemExit):  # 3 does not divide 4 iterations
        meta_batch.main(["--config", str(tiny_yaml), "--meta-batch", "3"])
    assert meta_batch.main(["--config", str(tiny_yaml), "--meta-batch", "3", "--seeds", "0", "--equal", "steps",
                            "--json", str(out)]) == 0
    assert [(r["meta_batch"], r["iterations"]) for r in json.loads(out.read_text())["rows"]] == [(3, 4)]
