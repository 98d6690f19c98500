"""Sweep candidate settings of the default digits job and print a table.

``addrmem distill`` with no options runs :func:`addrmem.default_config`
("digits"): 8x8 digits, the addressable memory against the ImageMemory
baseline at the same storage budget. This script runs that experiment
(:func:`addrmem.run_experiment`: both memories, the random real subset and
the full data) for each named candidate (the preset with some fields
overridden) and seed, and prints one Markdown row per run: the test accuracy
(mean over ``eval_nets`` networks, %) of each method, the margin addressable
minus ImageMemory, the addressable memory's rows per class, and the seconds
(wall, and the CPU time of the run, close to its wall time on an idle machine
since the preset runs one thread; on a busy one the wall time says little). Each run appends its row as one JSON line
to ``--log``. A benchmark measures and prints: it never fails on accuracy.

Usage (from the repository root; one thread per run, as the CLI sets)::

    python benchmarks/digits_search/sweep.py --list                # the candidates
    python benchmarks/digits_search/sweep.py --no-full-data        # all of them, seed 0 (about an hour)
    python benchmarks/digits_search/sweep.py --seeds 0 1 2 --only preset-10nets ipc2-k10-10nets
    python benchmarks/digits_search/sweep.py --set mine ipc=2 n_bases=11 --only mine
    python benchmarks/digits_search/sweep.py --span                # what a K-dim span costs the MLP

Candidates are the current preset ("preset") and the settings screened for
issue 9 (see benchmarks/RESULTS.md, "the default digits job"); add your own
with ``--set NAME field=value ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

import addrmem

try:  # the module that holds it moved in the split of addrmem.distill
    from addrmem.config import derive_seed
except ImportError:
    from addrmem.distill import derive_seed

NOISE = dict(val_nets=10, eval_nets=10)  # 10 networks: cheap with the MLP, halves the noise of 2 / 5

CANDIDATES = {
    # name: overrides of default_config("digits")
    "preset": {},
    "preset-10nets": dict(NOISE),
    # ipc 1: fewer full-resolution bases buy more rows per class but shrink the span
    "k3": dict(n_bases=3),
    "k4": dict(n_bases=4),
    "k5": dict(n_bases=5),
    "k6": dict(n_bases=6),
    # 4x4 bases (upsampled x2): cheap, but they lose the strokes
    "k8-ds2": dict(n_bases=8, downsample=2),
    "k16-ds2": dict(n_bases=16, downsample=2),
    # schedule and learning rates
    "it600": dict(iterations=600, eval_every=100),
    "outer-lr0.1": dict(outer_lr=0.1),
    "T50-it600": dict(steps=50, iterations=600, eval_every=100),
    "T200": dict(steps=200),
    "inner-eval-lr0.03": dict(inner_lr=0.03, eval_lr=0.03),
    "eval100": dict(eval_epochs=100),
    "eval100-10nets": dict(eval_epochs=100, **NOISE),
    # ipc 2
    "ipc2-k15": dict(ipc=2, n_bases=15),
    "ipc2-k12": dict(ipc=2, n_bases=12),
    "ipc2-k10": dict(ipc=2, n_bases=10),
    "ipc2-k10-10nets": dict(ipc=2, n_bases=10, **NOISE),
    "ipc2-k8-10nets": dict(ipc=2, n_bases=8, **NOISE),
    "ipc2-k9-10nets": dict(ipc=2, n_bases=9, **NOISE),
    "ipc2-k11-10nets": dict(ipc=2, n_bases=11, **NOISE),
    "ipc2-k10-lr0.03-10nets": dict(ipc=2, n_bases=10, inner_lr=0.03, eval_lr=0.03, **NOISE),
    "ipc3-k15-10nets": dict(ipc=3, n_bases=15, **NOISE),
    "ipc3-k13-10nets": dict(ipc=3, n_bases=13, **NOISE),
}


def span_table(dataset, seed=0):
    """What a K-dimensional span costs the MLP: networks trained (as the
    test protocol trains them) on ALL real training images projected onto the
    span of their top-K right singular vectors (no centring: a memory's
    images are linear combinations of its K bases), tested on the raw test
    images. Prints one Markdown row per K."""
    config = addrmem.default_config("digits", seed=seed)
    images, labels = dataset.train
    flat = images.flatten(1)
    _, s, vt = torch.linalg.svd(flat, full_matrices=False)
    print("| K (span) | energy kept | MLP test accuracy (5 nets) |")
    print("|---|---|---|")
    for k in (3, 4, 5, 6, 7, 8, 10, 12, 15, 20, flat.shape[1]):
        projected = ((flat @ vt[:k].T) @ vt[:k]).view_as(images)
        acc = addrmem.evaluate(projected, labels, dataset, addrmem.EvalSettings.of(config), config.eval_nets,
                               split="test", seed=derive_seed(seed, "test"), progress=False)
        energy = float((s[:k] ** 2).sum() / (s ** 2).sum())
        print(f"| {k} | {energy:.3f} | {acc.mean:.2f} ± {acc.std:.2f} |", flush=True)


def parse_value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="candidates to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", nargs="+", action="append", default=[], metavar="NAME FIELD=VALUE",
                        help="add a candidate: its name, then field=value overrides")
    parser.add_argument("--no-full-data", action="store_true", help="skip the full-data reference (faster)")
    parser.add_argument("--out", default=None, help="folder for the run folders (default: a temporary one)")
    parser.add_argument("--log", default="digits_search.jsonl", help="JSON lines of the rows (appended)")
    parser.add_argument("--list", action="store_true", help="list the candidates and exit")
    parser.add_argument("--span", action="store_true",
                        help="instead of candidates, measure what a K-dimensional span costs the MLP")
    args = parser.parse_args(argv)
    candidates = dict(CANDIDATES)
    for name, *pairs in args.set:
        candidates[name] = {k: parse_value(v) for k, v in (p.split("=", 1) for p in pairs)}
    if args.list:
        for name, overrides in candidates.items():
            print(f"{name:20s} {json.dumps(overrides)}")
        return 0
    names = args.only or list(candidates)
    unknown = [n for n in names if n not in candidates]
    if unknown:
        parser.error(f"unknown candidate(s) {', '.join(unknown)}; see --list")
    dataset = addrmem.load_dataset("digits")
    if args.span:
        torch.set_num_threads(1)
        span_table(dataset)
        return 0
    out = args.out or tempfile.mkdtemp(prefix="digits_search-")
    print("| candidate | seed | rows/class | addressable | ImageMemory | margin | random real | full data "
          "| wall s | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        for seed in args.seeds:
            overrides = dict(candidates[name], seed=seed)
            if args.no_full_data:
                overrides["full_data_epochs"] = 0
            config = addrmem.default_config("digits", **overrides)
            if config.threads:
                torch.set_num_threads(config.threads)
            run_dir = os.path.join(out, f"{name}-seed{seed}")
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            res = addrmem.run_experiment(config, dataset, run_dir, progress=False)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            m = res["methods"]
            addr, image = m["addressable"]["test"], m["image"]["test"]
            full = m.get("full_data", {}).get("test")
            row = dict(candidate=name, overrides=candidates[name], seed=seed,
                       per_class=m["addressable"]["per_class"], floats=m["addressable"]["num_floats"],
                       addressable=addr, image=image, random_real=m["random_real"]["test"], full_data=full,
                       margin=addr["mean"] - image["mean"], wall_s=round(wall, 1), cpu_s=round(cpu, 1),
                       seconds=res["seconds"], run_dir=run_dir)
            with open(args.log, "a") as f:
                f.write(json.dumps(row) + "\n")
            fmt = lambda a: f"{a['mean']:.2f} ± {a['std']:.2f}" if a else "-"
            print(f"| {name} | {seed} | {row['per_class']} | {fmt(addr)} | {fmt(image)} | {row['margin']:+.2f} "
                  f"| {fmt(row['random_real'])} | {fmt(full)} | {wall:.0f} | {cpu:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
