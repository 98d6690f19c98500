"""Smoke test of benchmarks/outer_step.py: a --quick CPU run prints the table
and writes JSON whose parts (from the wall clock and from the profiler ranges,
including addrmem.hypergradient's own) are positive and add up."""

import json

import pytest
from benchmark_scripts import load


def load_script():
    return load("outer_step")


def test_quick_cpu_run(tmp_path, capsys):
    outer_step = load_script()
    path = tmp_path / "o.json"
    assert outer_step.main(["--quick", "--device", "cpu", "--iterations", "1", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    for _, label in outer_step.ROWS:
        assert label in printed
    assert "seconds per outer iteration" in printed and "not measured on the CPU" in printed

    result = json.loads(path.read_text())
    assert result["setting"]["steps"] == 5 and result["device_type"] == "cpu" and result["iterations"] == 1
    assert result["memory"]["per_class"] == 14
    assert result["peak_memory_bytes"] is None and result["profiled"]["gpu_ranges"] is None
    wall, prof = result["wall"]["median"], result["profiled"]["median"]
    assert set(wall) == {*outer_step.PARTS, "iteration"}
    assert set(prof) == {*outer_step.PARTS, *outer_step.LOOPS, "hypergradient_other", "op", "iteration"}
    assert result["seconds_per_iteration"] == wall["iteration"]
    for times in (wall, prof):
        assert all(times[part] > 0 for part in outer_step.PARTS)
        assert sum(times[part] for part in outer_step.PARTS) <= times["iteration"] * (1 + 1e-9)
        # most of the iteration is in its parts (not all: a busy machine can stall between them)
        assert sum(times[part] for part in outer_step.PARTS) >= 0.5 * times["iteration"]
    # The hypergradient's two loops (its record_function ranges) lie inside it. (Which costs more is a
    # timing, left to the benchmark: on a busy machine either can.)
    assert 0 < prof["inner_forward"] and 0 < prof["reverse"]
    assert prof["inner_forward"] + prof["reverse"] <= prof["hypergradient"] * (1 + 1e-9)
    assert 0 <= prof["hypergradient_other"] < prof["hypergradient"]
    # The fused op runs inside the hypergradient's loops; its share is printed.
    assert 0 < prof["op"] < prof["inner_forward"] + prof["reverse"]
    assert "the fused op" in printed


def test_overrides_and_help(tmp_path, capsys):
    outer_step = load_script()
    path = tmp_path / "o.json"
    assert outer_step.main(["--quick", "--device", "cpu", "--iterations", "1", "--steps", "1", "--n-per-c", "2",
                            "--net", "mlp", "--augment", "--dtype", "float64", "--json", str(path)]) == 0
    setting = json.loads(path.read_text())["setting"]
    assert (setting["steps"], setting["n_per_c"], setting["net"], setting["augment"]) == (1, 2, "mlp", True)
    assert outer_step.main(["--quick", "--device", "cpu", "--iterations", "1", "--steps", "1", "--net-width", "4",
                            "--net-depth", "1", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert (result["setting"]["net_width"], result["setting"]["net_depth"]) == (4, 1)
    assert result["net_weights"] == 4 * 9 + 4 + 4 + 4 + 4 * 16 * 10 + 10  # conv, norm, linear on 4x4 maps
    with pytest.raises(SystemExit) as exc:
        outer_step.main(["--help"])
    assert exc.value.code == 0 and "--iterations" in capsys.readouterr().out


def test_cpu_cifar_preset():
    setting = load_script().CPU_CIFAR
    assert (setting.image_shape, setting.n_bases, setting.downsample, setting.net, setting.net_width,
            setting.net_depth, setting.steps, setting.n_per_c, setting.real_per_class) == (
        (3, 32, 32), 16, 2, "convnet", 32, 0, 10, 10, 64)


@pytest.mark.parametrize("argv", [["--iterations", "0"], ["--steps", "-1"], ["--dtype", "int8"],
                                  ["--net-width", "0"], ["--net-depth", "-1"], ["--cpu-cifar", "--mnist"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit) as exc:
        load_script().main(["--quick", "--device", "cpu", *argv])
    assert exc.value.code == 2


def test_a_network_too_deep_for_the_images_is_refused(capsys):
    assert load_script().main(["--quick", "--device", "cpu", "--net-depth", "4"]) == 2
    assert "error:" in capsys.readouterr().err


def test_n_per_c_beyond_the_memory_is_refused(capsys):
    assert load_script().main(["--quick", "--device", "cpu", "--n-per-c", "15"]) == 2
    assert "exceeds the memory's 14 rows per class" in capsys.readouterr().err
