"""addrmem.hypergradient against autograd through the fully unrolled inner
loop (float64), and against torch.optim.SGD for the forward pass."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from addrmem.augment import SiameseAugment
from addrmem.hypergradient import hypergradient
from addrmem.memory import AddressableMemory, ImageMemory
from addrmem.networks import MLP, ConvNet
from addrmem.ops import synthesize_reference

SHAPE, CLASSES, LR = (3, 8, 8), 3, 0.1


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def make_memory(kind, dtype=torch.float64):
    if kind == "addressable":
        m = AddressableMemory(CLASSES, SHAPE, n_bases=5, per_class=4, downsample=2, generator=gen(1))
    else:
        m = ImageMemory(CLASSES, SHAPE, per_class=4, generator=gen(1))
    return m.to(dtype)


def make_net(kind, dtype=torch.float64):
    torch.manual_seed(2)
    net = ConvNet(3, CLASSES, 8, width=6, depth=2) if kind == "convnet" else MLP(SHAPE, CLASSES, hidden=12)
    return net.to(dtype)


def make_problem(memory, dtype=torch.float64):
    g = gen(3)
    batches = [memory.sample_index([0, 1, 2], 2, g) for _ in range(3)]
    batches.insert(1, torch.tensor([5, 5, 0, 11, 5, 0]))  # repeated rows
    real_images = torch.randn(9, *SHAPE, generator=g, dtype=torch.float64).to(dtype)
    real_labels = torch.arange(CLASSES).repeat(3)
    return batches, real_images, real_labels


def reference_images(memory, index):
    """The memory's images, computed without addrmem's op."""
    if isinstance(memory, AddressableMemory):
        return synthesize_reference(memory.addresses, memory.bases, index, memory.downsample)
    return memory.images[index]


def unrolled(memory, net, batches, real_images, real_labels, momentum, augment):
    """Loss and gradients by autograd through every inner step's graph."""
    names = [n for n, _ in net.named_parameters()]
    w = [p.detach().clone().requires_grad_() for p in net.parameters()]
    v = [torch.zeros_like(t) for t in w]
    for index in batches:
        logits = functional_call(net, dict(zip(names, w)), (augment(reference_images(memory, index)),))
        g = torch.autograd.grad(F.cross_entropy(logits, memory.labels[index]), w, create_graph=True)
        v = [momentum * vi + gi for vi, gi in zip(v, g)]
        w = [wi - LR * vi for wi, vi in zip(w, v)]
    loss = F.cross_entropy(functional_call(net, dict(zip(names, w)), (augment(real_images),)), real_labels)
    grads = torch.autograd.grad(loss, list(memory.parameters()))
    return loss, dict(zip([n for n, _ in memory.named_parameters()], grads))


def sgd_loss(memory, net, batches, real_images, real_labels, momentum, augment):
    """The outer loss after training a copy of the net with torch.optim.SGD."""
    net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=momentum)
    for index in batches:
        images, labels = memory.recall()
        opt.zero_grad()
        F.cross_entropy(net(augment(images[index])), labels[index]).backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(net(augment(real_images)), real_labels)


AUGMENTS = {"none": lambda x: x, "flip_rotate": SiameseAugment(flip=True, angle=9.0)}


@pytest.mark.parametrize("memory_kind", ["addressable", "image"])
@pytest.mark.parametrize("net_kind", ["convnet", "mlp"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("augment", ["none", "flip_rotate"])
def test_matches_unrolled_autograd(memory_kind, net_kind, momentum, augment):
    memory, net = make_memory(memory_kind), make_net(net_kind)
    batches, real_images, real_labels = make_problem(memory)
    aug = AUGMENTS[augment]
    before = copy.deepcopy(net.state_dict())

    loss, grads = hypergradient(memory, net, batches, real_images, real_labels, lr=LR, momentum=momentum,
                                augment=aug if augment != "none" else None)

    ref_loss, ref_grads = unrolled(memory, net, batches, real_images, real_labels, momentum, aug)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, sgd_loss(memory, net, batches, real_images, real_labels, momentum, aug),
                               rtol=1e-12, atol=0)
    assert list(grads) == [n for n, _ in memory.named_parameters()]
    for name, ref in ref_grads.items():
        assert grads[name].shape == ref.shape and ref.abs().max() > 1e-6
        torch.testing.assert_close(grads[name], ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
    # The net and the memory's .grad are left alone.
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in list(net.parameters()) + list(memory.parameters()))


def test_unsampled_rows_get_no_gradient():
    memory, net = make_memory("addressable"), make_net("mlp")
    _, real_images, real_labels = make_problem(memory)
    _, grads = hypergradient(memory, net, [torch.tensor([0, 4, 8]), torch.tensor([1, 4])], real_images,
                             real_labels, lr=LR, momentum=0.9)
    used = torch.zeros(memory.rows, dtype=torch.bool)
    used[[0, 1, 4, 8]] = True
    assert grads["addresses"][~used].abs().max() == 0 and grads["addresses"][used].abs().min() > 0


def test_float32_agrees_with_float64():
    memory64, net64 = make_memory("addressable"), make_net("convnet")
    batches, real_images, real_labels = make_problem(memory64)
    loss64, grads64 = hypergradient(memory64, net64, batches, real_images, real_labels, lr=LR, momentum=0.9)
    memory32, net32 = make_memory("addressable", torch.float32), make_net("convnet", torch.float32)
    loss32, grads32 = hypergradient(memory32, net32, batches, real_images.float(), real_labels, lr=LR,
                                    momentum=0.9)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=0)
    for name, g in grads64.items():
        torch.testing.assert_close(grads32[name].double(), g, rtol=1e-3, atol=1e-4 * float(g.abs().max()))


