"""addrmem/continual/methods.py: what each method stores, in floats and in
bytes, within the budget; the budget divided among the tasks seen; the
undistilled start as a method; frozen shared bases left alone."""

import pytest
import torch

from addrmem.continual import METHODS, ContinualConfig, make_method, make_stream
from addrmem.memory import AddressableMemory
from addrmem.seeding import generator
from continual_helpers import TINY


@pytest.mark.parametrize("name", ["image", "addressable", "compressed"])
def test_the_budget_is_divided_among_the_tasks_seen(name):
    """After task t every memory holds budget / (t+1): the older ones keep the
    first rows of each class, and their bases."""
    config = ContinualConfig(**{**TINY, "tasks": 3})
    stream = make_stream(config)
    method = make_method(name, config, stream)
    sizes = []
    for t in range(3):
        before = [(task, m) for task, _, m in method.memories]
        method.remember(t, *stream.train(t))
        sizes.append([m.per_class for _, _, m in method.memories])
        assert method.num_bytes() == 4 * method.num_floats() <= method.budget
        for (task, old), (_, _, new) in zip(before, method.memories):
            for param_name, p in old.named_parameters():
                q = getattr(new, param_name)
                if param_name == "bases":
                    assert torch.equal(p, q)
                else:
                    kept = p.view(old.num_classes, old.per_class, *p.shape[1:])[:, :new.per_class]
                    assert torch.equal(kept.reshape(q.shape), q)
    assert sizes == [[method.per_class(2, 1)], [method.per_class(2, 2)] * 2, [method.per_class(2, 3)] * 3]
    assert sizes[0][0] > sizes[1][0] > sizes[2][0]


def test_replay_uint8_holds_four_times_the_images_in_the_same_bytes():
    config = ContinualConfig(**TINY, budget_images=50)
    stream = make_stream(config)
    floats, pixels = make_method("replay", config, stream), make_method("replay-uint8", config, stream)
    for method in (floats, pixels):
        method.remember(0, *stream.train(0))
        method.remember(1, *stream.train(1))
    assert floats.num_bytes() == pixels.num_bytes() == config.budget(stream.image_shape) == 50 * 64 * 4
    assert len(floats.labels) == 50 and len(pixels.labels) == 200
    assert pixels.images.dtype == torch.uint8
    images, labels = pixels.recalled()
    assert images.dtype == torch.float32 and images.shape == (200, 1, 8, 8)
    # every recalled image is a training image of its label, to within the 8-bit rounding
    train = torch.cat([stream.train(0)[0], stream.train(1)[0]]).flatten(1)
    nearest = torch.cdist(images.flatten(1), train).min(1).values
    assert nearest.max() < 0.02 * 64 ** 0.5


def test_compressed_is_the_addressable_memory_at_its_real_start():
    config = ContinualConfig(**TINY)
    stream = make_stream(config)
    method = make_method("compressed", config, stream)
    images, labels = stream.train(0)
    method.remember(0, images, labels)
    memory = method.memories[0][2]
    start = AddressableMemory(2, stream.image_shape, config.distill_config().n_bases, memory.per_class)
    start.init_from_real(images, labels % 2, generator(config.seed, "compressed", "init-rows", 0))
    assert torch.equal(memory.bases, start.bases) and torch.equal(memory.addresses, start.addresses)
    distilled = make_method("addressable", config, stream)
    distilled.remember(0, images, labels)
    assert not torch.equal(distilled.memories[0][2].addresses, memory.addresses)  # distillation moves it


def test_shared_bases_stay_frozen_and_get_no_gradient(monkeypatch):
    from addrmem import distill

    config = ContinualConfig(**{**TINY, "tasks": 3}, bases="shared")
    stream = make_stream(config)
    method = make_method("addressable", config, stream)
    method.remember(0, *stream.train(0))
    shared = method.shared_state.clone()
    seen = []
    real_step = distill.outer_step

    def spy(memory, optimizer, *args, **kw):
        seen.append([p.requires_grad for p in memory.parameters()])
        assert all(p is not memory.bases for group in optimizer.param_groups for p in group["params"])
        return real_step(memory, optimizer, *args, **kw)

    monkeypatch.setattr(distill, "outer_step", spy)
    method.remember(1, *stream.train(1))
    assert seen and all(flags == [False, True] for flags in seen)  # (bases, addresses)
    assert all(torch.equal(m.bases, shared) for _, _, m in method.memories)
    assert method.memories[1][2].bases.grad is None


def test_every_method_reports_floats_and_bytes_and_restores_its_state():
    config = ContinualConfig(**TINY, budget_images=20)
    stream = make_stream(config)
    for name in METHODS:
        method = make_method(name, config, stream)
        method.check()
        method.remember(0, *stream.train(0))
        again = make_method(name, config, stream)
        again.load_state_dict(method.state_dict())
        assert again.num_floats() == method.num_floats() and again.num_bytes() == method.num_bytes()
        if method.recalled() is None:
            assert name == "finetune" and method.num_bytes() == 0
            continue
        for a, b in zip(again.recalled(), method.recalled()):
            assert torch.equal(a, b), name
        per_value = 1 if name == "replay-uint8" else 4
        assert method.num_bytes() == per_value * method.num_floats()


def test_a_budget_too_small_is_named():
    config = ContinualConfig(**{**TINY, "distill": {"n_bases": 8}}, budget_images=1)
    with pytest.raises(ValueError, match="too small for the addressable memory"):
        make_method("addressable", config, make_stream(config)).check()
    with pytest.raises(ValueError, match="holds no image"):
        make_method("replay", ContinualConfig(budget_bytes=100), make_stream(config)).check()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_memories_hold_twice_the_rows_in_the_same_bytes(dtype):
    config = ContinualConfig(**TINY)
    half = ContinualConfig(**TINY, memory_dtype=dtype)
    stream = make_stream(config)
    full, small = make_method("addressable", config, stream), make_method("addressable", half, stream)
    for method in (full, small):
        method.remember(0, *stream.train(0))
    shared, row = full.shared_floats, full.row_floats
    assert small.memories[0][2].per_class == (config.budget(stream.image_shape) // 2 - shared) // (2 * row)
    assert small.memories[0][2].per_class > 2 * full.memories[0][2].per_class - 1
    assert small.num_bytes() == 2 * small.num_floats() <= small.budget
    for p in small.memories[0][2].parameters():  # what is recalled is what is stored
        assert torch.equal(p, p.to(getattr(torch, dtype)).float())
    with pytest.raises(ValueError, match="memory_dtype must be one of"):
        ContinualConfig(memory_dtype="int4")
