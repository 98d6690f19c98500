"""addrmem.distill: config round-trips, seeded reproducibility, exact resume,
atomic checkpoints, NaN detection, the regulariser, evaluation, run folders.
Tiny settings (an MLP, T=3, a few outer iterations, 2 evaluation epochs)."""

import dataclasses
import json
import os

import pytest
import torch

import addrmem.distill as distill_module
from addrmem.data import load_dataset
from addrmem.distill import (Accuracy, DistillConfig, default_config, derive_seed, distill, evaluate,
                             run_experiment)
from addrmem.memory import AddressableMemory, ImageMemory, load_memory

TINY = dict(network="mlp", n_bases=4, downsample=1, steps=3, n_per_c=3, iterations=4, eval_every=2,
            val_nets=1, eval_nets=1, eval_epochs=2, full_data_epochs=2, checkpoint_every=2,
            outer_optimizer="adam", outer_lr=0.03)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def tiny(**overrides):
    return default_config("digits", **{**TINY, **overrides})


def records(log):
    """Log records without their timings."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in log]


# --- config -------------------------------------------------------------------------------


def test_defaults_follow_the_official_readme():
    c = DistillConfig()
    assert (c.steps, c.inner_lr, c.inner_momentum, c.n_per_c, c.real_per_class) == (150, 0.01, 0.9, 32, 64)
    assert (c.outer_optimizer, c.outer_lr, c.outer_momentum, c.clip) == ("sgd", 0.1, 0.5, 2.0)
    assert (c.ipc, c.n_bases, c.downsample, c.task_classes, c.augment) == (1, 16, 2, 0, "none")
    assert (c.eval_nets, c.eval_epochs, c.eval_batch, c.eval_lr, c.eval_momentum) == (10, 300, 640, 0.01, 0.9)
    assert c.coeff_reg == "none"
    assert default_config("digits").downsample == 1  # the tuned digits preset
    assert default_config("mnist") == DistillConfig(dataset="mnist")


def test_config_yaml_round_trip(tmp_path):
    config = tiny(seed=7, coeff_reg="l1", augment="flip_rotate", data_root="/some/where")
    config.to_yaml(tmp_path / "c.yaml")
    assert DistillConfig.from_yaml(tmp_path / "c.yaml") == config
    assert DistillConfig.from_yaml(tmp_path / "c.yaml", seed=8) == dataclasses.replace(config, seed=8)


def test_partial_yaml_fills_in_the_dataset_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 5\ninner_lr: 1\n")
    config = DistillConfig.from_yaml(tmp_path / "c.yaml")
    assert config == default_config("digits", steps=5, inner_lr=1.0)


@pytest.mark.parametrize("values, match", [
    ({"stepz": 3}, "unknown config field"),
    ({"memory": "pixels"}, "memory must be one of"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"outer_lr": -1.0}, "outer_lr must be > 0"),
    ({"steps": "3"}, "steps must be int"),
    ({"memory": "image", "coeff_reg": "l2"}, "needs memory: addressable"),
    ({"eval_archs": ["vgg11", "resnet9"]}, "unknown network 'resnet9'"),
    ({"eval_archs": "vgg11"}, "eval_archs must be list"),
    ({"zca": -0.1}, "zca must be >= 0"),
    ({"full_data_epochs": -1}, "full_data_epochs must be >= 0"),
])
def test_bad_config_values(values, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DistillConfig.from_dict(values)


def test_derive_seed_streams_differ():
    assert derive_seed(0, "val") == derive_seed(0, "val")
    assert len({derive_seed(0, "val"), derive_seed(1, "val"), derive_seed(0, "test"), derive_seed(0, "val", 1)}) == 4


# --- distillation ---------------------------------------------------------------------------


def test_distill_learns_and_logs(digits):
    result = distill(tiny(iterations=6), digits, progress=False)
    assert isinstance(result.memory, AddressableMemory) and result.memory.per_class == 9
    steps = [r for r in result.log if "loss" in r]
    assert [r["iteration"] for r in steps] == list(range(6))
    evaluated = [r["iteration"] for r in result.log if "val_mean" in r]
    assert evaluated == [0, 2, 4, 6]  # every eval_every, and the final memory
    assert result.iteration in evaluated and 0 <= result.val.mean <= 100
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in steps)


def test_same_seed_same_memory(digits):
    a = distill(tiny(), digits, progress=False).memory
    b = distill(tiny(), digits, progress=False).memory
    c = distill(tiny(seed=1), digits, progress=False).memory
    for name, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[name])
    assert not torch.equal(a.bases, c.bases)


def test_image_memory_kind(digits):
    result = distill(tiny(memory="image"), digits, progress=False)
    assert isinstance(result.memory, ImageMemory) and result.memory.per_class == 1


def test_budget_that_cannot_fit(digits):
    with pytest.raises(ValueError, match="at most n_bases"):
        distill(tiny(n_bases=100), digits, progress=False)


def test_resume_equals_uninterrupted(digits, tmp_path, monkeypatch):
    config = tiny(iterations=5, checkpoint_every=2)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for folder in (whole, cut):
        folder.mkdir()
        config.to_yaml(folder / "config.yaml")
    reference = distill(config, digits, str(whole), progress=False)

    real = distill_module.hypergradient
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # iterations 0-2 done, the checkpoint holds 0-1
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill_module, "hypergradient", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(config, digits, str(cut), progress=False)
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["iteration"] == 2
    assert len(records(distill_module._read_log(cut / "log.jsonl"))) == 3  # one record past the checkpoint
    monkeypatch.setattr(distill_module, "hypergradient", real)
    with pytest.raises(FileExistsError, match="resume"):
        distill(config, digits, str(cut), progress=False)
    resumed = distill(config, digits, str(cut), resume=True, progress=False)

    assert records(resumed.log) == records(reference.log)
    assert records(distill_module._read_log(cut / "log.jsonl")) == records(reference.log)
    assert resumed.iteration == reference.iteration
    for name, p in reference.memory.named_parameters():
        assert torch.equal(p, dict(resumed.memory.named_parameters())[name])
    final = [torch.load(f / "checkpoint.pt", weights_only=True) for f in (whole, cut)]
    for key in final[0]["memory"]:
        assert torch.equal(final[0]["memory"][key], final[1]["memory"][key])
    saved = load_memory(str(cut / "memory.pt"))
    assert torch.equal(saved.addresses, reference.memory.addresses)
    assert saved.extra["iteration"] == reference.iteration and len(saved.extra["preprocessing"]["mean"]) == 1
    assert not any(name.endswith(".tmp") for name in os.listdir(cut))


def test_resume_of_a_finished_run_changes_nothing(digits, tmp_path):
    config = tiny()
    config.to_yaml(tmp_path / "config.yaml")
    first = distill(config, digits, str(tmp_path), progress=False)
    again = distill(config, digits, str(tmp_path), resume=True, progress=False)
    assert records(again.log) == records(first.log)
    assert torch.equal(again.memory.bases, first.memory.bases)


def test_corrupt_or_foreign_checkpoint(digits, tmp_path):
    config = tiny()
    config.to_yaml(tmp_path / "config.yaml")
    distill(config, digits, str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="another config"):
        distill(tiny(seed=3), digits, str(tmp_path), resume=True, progress=False)
    blob = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        distill(config, digits, str(tmp_path), resume=True, progress=False)


def test_nan_loss_is_reported(digits, monkeypatch):
    def broken(memory, *args, **kwargs):
        return torch.tensor(float("nan")), {n: torch.zeros_like(p) for n, p in memory.named_parameters()}

    monkeypatch.setattr(distill_module, "hypergradient", broken)
    with pytest.raises(FloatingPointError, match="not finite at iteration 0"):
        distill(tiny(), digits, progress=False)


@pytest.mark.parametrize("reg", ["l1", "l2"])
def test_coefficient_regulariser_acts_on_the_addresses(digits, monkeypatch, tmp_path, reg):
    def zero(memory, *args, **kwargs):
        return torch.tensor(1.0), {n: torch.zeros_like(p) for n, p in memory.named_parameters()}

    monkeypatch.setattr(distill_module, "hypergradient", zero)
    config = tiny(iterations=1, coeff_reg=reg, coeff_reg_alpha=0.5, outer_optimizer="sgd", outer_lr=0.1,
                  outer_momentum=0.0, clip=100.0)
    start = distill_module.build_memory(config, digits)
    config.to_yaml(tmp_path / "config.yaml")
    distill(config, digits, str(tmp_path), progress=False)
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["memory"]
    a = start.addresses.detach()
    step = a.sign() if reg == "l1" else a / a.norm()
    assert torch.allclose(final["addresses"], a - 0.1 * 0.5 * step, atol=1e-6)
    assert torch.equal(final["bases"], start.bases.detach())


# --- evaluation and the experiment ----------------------------------------------------------


def test_evaluate_is_seeded(digits):
    config = tiny(eval_epochs=50)
    images, labels = digits.train[0][:200], digits.train[1][:200]
    a = evaluate(images, labels, digits, config, 2, split="test", seed=1, progress=False)
    b = evaluate(images, labels, digits, config, 2, split="test", seed=1, progress=False)
    assert isinstance(a, Accuracy) and a == b and len(a.runs) == 2
    assert 30 < a.mean <= 100  # 50 full-batch steps on 200 real digits beat chance
    with pytest.raises(ValueError, match="split"):
        evaluate(images, labels, digits, config, 1, split="train", progress=False)


def test_run_experiment_writes_the_run_folder(digits, tmp_path):
    run = tmp_path / "run"
    results = run_experiment(tiny(), digits, str(run), progress=False)
    assert set(results["methods"]) == {"addressable", "image", "random_real", "full_data"}
    assert json.loads((run / "results.json").read_text()) == results
    for name in ("config.yaml", "log.jsonl", "checkpoint.pt", "memory.pt", "bases.png", "recall.png",
                 "baseline-image/memory.pt", "baseline-image/recall.png", "baseline-image/log.jsonl"):
        assert (run / name).is_file(), name
    m = results["methods"]
    assert m["addressable"]["num_floats"] <= m["image"]["num_floats"] == m["random_real"]["num_floats"] == 640
    assert m["random_real"]["images"] == 10 and m["full_data"]["images"] == len(digits.train[1])
    assert results["wall_seconds"] > 0 and results["device"] == "cpu"
    with pytest.raises(FileExistsError, match="not empty"):
        run_experiment(tiny(), digits, str(run), progress=False)
    assert run_experiment(tiny(), digits, str(run), resume=True, progress=False)["methods"] == m
    assert set(results["seconds"]) == set(m) and results["seconds"]["addressable"]["distill"] > 0


def test_cross_architecture_and_no_full_data(digits, tmp_path):
    config = tiny(eval_archs=["convnet", "mlp"], full_data_epochs=0)
    results = run_experiment(config, digits, str(tmp_path / "run"), progress=False)
    assert results["archs"] == ["mlp", "convnet"]  # the distillation network first, once
    assert set(results["methods"]) == {"addressable", "image", "random_real"}
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
