"""Distillation runs: the outer loop (METHOD.md §3.1), evaluation (§5), run folders.

* :class:`DistillConfig` holds every setting; its defaults are the official
  README example (§6), and :func:`default_config` adds the tuned settings of a
  dataset (:data:`PRESETS`). Configs round-trip through YAML.
* :func:`distill` learns one memory: each outer iteration samples a class
  subset, an augmentation, a fresh network, T row indices and a real batch,
  takes the exact hypergradient (:func:`addrmem.hypergradient.hypergradient`),
  clips it globally and steps the outer optimizer. It monitors accuracy on the
  validation split and returns the memory with the best validation accuracy
  (METHOD.md §12.3).
* :func:`evaluate` trains fresh networks on given images and measures them.
* :func:`run_experiment` is what ``addrmem distill`` runs: the addressable
  memory, the ImageMemory baseline distilled the same way at the same budget,
  a random real subset at the same budget and the full training set, each
  evaluated once on the test split; it writes ``results.json``.

Every random draw comes from a torch.Generator seeded from ``config.seed``
(:func:`derive_seed`): one seed, one result. A run folder holds

=================  ==========================================================
``config.yaml``    the config (:meth:`DistillConfig.to_yaml`)
``log.jsonl``      one JSON record per outer iteration: ``iteration``,
                   ``loss`` and ``grad_norm`` (of that iteration's update),
                   ``val_mean``/``val_std`` (%, of the memory before it, when
                   evaluated; the last record has only these) and ``seconds``
``checkpoint.pt``  everything needed to resume exactly (written atomically)
``memory.pt``      the chosen memory (:func:`addrmem.memory.load_memory`)
``bases.png``,     the bases (each scaled to [0, 1]) and the recalled images,
``recall.png``     one row per class, normalisation undone
``results.json``   the final comparison (:func:`run_experiment`)
``baseline-image/`` the same files for the ImageMemory baseline
=================  ==========================================================
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from .augment import SiameseAugment, augment_per_image
from .data import Dataset, to_display
from .hypergradient import hypergradient
from .memory import AddressableMemory, ImageMemory
from .networks import NETWORKS, make_network

__all__ = ["Accuracy", "DistillConfig", "DistillResult", "PRESETS", "default_config", "derive_seed",
           "distill", "evaluate", "make_outer_optimizer", "outer_update", "run_experiment", "save_grids",
           "eval_networks"]

CHECKPOINT_FORMAT = 1
BASELINE_DIR = "baseline-image"


@dataclass
class DistillConfig:
    """All settings of a distillation run. Defaults: the official README
    example (METHOD.md §6): CIFAR-10-style IPC 1, K=16 bases at half
    resolution, T=150, 32 rows per class per step, outer SGD 0.1 / 0.5, clip 2,
    evaluation by 10 nets x 300 epochs. Use :func:`default_config` for a
    dataset's tuned settings.

    Data: ``dataset`` (a name known to :func:`addrmem.data.load_dataset`),
    ``data_root`` (its folder; None for bundled data), ``zca`` (ZCA whitening
    strength, METHOD.md §3.5: 0 = off; the official code uses 0.1 for CIFAR
    and 100 for SVHN).
    Memory: ``memory`` ("addressable" or "image"), ``ipc`` (storage budget in
    raw images per class, METHOD.md §2), ``n_bases`` (K), ``downsample`` (ds:
    bases stored at 1/ds resolution; ignored by "image").
    Inner loop: ``network`` (a name known to :func:`addrmem.networks.make_network`),
    ``steps`` (T), ``inner_lr``, ``inner_momentum``, ``n_per_c`` (rows per
    class per step; capped at the rows the memory has), ``task_classes``
    (classes per outer iteration; 0 = all), ``real_per_class`` (real images
    per class in the outer loss), ``augment`` ("none" or "flip_rotate",
    METHOD.md §3.4).
    Outer loop: ``iterations``, ``outer_optimizer`` ("sgd" or "adam"),
    ``outer_lr``, ``outer_momentum`` (SGD only), ``clip`` (global grad-norm
    clip over all memory parameters), ``coeff_reg`` ("none", "l1" or "l2")
    and ``coeff_reg_alpha``: alpha * dR/dA is added to the addresses'
    gradient, R = ||A||_1 or ||A||_F over the whole address table (METHOD.md
    §3.3, §12.4; "addressable" only).
    Evaluation: every ``eval_every`` iterations (and after the last) ``val_nets``
    networks measure the memory on the validation split; at the end
    ``eval_nets`` networks of each architecture in ``network`` +
    ``eval_archs`` (cross-architecture evaluation, METHOD.md §12.6) measure
    each method on the test split. Each network trains ``eval_epochs``
    epochs (``full_data_epochs`` on the full training set; 0 skips that
    reference) of SGD (``eval_lr``, ``eval_momentum``) in shuffled batches of
    ``eval_batch``.
    Run: ``checkpoint_every`` (iterations), ``seed``, ``device``, ``dtype``
    ("float32" or "float64"), ``threads`` (CPU intra-op threads that the
    ``addrmem`` command sets, since results can differ in the last bits with
    the thread count; 0 leaves torch's default).
    """

    dataset: str = "digits"
    data_root: str | None = None
    zca: float = 0.0
    memory: str = "addressable"
    ipc: int = 1
    n_bases: int = 16
    downsample: int = 2
    network: str = "convnet"
    steps: int = 150
    inner_lr: float = 0.01
    inner_momentum: float = 0.9
    n_per_c: int = 32
    task_classes: int = 0
    real_per_class: int = 64
    augment: str = "none"
    iterations: int = 1000
    outer_optimizer: str = "sgd"
    outer_lr: float = 0.1
    outer_momentum: float = 0.5
    clip: float = 2.0
    coeff_reg: str = "none"
    coeff_reg_alpha: float = 1e-4
    eval_every: int = 200
    val_nets: int = 10
    eval_nets: int = 10
    eval_epochs: int = 300
    eval_batch: int = 640
    eval_lr: float = 0.01
    eval_momentum: float = 0.9
    eval_archs: list[str] = dataclasses.field(default_factory=list)
    full_data_epochs: int = 300
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> "DistillConfig":
        """Check types, choices and ranges; raises TypeError or ValueError
        naming the field. Returns self."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kind = {"int": int, "float": float, "str": str, "str | None": str, "list[str]": list}[field.type]
            if value is None and field.type == "str | None":
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, field.name, value)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise TypeError(f"config field {field.name} must be {field.type}; got {value!r}")
        choices = {"memory": ("addressable", "image"), "augment": ("none", "flip_rotate"),
                   "outer_optimizer": ("sgd", "adam"), "coeff_reg": ("none", "l1", "l2"),
                   "dtype": ("float32", "float64")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config field {name} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(self, name)!r}")
        for name in ("ipc", "n_bases", "downsample", "steps", "n_per_c", "real_per_class", "iterations",
                     "eval_every", "val_nets", "eval_nets", "eval_epochs", "eval_batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name} must be >= 1; got {getattr(self, name)}")
        for arch in self.eval_archs:
            if arch not in NETWORKS:
                raise ValueError(f"config field eval_archs: unknown network {arch!r}; known: "
                                 f"{', '.join(sorted(NETWORKS))}")
        for name in ("task_classes", "seed", "threads", "full_data_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"config field {name} must be >= 0; got {getattr(self, name)}")
        for name in ("inner_lr", "outer_lr", "clip", "eval_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"config field {name} must be > 0; got {getattr(self, name)}")
        for name in ("inner_momentum", "outer_momentum", "eval_momentum", "coeff_reg_alpha", "zca"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"config field {name} must be >= 0; got {getattr(self, name)}")
        if self.memory == "image" and self.coeff_reg != "none":
            raise ValueError("coeff_reg acts on the addresses: it needs memory: addressable")
        return self

    def to_dict(self) -> dict:
        """Plain dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, base: "DistillConfig | None" = None) -> "DistillConfig":
        """``base`` (default: :func:`default_config` of ``values["dataset"]``,
        or of the default dataset) with the fields in ``values`` replaced.
        Raises ValueError for unknown fields."""
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a mapping of field: value; got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(map(str, unknown))}; "
                             f"known: {', '.join(sorted(known))}")
        if base is None:
            base = default_config(values.get("dataset", cls.dataset))
        return dataclasses.replace(base, **values)

    def to_yaml(self, path) -> None:
        """Write the config to ``path`` as YAML (atomically)."""
        _atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path, **overrides) -> "DistillConfig":
        """Read a config written by :meth:`to_yaml`, or any YAML mapping of
        some fields (the others come from :func:`default_config` of its
        dataset), with the fields in ``overrides`` replaced. Raises
        FileNotFoundError or ValueError."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config file at {str(path)!r}")
        try:
            with open(path) as f:
                values = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ValueError(f"{str(path)!r} is not valid YAML: {_one_line(exc)}") from exc
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"{str(path)!r} must hold a YAML mapping of config fields")
        return cls.from_dict({**values, **overrides})


