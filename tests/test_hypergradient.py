"""addrmem.hypergradient against autograd through the fully unrolled inner
loop (float64), against the plain per-step recomputation it replaced, and
against torch.optim.SGD for the forward pass; its ways of having the step
graphs (kept from the forward, recomputed, snapshots) agree bit for bit."""

import copy
import importlib

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
hg = importlib.import_module("addrmem.hypergradient")  # the module: addrmem.hypergradient is the function


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


def test_frozen_parameters_are_skipped():
    """Frozen bases get no hypergradient; the addresses' is unchanged by freezing them."""
    memory, net = make_memory("addressable"), make_net("mlp")
    batches, real_images, real_labels = make_problem(memory)
    _, whole = hypergradient(memory, net, batches, real_images, real_labels, lr=LR, momentum=0.9)
    memory.bases.requires_grad_(False)
    _, grads = hypergradient(memory, net, batches, real_images, real_labels, lr=LR, momentum=0.9)
    assert list(grads) == ["addresses"] and memory.bases.grad is None
    torch.testing.assert_close(grads["addresses"], whole["addresses"], rtol=1e-12, atol=0)
    memory.addresses.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to distill"):
        hypergradient(memory, net, batches, real_images, real_labels, lr=LR, momentum=0.9)


def recomputed(memory, net, batches, real_images, real_labels, momentum, augment):
    """The hypergradient as addrmem computed it before the step graphs were
    kept: a forward without graphs, then per step from the last the step's
    loss recomputed at its stored weights, g with create_graph=True and one
    double backward of <g, dv>."""
    names = [n for n, _ in net.named_parameters()]
    mem_params = list(memory.parameters())

    def loss_at(w, images, labels):
        return F.cross_entropy(functional_call(net, dict(zip(names, w)), (augment(images),)), labels)

    w = [p.detach().clone() for p in net.parameters()]
    v = [torch.zeros_like(t) for t in w]
    weights = []
    for index in batches:
        weights.append(w)
        leaf = [t.clone().requires_grad_() for t in w]
        images = reference_images(memory, index).detach()
        g = torch.autograd.grad(loss_at(leaf, images, memory.labels[index]), leaf)
        v = [momentum * vi + gi for vi, gi in zip(v, g)]
        w = [wi - LR * vi for wi, vi in zip(w, v)]
    leaf = [t.clone().requires_grad_() for t in w]
    loss = loss_at(leaf, real_images, real_labels)
    dw = list(torch.autograd.grad(loss, leaf))
    dv = [torch.zeros_like(t) for t in dw]
    grads = [torch.zeros_like(p) for p in mem_params]
    for index, w in zip(reversed(batches), reversed(weights)):
        dv = [d - LR * e for d, e in zip(dv, dw)]
        leaf = [t.clone().requires_grad_() for t in w]
        images = reference_images(memory, index)
        g = torch.autograd.grad(loss_at(leaf, images, memory.labels[index]), leaf, create_graph=True)
        h = torch.autograd.grad(g, leaf + mem_params, grad_outputs=dv)
        dw = [d + e for d, e in zip(dw, h[:len(leaf)])]
        grads = [a + e for a, e in zip(grads, h[len(leaf):])]
        dv = [momentum * d for d in dv]
    return loss.detach(), dict(zip([n for n, _ in memory.named_parameters()], grads))


