"""addrmem.experiment: the comparison of methods and its run folder."""

import itertools
import json
import time

import pytest
import torch

from addrmem.data import load_dataset
from addrmem.experiment import run_experiment
from addrmem.memory import load_memory
from tiny_run import digits, tiny  # noqa: F401  (digits is a fixture)


def test_run_experiment_writes_the_run_folder(digits, tmp_path):
    run = tmp_path / "run"
    results = run_experiment(tiny(), digits, str(run), progress=False)
    assert set(results["methods"]) == {"addressable", "image", "addressable_undistilled", "image_undistilled",
                                       "random_real", "full_data"}
    assert json.loads((run / "results.json").read_text()) == results
    for name in ("config.yaml", "log.jsonl", "checkpoint.pt", "memory.pt", "bases.png", "recall.png", "curve.png",
                 "baseline-image/memory.pt", "baseline-image/recall.png", "baseline-image/log.jsonl"):
        assert (run / name).is_file(), name
    m = results["methods"]
    assert m["addressable"]["num_floats"] <= m["image"]["num_floats"] == m["random_real"]["num_floats"] == 640
    for kind in ("addressable", "image"):  # the undistilled start: same storage, its own accuracy, no iteration
        start = m[f"{kind}_undistilled"]
        assert start["num_floats"] == m[kind]["num_floats"] and start["images"] == m[kind]["images"]
        assert "iteration" not in start
        if m[kind]["iteration"] == 0:  # validation chose the start itself: evaluated alike, the same numbers
            assert start["test"] == m[kind]["test"]
        assert [p["iteration"] for p in results["curves"][kind]] == [0, 2, 4]
    assert m["random_real"]["images"] == 10 and m["full_data"]["images"] == len(digits.train[1])
    assert results["device"] == "cpu" and set(results["seconds"]) == set(m)
    with pytest.raises(FileExistsError, match="not empty"):
        run_experiment(tiny(), digits, str(run), progress=False)
    assert run_experiment(tiny(), digits, str(run), resume=True, progress=False)["methods"] == m


def test_seconds_keep_full_precision(digits, tmp_path, monkeypatch):
    """However fast the machine, the seconds are the clock's, unrounded, and add up
    (they were rounded to 0.1 s, and a fast run's came out 0.0)."""
    clock = itertools.count(start=1000.0, step=0.001)  # every reading 1 ms after the one before
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    results = run_experiment(tiny(), digits, str(tmp_path / "run"), progress=False)
    seconds = results["seconds"]
    for method, s in seconds.items():
        assert s["test"] > 0 and s["test"] != round(s["test"], 1), (method, s)
    assert seconds["addressable"]["distill"] > 0 and seconds["random_real"]["distill"] == 0
    assert results["distill_seconds"] == sum(s["distill"] for s in seconds.values())
    assert results["test_seconds"] == sum(s["test"] for s in seconds.values())
    assert results["wall_seconds"] == results["distill_seconds"] + results["test_seconds"]


def test_the_baseline_has_no_regulariser_and_its_own_outer_rate(digits, tmp_path):
    run = tmp_path / "run"
    results = run_experiment(tiny(coeff_reg="l1", iterations=1, full_data_epochs=0, baseline_outer_lr=0.05), digits,
                             str(run), progress=False)
    assert set(results["methods"]) == {"addressable", "image", "addressable_undistilled", "image_undistilled",
                                       "random_real"}
    baseline = (run / "baseline-image" / "config.yaml").read_text()
    assert "coeff_reg: none" in baseline and "outer_lr: 0.05" in baseline  # at its own outer rate


def test_cross_architecture_and_no_full_data(digits, tmp_path):
    config = tiny(eval_archs=["convnet", "mlp"], full_data_epochs=0)
    results = run_experiment(config, digits, str(tmp_path / "run"), progress=False)
    assert results["archs"] == ["mlp", "convnet"]  # the distillation network first, once
    assert set(results["methods"]) == {"addressable", "image", "addressable_undistilled", "image_undistilled",
                                       "random_real"}
    for m in results["methods"].values():
        assert set(m["archs"]) == {"mlp", "convnet"} and m["test"] == m["archs"]["mlp"]
        assert len(m["archs"]["convnet"]["runs"]) == 1


def test_zca_is_saved_with_the_memory_and_undone_in_the_grids(tmp_path):
    whitened = load_dataset("digits", zca=0.1)
    run = tmp_path / "run"
    run_experiment(tiny(zca=0.1, full_data_epochs=0), whitened, str(run), progress=False)
    saved = load_memory(str(run / "memory.pt"))
    zca = saved.extra["preprocessing"]["zca"]
    assert zca["reg"] == 0.1 and torch.equal(zca["eigenvectors"], whitened.zca.state_dict()["eigenvectors"])
    for name in ("recall.png", "bases.png"):
        assert (run / name).stat().st_size > 100


def test_dataset_preprocessing_must_match_the_config(digits, tmp_path):
    with pytest.raises(ValueError, match="zca"):
        run_experiment(tiny(zca=0.1), digits, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_run_experiment_fails_before_writing(digits, tmp_path):
    with pytest.raises(ValueError, match="n_bases"):
        run_experiment(tiny(n_bases=100), digits, str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


def test_run_folder_under_a_regular_file(digits, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        run_experiment(tiny(), digits, str(tmp_path / "file" / "run"), progress=False)
