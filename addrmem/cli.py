"""The ``addrmem`` command: ``distill``, ``show``, ``eval``, ``continual``,
``query`` and ``export``.

``addrmem distill`` with no arguments distills scikit-learn's 8×8 digits at a
budget of two images per class (on the GPU if torch sees one, else on the CPU:
about two minutes of CPU time) and
prints the retained test accuracy of the addressable memory, of the
ImageMemory baseline and of a random real subset at the same budget, and of
the full training set. Bad input ends with a one-line ``addrmem: error: ...``
and exit status 1 (130 when interrupted), never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time

import torch

from . import parallel
from .config import DistillConfig, default_config, derive_seed, device_name, read_yaml_mapping, resolve_device
from .continual import BENCHMARKS as CONTINUAL_BENCHMARKS
from .continual import ContinualConfig, make_stream, run_continual
from .data import DATASETS, load_dataset
from .evaluation import EvalSettings, evaluate
from .experiment import METHOD_NAMES, run_experiment
from .export import export_imagefolder, export_tensors
from .memory import AddressableMemory, load_memory
from .networks import NETWORKS, make_network
from .query import BUILTIN_MAPS, format_query, load_map, run_query
from .runs import BASELINE_DIR, read_run_config, save_grids

__all__ = ["main"]


def _names(text: str) -> list:
    """'a,b' -> ['a', 'b']."""
    return [name.strip() for name in text.split(",") if name.strip()]


# flag -> (config field, type, metavar, help). Defaults come from the dataset's config.
_DISTILL_FLAGS = [
    ("--dataset", "dataset", str, "NAME", f"dataset to distill: {', '.join(sorted(DATASETS))}"),
    ("--data-root", "data_root", str, "DIR", "folder holding the dataset's files (not needed for digits)"),
    ("--zca", "zca", float, "REG", "ZCA-whiten the images with this regularisation (0 = off; 0.1 for CIFAR "
     "as the official code)"),
    ("--ipc", "ipc", int, "N", "storage budget in raw images per class"),
    ("--n-bases", "n_bases", int, "K", "number of shared bases"),
    ("--downsample", "downsample", int, "DS", "bases are stored at 1/DS of the image resolution"),
    ("--steps", "steps", int, "T", "unrolled inner SGD steps per outer iteration"),
    ("--snapshot-every", "snapshot_every", int, "K", "keep every K-th inner step's weights and recompute the "
     "others in the reverse pass (less memory for long unrolls, more time; the same result)"),
    ("--iterations", "iterations", int, "N", "outer iterations"),
    ("--meta-batch", "meta_batch", int, "M", "inner trajectories whose hypergradients each outer iteration "
     "averages; under torchrun the processes share them out (M at least the number of processes)"),
    ("--inner-lr", "inner_lr", float, "LR", "learning rate of the unrolled inner SGD"),
    ("--outer-lr", "outer_lr", float, "LR", "learning rate of the memory's optimizer"),
    ("--network", "network", str, "NET", f"network to distill with and test: {', '.join(sorted(NETWORKS))}"),
    ("--net-width", "net_width", int, "W", "channels of the ConvNet (hidden units of the MLP)"),
    ("--net-depth", "net_depth", int, "D", "blocks of the ConvNet (hidden layers of the MLP); 0 = its default"),
    ("--net-norm", "net_norm", str, "NORM", "the ConvNet's normalisation: instance or none"),
    ("--init", "init", str, "INIT", "where the memories start: xavier (random) or real (real training images; "
     "for the addressable memory their principal components and coordinates)"),
    ("--eval-arch", "eval_archs", _names, "NET,...", "also test every method with these networks "
     f"(cross-architecture; any of {', '.join(sorted(NETWORKS))}, with options such as "
     "convnet:width=64:depth=2:norm=none)"),
    ("--val-nets", "val_nets", int, "N", "networks that measure the memory on the validation split"),
    ("--eval-nets", "eval_nets", int, "N", "networks that test each method on the test split"),
    ("--eval-epochs", "eval_epochs", int, "E", "epochs each validation and test network trains"),
    ("--full-data-epochs", "full_data_epochs", int, "E", "epochs of the full-training-set reference (0 skips it)"),
    ("--seed", "seed", int, "S", "seed of every random draw (one seed, one result)"),
    ("--device", "device", str, "DEVICE", "auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda or "
     "cuda:N"),
]


def _parser() -> argparse.ArgumentParser:
    digits, official = default_config("digits"), DistillConfig()
    parser = argparse.ArgumentParser(
        prog="addrmem",
        description="Distill a labelled image dataset into an addressable memory (K shared bases plus "
                    "learned addressing coefficients; Deng & Russakovsky, NeurIPS 2022).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "distill", help="distill a dataset and compare with baselines at the same budget",
        description="Distill a dataset into an addressable memory, distill the ImageMemory baseline the "
                    "same way at the same storage budget, and print the test accuracy (mean ± std over "
                    "fresh networks) of both, of a random real subset at that budget and of the full "
                    "training set. Without options: digits, IPC 2, about two minutes of CPU time. Options "
                    "override --config FILE, which overrides the dataset's defaults; a run folder "
                    "(config.yaml, log.jsonl, checkpoint.pt, memory.pt, PNG grids, results.json) is "
                    "written to --out.")
    for flag, field, kind, metavar, text in _DISTILL_FLAGS:
        shown = getattr(digits, field)
        if shown == []:
            shown = "none"
        elif getattr(official, field) != shown:
            shown = f"{shown} for digits, {getattr(official, field)} otherwise"
        run.add_argument(flag, dest=field, type=kind, metavar=metavar, default=None,
                         help=text if shown is None else f"{text} (default: {shown})")
    run.add_argument("--out", metavar="RUN", default=None,
                     help="new run folder (default: runs/DATASET-ipcK-seedS-TIMESTAMP); with --auto-resume, "
                          "and under torchrun, a folder holding a run of the same config is resumed")
    run.add_argument("--config", metavar="FILE.yaml", default=None,
                     help="YAML mapping of config fields (any of those in a run's config.yaml)")
    run.add_argument("--resume", metavar="RUN", default=None,
                     help="continue an interrupted run where it stopped, with its saved config")
    run.add_argument("--download", action="store_true",
                     help="let torchvision download the dataset into --data-root if it is not there")
    _run_options(run)

    show = commands.add_parser("show", help="redraw a run's PNG grids (bases.png, recall.png)",
                               description="Redraw the PNG grids of RUN's memories from their memory.pt.")
    show.add_argument("run", metavar="RUN", help="run folder written by addrmem distill")

    ev = commands.add_parser("eval", help="re-evaluate a run's memory on the test split",
                             description="Train fresh networks on the images recalled from RUN/memory.pt "
                                         "and print their test accuracy, mean ± std.")
    ev.add_argument("run", metavar="RUN", help="run folder written by addrmem distill")
    ev.add_argument("--nets", type=int, default=None, help="networks to train (default: the run's eval_nets)")
    ev.add_argument("--network", default=None, help="network spec to train, e.g. mlp or convnet:width=64 "
                    "(default: the run's network)")
    ev.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the run's device)")

    cl = commands.add_parser(
        "continual", help="learn a stream of tasks with every memory at the same storage budget",
        description="Learn a stream of tasks with one learner and compare, at the same storage budget in floats, "
                    "fine-tuning, experience replay, a distilled ImageMemory, the addressable memory and joint "
                    "training: retained accuracy (RA), backward transfer (BTI), learning accuracy (LA) and the "
                    "accuracy matrix R. Options override --config FILE, which overrides the defaults; a run "
                    "folder (config.yaml, checkpoint.pt, results.json, accuracy.png, R-METHOD.png) is written "
                    "to --out. See docs/continual.md.")
    cl.add_argument("--benchmark", default=None, metavar="NAME",
                    help=f"the stream: {', '.join(CONTINUAL_BENCHMARKS)} (default: split-digits)")
    cl.add_argument("--config", metavar="FILE.yaml", default=None,
                    help="YAML mapping of continual config fields (e.g. configs/continual-rotations.yaml)")
    cl.add_argument("--data-root", dest="data_root", metavar="DIR", default=None,
                    help="folder holding the dataset (MNIST: DIR/MNIST/raw/ with the four IDX files)")
    cl.add_argument("--out", metavar="RUN", default=None,
                    help="new run folder (default: runs/continual-BENCHMARK-seedS-TIMESTAMP)")
    cl.add_argument("--resume", metavar="RUN", default=None,
                    help="continue an interrupted run after its last finished task, with its saved config")
    cl.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the stream and of every draw")
    cl.add_argument("--device", default=None, metavar="DEVICE", help="auto, cpu, cuda or cuda:N (default: cpu)")
    cl.add_argument("--download", action="store_true",
                    help="let torchvision download the dataset into --data-root if it is not there")
    _run_options(cl)

    ex = commands.add_parser(
        "export", help="write a run's recalled images as PNG files (ImageFolder) or as a tensor file",
        description="Write the images RUN's memory recalls (RUN/baseline-image for the ImageMemory baseline): "
                    "--format imagefolder: one PNG per image in OUT/<class>/<n>.png, normalisation and ZCA "
                    "undone, for torchvision's ImageFolder; --format pt: torch.save of (images (N, C, H, W), "
                    "labels (N,)) as the networks saw them (normalised, whitened if the run used ZCA), for "
                    "dataset-distillation evaluation code. See docs/guide.md.")
    ex.add_argument("run", metavar="RUN", help="run folder written by addrmem distill")
    ex.add_argument("--format", required=True, choices=("imagefolder", "pt"), help="what to write")
    ex.add_argument("--out", metavar="PATH", default=None,
                    help="new folder (imagefolder; default RUN/imagefolder) or file (pt; default RUN/recalled.pt)")

    qu = commands.add_parser(
        "query", help="train classifiers for a new label space on images recalled from a run's memory",
        description="Map RUN's classes to new classes (a built-in map or a YAML/JSON file {new class: [old "
                    "classes]}), build training sets for the new labels from RUN's memories (one-hot recall, "
                    "aggregated and soft queries) and from real data at the same storage, distill a memory on "
                    "the new labels, and print the test accuracy (mean ± std over fresh networks) of each on "
                    "the relabelled test set. Writes query.json, query.png and distilled/ to --out. See "
                    "docs/query.md.")
    qu.add_argument("run", metavar="RUN", help="run folder written by addrmem distill")
    qu.add_argument("--map", required=True, metavar="NAME|FILE",
                    help=f"built-in map ({', '.join(BUILTIN_MAPS)}) or a YAML or JSON map file")
    qu.add_argument("--nets", type=int, default=None, metavar="N",
                    help="networks to train per training set (default: the run's eval_nets)")
    qu.add_argument("--out", metavar="DIR", default=None, help="new output folder (default: RUN/query-MAP)")
    return parser


def _run_options(command) -> None:
    """The options of the commands that write a resumable run folder (distill, continual)."""
    command.add_argument("--auto-resume", action="store_true",
                         help="resume --out if it holds a run of the same config, start it otherwise (the "
                              "behaviour under torchrun, so that --max-restarts and requeued jobs continue)")
    command.add_argument("--timeout", type=float, default=parallel.DEFAULT_TIMEOUT, metavar="SECONDS",
                         help="under torchrun, how long a process waits for the others before it stops with "
                              f"an error (default: {parallel.DEFAULT_TIMEOUT})")


def main(argv=None) -> int:
    """Entry point of the ``addrmem`` command; ``argv`` defaults to
    ``sys.argv[1:]``. Returns 0; exits with a one-line message and status 1
    on bad input (SystemExit), 130 when interrupted. Under torchrun every
    process ends through :func:`_leave_group`."""
    args = _parser().parse_args(argv)
    if args.command not in _GROUP_COMMANDS and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if os.environ.get("RANK", "0") != "0":  # rank 0 says it, once
            raise SystemExit(1)
        raise SystemExit(f"addrmem: error: addrmem {args.command} runs in one process: run it without torchrun")
    if args.command in _GROUP_COMMANDS:
        parallel.setup(getattr(args, "timeout", parallel.DEFAULT_TIMEOUT))  # under torchrun: join the group
    command = {"distill": _distill, "show": _show, "eval": _eval, "continual": _continual,
               "query": _query, "export": _export}[args.command]
    outcome = None  # the SystemExit to end with, if the command failed
    try:
        command(args)
        parallel.barrier()  # no rank leaves while another still talks to it
    except (KeyboardInterrupt, OSError, ValueError, FloatingPointError, parallel.PeerError) as exc:
        outcome = _failure(exc, args)
    if parallel.world_size() > 1:
        _leave_group(outcome)
    if outcome is not None:
        raise outcome
    return 0


_GROUP_COMMANDS = ("distill", "continual", "eval")
"""The commands that join torchrun's process group; the others refuse to run under it."""


