"""Time addrmem.synthesize against PyTorch eager and torch.compile, beside the
memory-bandwidth floor.

For each shape, three methods compute the same thing:

- ``addrmem``: the fused op, ``addrmem.synthesize``;
- ``eager``: ``addrmem.synthesize_reference`` (gather, matmul, reshape,
  ``F.interpolate``) in plain PyTorch;
- ``compile``: ``torch.compile(synthesize_reference, fullgraph=True)``; if
  compilation fails the row says why and shows n/a.

Each is timed forward only (under ``torch.no_grad``) and forward+backward
(``torch.autograd.grad`` of the output, with a fixed random ``grad_out``,
with respect to addresses and bases). Before timing, addrmem's output and both
gradients are checked once per shape against the reference computed in
float64; a mismatch prints a ``CHECK`` warning row (and ``"match": false`` in
the JSON). The ``floor`` row is the time just to move the bytes the
computation must move, at the copy bandwidth measured in the same run:

- forward: read the N address rows (and the index), read the bases, write the
  output;
- forward+backward: that, plus read ``grad_out`` once and write
  ``grad_addresses`` (R x K) and ``grad_bases``.

The ``fresh`` row times ``torch.empty(output shape).fill_(0)``: allocating a
new output tensor and writing it once. Every method returns a new tensor and
pays this; on the CPU, where the allocator hands large blocks back to the
operating system, it includes the page faults of first touching fresh memory,
which can cost far more than the copy floor.

Ratio columns: ``/ours`` is a method's time over addrmem's (above 1: slower
than addrmem), ``/floor`` its time over the floor (1 would be perfect).

On CUDA: CUDA events around every call, warm-up, the median of ``--repeats``
(default 100) calls, rotating among independent input sets that together
exceed twice the L2 cache, so no method finds its inputs in cache. On the
CPU: ``time.perf_counter``, the median of fewer calls (default 10); with
``--clock thread``, the calling thread's CPU time instead (``time.thread_time``:
with one intra-op thread, ``torch.set_num_threads(1)``, it is all the work, and
it barely moves when other processes load the machine).

A benchmark measures and prints; it never fails on time (the exit status is 0
unless the arguments are bad).

Usage (from the repository root)::

    python benchmarks/kernel_speed.py                      # GPU if there is one
    python benchmarks/kernel_speed.py --dtype bfloat16 --json out.json
    python benchmarks/kernel_speed.py --quick              # tiny shapes, seconds
    python benchmarks/kernel_speed.py --device cpu --no-compile --repeats 5
    python benchmarks/kernel_speed.py --device cpu --no-compile --threads 1 --clock thread --only streams
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import addrmem
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import addrmem
from common import device_name, fmt_time

METHODS = ("addrmem", "eager", "compile")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Largest allowed |addrmem - float64 reference|, relative to max |reference|,
# for the output and both gradients.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    rows: int  # R: rows of addresses
    n: int  # N: images synthesized (== R without an index)
    k: int  # K: bases
    c: int
    h: int
    w: int
    scale: int
    index: str = ""  # "": none; "repeats": N rows drawn from R; "permutation": of the R rows (N == R)

    @property
    def label(self) -> str:
        rows = {"": "", "repeats": f"/{self.rows}", "permutation": " perm"}[self.index]
        out = f"{self.h * self.scale}x{self.w * self.scale}"
        return f"{self.name} N{self.n}{rows} K{self.k} {self.c}x{self.h}x{self.w}->{out}"

    def traffic(self, itemsize: int) -> tuple[int, int]:
        """Bytes that must move: (forward, forward+backward)."""
        out = self.n * self.c * self.h * self.w * self.scale**2 * itemsize
        bases = self.k * self.c * self.h * self.w * itemsize
        index = 8 * self.n if self.index else 0
        forward = self.n * self.k * itemsize + index + bases + out
        return forward, forward + out + self.rows * self.k * itemsize + bases


# Scale 1 with few bases, as the digits default job (740 rows, K=12, 1x8x8)
# and the continual streams (K=4-8, 1x28x28) run it: (name, R, K, C, h, w).
SMALL_K = [("digits", 740, 12, 1, 8, 8), ("streams", 2000, 8, 1, 28, 28), ("scale1", 1024, 32, 3, 32, 32),
           ("scale1", 4096, 32, 3, 32, 32)]
SHAPES = [
    Shape("paper", 1150, 320, 16, 3, 16, 16, 2, "repeats"),  # the paper's one-inner-step shape
    Shape("mnist", 4000, 1024, 32, 1, 14, 14, 2, "repeats"),
    Shape("large", 8192, 8192, 64, 3, 32, 32, 2),
    Shape("large", 8192, 8192, 64, 3, 32, 32, 2, "repeats"),  # the indexed backward's sums over repeats
    *[Shape(name, R, R, K, C, h, w, 1, index) for name, R, K, C, h, w in SMALL_K
      for index in ("", "permutation", "repeats")],
    *[Shape("sweep", 2000, 2000, K, 1, 28, 28, 1) for K in (1, 2, 4, 8, 16, 32, 64)],
]
QUICK_SHAPES = [
    Shape("tiny", 50, 32, 4, 3, 8, 8, 2, "repeats"),
    Shape("tiny1", 24, 24, 3, 1, 5, 7, 1),
]


@dataclasses.dataclass
class Inputs:
    addresses: torch.Tensor
    bases: torch.Tensor
    index: torch.Tensor | None
    grad_out: torch.Tensor


def make_inputs(shape: Shape, dtype, device, count: int, seed: int = 0) -> list[Inputs]:
    g = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(count):
        A = torch.randn(shape.rows, shape.k, generator=g, device=device, dtype=dtype)
        B = torch.randn(shape.k, shape.c, shape.h, shape.w, generator=g, device=device, dtype=dtype)
        index = None
        if shape.index == "repeats":
            index = torch.randint(0, shape.rows, (shape.n,), generator=g, device=device)
        elif shape.index == "permutation":
            index = torch.randperm(shape.rows, generator=g, device=device)
        H, W = shape.h * shape.scale, shape.w * shape.scale
        grad_out = torch.randn(shape.n, shape.c, H, W, generator=g, device=device, dtype=dtype)
        sets.append(Inputs(A.requires_grad_(), B.requires_grad_(), index, grad_out))
    return sets


def time_op(fn, sets: list, device: torch.device, warmup: int, repeats: int, clock=time.perf_counter) -> float:
    """Median seconds of ``fn(s)``, cycling ``s`` through ``sets`` (on the CPU, by ``clock``)."""
    for i in range(warmup):
        fn(sets[i % len(sets)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(sets[i % len(sets)])
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        times = []
        for i in range(repeats):
            t0 = clock()
            fn(sets[i % len(sets)])
            times.append(clock() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, repeats: int) -> float:
    """Bytes per second of ``dst.copy_(src)``, counting the read and the write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = time_op(lambda pair: pair[1].copy_(pair[0]), [(src, dst)], device, warmup, repeats)
    return 2 * src.numel() * 4 / seconds