@pytest.mark.parametrize("net_kind", ["convnet", "mlp"])
@pytest.mark.parametrize("graph_budget", [None, 0])
def test_float64_unchanged_by_keeping_the_step_graphs(net_kind, graph_budget):
    # The speed work (step graphs kept from the forward) against the plain
    # per-step recomputation of before it, within 1e-10.
    memory, net = make_memory("addressable"), make_net(net_kind)
    batches, real_images, real_labels = make_problem(memory)
    aug = AUGMENTS["flip_rotate"]
    loss, grads = hypergradient(memory, net, batches, real_images, real_labels, lr=LR, momentum=0.9, augment=aug,
                                graph_budget=graph_budget)
    ref_loss, ref_grads = recomputed(memory, net, batches, real_images, real_labels, 0.9, aug)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for name, ref in ref_grads.items():
        assert ref.abs().max() > 1e-6
        torch.testing.assert_close(grads[name], ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


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


def seven_steps(net_kind):
    """(memory, net, batches, real, labels, augment): T=7 on 1x6x6 images, float32."""
    g = torch.Generator().manual_seed(5)
    memory = AddressableMemory(3, (1, 6, 6), n_bases=4, per_class=5, downsample=2, generator=g)
    torch.manual_seed(6)
    net = MLP((1, 6, 6), 3, hidden=8, depth=1) if net_kind == "mlp" else ConvNet(1, 3, 6, width=4, depth=2)
    batches = [memory.sample_index(range(3), 2, g) for _ in range(7)]
    real = torch.randn(9, 1, 6, 6, generator=g)
    labels = torch.arange(3).repeat(3)
    return memory, net, batches, real, labels, SiameseAugment.draw(torch.Generator().manual_seed(1))


@pytest.mark.parametrize("net_kind", ["mlp", "convnet"])
@pytest.mark.parametrize("how", [dict(snapshot_every=2), dict(snapshot_every=3), dict(snapshot_every=7),
                                 dict(snapshot_every=50), dict(graph_budget=0), dict(graph_budget=2500)])
def test_every_way_gives_the_same_result_bit_for_bit(net_kind, how, monkeypatch):
    # Keeping every step's graph (the default here), keeping none, keeping
    # the first two (a budget of 2.5 steps at a reported 1000 bytes each) and
    # keeping every k-th step's weights (T=7: segments of 2, 3, 7, and k beyond
    # T) change the memory needed and the time, not one bit of the result.
    # The ConvNet's GroupNorm backs up the create_graph=True of every inner gradient.
    memory, net, batches, real, labels, augment = seven_steps(net_kind)
    want = hypergradient(memory, net, batches, real, labels, lr=0.1, momentum=0.9, augment=augment)
    measure = hg._saved_bytes
    monkeypatch.setattr(hg, "_saved_bytes", lambda build: (measure(build)[0], 1000))
    got = hypergradient(memory, net, batches, real, labels, lr=0.1, momentum=0.9, augment=augment, **how)
    assert torch.equal(got[0], want[0])
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name


@pytest.mark.parametrize("graph_budget, recalls", [(None, 7), (2500, 7 + 5), (0, 1 + 7 + 7)])
def test_kept_graphs_are_not_recomputed(graph_budget, recalls, monkeypatch):
    # The memory is recalled once per step when every graph is kept, and
    # again in the reverse pass for each step whose graph was not (with none
    # kept, the first step is built once more: its graph was measured).
    memory, net, batches, real, labels, _ = seven_steps("convnet")
    measure = hg._saved_bytes
    monkeypatch.setattr(hg, "_saved_bytes", lambda build: (measure(build)[0], 1000))
    calls = []
    memory.register_forward_hook(lambda *args: calls.append(1))
    hypergradient(memory, net, batches, real, labels, lr=0.1, momentum=0.9, graph_budget=graph_budget)
    assert len(calls) == recalls


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(10, 10, requires_grad=True)
    (y, z), size = hg._saved_bytes(lambda: (x * x, x.exp()))  # x saved twice, exp's output once
    assert size == 2 * 100 * 4
    assert hg._free_bytes(torch.device("cpu")) > 0


@pytest.mark.parametrize("option", [{"snapshot_every": 0}, {"snapshot_every": 1.5}, {"snapshot_every": True},
                                    {"graph_budget": -1}, {"graph_budget": 1.5}, {"graph_budget": True}])
def test_snapshot_every_and_graph_budget_are_checked(option):
    """snapshot_every must be a positive int; graph_budget None or a byte count."""
    memory = AddressableMemory(2, (1, 4, 4), n_bases=2, per_class=2)
    net = MLP((1, 4, 4), 2, hidden=4, depth=1)
    with pytest.raises(ValueError, match=next(iter(option))):
        hypergradient(memory, net, [torch.tensor([0, 2])], torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), lr=0.1,
                      momentum=0.9, **option)
