"""Smoke test of benchmarks/kernel_speed.py: a --quick CPU run writes JSON
with a timed row per method and a passing output check."""

import json

from benchmark_scripts import load


def load_script():
    return load("kernel_speed")


def test_quick_cpu_run_writes_json(tmp_path, capsys):
    kernel_speed = load_script()
    path = tmp_path / "k.json"
    assert kernel_speed.main(["--quick", "--device", "cpu", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "MISMATCH" not in printed

    result = json.loads(path.read_text())
    for key in ("device", "torch", "build_info", "date", "rows"):
        assert key in result
    rows = result["rows"]
    shapes = {row["shape"] for row in rows}
    assert len(shapes) == len(kernel_speed.QUICK_SHAPES)
    for shape in shapes:
        by_method = {row["method"]: row for row in rows if row["shape"] == shape}
        assert set(by_method) == {*kernel_speed.METHODS, "floor", "fresh"}
        assert by_method["fresh"]["fwd_s"] > 0 and by_method["fresh"]["fwd_bwd_s"] is None
        for method in ("addrmem", "eager", "floor"):
            row = by_method[method]
            assert row["fwd_s"] > 0 and row["fwd_bwd_s"] > 0, row
            assert row["match"] is True, row
            assert row["dtype"] == "float32"
        assert by_method["addrmem"]["fwd_vs_addrmem"] == 1.0
        # --quick skips torch.compile unless --compile is given.
        assert by_method["compile"]["fwd_s"] is None and "skipped" in by_method["compile"]["note"]


def test_mismatch_is_reported_not_fatal(tmp_path, capsys, monkeypatch):
    kernel_speed = load_script()
    reference = kernel_speed.addrmem.synthesize_reference

    def wrong(addresses, bases, index=None, scale=1):
        return reference(addresses, bases, index, scale) * 1.1

    monkeypatch.setattr(kernel_speed.addrmem, "synthesize", wrong)
    path = tmp_path / "k.json"
    assert kernel_speed.main(["--quick", "--device", "cpu", "--repeats", "1", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "CHECK" in printed and "MISMATCH" in printed and "WARNING" in printed
    rows = json.loads(path.read_text())["rows"]
    assert rows and not any(row["match"] for row in rows)