def method_fn(method: str, scale: int):
    """``f(addresses, bases, index)`` for one method."""
    if method == "addrmem":
        return lambda A, B, index: addrmem.synthesize(A, B, index, scale)
    reference = addrmem.synthesize_reference
    if method == "compile":
        torch._dynamo.reset()  # fresh caches and recompile budget for each shape
        reference = torch.compile(reference, fullgraph=True, dynamic=False)
    return lambda A, B, index: reference(A, B, index, scale)


def passes(f):
    """The two timed steps of a method: forward, and forward+backward."""

    def forward(s: Inputs):
        with torch.no_grad():
            return f(s.addresses, s.bases, s.index)

    def forward_backward(s: Inputs):
        return torch.autograd.grad(f(s.addresses, s.bases, s.index), (s.addresses, s.bases), s.grad_out)

    return forward, forward_backward


def check(shape: Shape, s: Inputs) -> tuple[bool, float, str]:
    """addrmem's output and gradients against the float64 reference:
    (match, largest error relative to max |reference|, note)."""

    def outputs(f, s):  # output, grad_addresses, grad_bases
        forward, forward_backward = passes(f)
        return forward(s), *forward_backward(s)

    s64 = Inputs(
        s.addresses.detach().double().requires_grad_(),
        s.bases.detach().double().requires_grad_(),
        s.index,
        s.grad_out.double(),
    )
    try:
        want = outputs(method_fn("eager", shape.scale), s64)
        got = outputs(method_fn("addrmem", shape.scale), s)
    except Exception as exc:  # noqa: BLE001 - report any failure as a mismatch row
        return False, math.inf, f"check failed: {describe(exc)}"
    tol = TOLERANCE[s.addresses.dtype]
    errors = {}
    for name, x, ref in zip(("output", "grad_addresses", "grad_bases"), got, want):
        if x.shape != ref.shape:
            errors[name] = math.inf
        else:
            errors[name] = float((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    worst = max(errors.values())
    if worst <= tol:
        return True, worst, ""
    bad = ", ".join(f"{k} {v:.2g}" for k, v in errors.items() if v > tol)
    return False, worst, f"MISMATCH vs reference (max err / max |ref|, tol {tol:g}): {bad}"


def describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 160 else text[:157] + "..."


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt_ratio(r) -> str:
    return "-" if r is None else f"{r:#.3g}x" if r < 100 else f"{r:.0f}x"


COLUMNS = [  # (heading, width, row key, format)
    ("shape", 36, "shape", str),
    ("dtype", 9, "dtype", str),
    ("method", 8, "method", str),
    ("fwd", 10, "fwd_s", fmt_time),
    ("fwd+bwd", 10, "fwd_bwd_s", fmt_time),
    ("fwd/ours", 9, "fwd_vs_addrmem", fmt_ratio),
    ("f+b/ours", 9, "fwd_bwd_vs_addrmem", fmt_ratio),
    ("fwd/floor", 9, "fwd_vs_floor", fmt_ratio),
    ("f+b/floor", 9, "fwd_bwd_vs_floor", fmt_ratio),
    ("note", 0, "note", str),
]


def print_cells(cells) -> None:
    print("  ".join(f"{c:<{w}}" for c, (_, w, _, _) in zip(cells, COLUMNS)).rstrip(), flush=True)


def print_row(row: dict) -> None:
    print_cells([fmt(row.get(key)) for _, _, key, fmt in COLUMNS])


def bench_shape(shape: Shape, dtype, device, args, bandwidth: float) -> list[dict]:
    traffic = shape.traffic(torch.empty((), dtype=dtype).element_size())
    floor = [b / bandwidth for b in traffic]
    # Enough independent input sets to exceed twice the L2 cache on CUDA.
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 << 20
        n_sets = min(64, max(2, math.ceil(2 * l2 / traffic[1])))
    else:
        n_sets = 2
    sets = make_inputs(shape, dtype, device, n_sets)
    base = {
        "shape": shape.label,
        **dataclasses.asdict(shape),
        "H": shape.h * shape.scale,
        "W": shape.w * shape.scale,
        "dtype": str(dtype).removeprefix("torch."),
        "input_sets": n_sets,
    }
    match, err, note = check(shape, sets[0])
    base.update(match=match, max_err=err if math.isfinite(err) else None)
    rows = []
    if not match:
        print_row(dict(base, method="CHECK", note=f"!!! {note}"))
    for method in METHODS:
        times, notes = [None, None], []
        if method == "compile" and not args.compile:
            notes.append("skipped: --quick (add --compile)" if args.quick else "skipped: --no-compile")
        else:
            try:
                steps = passes(method_fn(method, shape.scale))
            except Exception as exc:  # noqa: BLE001
                steps, notes = (), [describe(exc)]
            for i, step in enumerate(steps):
                try:
                    times[i] = time_op(step, sets, device, args.warmup, args.repeats, args.clock)
                except Exception as exc:  # noqa: BLE001 - a failing method is n/a, not fatal
                    notes.append(f"{('fwd', 'fwd+bwd')[i]}: {describe(exc)}")
        rows.append(dict(base, method=method, fwd_s=times[0], fwd_bwd_s=times[1], note="; ".join(notes)))
    rows.append(
        dict(base, method="floor", fwd_s=floor[0], fwd_bwd_s=floor[1], bytes_fwd=traffic[0], bytes_fwd_bwd=traffic[1],
             note=f"bytes moved / {bandwidth / 1e9:.1f} GB/s copy")
    )
    out_shape = (shape.n, shape.c, shape.h * shape.scale, shape.w * shape.scale)
    fresh = time_op(lambda _: torch.empty(out_shape, dtype=dtype, device=device).fill_(0), [None], device,
                    args.warmup, args.repeats)
    rows.append(dict(base, method="fresh", fwd_s=fresh, fwd_bwd_s=None,
                     note="allocate and first write an output of this size (every method returning a new tensor pays it)"))
    ours = rows[0]
    for row in rows:
        row["fwd_vs_addrmem"] = ratio(row["fwd_s"], ours["fwd_s"])
        row["fwd_bwd_vs_addrmem"] = ratio(row["fwd_bwd_s"], ours["fwd_bwd_s"])
        row["fwd_vs_floor"] = ratio(row["fwd_s"], floor[0])
        row["fwd_bwd_vs_floor"] = ratio(row["fwd_bwd_s"], floor[1])
        print_row(row)
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Time addrmem.synthesize against PyTorch eager and torch.compile, beside the memory floor.",
        epilog="See the module docstring for what is measured and how.",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda if available, else cpu (default)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and few runs, no torch.compile unless --compile")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--compile", dest="compile", action="store_true", default=None,
                       help="time torch.compile (the default, except with --quick)")
    group.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per measurement (default: 100 on CUDA, 10 on CPU or with --quick)")
    p.add_argument("--only", metavar="NAME", action="append",
                   help="time only the shapes of this name (repeatable): " + ", ".join(dict.fromkeys(s.name for s in SHAPES)))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU (default: torch's)")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="CPU only: wall time, or the calling thread's CPU time (use with --threads 1)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    args.clock = time.thread_time if args.clock == "thread" else time.perf_counter
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype]
    if args.compile is None:
        args.compile = not args.quick
    if args.repeats is None:
        args.repeats = 10 if args.quick or not cuda else 100
    if args.threads is not None and not cuda:
        torch.set_num_threads(args.threads)
    args.warmup = 1 if args.quick and not cuda else min(10, args.repeats) if cuda else 2
    shapes = [s for s in (QUICK_SHAPES if args.quick else SHAPES) if not args.only or s.name in args.only]

    info = addrmem.build_info()
    print(f"addrmem.synthesize benchmark on {device_name(device)}, torch {torch.__version__}, "
          f"{args.dtype}, median of {args.repeats} (after {args.warmup} warm-up)"
          f"{', thread CPU time' if args.clock is time.thread_time and not cuda else ''}")
    print(f"addrmem build: {info}")
    if not cuda and hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5:
        print(f"note: load average {os.getloadavg()[0]:.1f} before starting: other processes compete "
              f"for the CPU, so CPU times may be inflated")
    if cuda and not info["cuda"]:
        print("WARNING: addrmem was built without CUDA kernels; its rows will be n/a")
    copy_bytes = (64 << 20) if args.quick else (512 << 20)
    bandwidth = copy_bandwidth(device, copy_bytes, args.warmup, max(args.repeats, 5) if cuda else 5)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (dst.copy_(src) of {copy_bytes >> 20} MiB, read + write)")
    print()
    print_cells([heading for heading, *_ in COLUMNS])
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, dtype, device, args, bandwidth)
        print()
        if cuda:
            torch.cuda.empty_cache()

    mismatched = sorted({r["shape"] for r in rows if not r["match"]})
    if mismatched:
        print(f"WARNING: addrmem did not match the reference for: {', '.join(mismatched)}")
    else:
        print("addrmem matched the float64 reference (output and both gradients) on every shape.")
    if args.json:
        result = {
            "device": device_name(device),
            "device_type": device.type,
            "torch": torch.__version__,
            "build_info": info,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": args.dtype,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
