"""Run one distillation setting end to end and write its results rows.

For a config (``configs/*.yaml``) this runs :func:`addrmem.experiment.run_experiment`
(the addressable memory, the ImageMemory baseline distilled the same way at
the same budget, a random real subset at that budget and the full training
set, each tested once by the same fresh networks) into ``--out`` and writes
there, next to the run folder's own files:

* ``rows.json``: one row per method and test architecture: dataset, IPC,
  method, network, outer iterations, wall seconds (distillation +
  testing of that method), device, test accuracy mean and std (%) over the
  ``eval_nets`` networks, and the command that produced it;
* ``curve.json``: the learning curves of results.json, validation accuracy
  (mean ± std over ``val_nets`` networks, %) against outer iteration and
  training seconds, of both distilled memories (the run folder's
  ``curve.png`` draws them);

and prints the rows as a Markdown table for ``benchmarks/RESULTS.md``. A run
that is interrupted (or cut by a time limit) continues with the same command
plus ``--resume``. A benchmark measures and prints: it never fails on
accuracy.

Usage (from the repository root)::

    python benchmarks/distill_accuracy.py --config configs/mnist-ipc1-cpu.yaml --data-root DIR --out runs/m1
    python benchmarks/distill_accuracy.py --config configs/cifar10-ipc1.yaml --data-root DIR \\
        --device cuda --iterations 200 --out runs/c1          # then, after a cut: ... --resume
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

try:
    import addrmem  # noqa: F401  (puts the checkout on the path)
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import addrmem  # noqa: F401  (puts the checkout on the path)
from addrmem.data import load_dataset
from addrmem.config import DistillConfig
from addrmem.experiment import METHOD_NAMES, run_experiment

def results_rows(results: dict, command: str) -> list:
    """One dict per (method, test architecture) of a results.json dict."""
    rows = []
    for method, m in results["methods"].items():
        seconds = results["seconds"][method]["distill"] + results["seconds"][method]["test"]
        for arch, acc in m["archs"].items():
            rows.append({"dataset": results["dataset"], "ipc": results["ipc"], "method": METHOD_NAMES[method],
                         "network": arch, "iterations": results["iterations"] if "iteration" in m else None,
                         "wall_seconds": round(seconds, 1), "device": results["device"],
                         "mean": round(acc["mean"], 2), "std": round(acc["std"], 2), "nets": len(acc["runs"]),
                         "command": command})
    return rows


def markdown(rows: list) -> str:
    lines = ["| dataset | IPC | method | network | outer iterations | wall s | device | test accuracy % |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['ipc']} | {r['method']} | {r['network']} | {r['iterations'] or '-'} | "
              f"{r['wall_seconds']:.0f} | {r['device']} | {r['mean']:.2f} ± {r['std']:.2f} ({r['nets']} nets) |"
              for r in rows]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Run a distillation config end to end and write its results rows, "
                                            "learning curves (JSON, PNG) and a Markdown table.",
                                epilog="See the module docstring for what is written.")
    p.add_argument("--config", required=True, metavar="FILE.yaml", help="a config, e.g. configs/mnist-ipc1.yaml")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (new, or the one to --resume)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--data-root", metavar="DIR", help="folder holding the dataset's files")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset if missing")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the config's)")
    p.add_argument("--iterations", type=int, metavar="N", help="outer iterations (default: the config's)")
    p.add_argument("--seed", type=int, metavar="S", help="seed (default: the config's)")
    p.add_argument("--eval-arch", metavar="NET,...", help="also test with these networks")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/distill_accuracy.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv) if a != "--resume")
    overrides = {"data_root": args.data_root, "device": args.device, "iterations": args.iterations,
                 "seed": args.seed,
                 "eval_archs": args.eval_arch and [a.strip() for a in args.eval_arch.split(",") if a.strip()]}
    try:
        if args.resume:
            config = DistillConfig.from_yaml(os.path.join(args.out, "config.yaml"))
        else:
            config = DistillConfig.from_yaml(args.config, **{k: v for k, v in overrides.items() if v is not None})
        if config.threads:
            torch.set_num_threads(config.threads)
        dataset = load_dataset(config.dataset, config.data_root, download=args.download, zca=config.zca)
        results = run_experiment(config, dataset, args.out, resume=args.resume)
    except (OSError, ValueError, TypeError, FloatingPointError) as exc:
        print(f"distill_accuracy.py: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    rows = results_rows(results, command)
    Path(args.out, "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    Path(args.out, "curve.json").write_text(json.dumps(results["curves"], indent=1) + "\n")
    print(markdown(rows))
    print(f"\ncommand: {command}")
    print(f"wrote {args.out}/rows.json, curve.json, curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