PRESETS = {
    # `addrmem distill` with no arguments: a few minutes on two CPU cores. At
    # IPC 1 an 8x8 digit budget is 640 floats and a full-resolution base costs
    # 64 of them, so K=7 bases leave 2 addressing rows per class (588 floats);
    # half-resolution (4x4) bases lose the strokes. The MLP, not the ConvNet:
    # on 8x8 inputs the ConvNet's third block normalises 2x2 maps, learns
    # slowly at lr 0.01 and costs ~40x more per inner step on the CPU. Adam,
    # not SGD 0.1: hypergradient norms here are ~0.01-0.1, so SGD barely moves
    # the memory in a few hundred iterations. One thread: these ops are too
    # small for a second one to pay for its synchronisation.
    "digits": dict(network="mlp", n_bases=7, downsample=1, steps=100, iterations=300, outer_optimizer="adam",
                   outer_lr=0.03, eval_every=50, val_nets=2, eval_nets=5, eval_epochs=300,
                   checkpoint_every=50, threads=1),
}
"""dataset name -> the fields :func:`default_config` changes for it."""


def default_config(dataset: str = "digits", **overrides) -> DistillConfig:
    """The config for ``dataset``: the official defaults, then the dataset's
    :data:`PRESETS`, then ``overrides`` (field=value)."""
    return DistillConfig(**{"dataset": dataset, **PRESETS.get(dataset, {}), **overrides})


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed for the stream named by ``keys`` (ints or strings) of run
    seed ``seed``, via numpy's SeedSequence: independent streams, stable
    across platforms and versions."""
    words = [seed] + [zlib.crc32(str(k).encode()) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _generator(seed: int, *keys) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


# --- evaluation ----------------------------------------------------------------------------


@dataclass
class Accuracy:
    """Accuracy (%) of ``len(runs)`` networks: mean and population std (as
    the official code's np.std)."""

    mean: float
    std: float
    runs: list

    @classmethod
    def of(cls, runs) -> "Accuracy":
        """From a list of per-network accuracies (%)."""
        runs = [float(r) for r in runs]
        return cls(float(np.mean(runs)), float(np.std(runs)), runs)

    def __str__(self):
        return f"{self.mean:.2f} ± {self.std:.2f}"


def _device_dtype(config):
    return torch.device(config.device), getattr(torch, config.dtype)


@torch.no_grad()
def _accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1024) -> float:
    """Top-1 accuracy (%) of ``net`` on images (N, C, H, W), labels (N,)."""
    net.eval()
    correct = 0
    for start in range(0, len(labels), batch):
        logits = net(images[start:start + batch])
        correct += int((logits.argmax(1) == labels[start:start + batch]).sum())
    return 100.0 * correct / len(labels)


