"""addrmem/continual/run.py: no method reads a later task's data, and none
learns from test data; every method's storage stays within the budget in
bytes; the metrics of a hand-made matrix; resume equals an uninterrupted
run; the command prints floats and bytes and names bad input in one line."""

import json
import os

import pytest
import torch

from addrmem.cli import main
from addrmem.continual import METHODS, ContinualConfig, Stream, make_stream, metrics, run_continual
from continual_helpers import TINY, RecordingStream, copy_stream


def test_metrics_of_a_hand_made_matrix():
    R = [[90.0, None, None],
         [70.0, 80.0, None],
         [60.0, 50.0, 100.0]]
    m = metrics(R)
    assert m["ra"] == pytest.approx(70.0)  # (60 + 50 + 100) / 3
    assert m["bti"] == pytest.approx(-30.0)  # ((60 - 90) + (50 - 80)) / 2
    assert m["la"] == pytest.approx(90.0)  # (90 + 80 + 100) / 3
    assert m["curve"] == pytest.approx([90.0, 75.0, 70.0])
    assert metrics([[42.0]]) == {"ra": 42.0, "bti": 0.0, "la": 42.0, "curve": [42.0]}


@pytest.mark.parametrize("protocol, bases", [("replay", "task"), ("retrain", "shared"), ("online", "task")])
def test_every_method_stays_within_budget_and_reads_no_later_task(protocol, bases):
    tiny = {**TINY, "tasks": 3, "distill": {**TINY["distill"], "n_bases": 2}}
    config = ContinualConfig(**tiny, budget_images=6, methods=list(METHODS), protocol=protocol, bases=bases)
    stream = copy_stream(make_stream(config), RecordingStream)
    results = run_continual(config, stream=stream, progress=False)
    assert [t for kind, t in stream.reads if kind == "train"] == [0, 1, 2]
    budget = 6 * 64 * 4  # six float32 8x8 images
    assert results["budget_bytes"] == budget and results["budget_floats"] == 6 * 64
    for name, m in results["methods"].items():
        for key in ("R", "R_val"):
            assert all(m[key][i][j] is None for i in range(3) for j in range(i + 1, 3))
            assert all(0 <= m[key][i][j] <= 100 for i in range(3) for j in range(i + 1))
        if name != "joint":  # the upper bound keeps everything
            assert m["max_bytes"] <= budget, name
    assert results["methods"]["joint"]["num_floats"] == sum(len(stream.plans[t]["train"]) for t in range(3)) * 64
    assert results["methods"]["replay"]["num_floats"] == 6 * 64
    assert results["methods"]["replay-uint8"]["num_floats"] == 24 * 64  # four times the images, in the same bytes
    assert results["methods"]["image"]["num_floats"] == 3 * 2 * 64  # one image per class of each task
    # Addressable, K = 2 bases of 64 floats (128) and rows of 2 coefficients. Bases per task: a task's share,
    # 384 / 3 = 128 floats, leaves no row, so each task keeps one row per class (128 + 2 * 2 = 132 floats) and
    # the oldest task is dropped to fit: 2 * 132. Shared bases: (384 - 128) // 3 = 85 floats per task,
    # 21 rows per class: 128 + 3 * 2 * 21 * 2.
    expected = 2 * 132 if bases == "task" else 128 + 3 * 2 * 21 * 2
    assert results["methods"]["addressable"]["num_floats"] == expected
    assert results["methods"]["addressable"]["num_bytes"] == 4 * expected


def test_nothing_is_learnt_from_test_data():
    """Test images replaced by noise change the test accuracies and nothing else."""
    config = ContinualConfig(**TINY)
    stream = make_stream(config)
    test_images, test_labels = stream.images["test"]
    noisy = dict(stream.images, test=(torch.randn_like(test_images), test_labels))
    other = Stream(stream.name, noisy, stream.plans, stream.num_classes, stream.image_shape, stream.mean, stream.std)
    a = run_continual(config, stream=stream, progress=False)
    b = run_continual(config, stream=other, progress=False)
    for name in config.methods:
        assert a["methods"][name]["R_val"] == b["methods"][name]["R_val"], name
        assert a["methods"][name]["num_floats"] == b["methods"][name]["num_floats"], name
    assert any(a["methods"][n]["R"] != b["methods"][n]["R"] for n in config.methods)


def test_resume_gives_the_uninterrupted_result(tmp_path):
    config = ContinualConfig(**{**TINY, "epochs": 1}, protocol="online")
    whole = run_continual(config, str(tmp_path / "whole"), progress=False)

    class Interrupted(Stream):
        def train(self, t):
            if t == 1:
                raise KeyboardInterrupt
            return super().train(t)

    with pytest.raises(KeyboardInterrupt):
        run_continual(config, str(tmp_path / "cut"), stream=copy_stream(make_stream(config), Interrupted),
                      progress=False)
    assert not os.path.exists(tmp_path / "cut" / "results.json")
    stream = copy_stream(make_stream(config), RecordingStream, first=1)
    resumed = run_continual(config, str(tmp_path / "cut"), resume=True, stream=stream, progress=False)
    assert [t for kind, t in stream.reads if kind == "train"] == [1]  # task 0 came from the checkpoint
    for name in config.methods:
        for key in ("R", "R_val", "ra", "bti", "la", "num_floats", "num_bytes"):
            assert resumed["methods"][name][key] == whole["methods"][name][key], (name, key)
    for name in ("config.yaml", "checkpoint.pt", "results.json", "accuracy.png", "R-addressable.png"):
        assert os.path.isfile(tmp_path / "cut" / name), name


def fails(argv, match):
    """main(argv) exits with one line 'addrmem: error: ...' containing ``match``."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = info.value.code
    assert isinstance(message, str) and message.startswith("addrmem: error: "), message
    assert "\n" not in message and match in message, message


def test_cli_runs_split_digits_and_names_bad_input(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(TINY))  # JSON is YAML
    out = str(tmp_path / "run")
    assert main(["continual", "--config", str(config), "--out", out, "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "addressable" in printed and "val RA" in printed and "bytes" in printed and out in printed
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["seed"] == 2 and set(results["methods"]) == set(METHODS)
    for m in results["methods"].values():
        assert {"ra", "bti", "la", "R", "val", "R_val", "num_floats", "num_bytes", "seconds"} <= set(m)
    fails(["continual", "--benchmark", "nope", "--out", str(tmp_path / "a")], "unknown benchmark 'nope'")
    small = tmp_path / "small.yaml"
    small.write_text("budget_images: 1\ndistill: {n_bases: 8}\n")
    fails(["continual", "--config", str(small), "--out", str(tmp_path / "b")], "too small")
    fails(["continual", "--benchmark", "rotations", "--data-root", str(tmp_path / "absent"),
           "--out", str(tmp_path / "c")], "does not exist")
    fails(["continual", "--resume", out, "--seed", "1"], "--resume")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
