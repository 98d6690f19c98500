"""addrmem.distill: one outer step, and the loop: seeded reproducibility, exact
resume, NaN detection, the regulariser. Tiny settings (tests/tiny_run.py)."""

import contextlib
import os

import pytest
import torch

import addrmem.distill as distill_module
from addrmem.distill import STREAMS, OuterLoop, RealPool, build_memory, distill
from addrmem.memory import AddressableMemory, ImageMemory, load_memory
from addrmem.runs import read_log
from tiny_run import digits, records, tiny  # noqa: F401  (digits is a fixture)


def outer_loop(config, dataset, seed=0):
    return OuterLoop(build_memory(config, dataset), config, *dataset.train, dataset.num_classes, seed=seed)


def test_outer_step_draws_from_its_streams_and_updates_the_memory(digits):
    config = tiny(task_classes=4, augment="flip_rotate")
    loop = outer_loop(config, digits)
    memory = loop.memory
    assert set(loop.generators) == set(STREAMS)
    before = {n: p.detach().clone() for n, p in memory.named_parameters()}
    seen, phases = {}, []

    def spy(memory, net, batches, real_images, real_labels, **kw):
        seen.update(batches=batches, real_labels=real_labels, kw=kw, net=net)
        return distill_module.hypergradient(memory, net, batches, real_images, real_labels, **kw)

    def phase(name):
        phases.append(name)
        return contextlib.nullcontext()

    loss, grad_norm = loop.step(gradient=spy, phase=phase)
    assert phases == ["network", "sample", "hypergradient", "update"]
    assert loss > 0 and grad_norm > 0
    classes = seen["real_labels"].unique()
    assert len(classes) == 4 and len(seen["real_labels"]) == 4 * config.real_per_class
    assert len(seen["batches"]) == config.steps
    for index in seen["batches"]:  # n_per_c distinct rows of each sampled class
        assert len(index) == 4 * config.n_per_c and index.unique().numel() == len(index)
        assert set((index // memory.per_class).tolist()) == set(classes.tolist())
    assert seen["kw"]["lr"] == config.inner_lr and seen["kw"]["augment"] is not None
    assert all(p.grad is None for p in memory.parameters())
    assert all(not torch.equal(p, before[n]) for n, p in memory.named_parameters())

    # The same streams give the same step; another seed another.
    assert outer_loop(config, digits).step() == (loss, grad_norm)
    assert outer_loop(config, digits, seed=1).step()[0] != loss


def test_outer_loop_keeps_its_real_pool_beside_the_memory(digits):
    """The pool takes the memory's device and dtype; tensors already there are used, not copied."""
    config = tiny(dtype="float64")
    images = digits.train[0].double()
    loop = OuterLoop(build_memory(config, digits), config, images, digits.train[1], digits.num_classes)
    assert loop.real.images.dtype == torch.float64 and loop.real.images.data_ptr() == images.data_ptr()
    assert outer_loop(tiny(), digits).real.images.dtype == torch.float32


def test_real_pool_samples_distinct_images_per_class(digits):
    real = RealPool(*digits.train, digits.num_classes, torch.device("cpu"), torch.float64)
    images, labels = real.sample([3, 1], 5, torch.Generator().manual_seed(0))
    assert images.dtype == torch.float64 and images.shape == (10, 1, 8, 8)
    assert labels.tolist() == [3] * 5 + [1] * 5
    rows = [int((digits.train[0].double() == image).all(dim=(1, 2, 3)).nonzero()[0]) for image in images]
    assert len(set(rows)) == 10


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
    assert len(records(read_log(cut / "log.jsonl"))) == 3  # one record past the checkpoint
    monkeypatch.setattr(distill_module, "hypergradient", real)
    with pytest.raises(FileExistsError, match="resume"):
        distill(config, digits, str(cut), progress=False)
    resumed = distill(config, digits, str(cut), resume=True, progress=False)

    assert records(resumed.log) == records(reference.log)
    assert records(read_log(cut / "log.jsonl")) == records(reference.log)
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
    start = build_memory(config, digits)
    config.to_yaml(tmp_path / "config.yaml")
    distill(config, digits, str(tmp_path), progress=False)
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["memory"]
    a = start.addresses.detach()
    step = a.sign() if reg == "l1" else a / a.norm()
    assert torch.allclose(final["addresses"], a - 0.1 * 0.5 * step, atol=1e-6)
    assert torch.equal(final["bases"], start.bases.detach())
