"""The experiment ``addrmem distill`` runs: the addressable memory against its
baselines at the same storage budget (:func:`run_experiment`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch

from . import parallel
from .config import DistillConfig, derive_seed, device_name, generator
from .data import Dataset
from .distill import build_memory, distill
from .evaluation import EvalSettings, evaluate
from .files import atomic_write, atomic_write_text
from .networks import make_network
from .runs import BASELINE_DIR, open_run_folder, read_json, report_state

__all__ = ["METHOD_NAMES", "eval_networks", "plot_curves", "run_experiment"]

METHOD_NAMES = {"addressable": "addressable memory", "image": "ImageMemory",
                "addressable_undistilled": "addressable memory, undistilled start",
                "image_undistilled": "ImageMemory, undistilled start",
                "random_real": "random real subset", "full_data": "full training set"}
"""results.json method key -> its name in tables and plots."""


def eval_networks(config: DistillConfig) -> list:
    """The network specs the test split is measured with:
    ``config.network_spec()``, then each other one of ``config.eval_archs``,
    in order, once each."""
    return list(dict.fromkeys([config.network_spec(), *config.eval_archs]))


def random_subset(config: DistillConfig, dataset) -> torch.Tensor:
    """The random real subset at the memory's budget: ``config.ipc`` training
    images per class, drawn from the seeded stream "random_real". Returns
    their (num_classes * ipc,) indices into ``dataset.train``."""
    pick = generator(config.seed, "random_real")
    labels = dataset.train[1]
    return torch.cat([(labels == c).nonzero().squeeze(1)[
        torch.randperm(int((labels == c).sum()), generator=pick)[:config.ipc]]
        for c in range(dataset.num_classes)])


def run_experiment(config: DistillConfig, dataset: Dataset, run_dir: str, resume: bool = False,
                   progress: bool = True) -> dict:
    """Distill ``config``'s memory into ``run_dir`` and compare, at the same
    storage budget and on the test split (each measured once, by
    ``eval_nets`` networks that are the same for every method):

    * ``addressable`` (or ``image``): the memory :func:`distill` returns;
    * ``image``: for an addressable config, the ImageMemory baseline distilled
      the same way, without the coefficient regulariser and at
      ``baseline_outer_lr`` if that is set (``run_dir/baseline-image``);
    * ``addressable_undistilled``, ``image_undistilled``: each memory as it
      started (:func:`addrmem.distill.build_memory`), tested alike;
    * ``random_real``: ``ipc`` random real training images per class;
    * ``full_data``: the whole training split (``full_data_epochs`` epochs;
      left out if 0).

    Each is tested with every architecture of :func:`eval_networks`.
    ``run_dir`` is opened by :func:`addrmem.runs.open_run_folder`
    (``resume``: False starts it, True continues it, "auto" does whichever
    fits); a finished run returns its saved results.
    In a torch.distributed process group every rank must call it; rank 0
    alone writes (:mod:`addrmem.parallel`).
    Everything that can fail on bad input (config, budget, networks, a
    dataset loaded with other preprocessing than ``config.zca``) fails before
    the folder is written (:func:`addrmem.runs.create_run_folder`). Writes
    ``results.json`` (atomically) and returns
    its dict: ``methods`` maps each name to {"test": Accuracy fields of
    ``config.network_spec()``, "archs": {spec: Accuracy fields}, "num_floats",
    "images", and for memories "iteration" and "val"}, a function of the
    config alone; ``seconds`` maps each name to {"distill", "test"} seconds
    (wall clock, unrounded), which add up to ``distill_seconds``,
    ``test_seconds`` and ``wall_seconds``.
    """
    config.validate()
    configs = {config.memory: config}
    if config.memory == "addressable":
        configs["image"] = dataclasses.replace(config, memory="image", coeff_reg="none",  # it has no addresses
                                               outer_lr=config.baseline_outer_lr or config.outer_lr)

    def check():
        """What can fail on bad input, on every rank, before the folder is written."""
        if (config.zca > 0) != (dataset.zca is not None):
            raise ValueError(f"the config asks for zca {config.zca} but the dataset was loaded "
                             f"{'with' if dataset.zca is not None else 'without'} ZCA: load it with zca=config.zca")
        parallel.check_meta_batch(config.meta_batch)
        # The budget does not depend on the start: skip init: real's PCA here (the undistilled rows build it).
        rows = {kind: build_memory(dataclasses.replace(cfg, init="xavier"), dataset).per_class
                for kind, cfg in configs.items()}
        for arch in eval_networks(config):
            make_network(arch, dataset.image_shape, dataset.num_classes, seed=0)
        return rows

    def start():
        state = open_run_folder(run_dir, config, resume)
        folder = os.path.join(run_dir, BASELINE_DIR)
        for kind, cfg in configs.items():
            if kind != config.memory and not os.path.exists(os.path.join(folder, "config.yaml")):
                os.makedirs(folder, exist_ok=True)
                cfg.to_yaml(os.path.join(folder, "config.yaml"))
        return state

    rows = parallel.everywhere(check)  # a mistake every rank meets is reported once
    state = parallel.from_writer(start)  # rank 0 writes; its errors are raised on every rank
    if progress and parallel.is_writer():
        capped = [f"{n} of the {kind} memory" for kind, n in rows.items() if n < config.n_per_c]
        if capped:
            print(f"n_per_c {config.n_per_c} is more than the rows per class it can take: each inner step takes "
                  f"all {' and '.join(capped)}")
        report_state(run_dir, state)
    if state == "finished":
        return parallel.from_writer(lambda: read_json(os.path.join(run_dir, "results.json")))
    test_seed = derive_seed(config.seed, "test")
    archs = eval_networks(config)

    def test(images, labels, name, full=False):
        """{arch: Accuracy fields} and the seconds it took; ``full``: the full
        training set's schedule (``full_data_epochs`` epochs)."""
        start = time.perf_counter()
        schedule = dict(epochs=config.full_data_epochs, steps=0) if full else {}
        accs = {}
        for arch in archs:
            settings = EvalSettings.of(config, network=arch, **schedule)
            accs[arch] = dataclasses.asdict(evaluate(images, labels, dataset, settings, config.eval_nets, split="test",
                                                     seed=test_seed, progress=progress, desc=f"test {name} ({arch})"))
        return accs, time.perf_counter() - start

    methods, seconds, curves = {}, {}, {}
    for kind, cfg in configs.items():
        folder = run_dir if kind == config.memory else os.path.join(run_dir, BASELINE_DIR)
        result = distill(cfg, dataset, folder, resume=state != "started", progress=progress)
        curves[kind] = [{"iteration": r["iteration"], "seconds": r["seconds"], "val_mean": r["val_mean"],
                         "val_std": r["val_std"]} for r in result.log if "val_mean" in r]
        for name, memory in ((kind, result.memory), (f"{kind}_undistilled", build_memory(cfg, dataset))):
            images, labels = memory.recall()
            accs, test_seconds = test(images, labels, name.replace("_", " "))
            methods[name] = {"test": accs[config.network_spec()], "archs": accs, "num_floats": memory.num_floats(),
                             "images": len(labels), "per_class": memory.per_class}
            seconds[name] = {"distill": 0.0, "test": test_seconds}
        methods[kind].update(iteration=result.iteration, val=dataclasses.asdict(result.val))
        seconds[kind]["distill"] = result.seconds
    train_images, train_labels = dataset.train
    subset = random_subset(config, dataset)
    references = {"random_real": subset}
    if config.full_data_epochs:
        references["full_data"] = torch.arange(len(train_labels))
    for kind, rows in references.items():
        full = kind == "full_data"
        accs, test_seconds = test(train_images[rows], train_labels[rows], kind.replace("_", " "), full)
        methods[kind] = {"test": accs[config.network_spec()], "archs": accs,
                         "num_floats": rows.numel() * math.prod(dataset.image_shape), "images": rows.numel()}
        if full:
            methods[kind]["epochs"] = config.full_data_epochs
        seconds[kind] = {"distill": 0.0, "test": test_seconds}
    distill_seconds = sum(s["distill"] for s in seconds.values())
    test_seconds = sum(s["test"] for s in seconds.values())
    results = {
        "dataset": dataset.name, "ipc": config.ipc, "seed": config.seed, "iterations": config.iterations,
        "network": config.network_spec(), "archs": archs, "zca": config.zca,
        "eval_nets": config.eval_nets, "eval_epochs": config.eval_epochs, "eval_steps": config.eval_steps, "test_images": len(dataset.test[1]),
        "methods": methods, "curves": curves, "seconds": seconds, "distill_seconds": distill_seconds, "test_seconds": test_seconds,
        "wall_seconds": distill_seconds + test_seconds,
        "device": device_name(config.device_dtype()[0]), "threads": torch.get_num_threads(),
    }
    if parallel.is_writer():
        atomic_write_text(os.path.join(run_dir, "results.json"), json.dumps(results, indent=2) + "\n")
        plot_curves(results, os.path.join(run_dir, "curve.png"))
    return results


def plot_curves(results: dict, path: str) -> None:
    """Draw the validation accuracy of each distilled memory against outer
    iterations (``results["curves"]``), with the undistilled starts and the
    references' test accuracy as lines, to the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, points in results["curves"].items():
        ax.errorbar([p["iteration"] for p in points], [p["val_mean"] for p in points],
                    yerr=[p["val_std"] for p in points], marker="o", capsize=3, label=f"{METHOD_NAMES[kind]} (val)")
    for kind, style in (("random_real", ":"), ("full_data", "--")):
        if kind in results["methods"]:
            ax.axhline(results["methods"][kind]["test"]["mean"], linestyle=style, color="gray",
                       label=f"{METHOD_NAMES[kind]} (test)")
    ax.set_xlabel("outer iteration")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{results['dataset']}, IPC {results['ipc']}, {results['network']}, {results['device']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)

