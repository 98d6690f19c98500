"""addrmem.memory: budget arithmetic (docs/method.md, "The storage budget"),
initialisation, indexing, recall and general queries, row sampling, save/load."""

import math

import pytest
import torch

from addrmem.memory import AddressableMemory, ImageMemory, load_memory
from addrmem.ops import synthesize_reference

MNIST, CIFAR10, CIFAR100, TINY = ((1, 28, 28), 10), ((3, 32, 32), 10), ((3, 32, 32), 100), ((3, 64, 64), 200)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def small_addressable(dtype=torch.float64, seed=0):
    return AddressableMemory(3, (2, 6, 4), n_bases=5, per_class=4, downsample=2, generator=gen(seed)).to(dtype)


def small_image(dtype=torch.float64, seed=0):
    return ImageMemory(3, (2, 6, 4), per_class=4, generator=gen(seed)).to(dtype)


MEMORIES = [small_addressable, small_image]


# --- budget (docs/method.md) -----------------------------------------------------------


def test_worked_example_cifar10_ipc1_k16_ds2():
    m = AddressableMemory.from_budget(1, 10, (3, 32, 32), 16, 2)
    assert m.per_class == 115 and m.rows == 1150
    assert m.bases.shape == (16, 3, 16, 16) and m.addresses.shape == (1150, 16)
    assert m.num_floats() == 30_688 <= 30_720


@pytest.mark.parametrize("data, ipc, k, r", [
    (MNIST, 1, 16, 29), (MNIST, 1, 32, 4), (MNIST, 1, 64, None), (MNIST, 10, 256, 11),
    (MNIST, 10, 512, None), (MNIST, 50, 512, 56),
    (CIFAR10, 1, 32, 19), (CIFAR10, 1, 64, None), (CIFAR10, 10, 16, 1843), (CIFAR10, 10, 256, 43),
    (CIFAR10, 50, 512, 223),
    (CIFAR100, 1, 256, 4), (CIFAR100, 1, 512, None), (CIFAR100, 10, 512, 52), (CIFAR100, 50, 128, 1192),
    (TINY, 1, 16, 752), (TINY, 1, 512, 8),
])
def test_budget_table(data, ipc, k, r):
    shape, n = data
    if r is None:
        with pytest.raises(ValueError, match="n_bases"):
            AddressableMemory.from_budget(ipc, n, shape, k, 2)
        return
    # Only the arithmetic matters here: build the memory on the meta device.
    with torch.device("meta"):
        m = AddressableMemory.from_budget(ipc, n, shape, k, 2)
    assert m.per_class == r
    assert m.num_floats() == k * math.prod(shape) // 4 + n * r * k <= ipc * math.prod(shape) * n


def test_budget_error_names_largest_fitting_k():
    with pytest.raises(ValueError, match="at most n_bases=39 fits"):
        AddressableMemory.from_budget(1, 10, (3, 32, 32), 64, 2)
    assert AddressableMemory.from_budget(1, 10, (3, 32, 32), 39, 2).per_class == 1
    with pytest.raises(ValueError):
        AddressableMemory.from_budget(1, 10, (3, 32, 32), 40, 2)


def test_image_memory_budget():
    m = ImageMemory.from_budget(10, 10, (3, 32, 32))
    assert m.per_class == 10 and m.images.shape == (100, 3, 32, 32)
    assert m.num_floats() == 10 * 10 * 3072


def test_storage_accounting():
    assert AddressableMemory.storage((3, 32, 32), 16, 2) == (16 * 3 * 16 * 16, 16)
    assert ImageMemory.storage((3, 32, 32)) == (0, 3072)
    # CIFAR-10 IPC 1, K = 16 at half resolution: (30,720 - 12,288) // (10 * 16) = 115 rows per class
    assert AddressableMemory.rows_per_class(30720, 10, (3, 32, 32), n_bases=16, downsample=2) == 115
    assert ImageMemory.rows_per_class(30720, 10, (3, 32, 32)) == 1
    assert AddressableMemory.rows_per_class(12288, 10, (3, 32, 32), n_bases=16, downsample=2) == 0
    memory = AddressableMemory(10, (3, 32, 32), 16, 115, 2)
    assert memory.num_floats() == sum(AddressableMemory.storage((3, 32, 32), **memory.shape())) - 16 + 16 * 1150
    with pytest.raises(ValueError, match="not divisible"):
        AddressableMemory.storage((3, 32, 32), 16, 3)


@pytest.mark.parametrize("make", [lambda: AddressableMemory(3, (2, 6, 4), 5, 4, 2, generator=gen()),
                                  lambda: ImageMemory(3, (2, 6, 4), 4, generator=gen())])
