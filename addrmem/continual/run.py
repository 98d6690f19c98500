"""A continual-learning run: every method through one stream, its metrics,
checkpoints, results.json and plots (docs/continual.md)."""

from __future__ import annotations

import json
import os
import time

import torch
from tqdm.auto import tqdm

from .. import parallel
from ..config import device_name, resolve_device
from ..evaluation import accuracy
from ..files import atomic_write, atomic_write_text
from ..runs import load_checkpoint, open_run_folder, report_state, save_checkpoint
from .config import ContinualConfig
from .learner import learn, make_learner
from .methods import make_method
from .streams import Stream, make_stream

__all__ = ["metrics", "plot", "run_continual"]


def metrics(R: list) -> dict:
    """The metrics of an accuracy matrix (docs/continual.md, "Metrics").

    ``R`` is T x T, R[i][j] the test accuracy (%) on task j after learning
    task i (only j <= i is read). Returns {"ra": mean_j R[T-1][j] (retained
    accuracy), "bti": mean over j < T-1 of R[T-1][j] - R[j][j] (backward
    transfer and interference; 0 for one task), "la": mean_j R[j][j]
    (learning accuracy), "curve": [mean_{j<=i} R[i][j] for each i]}.
    """
    T = len(R)
    last = R[T - 1]
    return {"ra": sum(last) / T,
            "bti": sum(last[j] - R[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0,
            "la": sum(R[j][j] for j in range(T)) / T,
            "curve": [sum(R[i][:i + 1]) / (i + 1) for i in range(T)]}


def run_continual(config: ContinualConfig, run_dir: str | None = None, resume: bool = False,
                  stream: Stream | None = None, progress: bool = True) -> dict:
    """Run every method of ``config`` through the stream (docs/continual.md).

    For task t = 0 .. T-1: each method's learner learns task t
    (:func:`~addrmem.continual.learner.learn`) and the method stores it; then
    each learner is tested on tasks 0 .. t, on their test images (row t of
    the matrix R; R[t][j] is null for j > t) and on their held-out training
    images (row t of R_val, what settings are chosen by). With ``run_dir``
    (opened by :func:`addrmem.runs.open_run_folder`: ``resume`` False starts
    it, True continues it from the last checkpoint with the result of an
    uninterrupted run, "auto" does whichever fits) it checkpoints after each
    task and writes ``config.yaml``, ``results.json``, ``accuracy.png`` and
    ``R-<method>.png``. ``stream`` defaults to :func:`make_stream` (config).

    Returns the results dict: ``methods`` maps each method to {"ra", "bti",
    "la", "curve", "R" (test), "val" (the metrics of R_val), "R_val",
    "num_floats" and "num_bytes" (stored after the last task),
    "max_floats" and "max_bytes" (the most stored after any task),
    "seconds"}; plus ``budget_bytes``, ``budget_floats`` (its float32
    values), ``tasks`` and the run's settings.

    In a torch.distributed process group every rank runs the whole protocol
    and shares out each task's distillation (``distill`` ``meta_batch``,
    :func:`addrmem.distill.outer_step`); rank 0 alone writes.

    Raises ValueError (bad config, a budget too small for a memory, a
    checkpoint of another config), FileNotFoundError (missing dataset files),
    FileExistsError (``run_dir`` not empty and not ``resume``) and OSError.
    """
    config.validate()
    stream = stream or make_stream(config)
    methods = {name: make_method(name, config, stream) for name in config.methods}
    nets = {name: make_learner(config, stream) for name in methods}

    def check():
        """What can fail on bad input, on every rank, before the folder is written."""
        if any(m in ("image", "addressable") for m in config.methods):
            parallel.check_meta_batch(config.distill_config().meta_batch)
        for method in methods.values():
            method.check()

    parallel.everywhere(check)  # a mistake every rank meets is reported once
    T = len(stream)
    state = {"task": 0, **{key: {name: [[None] * T for _ in range(T)] for name in methods} for key in ("R", "R_val")},
             "floats": {name: [] for name in methods}, "bytes": {name: [] for name in methods},
             "seconds": {name: 0.0 for name in methods}}
    checkpoint = os.path.join(run_dir, "checkpoint.pt") if run_dir else None
    writer = bool(run_dir) and parallel.is_writer()

    def start():
        """How the run folder was opened, and the checkpoint to resume from (or None)."""
        opened = open_run_folder(run_dir, config, resume)
        if opened in ("resumed", "finished"):
            return opened, load_checkpoint(checkpoint, config.to_dict())
        return opened, None

    opened, blob = parallel.from_writer(start) if run_dir else ("started", None)  # rank 0 reads and writes
    if progress:
        report_state(run_dir, opened)
    if blob is not None:
        for name, method in methods.items():
            method.load_state_dict(blob["methods"][name])
            nets[name].load_state_dict(blob["nets"][name])
        state = blob["state"]
    progress = progress and parallel.is_writer()
    for method in methods.values():
        method.progress = progress
    bar = tqdm(total=T, initial=state["task"], desc=f"{stream.name}", disable=None if progress else True)
    try:
        for t in range(state["task"], T):
            images, labels = stream.train(t)
            for name, method in methods.items():
                start = time.perf_counter()
                nets[name] = learn(nets[name], method, config, t, images, labels)
                state["seconds"][name] += time.perf_counter() - start
                state["floats"][name].append(method.num_floats())
                state["bytes"][name].append(method.num_bytes())
            for key, split in (("R", stream.test), ("R_val", stream.val)):
                for j in range(t + 1):
                    split_images, split_labels = split(j)
                    for name, net in nets.items():
                        device = next(net.parameters()).device
                        state[key][name][t][j] = accuracy(net, split_images.to(device), split_labels.to(device))
            state["task"] = t + 1
            bar.update(1)
            if writer:
                save_checkpoint(checkpoint, {"config": config.to_dict(), "state": state,
                                             "methods": {n: m.state_dict() for n, m in methods.items()},
                                             "nets": {n: {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                                                      for n, net in nets.items()}})
    finally:
        bar.close()
    budget = config.budget(stream.image_shape)
    results = {"benchmark": stream.name, "tasks": T, "protocol": config.protocol, "seed": config.seed,
               "budget_bytes": budget, "budget_floats": budget // 4, "bases": config.bases,
               "device": device_name(resolve_device(config.device)), "threads": torch.get_num_threads(),
               "methods": {name: {**metrics(state["R"][name]), "R": state["R"][name],
                                  "val": {k: v for k, v in metrics(state["R_val"][name]).items() if k != "curve"},
                                  "R_val": state["R_val"][name],
                                  "num_floats": state["floats"][name][-1], "max_floats": max(state["floats"][name]),
                                  "num_bytes": state["bytes"][name][-1], "max_bytes": max(state["bytes"][name]),
                                  "seconds": state["seconds"][name]}
                           for name in methods}}
    if writer:
        atomic_write_text(os.path.join(run_dir, "results.json"), json.dumps(results, indent=2) + "\n")
        plot(results, run_dir)
    return results


def plot(results: dict, folder: str) -> list:
    """Write ``accuracy.png`` (mean test accuracy over the tasks seen after
    each task, a line per method) and ``R-<method>.png`` (each method's R) to
    ``folder`` from a results dict of :func:`run_continual`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []

    def save(fig, name):
        for axes in fig.axes[:1]:  # whole task numbers
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        path = os.path.join(folder, name)
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in results["methods"].items():
        ax.plot(range(1, results["tasks"] + 1), m["curve"], marker="o", markersize=3,
                label=f"{name} (RA {m['ra']:.1f})")
    ax.set(xlabel="tasks learnt", ylabel="mean test accuracy over tasks seen (%)", ylim=(0, 100),
           title=f"{results['benchmark']}, {results['protocol']} protocol")
    ax.legend()
    save(fig, "accuracy.png")
    for name, m in results["methods"].items():
        fig, ax = plt.subplots(figsize=(5, 4))
        R = [[float("nan") if v is None else v for v in row] for row in m["R"]]
        image = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
        fig.colorbar(image, ax=ax, label="test accuracy (%)")
        ax.set(xlabel="task tested j", ylabel="after learning task i", title=f"{name}: R[i][j]")
        save(fig, f"R-{name}.png")
    return paths
