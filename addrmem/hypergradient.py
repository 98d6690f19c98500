"""The exact hypergradient of one outer iteration (docs/method.md,
"The hypergradient").

Forward: T steps of SGD with momentum (PyTorch semantics: v <- mu*v + g with
v_0 = 0, w <- w - lr*v; no weight decay, no dampening, no Nesterov) from the
network's weights, on mean cross-entropy of recalled minibatches; then the
outer loss on the real batch. Backward: the reverse recurrence of that
section, one double backward of <g_t, u_{t+1}> per step, through the
memory's synthesis.

Two ways to have step t's graph (g_t as a function of w_t and the memory)
for its double backward, with the same result bit for bit:

- kept: the forward builds it (``create_graph=True``) and keeps it, so the
  reverse pass only runs the double backward;
- recomputed: the forward keeps the flat weights w_t (on the weights' device)
  and the reverse pass rebuilds the step's graph from them, one step at a
  time: one more forward and backward per step, but |w| floats per step
  instead of the step's whole graph.

With ``snapshot_every=1`` (the default) the forward keeps the graphs of the
first steps while they fit in ``graph_budget`` bytes (by default half the
device's free memory; the size of a graph is measured on the first step) and
the weights of the others. With ``snapshot_every=k > 1`` no graph is kept: the
forward keeps the weights and momentum of every k-th step only, and the
reverse pass recomputes one segment of k weights at a time (about
(2T/k + k) * |w| floats), for up to T extra inner steps of compute.

Profiling: the forward loop and the reverse loop run inside
``torch.profiler.record_function`` ranges named ``addrmem.inner_forward`` and
``addrmem.reverse`` (``benchmarks/outer_step.py`` reads them); the outer loss
and the argument checks lie outside both.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.profiler import record_function

__all__ = ["hypergradient"]


class _FlatNet:
    """Evaluates ``net`` statelessly at a flat weight vector (|w|,)."""

    def __init__(self, net):
        if any(True for _ in net.buffers()):
            names = [name for name, _ in net.named_buffers()]
            raise ValueError(
                f"the network has buffers ({', '.join(names)}); the inner loop needs a network whose state "
                f"is only its parameters (use GroupNorm/instance norm, not BatchNorm)"
            )
        params = dict(net.named_parameters())
        if not params:
            raise ValueError("the network has no parameters")
        first = next(iter(params.values()))
        for name, p in params.items():
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(f"network parameter {name} is {p.dtype} on {p.device}, unlike the others "
                                 f"({first.dtype} on {first.device})")
        self.net = net
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.sizes = [p.numel() for p in params.values()]
        self.initial = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss(self, flat, images, labels):
        """Mean cross-entropy of the net at weights ``flat`` on (images, labels)."""
        weights = {name: t.view(shape) for name, t, shape in
                   zip(self.names, flat.split(self.sizes), self.shapes)}
        return F.cross_entropy(functional_call(self.net, weights, (images,)), labels)


def hypergradient(memory, net, batches, real_images, real_labels, *, lr, momentum, augment=None,
                  snapshot_every=1, graph_budget=None):
    """Outer loss and its exact gradient w.r.t. the memory's parameters.

    Args:
        memory: an ``AddressableMemory`` or ``ImageMemory`` (its parameters
            must require grad); ``.grad`` is not touched.
        net: freshly initialised network holding parameters only (no buffers),
            same dtype and device as the memory; its weights are theta_0 and
            are left unchanged.
        batches: sequence of T >= 1 int64 (N_t,) row indices into the memory,
            one per inner step (repeats allowed); their type and device are
            checked up front, their range where the rows are read (IndexError).
        real_images: (N, C, H, W) real batch, the memory's dtype, device
            and image shape; real_labels: (N,) int64 on the same device.
        lr, momentum: the inner SGD's learning rate (finite, > 0) and
            momentum (finite, >= 0).
        augment: optional differentiable callable (N, C, H, W) -> same,
            applied identically to every synthetic batch and the real batch
            (e.g. ``SiameseAugment.draw(generator)``).
        snapshot_every: k >= 1. The forward keeps the weights (and momentum)
            of every k-th inner step only, and the reverse recomputes the
            steps in between, one segment of k at a time: about T/k + k weight
            vectors in memory instead of T + 1, for up to T more inner steps
            of compute. No step graph is kept from the forward then. The
            result is the same, bit for bit.
        graph_budget: with ``snapshot_every=1``, the bytes the forward may
            spend keeping the inner steps' graphs (estimated from the tensors
            the first step's graph saves); the steps beyond it are recomputed
            in the reverse pass. None (default): half the device's free
            memory (CUDA: free plus cached by PyTorch; CPU: free RAM); 0:
            recompute every step. The result is the same, bit for bit.

    Returns:
        (loss, grads): the outer loss (0-dim tensor, detached) and a dict from
        each name of ``memory.named_parameters()`` that requires grad (frozen
        parameters are skipped) to d loss / d parameter (same shape; the sum
        of all T steps' contributions).

    Raises ValueError (TypeError for non-tensors) naming the argument that
    does not fit.
    """
    if not (_is_finite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0; got {lr!r}")
    if not (_is_finite(momentum) and momentum >= 0):
        raise ValueError(f"momentum must be a finite number >= 0; got {momentum!r}")
    if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
        raise ValueError(f"snapshot_every must be an int >= 1; got {snapshot_every!r}")
    if graph_budget is not None and (isinstance(graph_budget, bool) or not isinstance(graph_budget, int)
                                     or graph_budget < 0):
        raise ValueError(f"graph_budget must be None or an int >= 0 (bytes); got {graph_budget!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: the inner loop needs at least one step")
    flatnet = _FlatNet(net)
    learnt = [(name, p) for name, p in memory.named_parameters() if p.requires_grad]  # frozen ones are skipped
    if not learnt:
        raise ValueError("no memory parameter requires grad: there is nothing to distill")
    mem_names, mem_params = zip(*learnt)
    w = flatnet.initial
    if w.dtype != mem_params[0].dtype or w.device != mem_params[0].device:
        raise ValueError(f"the network is {w.dtype} on {w.device} but the memory is "
                         f"{mem_params[0].dtype} on {mem_params[0].device}")
    _check_real_batch(real_images, real_labels, mem_params[0], memory.image_shape)
    memory.validate_index(torch.cat(batches))  # every batch at once (rows are range-checked when read)
    augment = augment if augment is not None else (lambda images: images)

    def step_loss(flat, index):
        images, labels = memory(index)
        return flatnet.loss(flat, augment(images), labels)

    # Every inner gradient is taken with create_graph=True, kept or not: that
    # selects the differentiable backward formulas of some ops (GroupNorm's),
    # whose bits differ from the plain backward's, and both ways must agree.
    def step_graph(w, index):
        """Step t's graph at weights w_t: (w_t as a leaf, g_t with its graph
        through w_t and the memory)."""
        flat = w.detach().requires_grad_()
        (g,) = torch.autograd.grad(step_loss(flat, index), flat, create_graph=True)
        return flat, g

    def advance(w, v, index):
        """One inner step from (w_t, v_t), keeping no graph and not
        differentiating the memory. Returns (w_{t+1}, v_{t+1})."""
        flat = w.detach().requires_grad_()
        with torch.no_grad():
            images, labels = memory(index)
            images = augment(images)
        (g,) = torch.autograd.grad(flatnet.loss(flat, images, labels), flat, create_graph=True)
        return update(w, v, g.detach())

    def update(w, v, g):
        v = v.mul(momentum).add_(g)
        return w.add(v, alpha=-lr), v

    # Forward: w_T, keeping step t's graph (graphs[t]) for t < n_kept, and
    # (w_t, v_t) at every k-th later step t (kept[t]; v only if k > 1).
    k = snapshot_every
    with record_function("addrmem.inner_forward"):
        graphs, kept = {}, {}
        n_kept = 0
        if k == 1:  # the first step's graph, measured to see how many fit
            first, size = _saved_bytes(lambda: step_graph(w, batches[0]))
            budget = _free_bytes(w.device) // 2 if graph_budget is None else graph_budget
            n_kept = min(len(batches), budget // max(size, 1))
            if n_kept:
                graphs[0] = first
            del first  # freed here unless kept
        v = torch.zeros_like(w)
        for t, index in enumerate(batches):
            if t < n_kept:
                if t not in graphs:
                    graphs[t] = step_graph(w, index)
                w, v = update(w, v, graphs[t][1].detach())
            else:
                if t % k == 0:
                    kept[t] = (w, v.clone() if k > 1 else None)
                w, v = advance(w, v, index)

    flat = w.requires_grad_()
    loss = flatnet.loss(flat, augment(real_images), real_labels)
    (dw,) = torch.autograd.grad(loss, flat)

    # Reverse: dv = dL/dv_{t+1}, dw = dL/dw_{t+1}; segment by segment from the
    # last, each segment's weights recomputed from its kept step, unless its
    # graph was kept (then k = 1, so the segment is that step alone).
    with record_function("addrmem.reverse"):
        grads = [torch.zeros_like(p) for p in mem_params]
        dv = torch.zeros_like(dw)
        for start in reversed(range(0, len(batches), k)):
            stop = min(start + k, len(batches))
            if start in kept:
                w, v = kept.pop(start)
                weights = [w]
                for t in range(start, stop - 1):
                    w, v = advance(w, v, batches[t])
                    weights.append(w)
            for t in reversed(range(start, stop)):
                dv.sub_(dw, alpha=lr)
                flat, g = graphs.pop(t) if t in graphs else step_graph(weights.pop(), batches[t])
                h_w, *h_mem = torch.autograd.grad(g, (flat, *mem_params), grad_outputs=dv)
                dw.add_(h_w)
                for total, h in zip(grads, h_mem):
                    total.add_(h)
                dv.mul_(momentum)
    return loss.detach(), dict(zip(mem_names, grads))


def _saved_bytes(build):
    """(build(), the bytes of the distinct storages that the autograd graphs
    built inside it save for their backward)."""
    sizes = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = build()
    return result, sum(sizes.values())


def _free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device``: on CUDA the driver's free
    memory plus what PyTorch's allocator caches unused; on the CPU the free
    RAM (0 where the OS does not say, and for other devices)."""
    if device.type == "cuda":
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    if device.type == "cpu" and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 0


def _check_real_batch(images, labels, like, image_shape):
    """real_images (N, C, H, W) of ``like``'s dtype and device, real_labels (N,) int64 there too."""
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("real_images and real_labels must be tensors")
    if images.dtype != like.dtype or images.device != like.device:
        raise ValueError(f"real_images are {images.dtype} on {images.device} but the memory is {like.dtype} on "
                         f"{like.device}: pass real_images.to({like.device.type!r}, {like.dtype})")
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"real_images must have shape (N, {', '.join(map(str, image_shape))}) as the memory's "
                         f"images; got {tuple(images.shape)}")
    if labels.dtype != torch.int64 or labels.device != like.device or labels.shape != images.shape[:1]:
        raise ValueError(f"real_labels must be int64 ({images.shape[0]},) on {like.device}; got {labels.dtype} "
                         f"{tuple(labels.shape)} on {labels.device}")


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