def test_truncate_keeps_the_first_rows_of_each_class_and_the_bases(make):
    memory = make().double()
    kept = memory.truncate(2)
    assert type(kept) is type(memory) and kept.per_class == 2 and next(kept.parameters()).dtype == torch.float64
    images, labels = memory.recall()
    kept_images, kept_labels = kept.recall()
    rows = torch.tensor([0, 1, 4, 5, 8, 9])
    assert torch.equal(kept_images, images[rows]) and torch.equal(kept_labels, labels[rows])
    assert memory.truncate(4) is memory and memory.truncate(9) is memory
    with pytest.raises(ValueError):
        memory.truncate(0)


@pytest.mark.parametrize("kwargs, error", [
    (dict(downsample=3), ValueError),  # 6x4 not divisible by 3
    (dict(downsample=0), ValueError),
    (dict(n_bases=0), ValueError),
    (dict(per_class=True), TypeError),
    (dict(image_shape=(6, 4)), ValueError),
    (dict(num_classes=2.0), TypeError),
])
def test_constructor_validation(kwargs, error):
    args = dict(num_classes=3, image_shape=(2, 6, 4), n_bases=5, per_class=4, downsample=2)
    with pytest.raises(error):
        AddressableMemory(**{**args, **kwargs})


# --- initialisation -------------------------------------------------------------------


def test_xavier_bounds_and_reproducibility():
    m = AddressableMemory(10, (3, 32, 32), 16, 115, 2, generator=gen(1))
    b_bound, a_bound = math.sqrt(6 / (16 + 768)), math.sqrt(6 / (1150 + 16))
    assert m.bases.abs().max() <= b_bound and m.bases.abs().max() > 0.99 * b_bound
    assert m.addresses.abs().max() <= a_bound and m.addresses.abs().max() > 0.99 * a_bound
    again = AddressableMemory(10, (3, 32, 32), 16, 115, 2, generator=gen(1))
    other = AddressableMemory(10, (3, 32, 32), 16, 115, 2, generator=gen(2))
    assert torch.equal(m.bases, again.bases) and torch.equal(m.addresses, again.addresses)
    assert not torch.equal(m.bases, other.bases)
    im = ImageMemory(10, (3, 8, 8), 2, generator=gen(1))
    bound = math.sqrt(6 / (20 + 192))
    assert 0.95 * bound < im.images.abs().max() <= bound
    assert torch.equal(im.images, ImageMemory(10, (3, 8, 8), 2, generator=gen(1)).images)


def test_labels_fixed_and_grouped_by_class():
    m = small_addressable()
    assert m.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert "labels" not in m.state_dict() and [n for n, _ in m.named_parameters()] == ["bases", "addresses"]


# --- forward and recall ---------------------------------------------------------------


def test_forward_matches_reference_and_is_differentiable():
    m = small_addressable()
    index = torch.tensor([0, 11, 5, 5, 2])
    images, labels = m(index)
    assert images.shape == (5, 2, 6, 4) and labels.tolist() == [0, 2, 1, 1, 0]
    torch.testing.assert_close(images, synthesize_reference(m.addresses, m.bases, index, 2))
    images.sum().backward()
    assert m.bases.grad is not None and m.addresses.grad[[1, 3, 4, 6]].abs().sum() == 0


@pytest.mark.parametrize("make", MEMORIES)
@pytest.mark.parametrize("index, error", [
    (torch.tensor([0, 12]), IndexError),
    (torch.tensor([-1]), IndexError),
    (torch.tensor([0.0]), TypeError),
    (torch.tensor([True]), TypeError),
    (torch.tensor([[0]]), ValueError),
    ([0, 1], TypeError),
])
def test_bad_index(make, index, error):
    with pytest.raises(error):
        make()(index)


@pytest.mark.parametrize("make", MEMORIES)
def test_recall_all(make):
    m = make()
    images, labels = m.recall()
    assert images.shape == (12, 2, 6, 4) and not images.requires_grad
    assert torch.equal(labels, m.labels)
    torch.testing.assert_close(images, m(torch.arange(12))[0].detach(), rtol=1e-14, atol=1e-14)
    images.zero_(), labels.zero_()  # the results are copies, not the memory itself
    assert m.recall()[0].abs().sum() > 0 and m.labels.sum() > 0