def _failure(exc, args) -> SystemExit:
    """The exit for ``exc``: its one-line message (status 1), or 130 when
    interrupted. One rank reports an error (the ``reporter`` that
    :func:`addrmem.parallel.everywhere` and ``from_writer`` set; else the
    rank that met it; a lost peer, rank 0); the others stay silent."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    peer = isinstance(exc, parallel.PeerError)
    reporter = getattr(exc, "reporter", 0 if peer or interrupted else parallel.rank())
    if reporter != parallel.rank():
        return SystemExit(130 if interrupted else 1)
    where = _run_folder(args)
    resume = f"continue with: addrmem {args.command} --resume {where}" if where else ""
    if interrupted:
        print("\naddrmem: interrupted" + (f"; {resume}" if resume else ""), file=sys.stderr)
        return SystemExit(130)
    if peer:
        message = f"{_first_line(exc)}" + (f"; {resume} (under torchrun --max-restarts, a restart resumes it "
                                           f"by itself)" if resume else "")
    elif isinstance(exc, OSError):
        message = _os_error(exc, args)
    else:
        message = _first_line(exc)
    rank = f" (rank {reporter})" if reporter else ""
    return SystemExit(f"addrmem: error{rank}: {message}")


def _run_folder(args):
    """The run folder a distill or continual command can be resumed from: one that exists and holds its
    config.yaml (None otherwise, or for the other commands)."""
    where = getattr(args, "run", None) if args.command in ("distill", "continual") else None
    return where if where and os.path.isfile(os.path.join(where, "config.yaml")) else None


def _leave_group(outcome) -> None:
    """End a torchrun process (:func:`addrmem.parallel.leave`), saying
    ``outcome``'s message and exiting with its status (0 if None)."""
    code = 0 if outcome is None else outcome.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    parallel.leave(code)