def evaluate(images: torch.Tensor, labels: torch.Tensor, dataset: Dataset, config: DistillConfig,
             n_nets: int, *, split: str = "val", seed: int = 0, network: str | None = None,
             progress: bool = True, desc: str = "evaluate") -> Accuracy:
    """Train ``n_nets`` fresh networks on (images (N, C, H, W), labels (N,)
    int64) and measure them on ``dataset``'s ``split`` ("val" or "test").

    Each network (``network``, default ``config.network``) starts from its own
    seeded init (network j of seed s is the same for every call, so methods
    compared with the same seed see the same networks) and trains
    ``config.eval_epochs`` epochs of SGD (``eval_lr``, ``eval_momentum``, no
    weight decay) in shuffled batches of ``eval_batch``, with per-image
    flip/rotate augmentation at every step if ``config.augment`` is on
    (METHOD.md §5). Runs on ``config.device`` in ``config.dtype``.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test'; got {split!r}")
    device, dtype = _device_dtype(config)
    images = images.detach().to(device, dtype)
    labels = labels.to(device)
    eval_images, eval_labels = getattr(dataset, split)
    eval_images, eval_labels = eval_images.to(device, dtype), eval_labels.to(device)
    runs = []
    for j in tqdm(range(n_nets), desc=desc, leave=False, disable=None if progress else True):
        net = make_network(network or config.network, dataset.image_shape, dataset.num_classes,
                           seed=derive_seed(seed, "net", j)).to(device, dtype)
        generator = _generator(seed, "batches", j)
        optimizer = torch.optim.SGD(net.parameters(), lr=config.eval_lr, momentum=config.eval_momentum)
        net.train()
        for _ in range(config.eval_epochs):
            order = torch.randperm(len(labels), generator=generator).to(device)
            for start in range(0, len(labels), config.eval_batch):
                batch = order[start:start + config.eval_batch]
                x = images[batch]
                if config.augment == "flip_rotate":
                    x = augment_per_image(x, generator)
                loss = F.cross_entropy(net(x), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        runs.append(_accuracy(net, eval_images, eval_labels))
    return Accuracy.of(runs)


# --- distillation --------------------------------------------------------------------------


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


def build_memory(config: DistillConfig, dataset: Dataset):
    """The untrained memory of ``config.memory`` kind at ``config.ipc``'s
    budget for ``dataset``, initialised from the run's "memory" stream, on
    ``config.device`` in ``config.dtype``. Raises ValueError if it cannot fit."""
    generator = _generator(config.seed, "memory")
    if config.memory == "addressable":
        memory = AddressableMemory.from_budget(config.ipc, dataset.num_classes, dataset.image_shape,
                                               config.n_bases, config.downsample, generator=generator)
    else:
        memory = ImageMemory.from_budget(config.ipc, dataset.num_classes, dataset.image_shape,
                                         generator=generator)
    return memory.to(*_device_dtype(config))


def make_outer_optimizer(memory, config: DistillConfig) -> torch.optim.Optimizer:
    """The outer optimizer of ``config`` over all of ``memory``'s parameters:
    SGD(``outer_lr``, ``outer_momentum``) or Adam(``outer_lr``)."""
    if config.outer_optimizer == "sgd":
        return torch.optim.SGD(memory.parameters(), lr=config.outer_lr, momentum=config.outer_momentum)
    return torch.optim.Adam(memory.parameters(), lr=config.outer_lr)


def outer_update(memory, optimizer, loss, grads: dict, config: DistillConfig, iteration: int = 0) -> float:
    """One outer step (METHOD.md §3.1 step 6, §12.4): set ``grads`` (name ->
    tensor shaped like the parameter, as :func:`addrmem.hypergradient`
    returns) as the memory's gradients, add the coefficient regulariser's
    gradient (``config.coeff_reg``), clip the global norm to ``config.clip``,
    step ``optimizer`` and clear the gradients. Returns the norm before
    clipping. Raises FloatingPointError if ``loss`` (0-dim) or the norm is
    not finite; the memory is then left unchanged."""
    for name, p in memory.named_parameters():
        p.grad = grads[name]
    if config.coeff_reg != "none":
        a = memory.addresses.detach()
        reg = a.sign() if config.coeff_reg == "l1" else a / a.norm().clamp_min(1e-12)
        memory.addresses.grad.add_(reg, alpha=config.coeff_reg_alpha)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(memory.parameters(), config.clip))
    if not (math.isfinite(float(loss)) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(
            f"the outer loss ({float(loss)}) or its gradient norm ({grad_norm}) is not finite at "
            f"iteration {iteration}: the memory diverged; lower outer_lr or inner_lr and start again")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


_STREAMS = ("task", "network", "rows", "real", "augment")


class _Run:
    """The mutable state of one distillation, and its checkpointing."""

    def __init__(self, config, dataset, run_dir):
        self.config = config
        self.run_dir = run_dir
        self.memory = build_memory(config, dataset)
        self.optimizer = make_outer_optimizer(self.memory, config)
        self.generators = {name: _generator(config.seed, name) for name in _STREAMS}
        self.iteration = 0
        self.best = None  # {"iteration", "val": Accuracy fields, "state": memory state}
        self.log = []
        self.seconds = 0.0

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def save_checkpoint(self):
        """Write checkpoint.pt atomically (temporary file, then os.replace)."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "iteration": self.iteration,
            "memory": _cpu_state(self.memory.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "generators": {name: g.get_state() for name, g in self.generators.items()},
            "best": None if self.best is None else {**self.best, "state": _cpu_state(self.best["state"])},
            "log_records": len(self.log),
            "seconds": self.seconds,
        }
        tmp = self.path("checkpoint.pt.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path("checkpoint.pt"))

    def load_checkpoint(self):
        """Restore the state of checkpoint.pt; truncate log.jsonl to it.
        Raises ValueError for a checkpoint that is unreadable or not this run's."""
        path = self.path("checkpoint.pt")
        fix = f"delete {self.run_dir!r} and start the run again"
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("not an addrmem checkpoint")
        except Exception as exc:
            raise ValueError(f"{path!r} is unreadable or corrupt ({_one_line(exc)}): {fix}") from exc
        if blob["config"] != self.config.to_dict():
            raise ValueError(f"{path!r} was written with another config than {self.path('config.yaml')!r}: {fix}")
        try:
            self.memory.load_state_dict(blob["memory"])
            self.optimizer.load_state_dict(blob["optimizer"])
            for name, g in self.generators.items():
                g.set_state(blob["generators"][name])
            self.iteration = int(blob["iteration"])
            self.seconds = float(blob["seconds"])
            self.best = blob["best"]
            self.log = _read_log(self.path("log.jsonl"), blob["log_records"])
            if len(self.log) != blob["log_records"]:
                raise ValueError(f"log.jsonl has fewer than the {blob['log_records']} records it had")
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"{path!r} does not match this run ({_one_line(exc)}): {fix}") from exc
        _atomic_write_text(self.path("log.jsonl"), "".join(json.dumps(r) + "\n" for r in self.log))


