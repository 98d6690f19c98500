"""Outer iterations per second, peak memory and bytes exchanged against the
number of processes (docs/scaling.md).

For each N of ``--processes`` the benchmark starts N processes with
``torchrun --standalone`` (gloo on the CPU, NCCL on GPUs, one GPU per
process). Each runs one warm-up and then ``--iterations`` calls of the
library's ``addrmem.distill.OuterLoop.step`` with ``meta_batch`` M: the N
processes share out the M inner trajectories and combine their
hypergradients once per outer iteration (``addrmem.parallel.combine``).

* Strong scaling (the default): M = ``--meta-batch`` (default: the largest
  N) for every N, so every N does the same work and the ideal speed-up is N.
* ``--weak``: M = N x ``--meta-batch``, the same work per process.

Per N it prints the median seconds per outer iteration (and iterations per
second, speed-up over the first N), the median seconds of the update part
(the all-gather of the hypergradients, the clip and the optimizer step), the
peak memory of the largest process (resident set size on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU) and the bytes each process
receives per outer iteration, (N - 1) * ceil(M / N) * (P + 1) * 4 for a
memory of P float32 parameters.

The job is a ``DistillConfig`` (``--config FILE.yaml``, default: the digits
preset) with random images of the dataset's shape as the real data, so that
no dataset files are needed; the memory starts from its seeded init.
``--threads`` sets each process's intra-op threads (default 1: on the CPU
the processes share the cores). A benchmark measures and prints; it never
fails on time.

Usage (from the repository root)::

    python benchmarks/scaling.py                                   # digits, N = 1, 2 on the CPU
    python benchmarks/scaling.py --config configs/mnist-ipc1-cpu.yaml --processes 1,2 --iterations 3
    python benchmarks/scaling.py --config configs/cifar10-ipc1.yaml --device cuda --processes 1,2,4,8
    python benchmarks/scaling.py --weak --meta-batch 1 --json scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import types

import torch

from addrmem import parallel
from addrmem.config import DistillConfig, default_config, device_name
from addrmem.distill import OuterLoop, build_memory
from common import Stopwatch, fmt_bytes

SHAPES = {"digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "fashionmnist": ((1, 28, 28), 10),
          "svhn": ((3, 32, 32), 10), "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}
"""dataset -> (image shape, classes), for the random real images."""


def job_config(args) -> DistillConfig:
    config = DistillConfig.from_yaml(args.config) if args.config else default_config("digits")
    return DistillConfig.from_dict({"device": args.device}, base=config)


def worker(args) -> None:
    """One process of a torchrun group: time outer steps, write rank 0's summary to args.worker."""
    torch.set_num_threads(args.threads)
    parallel.setup()
    config = job_config(args)
    n = parallel.world_size()
    m = args.meta_batch * n if args.weak else args.meta_batch
    config = DistillConfig.from_dict({"meta_batch": m}, base=config)
    device = config.device_dtype()[0]
    parallel.check_device(device)
    shape, classes = SHAPES[config.dataset]
    memory = build_memory(config, types.SimpleNamespace(num_classes=classes, image_shape=shape))
    draws = torch.Generator().manual_seed(config.seed)
    per_class = 2 * config.real_per_class
    loop = OuterLoop(memory, config, torch.randn(classes * per_class, *shape, generator=draws),
                     torch.arange(classes).repeat_interleave(per_class), classes)
    seconds, update = [], []
    for it in range(args.iterations + 1):
        watch = Stopwatch(device)
        with watch("iteration"):
            loop.step(it, phase=watch)
        spans = watch.seconds()
        seconds.append(spans["iteration"])
        update.append(spans["update"])
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    peaks = parallel.gather([peak], n)  # one per process
    numel = sum(p.numel() for p in memory.parameters()) + 1
    if parallel.is_writer():
        with open(args.worker, "w") as f:
            json.dump({"processes": n, "meta_batch": m, "seconds": statistics.median(seconds[1:]),
                       "update_seconds": statistics.median(update[1:]), "peak_bytes": max(peaks),
                       "parameters": numel - 1,
                       "exchanged_bytes": parallel.exchanged_bytes(m, numel, memory.bases.element_size()),
                       "device": device_name(device), "threads": torch.get_num_threads()}, f)
    if n > 1:
        parallel.barrier()
        parallel.leave()


def run(args, processes: int) -> dict:
    """Start ``processes`` workers under torchrun; returns rank 0's summary."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        forwarded = ["--device", args.device, "--meta-batch", str(args.meta_batch), "--iterations",
                     str(args.iterations), "--threads", str(args.threads)]
        forwarded += (["--config", args.config] if args.config else []) + (["--weak"] if args.weak else [])
        # PYTHONFAULTHANDLER: a worker that aborts (a rare SIGABRT under load, issue 19) prints every thread's
        # Python stack, which says whether it died in a collective or in teardown
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONFAULTHANDLER": "1"}
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc-per-node={processes}", os.path.abspath(__file__), *forwarded,
                               "--worker", out], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"scaling: {processes} processes failed:\n{done.stderr[-8000:]}")
        with open(out) as f:
            return json.load(f)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Outer iterations per second, peak memory and bytes exchanged "
                                            "against the number of torch.distributed processes.")
    p.add_argument("--config", metavar="FILE.yaml", help="the job (default: the digits preset)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--processes", default="1,2", metavar="N,N,...", help="process counts (default: 1,2)")
    p.add_argument("--meta-batch", type=int, default=0, metavar="M",
                   help="trajectories per outer iteration (default: the largest process count); with --weak, "
                        "per process (default 1)")
    p.add_argument("--weak", action="store_true", help="M = processes x --meta-batch (the same work per process)")
    p.add_argument("--iterations", type=int, default=5, help="timed outer iterations after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.counts = [int(n) for n in args.processes.split(",")]
    except ValueError:
        p.error(f"--processes takes numbers separated by commas; got {args.processes!r}")
    if not args.counts or min(args.counts) < 1 or args.iterations < 1 or args.threads < 1:
        p.error("--processes, --iterations and --threads must be >= 1")
    if args.meta_batch == 0:
        args.meta_batch = 1 if args.weak else max(args.counts)
    if not args.weak and args.meta_batch < max(args.counts):
        p.error(f"--meta-batch {args.meta_batch} leaves processes idle: give at least {max(args.counts)}")
    try:
        job_config(args)
    except (ValueError, OSError) as exc:
        p.error(str(exc).splitlines()[0])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    config = job_config(args)
    print(f"job: {args.config or 'the digits preset'} ({config.dataset}, {config.network}, T = {config.steps}, "
          f"K = {config.n_bases}), {'weak' if args.weak else 'strong'} scaling, {args.threads} thread(s) per "
          f"process, median of {args.iterations} outer iterations")
    rows = [run(args, n) for n in args.counts]
    print(f"device: {rows[0]['device']}; memory: {rows[0]['parameters']} parameters")
    print(f"{'processes':>9} {'M':>3} {'s/iter':>8} {'iter/s':>7} {'speed-up':>8} {'update s':>9} "
          f"{'peak memory':>12} {'received/iter':>14}")
    for row in rows:
        work = row["meta_batch"] / rows[0]["meta_batch"]
        speedup = rows[0]["seconds"] * work / row["seconds"]
        print(f"{row['processes']:>9} {row['meta_batch']:>3} {row['seconds']:8.3f} {1 / row['seconds']:7.2f} "
              f"{speedup:7.2f}x {row['update_seconds']:9.4f} {fmt_bytes(row['peak_bytes']):>12} "
              f"{fmt_bytes(row['exchanged_bytes']):>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config.to_dict(), "weak": args.weak, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