def _first_line(exc) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _os_error(exc: OSError, args) -> str:
    """What a file error means for the command that met it, and the fix."""
    if exc.errno is None:  # raised by addrmem with its own message
        return _first_line(exc)
    where = repr(exc.filename) if exc.filename else "the run folder"
    resumable = args.command in ("distill", "continual")  # commands that write a run folder, with --resume
    run = getattr(args, "run", None)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = (f"free space, then continue with: addrmem {args.command} --resume {run}" if resumable
               else "free space and run it again")
        return f"no space left on the device for {where}: {fix}"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = ("choose an --out folder you can write to" if resumable and not args.resume
               else f"copy the run folder somewhere writable (cp -r {run} COPY) and give the copy")
        return f"cannot write {where} ({exc.strerror}): {fix}"
    return f"{where}: {exc.strerror}"


def _use_device(config) -> torch.device:
    """The device ``config`` runs on here (raises ValueError if it is missing
    or, under torchrun, not one GPU per process); says which."""
    device = resolve_device(config.device)
    parallel.check_device(device)
    if parallel.is_writer():
        processes = f", {parallel.world_size()} processes" if parallel.world_size() > 1 else ""
        print(f"device: {device_name(device)}" + (" (auto)" if config.device == "auto" else "") + processes)
    return device


