"""Distillation: one outer step (:func:`outer_step`), the outer loop's state
(:class:`OuterLoop`, the one place an outer loop is set up) and the loop
(:func:`distill`).

An outer step (docs/method.md, "One outer iteration") draws a class subset,
an augmentation, a fresh network, T row indices and a real batch, takes the
exact hypergradient (:func:`addrmem.hypergradient.hypergradient`), clips it
globally and steps the outer optimizer. :func:`distill` repeats it, monitors accuracy on the
validation split, checkpoints into a run folder (:mod:`addrmem.runs`) and
returns the memory with the best validation accuracy (docs/method.md, "Where
addrmem departs from the official code").

Every random draw comes from a torch.Generator seeded from ``config.seed``
(:func:`addrmem.config.derive_seed`), one stream per kind of draw
(:func:`outer_generators`): one seed, one result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import parallel
from .augment import SiameseAugment
from .config import DistillConfig, derive_seed, generator
from .data import Dataset
from .evaluation import Accuracy, EvalSettings, evaluate
from .files import atomic_write_text
from .hypergradient import hypergradient
from .memory import AddressableMemory, ImageMemory
from .networks import make_network
from .runs import cpu_state, load_checkpoint, read_log, save_checkpoint, save_grids, write_log

__all__ = ["DistillResult", "OuterLoop", "RealPool", "STREAMS", "build_memory", "distill", "make_outer_optimizer",
           "outer_generators", "outer_step"]

STREAMS = ("task", "network", "rows", "real", "augment")
"""The random streams of the outer loop, one generator each (:func:`outer_generators`)."""


def build_memory(config: DistillConfig, dataset: Dataset):
    """The undistilled memory of ``config.memory`` kind at ``config.ipc``'s
    budget for ``dataset``, on ``config.device`` in ``config.dtype``:
    Xavier-initialised from the run's "memory" stream, or with ``init: real``
    started from ``dataset``'s training images (``init_from_real``, drawn
    from the "memory" stream too). Raises ValueError if it cannot fit."""
    draws = generator(config.seed, "memory")
    if config.memory == "addressable":
        memory = AddressableMemory.from_budget(config.ipc, dataset.num_classes, dataset.image_shape,
                                               config.n_bases, config.downsample, generator=draws)
    else:
        memory = ImageMemory.from_budget(config.ipc, dataset.num_classes, dataset.image_shape, generator=draws)
    memory = memory.to(*config.device_dtype())
    if config.init == "real":
        memory.init_from_real(*dataset.train, draws)
    return memory


def make_outer_optimizer(memory, config: DistillConfig) -> torch.optim.Optimizer:
    """The outer optimizer of ``config`` over ``memory``'s parameters that
    require grad (frozen ones, e.g. shared bases, stay as they are):
    SGD(``outer_lr``, ``outer_momentum``) or Adam(``outer_lr``)."""
    learnt = _learnt(memory)
    if config.outer_optimizer == "sgd":
        return torch.optim.SGD(learnt.values(), lr=config.outer_lr, momentum=config.outer_momentum)
    return torch.optim.Adam(learnt.values(), lr=config.outer_lr)


def _learnt(memory) -> dict:
    """name -> parameter of ``memory``'s parameters that require grad."""
    return {name: p for name, p in memory.named_parameters() if p.requires_grad}


def outer_generators(seed: int) -> dict:
    """One CPU torch.Generator per stream of :data:`STREAMS`, seeded from ``seed``."""
    return {name: generator(seed, name) for name in STREAMS}