def _cpu_state(state):
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _read_log(path, records=None):
    """The first ``records`` (default: all) records of a log.jsonl; lines after
    them (perhaps half-written) are not read."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return [json.loads(line) for line in lines[:records]]


def distill(config: DistillConfig, dataset: Dataset, run_dir: str | None = None, resume: bool = False,
            progress: bool = True) -> DistillResult:
    """Distill ``dataset`` into a memory (METHOD.md §3.1).

    Outer iteration ``it`` (0 .. iterations-1): evaluate on the validation
    split if ``it % eval_every == 0``; draw the class subset S (all classes
    unless ``task_classes`` is smaller), one Siamese augmentation (if on), a
    fresh network's seed, T = ``steps`` row indices (``n_per_c`` distinct rows
    per class of S, capped at the memory's rows per class) and
    ``real_per_class`` real training images per class of S (without
    replacement); take the exact hypergradient, add the coefficient
    regulariser's gradient (if on), clip the global norm to ``clip`` and step
    the outer optimizer. After the last iteration the memory is evaluated once
    more; the best evaluated memory is returned.

    With ``run_dir`` (an existing folder holding config.yaml) it logs to
    log.jsonl, checkpoints every ``checkpoint_every`` iterations and at the
    end, and writes memory.pt and the PNG grids. ``resume=True`` continues
    from checkpoint.pt (from the start if there is none yet) with exactly the
    result of an uninterrupted run.

    Raises ValueError (budget that cannot fit, bad or foreign checkpoint),
    FileExistsError (a checkpoint exists but ``resume`` is False) and
    FloatingPointError (the outer loss or gradient became NaN/inf).
    """
    config.validate()
    run = _Run(config, dataset, run_dir)
    if run_dir is not None:
        checkpoint = run.path("checkpoint.pt")
        if resume and os.path.exists(checkpoint):
            run.load_checkpoint()
        elif not resume and os.path.exists(checkpoint):
            raise FileExistsError(f"{run_dir!r} already holds a run: resume it or choose another folder")
        else:
            _atomic_write_text(run.path("log.jsonl"), "")
    device, dtype = _device_dtype(config)
    memory, gens = run.memory, run.generators
    train_images = dataset.train[0].to(device, dtype)
    train_labels = dataset.train[1].to(device)
    members = [(dataset.train[1] == c).nonzero().squeeze(1) for c in range(dataset.num_classes)]
    n_per_c = min(config.n_per_c, memory.per_class)
    n_task = config.task_classes if 0 < config.task_classes < dataset.num_classes else dataset.num_classes
    val_seed = derive_seed(config.seed, "val")
    log_file = open(run.path("log.jsonl"), "a") if run_dir is not None else None

    def validate_memory():
        images, labels = memory.recall()
        acc = evaluate(images, labels, dataset, config, config.val_nets, split="val", seed=val_seed,
                       progress=progress, desc=f"val @ {run.iteration}")
        if run.best is None or acc.mean >= run.best["val"]["mean"]:
            run.best = {"iteration": run.iteration, "val": dataclasses.asdict(acc),
                        "state": _cpu_state(memory.state_dict())}
        return acc

    def write(record):
        run.log.append(record)
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

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
            if n_task < dataset.num_classes:
                classes = torch.randperm(dataset.num_classes, generator=gens["task"])[:n_task].sort().values
            else:
                classes = torch.arange(dataset.num_classes)
            augment = SiameseAugment.draw(gens["augment"]) if config.augment == "flip_rotate" else None
            net_seed = int(torch.randint(0, 2**62, (1,), generator=gens["network"]))
            net = make_network(config.network, dataset.image_shape, dataset.num_classes,
                               seed=net_seed).to(device, dtype)
            batches = [memory.sample_index(classes, n_per_c, gens["rows"]) for _ in range(config.steps)]
            real = torch.cat([members[c][torch.randperm(len(members[c]), generator=gens["real"])
                                         [:config.real_per_class]] for c in classes.tolist()]).to(device)
            loss, grads = hypergradient(memory, net, batches, train_images[real], train_labels[real],
                                        lr=config.inner_lr, momentum=config.inner_momentum, augment=augment)
            grad_norm = outer_update(memory, run.optimizer, loss, grads, config, it)
            run.seconds += time.perf_counter() - start
            record.update(loss=float(loss), grad_norm=grad_norm, seconds=round(run.seconds, 3))
            write(record)
            run.iteration = it + 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}", val=f"{last_val.mean:.1f}%" if last_val else "-")
            if run_dir is not None and run.iteration % config.checkpoint_every == 0:
                run.save_checkpoint()
        if not run.log or "loss" in run.log[-1]:  # the final memory is not evaluated yet
            start = time.perf_counter()
            last_val = validate_memory()
            run.seconds += time.perf_counter() - start
            write({"iteration": run.iteration, "val_mean": last_val.mean, "val_std": last_val.std,
                   "seconds": round(run.seconds, 3)})
            if run_dir is not None:
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
        tmp = run.path("memory.pt.tmp")
        best.save(tmp, **best.extra)
        os.replace(tmp, run.path("memory.pt"))
        save_grids(best, run_dir)
    return result


# --- artefacts -----------------------------------------------------------------------------


def save_grids(memory, folder: str, max_per_class: int = 16) -> list:
    """Write PNG grids of a memory saved with its dataset's ``preprocessing``
    in ``memory.extra`` (as :func:`distill` does): ``recall.png`` (one row per
    class, its first ``max_per_class`` images, with the normalisation and
    any ZCA whitening undone by :func:`addrmem.data.to_display`) and, for
    an addressable memory, ``bases.png`` (each base scaled to [0, 1]). Tiles
    are enlarged (nearest) to at least 32 px. Returns the paths written."""
    from torchvision.utils import save_image

    images, _ = memory.recall()
    per_class = min(memory.per_class, max_per_class)
    images = images.float().cpu().view(memory.num_classes, memory.per_class, *images.shape[1:])
    images = to_display(images[:, :per_class].flatten(0, 1), memory.extra["preprocessing"])
    paths = [os.path.join(folder, "recall.png")]
    save_image(_enlarge(images), paths[0], nrow=per_class, padding=1, pad_value=1.0)
    if isinstance(memory, AddressableMemory):
        bases = memory.bases.detach().float().cpu()
        lo = bases.amin(dim=(1, 2, 3), keepdim=True)
        hi = bases.amax(dim=(1, 2, 3), keepdim=True)
        bases = (bases - lo) / (hi - lo).clamp_min(1e-12)
        paths.append(os.path.join(folder, "bases.png"))
        save_image(_enlarge(bases), paths[1], nrow=min(len(bases), 16), padding=1, pad_value=1.0)
    return paths


def _enlarge(images):
    factor = max(1, math.ceil(32 / min(images.shape[-2:])))
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def _atomic_write_text(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _one_line(exc) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# --- the experiment ------------------------------------------------------------------------


def eval_networks(config: DistillConfig) -> list:
    """The architectures the test split is measured with: ``config.network``,
    then each other one of ``config.eval_archs``, in order, once each."""
    return list(dict.fromkeys([config.network, *config.eval_archs]))


def run_experiment(config: DistillConfig, dataset: Dataset, run_dir: str, resume: bool = False,
                   progress: bool = True) -> dict:
    """Distill ``config``'s memory into ``run_dir`` and compare, at the same
    storage budget and on the test split (each measured once, by
    ``eval_nets`` networks that are the same for every method):

    * ``addressable`` (or ``image``): the memory :func:`distill` returns;
    * ``image``: for an addressable config, the ImageMemory baseline distilled
      the same way (``run_dir/baseline-image``);
    * ``random_real``: ``ipc`` random real training images per class;
    * ``full_data``: the whole training split (``full_data_epochs`` epochs;
      left out if 0).

    Each is tested with every architecture of :func:`eval_networks`.
    ``run_dir`` must be new or empty (it is created), unless ``resume``.
    Everything that can fail on bad input (config, budget, networks, a
    dataset loaded with other preprocessing than ``config.zca``) fails before
    the folder is written. Writes ``results.json`` (atomically) and returns
    its dict: ``methods`` maps each name to {"test": Accuracy fields of
    ``config.network``, "archs": {arch: Accuracy fields}, "num_floats",
    "images", and for memories "iteration" and "val"}, a function of the
    config alone; ``seconds`` maps each name to {"distill", "test"} seconds.
    """
    config.validate()
    if (config.zca > 0) != (dataset.zca is not None):
        raise ValueError(f"the config asks for zca {config.zca} but the dataset was loaded "
                         f"{'with' if dataset.zca is not None else 'without'} ZCA: load it with zca=config.zca")
    configs = {config.memory: config}
    if config.memory == "addressable":
        configs["image"] = dataclasses.replace(config, memory="image")
    for cfg in configs.values():  # the budget and the networks must fit before anything is written
        build_memory(cfg, dataset)
    for arch in eval_networks(config):
        make_network(arch, dataset.image_shape, dataset.num_classes, seed=0)
    if resume:
        saved = DistillConfig.from_yaml(os.path.join(run_dir, "config.yaml"))
        if saved != config:
            raise ValueError(f"the config differs from {run_dir!r}/config.yaml: resume with the saved config")
    else:
        if os.path.isdir(run_dir) and os.listdir(run_dir):
            raise FileExistsError(f"{run_dir!r} is not empty: choose another output folder, or resume it")
        os.makedirs(run_dir, exist_ok=True)
        config.to_yaml(os.path.join(run_dir, "config.yaml"))
    test_seed = derive_seed(config.seed, "test")
    archs = eval_networks(config)

    def test(images, labels, name, epochs=config.eval_epochs):
        """{arch: Accuracy fields} and the seconds it took."""
        start = time.perf_counter()
        tested = dataclasses.replace(config, eval_epochs=epochs)
        accs = {arch: dataclasses.asdict(evaluate(images, labels, dataset, tested, config.eval_nets, split="test",
                                                  seed=test_seed, network=arch, progress=progress,
                                                  desc=f"test {name} ({arch})"))
                for arch in archs}
        return accs, time.perf_counter() - start

    methods, seconds = {}, {}
    for kind, cfg in configs.items():
        folder = run_dir if kind == config.memory else os.path.join(run_dir, BASELINE_DIR)
        os.makedirs(folder, exist_ok=True)
        if folder != run_dir and not os.path.exists(os.path.join(folder, "config.yaml")):
            cfg.to_yaml(os.path.join(folder, "config.yaml"))
        result = distill(cfg, dataset, folder, resume=resume, progress=progress)
        images, labels = result.memory.recall()
        accs, test_seconds = test(images, labels, kind)
        methods[kind] = {"test": accs[config.network], "archs": accs, "num_floats": result.memory.num_floats(),
                         "images": len(labels), "per_class": result.memory.per_class,
                         "iteration": result.iteration, "val": dataclasses.asdict(result.val)}
        seconds[kind] = {"distill": round(result.seconds, 1), "test": round(test_seconds, 1)}
    pick = torch.Generator().manual_seed(derive_seed(config.seed, "random_real"))
    train_images, train_labels = dataset.train
    subset = torch.cat([(train_labels == c).nonzero().squeeze(1)[
        torch.randperm(int((train_labels == c).sum()), generator=pick)[:config.ipc]]
        for c in range(dataset.num_classes)])
    references = {"random_real": (subset, config.eval_epochs)}
    if config.full_data_epochs:
        references["full_data"] = (torch.arange(len(train_labels)), config.full_data_epochs)
    for kind, (rows, epochs) in references.items():
        accs, test_seconds = test(train_images[rows], train_labels[rows], kind.replace("_", " "), epochs)
        methods[kind] = {"test": accs[config.network], "archs": accs,
                         "num_floats": rows.numel() * math.prod(dataset.image_shape), "images": rows.numel(),
                         "epochs": epochs}
        seconds[kind] = {"distill": 0.0, "test": round(test_seconds, 1)}
    distill_seconds = sum(s["distill"] for s in seconds.values())
    test_seconds = sum(s["test"] for s in seconds.values())
    results = {
        "dataset": dataset.name, "ipc": config.ipc, "seed": config.seed, "iterations": config.iterations,
        "network": config.network, "archs": archs, "zca": config.zca,
        "eval_nets": config.eval_nets, "eval_epochs": config.eval_epochs, "test_images": len(dataset.test[1]),
        "methods": methods, "seconds": seconds, "distill_seconds": round(distill_seconds, 1), "test_seconds": round(test_seconds, 1),
        "wall_seconds": round(distill_seconds + test_seconds, 1),
        "device": _device_name(config.device), "threads": torch.get_num_threads(),
    }
    _atomic_write_text(os.path.join(run_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    return results


def _device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