def _set_threads(config):
    if config.threads:
        torch.set_num_threads(config.threads)


def _open_settings(args, config_class, flags: dict, given: list, name: str):
    """(config, run folder, ``resume`` for :func:`addrmem.runs.open_run_folder`)
    of a distill or continual command: with --resume, the run's saved config;
    else ``flags`` (config fields set by options; ``given``: those options)
    over --config over the defaults, into --out (default
    runs/NAME-TIMESTAMP), resumed if it holds a run of the same config with
    --auto-resume or under torchrun. Sets ``args.run``."""
    if args.resume:
        if given or args.config or args.out or args.auto_resume:
            raise ValueError(f"--resume takes every setting from the run's config.yaml; drop "
                             f"{', '.join(given) or '--config/--out/--auto-resume'}")
        config = parallel.from_writer(lambda: read_run_config(args.resume, config_class))
        args.run, resume = args.resume, True
    else:
        config = parallel.everywhere(lambda: config_class.from_yaml(args.config, **flags) if args.config
                                     else config_class.from_dict(flags))
        args.run = args.out or parallel.from_writer(
            lambda: os.path.join("runs", f"{name.format(c=config)}-{time.strftime('%Y%m%d-%H%M%S')}"))
        resume = "auto" if args.auto_resume or parallel.launched_by_torchrun() else False
    parallel.everywhere(lambda: _use_device(config))
    _set_threads(config)
    return config, args.run, resume


