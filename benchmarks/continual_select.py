"""Choose a continual-learning setting on held-out data, then report it on other seeds.

For a config (``configs/continual-*.yaml``) and a grid of settings, this runs
the distilled addressable memory under every setting of the grid on the
``--choose-seeds`` (beside its undistilled start, ``compressed``) and picks the setting with the best mean RA on the
tasks' held-out training images (val RA; test accuracy is never looked at
while choosing). It then runs every method of the config with that setting
on the ``--report-seeds`` (which must differ from the choosing seeds) and
prints a Markdown table per seed and their mean for ``benchmarks/RESULTS.md``:
test RA, val RA, and what each method stores in values and bytes.

Every run is a run folder under ``--out`` (``choose/<setting>/seed<S>``,
``report/seed<S>``), resumed where it was cut: rerun the same command.
``select.json`` there holds every val RA, the chosen setting and the report.
A benchmark measures and prints: it never fails on accuracy.

Usage (from the repository root)::

    python benchmarks/continual_select.py --config configs/continual-split-digits.yaml \\
        --grid distill.iterations=100,300 --grid distill.outer_lr=0.001,0.003 \\
        --choose-seeds 10 11 --report-seeds 0 1 2 --out runs/select-split-digits
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch
import yaml

try:
    import addrmem  # noqa: F401
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from addrmem.continual import ContinualConfig, run_continual


def grid_entry(text: str) -> tuple[str, list]:
    """'distill.outer_lr=0.001,0.003' -> ('distill.outer_lr', [0.001, 0.003])."""
    name, sep, values = text.partition("=")
    if not sep or not values:
        raise argparse.ArgumentTypeError(f"a grid entry is FIELD=V1,V2,...; got {text!r}")
    return name, [yaml.safe_load(v) for v in values.split(",")]


def with_setting(config: dict, setting: dict) -> dict:
    """``config`` with each 'field' or 'distill.field' of ``setting`` replaced."""
    config = {**config, "distill": dict(config.get("distill", {}))}
    for name, value in setting.items():
        if name.startswith("distill."):
            config["distill"][name.removeprefix("distill.")] = value
        else:
            config[name] = value
    return config


def settings(grid: list) -> list:
    """Every combination of the grid's values: a list of {field: value}."""
    names = [name for name, _ in grid]
    return [dict(zip(names, values)) for values in itertools.product(*(v for _, v in grid))]


def slug(setting: dict) -> str:
    return ",".join(f"{k.removeprefix('distill.')}={v}" for k, v in setting.items()) or "as-configured"


def run(config: dict, folder: Path) -> dict:
    """The results of one run, resumed or started in ``folder``."""
    return run_continual(ContinualConfig.from_dict(config), str(folder), resume="auto", progress=False)


def report_table(reports: dict, methods: list) -> str:
    """Markdown: a row per method, a column per seed (test RA) and the means."""
    seeds = list(reports)
    lines = ["| method | " + " | ".join(f"RA seed {s}" for s in seeds) + " | mean RA | mean val RA | values | bytes |",
             "|---|" + "---|" * (len(seeds) + 4)]
    for name in methods:
        ms = [reports[s]["methods"][name] for s in seeds]
        lines.append(f"| {name} | " + " | ".join(f"{m['ra']:.2f}" for m in ms)
                     + f" | {statistics.mean(m['ra'] for m in ms):.2f}"
                     + f" | {statistics.mean(m['val']['ra'] for m in ms):.2f}"
                     + f" | {ms[0]['num_floats']:,} | {ms[0]['num_bytes']:,} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, metavar="FILE.yaml", help="a continual config")
    p.add_argument("--data-root", default=None, metavar="DIR", help="the dataset's folder")
    p.add_argument("--grid", type=grid_entry, action="append", default=[], metavar="FIELD=V1,V2",
                   help="a field (distill.NAME for a distillation field) and the values to try; repeatable")
    p.add_argument("--choose-seeds", type=int, nargs="+", default=[10, 11], metavar="S")
    p.add_argument("--report-seeds", type=int, nargs="+", default=[0, 1, 2], metavar="S")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help="the methods reported (default: the config's)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the config's)")
    p.add_argument("--out", required=True, metavar="DIR")
    args = p.parse_args(argv)
    if set(args.choose_seeds) & set(args.report_seeds):
        p.error("--choose-seeds and --report-seeds must differ: a setting is reported on seeds it was not chosen on")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/continual_select.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        base = ContinualConfig.from_yaml(args.config).to_dict()
        if args.methods:
            ContinualConfig.from_dict({**base, "methods": args.methods})
        for setting in settings(args.grid):
            ContinualConfig.from_dict(with_setting(base, setting))  # every setting checked before the first run
    except (OSError, ValueError, TypeError) as exc:
        print(f"continual_select.py: error: {exc}", file=sys.stderr)
        return 2
    if args.data_root:
        base["data_root"] = args.data_root
    if args.threads:
        base["threads"] = args.threads
    if args.methods:
        base["methods"] = args.methods
    torch.set_num_threads(base["threads"] or torch.get_num_threads())
    out = Path(args.out)
    chosen_by, start = {}, {}  # setting -> val RA per choosing seed, distilled and at its undistilled start
    for setting in settings(args.grid):
        vals, starts = [], []
        for seed in args.choose_seeds:
            config = with_setting({**base, "seed": seed, "methods": ["compressed", "addressable"]}, setting)
            results = run(config, out / "choose" / slug(setting) / f"seed{seed}")
            vals.append(results["methods"]["addressable"]["val"]["ra"])
            starts.append(results["methods"]["compressed"]["val"]["ra"])
        chosen_by[slug(setting)], start[slug(setting)] = vals, starts
        print(f"{slug(setting)}: val RA {statistics.mean(vals):.2f} ({', '.join(f'{v:.2f}' for v in vals)}); "
              f"its undistilled start {statistics.mean(starts):.2f}", flush=True)
    best = max(settings(args.grid), key=lambda s: statistics.mean(chosen_by[slug(s)]))
    print(f"chosen on val RA (seeds {args.choose_seeds}): {slug(best)}", flush=True)
    reports = {seed: run(with_setting({**base, "seed": seed}, best), out / "report" / f"seed{seed}")
               for seed in args.report_seeds}
    first = reports[args.report_seeds[0]]
    table = report_table(reports, list(first["methods"]))
    summary = {"command": command, "grid": dict(args.grid), "val_ra": chosen_by, "start_val_ra": start, "chosen": best,
               "report": {seed: {name: {k: m[k] for k in ("ra", "bti", "la", "val", "num_floats", "num_bytes", "seconds")}
                                 for name, m in r["methods"].items()} for seed, r in reports.items()}}
    (out / "select.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n{first['benchmark']}, {first['protocol']} protocol, budget {first['budget_bytes']:,} bytes, "
          f"setting {slug(best)} (chosen on seeds {args.choose_seeds}); test RA (%):\n")
    print(table)
    print(f"\ncommand: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