def test_bad_inputs():
    memory, net = make_memory("addressable"), make_net("mlp")
    batches, real_images, real_labels = make_problem(memory)
    kw = dict(lr=LR, momentum=0.9)
    with pytest.raises(ValueError, match="buffers"):
        bn = nn.Sequential(nn.Flatten(), nn.Linear(192, 3), nn.BatchNorm1d(3)).double()
        hypergradient(memory, bn, batches, real_images, real_labels, **kw)
    with pytest.raises(ValueError, match="at least one step"):
        hypergradient(memory, net, [], real_images, real_labels, **kw)
    with pytest.raises(IndexError):
        hypergradient(memory, net, batches + [torch.tensor([12])], real_images, real_labels, **kw)
    with pytest.raises(ValueError, match="float32"):
        hypergradient(memory, net.float(), batches, real_images, real_labels, **kw)


@pytest.mark.parametrize("change, match", [
    (dict(real_images=lambda x: x.float()), r"real_images are torch.float32 .* memory is torch.float64"),
    (dict(real_images=lambda x: x[:, :1]), r"real_images must have shape \(N, 3, 8, 8\)"),
    (dict(real_labels=lambda y: y.int()), "real_labels must be int64"),
    (dict(real_labels=lambda y: y[:-1]), r"real_labels must be int64 \(9,\)"),
    (dict(lr=float("nan")), "lr must be a finite number > 0; got nan"),
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(lr=True), "lr must be a finite number > 0"),
    (dict(momentum=float("inf")), "momentum must be a finite number >= 0; got inf"),
    (dict(momentum=-0.5), "momentum must be a finite number >= 0"),
])
def test_bad_real_batch_and_rates_name_the_argument(change, match):
    memory, net = make_memory("addressable"), make_net("mlp")
    batches, real_images, real_labels = make_problem(memory)
    args = dict(real_images=real_images, real_labels=real_labels, lr=LR, momentum=0.9)
    args.update({k: v(args[k]) if callable(v) else v for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        hypergradient(memory, net, batches, **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("memory_kind", ["addressable", "image"])
def test_cuda_matches_cpu(memory_kind):
    memory, net = make_memory(memory_kind), make_net("convnet")
    batches, real_images, real_labels = make_problem(memory)
    aug = AUGMENTS["flip_rotate"]
    loss, grads = hypergradient(memory, net, batches, real_images, real_labels, lr=LR, momentum=0.9, augment=aug)
    loss_c, grads_c = hypergradient(memory.cuda(), net.cuda(), [b.cuda() for b in batches], real_images.cuda(),
                                    real_labels.cuda(), lr=LR, momentum=0.9, augment=aug)
    torch.testing.assert_close(loss_c.cpu(), loss, rtol=1e-10, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name].cpu(), g, rtol=1e-8, atol=1e-8 * float(g.abs().max()))


@pytest.mark.parametrize("k", [2, 3, 7, 50])
def test_snapshot_every_k_gives_the_same_result_bit_for_bit(k):
    # Keeping every k-th step's weights and recomputing the rest changes the
    # memory needed, not one bit of the result (T=7: segments of 2, 3, 7, and
    # k beyond T).
    g = torch.Generator().manual_seed(5)
    memory = AddressableMemory(3, (1, 6, 6), n_bases=4, per_class=5, downsample=2, generator=g)
    net = MLP((1, 6, 6), 3, hidden=8, depth=1)
    batches = [memory.sample_index(range(3), 2, g) for _ in range(7)]
    real = torch.randn(9, 1, 6, 6, generator=g)
    labels = torch.arange(3).repeat(3)
    augment = SiameseAugment.draw(torch.Generator().manual_seed(1))
    want = hypergradient(memory, net, batches, real, labels, lr=0.1, momentum=0.9, augment=augment)
    got = hypergradient(memory, net, batches, real, labels, lr=0.1, momentum=0.9, augment=augment, snapshot_every=k)
    assert torch.equal(got[0], want[0])
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name


@pytest.mark.parametrize("k", [0, 1.5, True])
def test_snapshot_every_must_be_a_positive_int(k):
    memory = AddressableMemory(2, (1, 4, 4), n_bases=2, per_class=2)
    net = MLP((1, 4, 4), 2, hidden=4, depth=1)
    with pytest.raises(ValueError, match="snapshot_every"):
        hypergradient(memory, net, [torch.tensor([0, 2])], torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), lr=0.1,
                      momentum=0.9, snapshot_every=k)
