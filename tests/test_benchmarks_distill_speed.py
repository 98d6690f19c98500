"""Tests of benchmarks/distill_speed.py.

The float64 runs are the correctness test of the benchmark's official-style
implementation: it must give addrmem's hypergradient (and, after the same
updates, the same memory) to rounding, on --quick's 1-channel images and on
3-channel ones with and without upsampling. The float32 checks use the MLP:
on the quick ConvNet, float32 rounding alone flips enough ReLU masks to move the
hypergradient by about 1e-4 (see the script's docstring), so a 1e-4 check
there would test luck, not the implementations.
"""

import json
import math

import pytest
import torch
from benchmark_scripts import load


def load_script():
    return load("distill_speed")


def run_quick(tmp_path, *argv, device="cpu"):
    path = tmp_path / "d.json"
    assert load_script().main(["--quick", "--device", device, "--iterations", "1", "--json", str(path),
                               *argv]) == 0
    return json.loads(path.read_text())


def check_timings(result, iterations=1):
    for name in ("addrmem", "official"):
        assert len(result["runs"][name]) == iterations and all(t > 0 for t in result["runs"][name])
        assert result["seconds_per_iteration"][name] > 0
    ratio = result["seconds_per_iteration"]["official"] / result["seconds_per_iteration"]["addrmem"]
    assert result["speedup"] == pytest.approx(ratio)


def test_float64_the_two_implementations_agree(tmp_path, capsys):
    result = run_quick(tmp_path, "--dtype", "float64", "--steps", "3")
    printed = capsys.readouterr().out
    assert "seconds per outer iteration" in printed and "speed-up (b)/(a)" in printed
    assert "peak GPU memory allocated" in printed and "n/a" in printed
    assert result["setting"]["steps"] == 3 and result["setting"]["net"] == "convnet"
    assert result["memory"]["per_class"] == 14
    assert result["device_type"] == "cpu" and result["dtype"] == "float64" and result["seed"] == 0
    assert result["tf32"] is False and result["tf32_vs_float32_hypergradient"] is None
    assert result["float64_reference_difference"] is None
    assert set(result["build_info"]) >= {"cuda", "torch_built", "torch_runtime"}
    check_timings(result)
    assert result["peak_memory_bytes"] == {"addrmem": None, "official": None}
    assert result["resident_memory_bytes"] is None
    for name in ("bases", "addresses"):
        diff = result["hypergradient_difference"][name]
        assert diff["norm"] > 0 and diff["rel"] < 1e-10, (name, diff)
        assert result["memory_difference_after"][name]["rel"] < 1e-10
    loss = result["warmup_loss"]
    assert loss["addrmem"] == pytest.approx(loss["official"], rel=1e-12)
    assert result["target"]["agreement_met"] is True and result["target"]["target_run"] is False


def test_float64_agree_on_rgb_images_without_downsampling_too():
    """--quick has one channel and ds=2: check (b)'s (K, C*h*w) layout on
    3-channel bases, with ds=2 and with ds=1 (no F.interpolate)."""
    script = load_script()
    for downsample, n_bases in ((2, 4), (1, 2)):
        setting = script.QUICK.__class__("rgb", (3, 8, 8), 4, 1, n_bases, downsample, "convnet", 2, 2, 4, 20, False)
        job = script.Job(setting, torch.device("cpu"), torch.float64, 1)
        runners = script.make_runners(job)
        assert runners["official"].loop.real.images.data_ptr() == job.real_images.data_ptr()  # one pool
        first, _, _ = script.warm_up(runners)
        diff = script.compare(first["addrmem"][1], script.agreement_view(first["official"][1], job.memory))
        for name in ("bases", "addresses"):
            assert diff[name]["norm"] > 0 and diff[name]["rel"] < 1e-10, (downsample, name, diff)


def test_float32_the_two_implementations_agree(tmp_path, capsys):
    result = run_quick(tmp_path, "--net", "mlp", "--fp64-reference", "--seed", "3")
    printed = capsys.readouterr().out
    assert "against addrmem's float64 one" in printed
    assert result["dtype"] == "float32" and result["setting"]["net"] == "mlp" and result["seed"] == 3
    check_timings(result)
    assert result["peak_memory_bytes"] == {"addrmem": None, "official": None}
    for name in ("bases", "addresses"):
        assert result["hypergradient_difference"][name]["rel"] < 1e-4
        for impl in ("addrmem", "official"):
            assert result["float64_reference_difference"][impl][name]["rel"] < 1e-4
    assert result["target"]["agreement_met"] is True


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        load_script().main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--iterations" in out and "--tf32" in out


def test_network_size(tmp_path):
    result = run_quick(tmp_path, "--dtype", "float64", "--steps", "2", "--net-width", "4", "--net-depth", "2")
    assert (result["setting"]["net_width"], result["setting"]["net_depth"]) == (4, 2)
    for name in ("bases", "addresses"):
        assert result["hypergradient_difference"][name]["rel"] < 1e-10


BAD = [["--iterations", "0"], ["--steps", "-1"], ["--dtype", "bfloat16"], ["--seed", "-1"],
       ["--net-width", "0"], ["--net-depth", "-1"], ["--cpu-cifar"],
       ["--net", "nonet"], ["--device", "tpu"], ["--fp64-reference", "--dtype", "float64"],
       ["--tf32", "--device", "cpu"], ["--tf32", "--dtype", "float64"]]


@pytest.mark.parametrize("argv", BAD)
def test_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        load_script().main(["--quick", *argv])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_bad_argument(capsys):
    with pytest.raises(SystemExit) as exc:
        load_script().main(["--quick", "--device", "cuda"])
    assert exc.value.code == 2 and "torch sees no CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(tmp_path):
    result = run_quick(tmp_path, "--fp64-reference", device="cuda")  # the ConvNet: timings and memory
    assert result["device_type"] == "cuda" and result["build_info"]["cuda"]
    check_timings(result)
    for name in ("addrmem", "official"):
        assert result["peak_memory_bytes"][name] > result["resident_memory_bytes"] > 0
        for table in ("bases", "addresses"):  # float32 rounding alone moves it (ReLU masks): no tolerance
            assert math.isfinite(result["float64_reference_difference"][name][table]["rel"])

    result = run_quick(tmp_path, "--net", "mlp", "--fp64-reference", device="cuda")
    for name in ("bases", "addresses"):
        assert result["hypergradient_difference"][name]["rel"] < 1e-4
        for impl in ("addrmem", "official"):
            assert result["float64_reference_difference"][impl][name]["rel"] < 1e-4

    result = run_quick(tmp_path, "--dtype", "float64", "--steps", "3", device="cuda")
    for name in ("bases", "addresses"):
        assert result["hypergradient_difference"][name]["rel"] < 1e-10
        assert result["memory_difference_after"][name]["rel"] < 1e-10

    result = run_quick(tmp_path, "--tf32", "--net", "mlp", device="cuda")
    assert result["tf32"] is True
    for name in ("bases", "addresses"):
        assert 0 <= result["tf32_vs_float32_hypergradient"][name]["rel"] < 1e-1
