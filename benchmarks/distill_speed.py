"""Seconds per outer iteration and peak GPU memory: addrmem against the official algorithm.

Two implementations of one outer iteration of distillation (docs/method.md,
"One outer iteration" and "The hypergradient") run on the same job, the same
device, in one process:

- **(a) addrmem**: the library's outer step, ``addrmem.distill.OuterLoop.step``,
  whose hypergradient is ``addrmem.hypergradient`` (weights kept on the
  device as flat snapshots, the fused synthesis op, one double backward per
  step).
- **(b) official-style**: the official code's algorithm written plainly here
  (:class:`OfficialStyle`). The memory is two tensors, coefficients
  (n_cls * r, K) and bases (K, C*h*w); synthesis is the eager ``coeffs[index]
  @ bases``, reshaped to (N, C, h, w) and upsampled by ``F.interpolate``
  (bilinear, align_corners=False). The inner loop runs T steps of SGD with
  momentum written out (v <- mu*v + g, w <- w - lr*v) on the network
  module's parameters, keeping before each step a ``copy.deepcopy`` of the
  network moved to the CPU, and the step's row index. The reverse pass is
  docs/method.md's: for t = T-1..0 the step-t copy is moved back to the
  device (in place, so the copies stay there until the iteration ends, as
  in the official code), the step's loss is recomputed with ``create_graph=True``
  and one ``torch.autograd.grad`` of <g_t, dv> gives the weights' and the
  memory's parts (a double backward per step). It runs inside the same
  ``outer_step`` as (a), through ``OuterLoop.step``'s ``gradient`` hook:
  the two tables are the parameters ``addresses`` and ``bases`` of a small
  module, so the sampling and the update (global clip 2, SGD lr 0.1,
  momentum 0.5) are the same code.

Inner lr 0.01 and momentum 0.9 (``DistillConfig()``'s defaults, the
official ones, docs/method.md, "Reference settings"); no augmentation (the
README job's ``none``).

What is compared. Each implementation runs in an ``addrmem.distill.OuterLoop``
of its own (its memory, outer optimizer and generators), both made by
``outer_step.Job.outer_loop``: their generators are seeded alike and draw
alike, so outer iteration i of both gets the same network weights, T row
indices (``memory.sample_index``, all classes) and real batch (as
``benchmarks/outer_step.py``: a pool of random "real" images on the device,
one pool for both). Both memories start equal ((b)'s tables are copies of (a)'s initial
values). On the first (warm-up) iteration the benchmark compares the two
hypergradients, taken before either memory is updated: ||g_a - g_b|| / ||g_b|| and max |g_a - g_b|, for the bases and
for the addresses separately (they compute the same function: only rounding
differs). After the timed iterations it also compares the two memories,
which have taken the same updates from the same inputs. In float64 both
differences are at the rounding level (about 1e-13 on ``--quick``).

Float32 and ReLU. The hypergradient of a ReLU network is only piecewise
smooth: the inner gradients jump where a pre-activation crosses zero, so
rounding at the 1e-7 level can flip a few ReLU masks and move the
hypergradient by far more. Measured on the CPU (addrmem's float32
hypergradient against its float64 one at the same memory and inputs): about
1e-4 relative on ``--quick``'s ConvNet, 2e-3 to 3e-3 on the default CIFAR-10
shape (T = 2), 1e-2 on a 1x16x16 variant of ``--quick``, but 5e-6 on that
variant with GELU in place of ReLU, and 3e-7 with ``--net mlp`` (far fewer
units to flip). So in float32 the (a)-(b) difference measures rounding
noise: ``--fp64-reference`` also computes addrmem's float64 hypergradient on
the warm-up inputs and reports each float32 hypergradient's distance to it,
which says whether (a) and (b) differ by more than float32 itself does. For
the same reason the float32 memories drift apart over the iterations.

How it is timed. After the warm-up, ``--iterations`` outer iterations, the
two implementations alternating on the same inputs (each on its own memory
and outer optimizer). The timed part of an outer iteration is hypergradient
+ outer update (``outer_step``'s "hypergradient" and "update" phases); the
network and the inputs are made outside it. CUDA events around each phase on
CUDA (the update reads the loss, and the events are read after a
synchronisation at the iteration's end), ``time.perf_counter`` on the CPU.
Reported: the median seconds per outer iteration of each, the speed-up
(b)/(a), and on CUDA ``torch.cuda.max_memory_allocated`` over each
implementation's iterations (peak stats reset before each; it includes what
both keep resident: the two memories and optimizers, the real pool, the
inputs); n/a on the CPU.

Precision. On CUDA in float32, TF32 is off for both cuBLAS and cuDNN unless
``--tf32`` is given (PyTorch's default lets cuDNN convolutions use TF32).
With ``--tf32`` both implementations run with TF32 on, and the benchmark
also reports how far addrmem's TF32 hypergradient lies from its full-float32
one on the warm-up inputs.

Targets (from the project's issue; the default setting, one H100, float32):
the official-style implementation was measured at 4.39 s per outer iteration;
(a) should take at most 1.0 s, with hypergradients agreeing to 1e-4. The
benchmark prints whether this run meets them; it never fails on time (the
exit status is 0 unless the arguments are bad).

Settings: the default is the README's CIFAR-10 IPC-1 job (docs/method.md,
"Reference settings", ``outer_step.DEFAULT``):
``AddressableMemory.from_budget(1, 10, (3, 32, 32), 16, 2)`` (115 rows per class), ConvNet, T = 150, 32 rows per class per step
(320 synthetic images), 64 real images per class. ``--quick`` is
``outer_step.QUICK``'s tiny job (1x8x8, T = 5) that runs in seconds on a CPU.
``--cpu-cifar`` is ``outer_step.CPU_CIFAR``, the CPU CIFAR-10 setting (the
same memory and real batch, ConvNet width 32 depth 3, T = 10, 10 rows per
class per step). ``--net`` picks another network of
``addrmem.networks.NETWORKS``, ``--net-width`` and ``--net-depth`` its size.

Usage (from the repository root)::

    python benchmarks/distill_speed.py                          # GPU if there is one
    python benchmarks/distill_speed.py --quick --device cpu --dtype float64
    python benchmarks/distill_speed.py --steps 10 --iterations 1 --json out.json
    OMP_NUM_THREADS=2 python benchmarks/distill_speed.py --cpu-cifar --device cpu --iterations 5
    python benchmarks/distill_speed.py --cpu-cifar --device cpu --net-width 64 --steps 30
    python benchmarks/distill_speed.py --quick --device cpu --net mlp --fp64-reference
    python benchmarks/distill_speed.py --device cuda --fp64-reference
    python benchmarks/distill_speed.py --device cuda --tf32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import addrmem  # noqa: F401
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import addrmem  # noqa: F401
from addrmem import hypergradient
from common import Stopwatch, device_name, fmt_bytes, fmt_time
from outer_step import DEFAULT, QUICK, Job, add_job_arguments, job_from, run_info

DTYPES = ("float32", "float64")
IMPLEMENTATIONS = ("addrmem", "official")
LABELS = {"addrmem": "(a) addrmem", "official": "(b) official-style"}
TARGET_SECONDS = 1.0  # (a) per outer iteration, default setting, one H100, float32
TARGET_AGREEMENT = 1e-4  # relative difference of the hypergradients in float32
REFERENCE_OFFICIAL_SECONDS = 4.39  # (b) measured by the project lead on one H100


class OfficialStyle(nn.Module):
    """The official algorithm (docs/method.md), written plainly.

    Parameters ``addresses`` (n_cls * r, K) and ``bases`` (K, C*h*w): copies of
    an ``AddressableMemory``'s initial values, so both start equal. Its rows
    are sampled as that memory's (``sample_index``), so ``outer_step`` can
    run it.
    """

    def __init__(self, memory):
        super().__init__()
        self.addresses = nn.Parameter(memory.addresses.detach().clone())
        self.bases = nn.Parameter(memory.bases.detach().reshape(memory.n_bases, -1).clone())
        self.low_shape = tuple(memory.bases.shape[1:])  # (C, h, w)
        self.downsample = memory.downsample
        self.per_class = memory.per_class
        self.num_classes, self.image_shape = memory.num_classes, memory.image_shape
        self.sample_index = memory.sample_index  # depends on the geometry alone

    def synthesize(self, index):
        """Eager gather + matmul + F.interpolate: (images (N, C, H, W), labels (N,))."""
        low = (self.addresses[index] @ self.bases).view(-1, *self.low_shape)
        images = low if self.downsample == 1 else F.interpolate(
            low, scale_factor=self.downsample, mode="bilinear", align_corners=False)
        return images, index // self.per_class

    def hypergradient(self, net, batches, real_images, real_labels, *, lr, momentum, augment=None):
        """(outer loss, {"addresses": G_A, "bases": G_B}); trains ``net`` in
        place. Called as ``outer_step``'s ``gradient`` (self = the memory);
        no augmentation."""
        if augment is not None:
            raise ValueError("the official-style implementation runs without augmentation")
        device = real_images.device
        params = list(net.parameters())
        velocity = [torch.zeros_like(p) for p in params]
        saved = []  # (network copy on the CPU, row index), one per step
        for index in batches:
            saved.append((copy.deepcopy(net).cpu(), index))
            with torch.no_grad():
                images, labels = self.synthesize(index)
            grads = torch.autograd.grad(F.cross_entropy(net(images), labels), params)
            with torch.no_grad():
                for p, v, g in zip(params, velocity, grads):
                    v.mul_(momentum).add_(g)
                    p.sub_(v, alpha=lr)

        loss = F.cross_entropy(net(real_images), real_labels)
        dw = list(torch.autograd.grad(loss, params))
        dv = [torch.zeros_like(p) for p in params]
        g_addresses, g_bases = torch.zeros_like(self.addresses), torch.zeros_like(self.bases)
        for model, index in reversed(saved):
            for v, w in zip(dv, dw):
                v.sub_(w, alpha=lr)
            model.to(device)  # in place: it stays on the device until the iteration ends
            weights = list(model.parameters())
            images, labels = self.synthesize(index)
            g = torch.autograd.grad(F.cross_entropy(model(images), labels), weights, create_graph=True)
            *h_w, h_addresses, h_bases = torch.autograd.grad(g, (*weights, self.addresses, self.bases),
                                                             grad_outputs=dv)
            for w, h in zip(dw, h_w):
                w.add_(h)
            g_addresses.add_(h_addresses)
            g_bases.add_(h_bases)
            for v in dv:
                v.mul_(momentum)
        return loss.detach(), {"addresses": g_addresses, "bases": g_bases}


class Runner:
    """One implementation: its ``loop`` (an ``addrmem.distill.OuterLoop``
    over its memory, from ``Job.outer_loop``) and its ``gradient``, the
    hypergradient its outer steps take."""

    def __init__(self, name: str, loop):
        self.name, self.loop = name, loop
        self.device = next(loop.memory.parameters()).device
        self.gradient = hypergradient if name == "addrmem" else OfficialStyle.hypergradient

    def step(self, i: int, gradient=None, phase=None) -> None:
        """Outer iteration ``i`` of the loop, with ``gradient`` in place of
        the implementation's own if given."""
        self.loop.step(i, gradient=gradient or self.gradient, phase=phase)

    def timed_iteration(self, i: int) -> tuple[float, int | None]:
        """Outer iteration ``i``: (seconds of its hypergradient + update, peak
        bytes allocated on CUDA, else None)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        watch = Stopwatch(self.device)
        timed = ("hypergradient", "update")
        self.step(i, phase=lambda name: watch(name) if name in timed else contextlib.nullcontext())
        seconds = sum(watch.seconds()[name] for name in timed)
        return seconds, torch.cuda.max_memory_allocated(self.device) if cuda else None


def make_runners(job: Job) -> dict:
    """{"addrmem": the job's loop, "official": an :class:`OfficialStyle`
    copy of its memory's initial values in a loop of its own}, as
    :class:`Runner`; their loops draw the same inputs, iteration for
    iteration."""
    return {"addrmem": Runner("addrmem", job.loop),
            "official": Runner("official", job.outer_loop(OfficialStyle(job.memory)))}


def warm_up(runners: dict, tf32_effect: bool = False, fp64_reference: bool = False):
    """Outer iteration 0 of every runner, recording each hypergradient before
    its update: ({name: (outer loss, gradients)}, addrmem's gradients on the
    same memory and inputs with TF32 off if ``tf32_effect``, and in float64 if
    ``fp64_reference`` (else None))."""
    first, extra = {}, {"tf32_off": None, "float64": None}

    def recording(runner):
        def gradient(memory, net, batches, real_images, real_labels, **kw):
            loss, grads = runner.gradient(memory, net, batches, real_images, real_labels, **kw)
            first[runner.name] = (float(loss), clone(grads))
            if runner.name == "addrmem" and tf32_effect:  # addrmem's hypergradient leaves the net unchanged
                with tf32(False):
                    extra["tf32_off"] = clone(hypergradient(memory, net, batches, real_images, real_labels, **kw)[1])
            if runner.name == "addrmem" and fp64_reference:
                float64 = torch.float64
                extra["float64"] = hypergradient(copy.deepcopy(memory).to(dtype=float64),
                                                 copy.deepcopy(net).to(dtype=float64), batches,
                                                 real_images.to(float64), real_labels, **kw)[1]
            return loss, grads
        return gradient

    for runner in runners.values():
        runner.step(0, gradient=recording(runner))
    return first, extra["tf32_off"], extra["float64"]


def difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """{"rel": ||a - b|| / ||b||, "max_abs": max |a - b|, "norm": ||b||}, in float64."""
    a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
    diff, norm = (a - b).norm().item(), b.norm().item()
    rel = diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))
    return {"rel": rel, "max_abs": (a - b).abs().max().item(), "norm": norm}


def compare(grads_a: dict, grads_b: dict) -> dict:
    """Per table ("bases", "addresses"): :func:`difference` of (a) against (b)."""
    return {name: difference(grads_a[name], grads_b[name]) for name in ("bases", "addresses")}


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 on or off for cuBLAS matmuls and cuDNN convolutions, restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def agreement_view(tables: dict, memory) -> dict:
    """(b)'s {"addresses", "bases"} tables (or their gradients) shaped as (a)'s."""
    return {"addresses": tables["addresses"], "bases": tables["bases"].view_as(memory.bases)}


def clone(grads: dict) -> dict:
    return {name: g.detach().clone() for name, g in grads.items()}


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Seconds per outer iteration and peak GPU memory of addrmem against a plain-PyTorch "
                    "implementation of the official algorithm, and how far their hypergradients differ.",
        epilog="See the module docstring for what is measured and how.",
    )
    add_job_arguments(p, DTYPES)
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions for both (CUDA, float32 "
                   "only); also reports addrmem's TF32 hypergradient against its float32 one")
    p.add_argument("--fp64-reference", action="store_true", help="float32 only: also compute addrmem's float64 "
                   "hypergradient on the warm-up inputs and report how far each float32 one lies from it")
    args = p.parse_args(argv)
    if args.tf32 and args.dtype != "float32":
        p.error("--tf32 applies to float32 only")
    if args.fp64_reference and args.dtype != "float32":
        p.error("--fp64-reference applies to float32 only")
    if args.tf32 and args.device.type != "cuda":
        p.error("--tf32 needs a CUDA device")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    job = job_from(args, "distill_speed.py", augment=False)
    if job is None:
        return 2
    iterations = args.iterations or (3 if args.setting is QUICK else 5)
    with tf32(args.tf32) if job.device.type == "cuda" else contextlib.nullcontext():
        return run(args, job, iterations)


def run(args, job: Job, iterations: int) -> int:
    setting, device, memory = job.setting, job.device, job.memory
    cuda = device.type == "cuda"
    runners = make_runners(job)
    net_params = job.net_weights
    precision = f", TF32 {'on' if args.tf32 else 'off'} (cuBLAS and cuDNN)" if cuda and args.dtype == "float32" else ""
    print(f"distill_speed benchmark on {device_name(device)}, torch {torch.__version__}, {args.dtype}{precision}")
    print(f"setting {setting.name}: {job.config.network_spec()} ({net_params:,} weights) on {setting.image_shape} images, "
          f"{setting.num_classes} classes; AddressableMemory ipc {setting.ipc}, K={memory.n_bases}, "
          f"ds={memory.downsample}, {memory.per_class} rows/class; T={setting.steps}, "
          f"{setting.n_per_c * setting.num_classes} synthetic and {setting.real_per_class * setting.num_classes} "
          f"real images per step; inner SGD lr {job.config.inner_lr} momentum {job.config.inner_momentum}; "
          f"outer SGD lr {job.config.outer_lr} momentum {job.config.outer_momentum}, clip {job.config.clip}")
    print(f"(a) addrmem.hypergradient; (b) official-style plain PyTorch (per-step deepcopy of the network to "
          f"the CPU, eager synthesis, double backward per step); median of {iterations} outer iteration(s) each, "
          f"after 1 warm-up each, seed {args.seed}")

    # Warm-up (iteration 0): both hypergradients from identical memories, each recorded before its update.
    warm, grads_tf32_off, grads_fp64 = warm_up(runners, args.tf32, args.fp64_reference)
    official = warm["official"][1]
    agreement = compare(warm["addrmem"][1], agreement_view(official, memory))
    losses = {name: loss for name, (loss, _) in warm.items()}
    tf32_effect = None if grads_tf32_off is None else compare(warm["addrmem"][1], grads_tf32_off)
    reference = None
    if grads_fp64 is not None:
        reference = {name: compare(grads, grads_fp64) for name, grads in
                     (("addrmem", warm["addrmem"][1]), ("official", agreement_view(official, memory)))}
    del warm, official

    resident = torch.cuda.memory_allocated(device) if cuda else None
    runs = {name: [] for name in IMPLEMENTATIONS}
    peaks = {name: [] for name in IMPLEMENTATIONS}
    for i in range(1, iterations + 1):
        for name, runner in runners.items():
            seconds, peak = runner.timed_iteration(i)
            runs[name].append(seconds)
            peaks[name].append(peak)
    seconds = {name: statistics.median(runs[name]) for name in IMPLEMENTATIONS}
    peak = {name: max(peaks[name]) if cuda else None for name in IMPLEMENTATIONS}
    speedup = seconds["official"] / seconds["addrmem"]
    official = runners["official"].loop.memory
    memory_after = compare(dict(memory.named_parameters()), agreement_view(dict(official.named_parameters()), memory))

    worst = max(agreement[name]["rel"] for name in agreement)
    meets_time = seconds["addrmem"] <= TARGET_SECONDS
    meets_agreement = worst <= TARGET_AGREEMENT
    target_run = cuda and setting == DEFAULT and args.dtype == "float32" and not args.tf32

    print()
    print(f"{'':<38}{LABELS['addrmem']:>16}{LABELS['official']:>22}")
    print(f"{'seconds per outer iteration (median)':<38}{fmt_time(seconds['addrmem']):>16}"
          f"{fmt_time(seconds['official']):>22}")
    print(f"{'peak GPU memory allocated':<38}{fmt_bytes(peak['addrmem']):>16}{fmt_bytes(peak['official']):>22}")
    print(f"{'outer loss, warm-up iteration':<38}{losses['addrmem']:>16.6f}{losses['official']:>22.6f}")
    print()
    print(f"speed-up (b)/(a): {speedup:.2f}x")
    if cuda:
        print(f"peak memory includes {fmt_bytes(resident)} resident for both (memories, optimizers, real pool)")
    print("hypergradients on the warm-up iteration, (a) against (b): ||a - b|| / ||b||, max |a - b|")
    for name, d in agreement.items():
        print(f"  {name:<10} rel {d['rel']:.3e}   max abs {d['max_abs']:.3e}   (||b|| = {d['norm']:.4e})")
    if reference is not None:
        print("float32 hypergradients against addrmem's float64 one on the same inputs (rounding alone):")
        for impl, diff in reference.items():
            print(f"  {LABELS[impl]:<20} " + ", ".join(f"{name} rel {d['rel']:.3e}" for name, d in diff.items()))
    if tf32_effect is not None:
        print("addrmem's TF32 hypergradient against its full-float32 one, same inputs:")
        for name, d in tf32_effect.items():
            print(f"  {name:<10} rel {d['rel']:.3e}   max abs {d['max_abs']:.3e}")
    print(f"memories after {iterations + 1} updates, (a) against (b): "
          + ", ".join(f"{name} rel {d['rel']:.3e}" for name, d in memory_after.items()))
    where = "" if target_run else (" (this run is not the target's: default setting, T=150, CUDA, float32, "
                                   "TF32 off)")
    print(f"target (a) <= {TARGET_SECONDS} s per outer iteration (one H100; (b) there: "
          f"{REFERENCE_OFFICIAL_SECONDS} s): {'met' if meets_time else 'not met'}{where}")
    print(f"target hypergradients agree to {TARGET_AGREEMENT:g}: {'met' if meets_agreement else 'not met'} "
          f"(worst rel {worst:.3e}, {args.dtype}{', TF32' if args.tf32 else ''})")

    if args.json:
        result = {
            **run_info(setting, memory, net_params, device, args.dtype, args.seed),
            "tf32": args.tf32,
            "iterations": iterations,
            "seconds_per_iteration": seconds,
            "runs": runs,
            "speedup": speedup,
            "peak_memory_bytes": peak,
            "resident_memory_bytes": resident,
            "warmup_loss": losses,
            "hypergradient_difference": agreement,
            "tf32_vs_float32_hypergradient": tf32_effect,
            "float64_reference_difference": reference,
            "memory_difference_after": memory_after,
            "target": {"seconds": TARGET_SECONDS, "agreement": TARGET_AGREEMENT,
                       "reference_official_seconds": REFERENCE_OFFICIAL_SECONDS, "target_run": target_run,
                       "seconds_met": meets_time, "agreement_met": meets_agreement},
        }
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