@pytest.mark.parametrize("make", MEMORIES)
def test_one_hot_queries_give_recall_exactly(make):
    m = make()
    images, soft = m.recall(torch.eye(3, dtype=torch.float64))
    assert torch.equal(images, m.recall()[0])
    assert torch.equal(soft.argmax(1), m.labels) and soft.shape == (12, 3)
    # One query per class, any order: query b, slot i is row b * per_class + i.
    images, soft = m.recall(torch.eye(3, dtype=torch.float32)[[2, 0]])
    assert torch.equal(images, m.recall()[0][[8, 9, 10, 11, 0, 1, 2, 3]])
    assert soft.dtype == torch.float64


@pytest.mark.parametrize("make", MEMORIES)
def test_general_queries_are_linear(make):
    m = make()
    q = torch.randn(2, 3, generator=gen(5), dtype=torch.float64)
    images, soft = m.recall(q)
    assert images.shape == (8, 2, 6, 4)
    assert torch.equal(soft, q.repeat_interleave(4, 0))
    all_images = m.recall()[0].view(3, 4, 2, 6, 4)
    expected = torch.einsum("bc,cpxyz->bpxyz", q, all_images).reshape(8, 2, 6, 4)
    torch.testing.assert_close(images, expected, rtol=1e-12, atol=1e-12)
    q2 = torch.randn(2, 3, generator=gen(6), dtype=torch.float64)
    torch.testing.assert_close(m.recall(2 * q - 3 * q2)[0], 2 * images - 3 * m.recall(q2)[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("queries, error", [
    (torch.ones(2, 4), ValueError), (torch.ones(3), ValueError), (torch.ones(2, 3, dtype=torch.long), TypeError),
])
def test_bad_queries(queries, error):
    with pytest.raises(error):
        small_addressable().recall(queries)


# --- sampling -------------------------------------------------------------------------


@pytest.mark.parametrize("make", MEMORIES)
def test_sample_index(make):
    m = make()
    index = m.sample_index([2, 0], 3, gen(7))
    assert index.dtype == torch.int64 and index.shape == (6,)
    assert torch.equal(m.labels[index], torch.tensor([2, 2, 2, 0, 0, 0]))
    assert len(set(index[:3].tolist())) == 3 and len(set(index[3:].tolist())) == 3
    assert torch.equal(index, m.sample_index(torch.tensor([2, 0]), 3, gen(7)))
    g = gen(8)
    seen = torch.cat([m.sample_index([0, 1, 2], 1, g) for _ in range(200)])
    assert seen.bincount(minlength=12).min() > 20  # every row gets drawn, roughly uniformly
    assert sorted(m.sample_index(range(3), 4, g).tolist()) == list(range(12))


@pytest.mark.parametrize("classes, n, error", [
    ([0, 3], 1, ValueError), ([1, 1], 1, ValueError), ([], 1, ValueError), ([0], 5, ValueError),
    ([0], 0, ValueError), ([0.5], 1, ValueError),
])
def test_bad_sample_index(classes, n, error):
    with pytest.raises(error):
        small_addressable().sample_index(classes, n, gen())


# --- save / load ----------------------------------------------------------------------


@pytest.mark.parametrize("make", MEMORIES)
def test_save_load_round_trip(make, tmp_path):
    m = make()
    path = tmp_path / "memory.pt"
    m.save(path, dataset="toy", mean=torch.tensor([0.5, 0.25]), steps=[1, 2])
    loaded = load_memory(path)
    assert type(loaded) is type(m) and loaded.config() == m.config()
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert loaded.extra["dataset"] == "toy" and loaded.extra["steps"] == [1, 2]
    assert torch.equal(loaded.extra["mean"], torch.tensor([0.5, 0.25]))
    for a, b in zip(m.recall(), loaded.recall()):
        assert torch.equal(a, b)
    q = torch.rand(2, 3, dtype=torch.float64, generator=gen())
    assert torch.equal(m.recall(q)[0], loaded.recall(q)[0])


def test_load_rejects_bad_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="not a readable"):
        load_memory(junk)
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not an addrmem memory"):
        load_memory(bad)
    m = small_addressable()
    blob = {"kind": "Unknown", "config": m.config(), "state_dict": m.state_dict(), "extra": {}}
    torch.save(blob, bad)
    with pytest.raises(ValueError, match="unknown memory kind"):
        load_memory(bad)
    torch.save({**blob, "kind": "AddressableMemory", "config": {**m.config(), "n_bases": 6}}, bad)
    with pytest.raises(ValueError, match="do not match"):
        load_memory(bad)
    torch.save({**blob, "kind": "AddressableMemory", "config": {**m.config(), "downsample": 5}}, bad)
    with pytest.raises(ValueError, match="invalid AddressableMemory config"):
        load_memory(bad)
    with pytest.raises(FileNotFoundError):
        load_memory(tmp_path / "missing.pt")


def test_save_rejects_non_plain_extra(tmp_path):
    with pytest.raises(TypeError, match="plain data"):
        small_addressable().save(tmp_path / "m.pt", net=torch.nn.Linear(2, 2))


# --- the start from real data (init_from_real) --------------------------------------------


def real_digits():
    from addrmem.data import load_dataset
    images, labels = load_dataset("digits").train
    return images.double(), labels


@pytest.mark.parametrize("kind", ["image", "addressable"])
def test_real_start_recalls_real_images_of_each_class(kind):
    """Every row recalls a real image of its own class: itself (ImageMemory), or
    its least-squares projection onto the bases' span (full-resolution bases)."""
    images, labels = real_digits()
    if kind == "image":
        memory = ImageMemory(10, (1, 8, 8), per_class=3).double()
    else:
        memory = AddressableMemory(10, (1, 8, 8), n_bases=9, per_class=3).double()
    assert memory.init_from_real(images, labels, gen(1)) is memory
    recalled, row_labels = memory.recall()
    flat = images.flatten(1)
    if kind == "addressable":
        bases = memory.bases.detach().flatten(1)
        flat = flat @ torch.linalg.pinv(bases) @ bases
    nearest = torch.cdist(recalled.flatten(1), flat, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
    assert nearest.values.max() < 1e-8
    assert torch.equal(labels[nearest.indices], row_labels)
    assert len(set(nearest.indices.tolist())) == memory.rows  # no image twice where a class has enough


def test_real_start_keeps_the_storage_and_balances_bases_and_addresses():
    images, labels = real_digits()
    memory = AddressableMemory.from_budget(2, 10, (1, 8, 8), 11, 1).double()
    floats = memory.num_floats()
    memory.init_from_real(images, labels, gen(0))
    assert memory.num_floats() == floats == 1254 and memory.addresses.shape == (50, 11)
    rms = [p.detach().square().mean().sqrt() for p in (memory.bases, memory.addresses)]
    assert torch.allclose(rms[0], rms[1])


def test_real_start_bases_are_the_best_rank_k_recall_at_low_resolution():
    """With half-resolution bases, the start's span recalls the data better than
    a PCA of average-pooled images (the upsampling's metric is taken into
    account), and no worse than any of a few random K-dimensional spans."""
    images, labels = real_digits()
    memory = AddressableMemory(10, (1, 8, 8), n_bases=6, per_class=2, downsample=2).double()
    memory.init_from_real(images, labels, gen(0))

    def residual(bases):  # || x - U(a B) || at the best a for each image
        recall = synthesize_reference(torch.eye(6, dtype=torch.float64), bases, scale=2).flatten(1)  # (K, 64)
        coeffs = torch.linalg.lstsq(recall.T, images.flatten(1).T).solution
        return (images.flatten(1) - coeffs.T @ recall).norm()

    ours = residual(memory.bases.detach())
    pooled = torch.nn.functional.avg_pool2d(images, 2).flatten(1)
    pca = torch.linalg.svd(pooled, full_matrices=False).Vh[:6].view(6, 1, 4, 4)
    assert ours < residual(pca) * 0.999
    for seed in range(3):
        assert ours < residual(torch.randn(6, 1, 4, 4, generator=gen(seed), dtype=torch.float64))


def test_real_start_with_fixed_bases_only_sets_the_addresses():
    images, labels = real_digits()
    memory = AddressableMemory(10, (1, 8, 8), n_bases=5, per_class=2, downsample=2).double()
    bases = memory.bases.detach().clone()
    memory.init_from_real(images, labels, gen(0), bases=False)
    assert torch.equal(memory.bases.detach(), bases)
    target = images[memory._pick_real(labels, gen(0))].flatten(1)  # the images the rows were drawn from
    error = (memory.recall()[0].flatten(1) - target).norm()
    for seed in range(3):  # the start is each image's least-squares address: any change fits worse
        moved = memory.addresses.detach() + 0.01 * torch.randn(memory.addresses.shape, generator=gen(seed),
                                                               dtype=torch.float64)
        assert error < (synthesize_reference(moved, bases, scale=2).flatten(1) - target).norm()


@pytest.mark.parametrize("make", MEMORIES)
def test_real_start_rejects_data_that_does_not_fit(make):
    memory = make()
    images = torch.randn(12, 2, 6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="cover every class"):
        memory.init_from_real(images, torch.zeros(12, dtype=torch.int64))
    with pytest.raises(ValueError, match="images must be"):
        memory.init_from_real(images[:, :1], torch.arange(12) % 3)
    with pytest.raises(ValueError, match="labels must be int64"):
        memory.init_from_real(images, torch.arange(11) % 3)