def _distill(args):
    flags = {field: getattr(args, field) for _, field, _, _, _ in _DISTILL_FLAGS
             if getattr(args, field) is not None}
    given = [flag for flag, field, _, _, _ in _DISTILL_FLAGS if field in flags]
    parallel.everywhere(lambda: _check_dataset(args.config, flags.get("dataset")))
    config, run_dir, resume = _open_settings(args, DistillConfig, flags, given, "{c.dataset}-ipc{c.ipc}-seed{c.seed}")
    dataset = parallel.everywhere(lambda: load_dataset(config.dataset, config.data_root, download=args.download,
                                                       zca=config.zca))
    results = run_experiment(config, dataset, run_dir, resume=resume)
    if parallel.is_writer():
        print(_format_results(results, config))
        print(f"run folder: {run_dir}")


def _check_dataset(config_file, dataset) -> None:
    """Refuse ``--dataset`` with a config file written for another dataset."""
    other = read_yaml_mapping(config_file).get("dataset", dataset) if config_file and dataset else dataset
    if other != dataset:
        raise ValueError(f"--dataset {dataset} with {config_file}, a config for {other}: its settings were "
                         f"chosen for {other}; give a config for {dataset} (configs/{dataset}-*.yaml), or drop "
                         f"--dataset")


def _format_results(results, config) -> str:
    """The results table printed by ``addrmem distill``."""
    sizes = {"addressable": "{n_bases} bases, {per_class} per class", "image": "{per_class} per class",
             "random_real": "{images} images", "full_data": "{images} images"}
    rows = [(f"{METHOD_NAMES[key]} ({sizes[key.replace('_undistilled', '')]})".format(n_bases=config.n_bases, **m), m)
            for key, m in results["methods"].items()]
    width = max(len(name) for name, _ in rows)
    archs = results["archs"]
    full = results["methods"].get("full_data")
    epochs = (f"{results['eval_steps']} steps" if results["eval_steps"] else f"{results['eval_epochs']} epochs") + (
        f" ({full['epochs']} epochs on the full set)" if full else "")
    lines = [f"test accuracy (%) on {results['dataset']} ({results['test_images']} images), IPC {results['ipc']}, "
             f"{results['eval_nets']} networks x {epochs}, mean ± std:",
             f"  {'':<{width}}" + "".join(f"  {arch:>13}" for arch in archs)]
    lines += [f"  {name:<{width}}" + "".join(f"  {m['archs'][a]['mean']:6.2f} ± {m['archs'][a]['std']:4.2f}"
                                             for a in archs) + f"  ({m['num_floats']} floats)"
              for name, m in rows]
    lines.append(f"wall time {results['wall_seconds']:.0f} s on {results['device']} "
                 f"({results['distill_seconds']:.0f} s distilling)")
    return "\n".join(lines)


def _memory_files(run_dir):
    """The memory.pt files of a run folder: its own and the baseline's (if any)."""
    main_file = os.path.join(run_dir, "memory.pt")
    if not os.path.isfile(main_file):
        raise FileNotFoundError(f"{run_dir!r} has no memory.pt: the run has not finished; continue it with "
                                f"addrmem distill --resume {run_dir}")
    baseline = os.path.join(run_dir, BASELINE_DIR, "memory.pt")
    return [main_file] + ([baseline] if os.path.isfile(baseline) else [])


def _show(args):
    read_run_config(args.run, DistillConfig)
    for path in _memory_files(args.run):
        try:
            written = save_grids(load_memory(path), os.path.dirname(path))
        except ValueError as exc:
            raise ValueError(f"{path!r}: {exc}") from exc
        print("\n".join(written))