class RealPool:
    """The real images outer steps draw their real batches from.

    ``images`` (N, C, H, W) and ``labels`` (N,) int64 in [0, num_classes) are
    moved once to ``device`` in ``dtype``; each class's rows are kept for
    :meth:`sample`.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, device, dtype):
        self.images = images.to(device, dtype)
        self.labels = labels.to(device)
        self.members = [(labels.cpu() == c).nonzero().squeeze(1) for c in range(num_classes)]

    def sample(self, classes: list, per_class: int, generator: torch.Generator):
        """``per_class`` distinct images of each class of ``classes`` (all of a
        class's images if it has fewer), drawn from ``generator``: (images
        (n, C, H, W), labels (n,)), class-major in the order of ``classes``."""
        rows = torch.cat([self.members[c][torch.randperm(len(self.members[c]), generator=generator)[:per_class]]
                          for c in classes]).to(self.images.device)
        return self.images[rows], self.labels[rows]


def outer_step(memory, optimizer: torch.optim.Optimizer, config: DistillConfig, real: RealPool,
               generators: dict, iteration: int = 0, *, gradient=None, phase=None) -> tuple[float, float]:
    """One outer iteration of distillation (docs/method.md, "One outer
    iteration"), in place on
    ``memory`` (an AddressableMemory or ImageMemory) and ``optimizer`` (from
    :func:`make_outer_optimizer`). For each of ``config.meta_batch``
    trajectories m = 0 .. M-1 in turn:

    1. **network**: a fresh ``config.network_spec()`` network for the memory's image shape
       and classes, seeded from ``generators["network"]``, on the memory's
       device and dtype;
    2. **sample**: the class subset S (``task_classes`` of them, drawn from
       ``generators["task"]``; all classes if 0), a Siamese flip/rotate
       augmentation (``config.augment``, from "augment"), T = ``steps`` row
       indices of ``n_per_c`` distinct rows per class of S (capped at the
       memory's rows per class, from "rows") and ``real_per_class`` real
       images per class of S from ``real`` (from "real");
    3. **hypergradient**: the outer loss and its exact gradient
       (``gradient``, default :func:`addrmem.hypergradient.hypergradient`,
       called with its arguments; inner SGD ``inner_lr``, ``inner_momentum``).

    Then 4. **update**: the mean over the M trajectories of the losses and
    of the gradients, the gradients set as the parameters' ``.grad``, plus
    ``coeff_reg_alpha`` times the coefficient regulariser's gradient
    (``coeff_reg``), the global norm clipped to ``clip``, one optimizer
    step, the gradients cleared.

    In a torch.distributed process group (:mod:`addrmem.parallel`) every rank
    draws every trajectory's samples, so the streams stay in step, but
    computes only the hypergradients of its share (m mod N = rank); the
    results are added in trajectory order on every rank, so every rank takes
    the same step. Every rank must call it, and M must be at least the
    number of processes (ValueError otherwise).

    ``generators`` maps each name of :data:`STREAMS` to a torch.Generator
    (:func:`outer_generators`). ``phase(name)``, if given, is a context
    manager entered around each part above ("network", "sample",
    "hypergradient", "update"), e.g. to time them. Returns (outer loss, the
    gradient's global norm before clipping). Raises FloatingPointError
    (naming ``iteration``) if either is not finite; the memory is then left
    unchanged.
    """
    phase = phase or contextlib.nullcontext  # nullcontext(name) enters to name and does nothing
    gradient = gradient or functools.partial(hypergradient, snapshot_every=config.snapshot_every)
    first = next(memory.parameters())
    num_classes = memory.num_classes
    learnt = _learnt(memory)
    parallel.check_meta_batch(config.meta_batch)
    mine = parallel.shard(config.meta_batch)
    flats = []  # per trajectory of this rank: [loss, every gradient flattened in the order of names]
    for m in range(config.meta_batch):
        with phase("network"):
            net_seed = int(torch.randint(0, 2**62, (1,), generator=generators["network"]))
            if m in mine:
                net = make_network(config.network_spec(), memory.image_shape, num_classes, seed=net_seed)
                net = net.to(first.device, first.dtype)
        with phase("sample"):
            if 0 < config.task_classes < num_classes:
                classes = torch.randperm(num_classes, generator=generators["task"])[:config.task_classes]
                classes = classes.sort().values
            else:
                classes = torch.arange(num_classes)
            augment = SiameseAugment.draw(generators["augment"]) if config.augment == "flip_rotate" else None
            n_per_c = min(config.n_per_c, memory.per_class)
            batches = [memory.sample_index(classes, n_per_c, generators["rows"]) for _ in range(config.steps)]
            real_images, real_labels = real.sample(classes.tolist(), config.real_per_class, generators["real"])
        if m in mine:
            with phase("hypergradient"):
                loss, grads = gradient(memory, net, batches, real_images, real_labels, lr=config.inner_lr,
                                       momentum=config.inner_momentum, augment=augment)
                flats.append(torch.cat([loss.reshape(1).to(first.dtype)] + [grads[name].reshape(-1)
                                                                             for name in learnt]))
    with phase("update"):
        total = parallel.combine(flats, config.meta_batch)
        if config.meta_batch > 1:
            total /= config.meta_batch
        offset = 1
        for p in learnt.values():
            p.grad = total[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        if config.coeff_reg != "none":
            a = memory.addresses.detach()
            reg = a.sign() if config.coeff_reg == "l1" else a / a.norm().clamp_min(1e-12)
            memory.addresses.grad.add_(reg, alpha=config.coeff_reg_alpha)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(learnt.values(), config.clip))
        loss = float(total[0])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"the outer loss ({loss}) or its gradient norm ({grad_norm}) is not finite at iteration "
                f"{iteration}: the memory diverged; lower outer_lr or inner_lr and start again")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


class OuterLoop:
    """An outer loop's state: ``memory``, its outer ``optimizer``
    (:func:`make_outer_optimizer`: the memory's parameters that require
    grad), the ``real`` pool (:class:`RealPool` of
    ``real_images`` (N, C, H, W) and ``real_labels`` (N,) in [0,
    ``num_classes``), on the memory's device and in its dtype: tensors
    already there are used, not copied) and the random ``generators``
    (:func:`outer_generators` of ``seed``, default ``config.seed``; two
    loops of one seed over memories of one geometry draw the same inputs,
    step for step). :meth:`step` takes one outer iteration;
    :meth:`state_dict` and :meth:`load_state_dict` checkpoint what changes
    (the memory, the optimizer, the generators)."""

    def __init__(self, memory, config: DistillConfig, real_images: torch.Tensor, real_labels: torch.Tensor,
                 num_classes: int, *, seed: int | None = None):
        self.memory = memory
        self.config = config
        self.optimizer = make_outer_optimizer(memory, config)
        first = next(memory.parameters())
        self.real = RealPool(real_images, real_labels, num_classes, first.device, first.dtype)
        self.generators = outer_generators(config.seed if seed is None else seed)

    def step(self, iteration: int = 0, **hooks) -> tuple[float, float]:
        """:func:`outer_step` on this loop's state (``hooks``: its ``gradient``
        and ``phase``); returns (outer loss, gradient norm before clipping)."""
        return outer_step(self.memory, self.optimizer, self.config, self.real, self.generators, iteration, **hooks)

    def state_dict(self) -> dict:
        """{"memory": its state on the CPU, "optimizer": its state, "generators": {name: state}}."""
        return {"memory": cpu_state(self.memory.state_dict()), "optimizer": self.optimizer.state_dict(),
                "generators": {name: g.get_state() for name, g in self.generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`."""
        self.memory.load_state_dict(state["memory"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name, g in self.generators.items():
            g.set_state(state["generators"][name])


@dataclass
class DistillResult:
    """What :func:`distill` returns: ``memory`` is the memory with the best
    validation accuracy (``val``, measured at ``iteration``; the latest of
    ties); ``log`` the records of ``log.jsonl``; ``seconds`` the wall time of
    the outer loop (resumed runs included)."""

    memory: torch.nn.Module
    iteration: int
    val: Accuracy
    log: list
    seconds: float


class _Run:
    """The mutable state of one distillation, and its checkpoints."""

    def __init__(self, config, dataset, run_dir):
        self.config = config
        self.run_dir = run_dir
        self.loop = OuterLoop(build_memory(config, dataset), config, *dataset.train, dataset.num_classes)
        self.memory = self.loop.memory
        self.iteration = 0
        self.best = None  # {"iteration", "val": Accuracy fields, "state": memory state}
        self.log = []
        self.seconds = 0.0

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def save_checkpoint(self):
        """Write checkpoint.pt (atomically)."""
        save_checkpoint(self.path("checkpoint.pt"), {
            "config": self.config.to_dict(),
            "iteration": self.iteration,
            **self.loop.state_dict(),
            "best": None if self.best is None else {**self.best, "state": cpu_state(self.best["state"])},
            "log_records": len(self.log),
            "seconds": self.seconds,
        })

    def load_checkpoint(self):
        """Restore the state of checkpoint.pt; truncate log.jsonl to it.
        Raises ValueError for a checkpoint that is corrupt or not this run's,
        or a log.jsonl that does not hold the records it covers."""
        path = self.path("checkpoint.pt")
        blob, self.log = parallel.from_writer(lambda: self._read_checkpoint(path))
        try:
            self.loop.load_state_dict(blob)
            self.iteration = int(blob["iteration"])
            self.seconds = float(blob["seconds"])
            self.best = blob["best"]
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            lines = str(exc).strip().splitlines()
            raise ValueError(f"{path!r} does not match this run ({lines[0] if lines else type(exc).__name__}): "
                             f"delete {self.run_dir!r} and start the run again") from exc
        if parallel.is_writer():
            write_log(self.path("log.jsonl"), self.log)

    def _read_checkpoint(self, path):
        """(checkpoint dict, the log records it covers), read from the files."""
        blob = load_checkpoint(path, self.config.to_dict())
        try:
            records = int(blob["log_records"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path!r} does not match this run (no log_records): delete {self.run_dir!r} and "
                             f"start the run again") from exc
        return blob, read_log(self.path("log.jsonl"), records)


def distill(config: DistillConfig, dataset: Dataset, run_dir: str | None = None, resume: bool = False,
            progress: bool = True) -> DistillResult:
    """Distill ``dataset`` into a memory (docs/method.md, "One outer
    iteration").

    Outer iteration ``it`` (0 .. iterations-1): evaluate on the validation
    split if ``it % eval_every == 0``, then :func:`outer_step`. After the last
    iteration the memory is evaluated once more; the best evaluated memory is
    returned.

    With ``run_dir`` (an existing folder holding config.yaml) it logs to
    log.jsonl, checkpoints every ``checkpoint_every`` iterations and at the
    end, and writes memory.pt and the PNG grids (:mod:`addrmem.runs`).
    ``resume=True`` continues from checkpoint.pt (from the start if there is
    none yet) with exactly the result of an uninterrupted run.

    Raises ValueError (budget that cannot fit, missing device, corrupt or
    foreign checkpoint, garbled log), FileExistsError (a checkpoint exists but
    ``resume`` is False), FloatingPointError (the outer loss or gradient
    became NaN/inf) and OSError (a file cannot be written; the last
    checkpoint stays intact).
    """
    config.validate()
    parallel.check_meta_batch(config.meta_batch)
    run = _Run(config, dataset, run_dir)
    writer = run_dir is not None and parallel.is_writer()
    if run_dir is not None:
        checkpoint = run.path("checkpoint.pt")
        found = parallel.from_writer(lambda: os.path.exists(checkpoint))
        if resume and found:
            run.load_checkpoint()
        elif not resume and found:
            raise FileExistsError(f"{run_dir!r} already holds a run: resume it or choose another folder")
        elif writer:
            atomic_write_text(run.path("log.jsonl"), "")
    device, dtype = config.device_dtype()
    memory = run.memory
    val_seed = derive_seed(config.seed, "val")
    val_settings = EvalSettings.of(config)
    log_file = open(run.path("log.jsonl"), "a") if writer else None

    def validate_memory():
        images, labels = memory.recall()
        acc = evaluate(images, labels, dataset, val_settings, config.val_nets, split="val", seed=val_seed,
                       progress=progress, desc=f"val @ {run.iteration}")
        if run.best is None or acc.mean >= run.best["val"]["mean"]:
            run.best = {"iteration": run.iteration, "val": dataclasses.asdict(acc),
                        "state": cpu_state(memory.state_dict())}
        return acc

    def write(record):
        run.log.append(record)
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    progress = progress and parallel.is_writer()
    bar = tqdm(total=config.iterations, initial=run.iteration, desc=f"distill {config.memory}",
               disable=None if progress else True)
    last_val = None
    try:
        while run.iteration < config.iterations:
            start = time.perf_counter()
            it = run.iteration
            record = {"iteration": it}
            if it % config.eval_every == 0:
                last_val = validate_memory()
                record.update(val_mean=last_val.mean, val_std=last_val.std)
            loss, grad_norm = run.loop.step(it)
            run.seconds += time.perf_counter() - start
            record.update(loss=loss, grad_norm=grad_norm, seconds=round(run.seconds, 3))
            write(record)
            run.iteration = it + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{last_val.mean:.1f}%" if last_val else "-")
            if writer and run.iteration % config.checkpoint_every == 0:
                run.save_checkpoint()
        if not run.log or "loss" in run.log[-1]:  # the final memory is not evaluated yet
            start = time.perf_counter()
            last_val = validate_memory()
            run.seconds += time.perf_counter() - start
            write({"iteration": run.iteration, "val_mean": last_val.mean, "val_std": last_val.std,
                   "seconds": round(run.seconds, 3)})
            if writer:
                run.save_checkpoint()
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()

    best = type(memory)(**memory.config(), generator=torch.Generator()).to(device, dtype)
    best.load_state_dict(run.best["state"])
    result = DistillResult(best, run.best["iteration"], Accuracy(**run.best["val"]), run.log, run.seconds)
    if run_dir is not None:
        best.extra = dict(dataset=dataset.name, preprocessing=dataset.preprocessing(),
                          classes=list(dataset.classes), iteration=result.iteration, val_mean=result.val.mean,
                          val_std=result.val.std)
    if writer:
        best.save(run.path("memory.pt"), **best.extra)
        save_grids(best, run_dir)
    return result
