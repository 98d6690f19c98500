"""Accuracy against the meta-batch at equal compute (docs/scaling.md).

For each M of ``--meta-batch`` and each seed, distills the job's memory with
``meta_batch`` M for ``iterations / M`` outer iterations (so every M
computes the same number of inner trajectories, ``iterations``), in one
process; with ``--equal steps``, for ``iterations`` outer iterations (M
times the compute: what M processes do in the time one process takes), and tests the memory it returns (the best on the validation split)
with ``eval_nets`` fresh networks on the test split, as ``addrmem distill``
does. Prints test accuracy (mean ± std over the networks) per M and seed,
the mean over seeds, and the distillation's wall time; ``--json PATH``
writes them.

The job is a ``DistillConfig``: ``--config FILE.yaml`` (default: the digits
preset), with ``eval_every`` divided by M too (rounded down), so that
every M is validated about as often per trajectory. A benchmark measures and prints; it
never fails on time.

Usage (from the repository root)::

    python benchmarks/meta_batch.py                                # digits, M = 1, 2, 4, seeds 0, 1, 2
    python benchmarks/meta_batch.py --meta-batch 2,4 --equal steps
    python benchmarks/meta_batch.py --config configs/mnist-ipc1-cpu.yaml --data-root DATA --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from addrmem.config import DistillConfig, default_config, derive_seed
from addrmem.data import load_dataset
from addrmem.distill import distill
from addrmem.evaluation import EvalSettings, evaluate


def parse_args(argv):
    p = argparse.ArgumentParser(description="Test accuracy against the meta-batch M at equal compute "
                                            "(iterations / M outer iterations of M trajectories).")
    p.add_argument("--config", metavar="FILE.yaml", help="the job (default: the digits preset)")
    p.add_argument("--data-root", metavar="DIR", help="the dataset's folder (not needed for digits)")
    p.add_argument("--meta-batch", default="1,2,4", metavar="M,M,...", help="meta-batches (default: 1,2,4)")
    p.add_argument("--equal", choices=("compute", "steps"), default="compute",
                   help="compute: iterations / M outer iterations (default); steps: iterations for every M")
    p.add_argument("--seeds", default="0,1,2", metavar="S,S,...", help="seeds (default: 0,1,2)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    try:
        args.ms = [int(m) for m in args.meta_batch.split(",")]
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error("--meta-batch and --seeds take numbers separated by commas")
    try:
        config = DistillConfig.from_yaml(args.config) if args.config else default_config("digits")
        if args.data_root:
            config = DistillConfig.from_dict({"data_root": args.data_root}, base=config)
    except (ValueError, OSError) as exc:
        p.error(str(exc).splitlines()[0])
    bad = [m for m in args.ms if m < 1 or (args.equal == "compute" and config.iterations % m)]
    if bad:
        p.error(f"each meta-batch must divide iterations ({config.iterations}); got {bad}")
    args.job = config
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    base = args.job
    if base.threads:
        torch.set_num_threads(base.threads)
    dataset = load_dataset(base.dataset, base.data_root, zca=base.zca)
    budget = (f"{base.iterations} trajectories" if args.equal == "compute"
              else f"{base.iterations} outer iterations")
    print(f"job: {args.config or 'the digits preset'}: {budget} of T = {base.steps} for every M, "
          f"{base.eval_nets} test networks; {torch.get_num_threads()} thread(s)")
    rows = []
    for m in args.ms:
        for seed in args.seed_list:
            share = m if args.equal == "compute" else 1
            config = DistillConfig.from_dict(dict(meta_batch=m, iterations=base.iterations // share,
                                                  eval_every=max(1, base.eval_every // share), seed=seed),
                                             base=base)
            start = time.perf_counter()
            result = distill(config, dataset, progress=False)
            seconds = time.perf_counter() - start
            images, labels = result.memory.recall()
            test = evaluate(images, labels, dataset, EvalSettings.of(config), config.eval_nets, split="test",
                            seed=derive_seed(seed, "test"), progress=False)
            rows.append({"meta_batch": m, "seed": seed, "iterations": config.iterations, "test_mean": test.mean,
                         "test_std": test.std, "val_mean": result.val.mean, "best_iteration": result.iteration,
                         "distill_seconds": seconds})
            print(f"M = {m}, {config.iterations} iterations, seed {seed}: test {test}, val {result.val} (best "
                  f"at iteration {result.iteration}), {seconds:.0f} s distilling", flush=True)
    print("mean test accuracy over seeds:")
    for m in args.ms:
        means = [r["test_mean"] for r in rows if r["meta_batch"] == m]
        secs = [r["distill_seconds"] for r in rows if r["meta_batch"] == m]
        print(f"  M = {m}: {statistics.mean(means):.2f} % ({', '.join(f'{v:.2f}' for v in means)}), "
              f"{statistics.mean(secs):.0f} s distilling")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": base.to_dict(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