def _eval(args):
    """Under torchrun the processes share the networks out (:func:`addrmem.evaluation.evaluate`)."""

    def prepare():
        config = read_run_config(args.run, DistillConfig)
        if args.device:
            config = DistillConfig.from_dict({"device": args.device}, base=config)
        nets = config.eval_nets if args.nets is None else args.nets
        if nets < 1:
            raise ValueError(f"--nets must be >= 1; got {nets}")
        device = _use_device(config)
        _set_threads(config)
        settings = EvalSettings.of(config, network=args.network or config.network_spec())
        memory = load_memory(_memory_files(args.run)[0], map_location=device)
        dataset = load_dataset(config.dataset, config.data_root, zca=config.zca)
        make_network(settings.network, dataset.image_shape, dataset.num_classes, seed=0)
        return config, settings, nets, memory, dataset

    config, settings, nets, memory, dataset = parallel.everywhere(prepare)
    images, labels = memory.recall()
    acc = evaluate(images, labels, dataset, settings, nets, split="test", seed=derive_seed(config.seed, "test"),
                   desc="test")
    if parallel.is_writer():
        print(f"test accuracy of {args.run}/memory.pt ({type(memory).__name__}, {len(labels)} images) on "
              f"{dataset.name}: {acc} % ({nets} {settings.network} networks x "
              f"{f'{settings.steps} steps' if settings.steps else f'{settings.epochs} epochs'})")


def _export(args):
    read_run_config(args.run, DistillConfig)
    path = _memory_files(args.run)[0]
    memory = load_memory(path)
    missing = [key for key in ("preprocessing", "classes") if key not in memory.extra]
    if missing:
        raise ValueError(f"{path!r} was saved without its {' and '.join(missing)}: distill it again")
    default = "imagefolder" if args.format == "imagefolder" else "recalled.pt"
    out = args.out or os.path.join(args.run, default)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise FileExistsError(f"{out!r} exists: give another --out, or delete it")
    count = export_imagefolder(memory, out) if args.format == "imagefolder" else export_tensors(memory, out)
    print(f"{count} images of {path} written to {out}")


def _query(args):
    config = read_run_config(args.run, DistillConfig)
    device = _use_device(config)
    _set_threads(config)
    memories = {}
    for path in _memory_files(args.run):
        memory = load_memory(path, map_location=device)
        memories["addressable" if isinstance(memory, AddressableMemory) else "image"] = memory
    first = next(iter(memories.values()))
    if "classes" not in first.extra:
        raise ValueError(f"{args.run!r}/memory.pt was saved without its class names: distill it again")
    label_map = load_map(args.map, first.extra["classes"], config.dataset)
    out = args.out or os.path.join(args.run, f"query-{os.path.splitext(os.path.basename(args.map))[0]}")
    dataset = load_dataset(config.dataset, config.data_root, zca=config.zca)
    results = run_query(config, dataset, memories, label_map, out, nets=args.nets)
    print(format_query(results))
    print(f"written to: {out}")


def _continual(args):
    flags = {name: getattr(args, name) for name in ("benchmark", "data_root", "seed", "device")
             if getattr(args, name) is not None}
    given = ["--" + name.replace("_", "-") for name in flags]
    config, run_dir, resume = _open_settings(args, ContinualConfig, flags, given, "continual-{c.benchmark}-seed{c.seed}")
    stream = parallel.everywhere(lambda: make_stream(config, download=args.download))
    results = run_continual(config, run_dir, resume=resume, stream=stream)
    if parallel.is_writer():
        print(_format_continual(results))
        print(f"run folder: {run_dir}")


def _format_continual(results) -> str:
    """The table printed by ``addrmem continual``."""
    lines = [f"{results['benchmark']}: {results['tasks']} tasks, {results['protocol']} protocol, budget "
             f"{results['budget_bytes']} bytes ({results['budget_floats']} float32 values); test accuracy (%), "
             f"and RA on held-out training images (val RA):",
             f"  {'method':<13} {'RA':>6} {'BTI':>7} {'LA':>6} {'val RA':>7} {'values':>9} {'bytes':>9} {'seconds':>8}"]
    lines += [f"  {name:<13} {m['ra']:6.2f} {m['bti']:7.2f} {m['la']:6.2f} {m['val']['ra']:7.2f} {m['num_floats']:9d} "
              f"{m['num_bytes']:9d} {m['seconds']:8.1f}" for name, m in results["methods"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
