"""Continual learning with distilled memories (docs/continual.md).

A learner meets a stream of tasks one after another and must keep what it
learnt. Every method below uses the same learner, the same stream, the same
seeds and the same storage budget in floats; they differ only in what they
keep of the tasks already seen:

* ``finetune``: nothing (the lower bound);
* ``replay``: a reservoir-sampled buffer of real training images;
* ``image``: each task distilled into an :class:`~addrmem.memory.ImageMemory`;
* ``addressable``: each task distilled into addressing rows over bases
  (:class:`~addrmem.memory.AddressableMemory`), the bases either per task or
  shared by all tasks (learnt on the first task, then frozen);
* ``joint``: every earlier task's whole training data (the upper bound; no
  budget).

Tasks are distilled with :class:`addrmem.distill.OuterLoop`.
:func:`run_continual` runs the protocol, measures the accuracy matrix R and
its metrics (:func:`metrics`), checkpoints after each task into a run folder
(:mod:`addrmem.runs`) and writes ``results.json`` and PNG plots.

Streams (:func:`make_stream`, :data:`BENCHMARKS`): ``rotations``,
``permutations`` and ``many`` (domain-incremental, MNIST), ``split-digits``,
``split-mnist`` and ``split-cifar10`` (class-incremental). All share one
10-way head and no task identity is given at test time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from . import parallel
from .config import (DistillConfig, check_field_types, check_known_fields, derive_seed, device_name, generator,
                     read_yaml_mapping, resolve_device)
from .data import load_dataset
from .distill import OuterLoop
from .evaluation import accuracy
from .files import atomic_write, atomic_write_text
from .memory import AddressableMemory, ImageMemory
from .networks import MLP, NETWORKS, make_network
from .runs import load_checkpoint, open_run_folder, report_state, save_checkpoint

__all__ = ["BENCHMARKS", "DISTILL_DEFAULTS", "METHODS", "ContinualConfig", "Stream", "make_stream", "metrics", "plot",
           "run_continual"]

METHODS = ("finetune", "replay", "image", "addressable", "joint")
"""The methods, in the order they are run and reported."""

BENCHMARKS = {
    # dataset, kind, tasks, training images per task (0: all of the task's), test images per task
    # (0: all), storage budget in images, learner network
    "rotations": dict(dataset="mnist", kind="rotations", tasks=20, train_per_task=1000, test_per_task=0,
                      budget_images=200, network="mlp"),
    "permutations": dict(dataset="mnist", kind="permutations", tasks=20, train_per_task=1000, test_per_task=0,
                         budget_images=200, network="mlp"),
    "many": dict(dataset="mnist", kind="permutations", tasks=100, train_per_task=200, test_per_task=1000,
                 budget_images=500, network="mlp"),
    "split-digits": dict(dataset="digits", kind="split", tasks=5, train_per_task=0, test_per_task=0,
                         budget_images=200, network="mlp"),
    "split-mnist": dict(dataset="mnist", kind="split", tasks=5, train_per_task=0, test_per_task=0,
                        budget_images=200, network="mlp"),
    "split-cifar10": dict(dataset="cifar10", kind="split", tasks=5, train_per_task=0, test_per_task=0,
                          budget_images=200, network="convnet"),
}
"""benchmark name -> its definition (docs/continual.md, "Benchmarks"); 0 for
``train_per_task``/``test_per_task`` means all of a task's images."""

DISTILL_DEFAULTS = dict(network="mlp", n_bases=12, downsample=1, steps=20, n_per_c=5, real_per_class=32,
                        iterations=10, outer_optimizer="adam", outer_lr=0.003, inner_lr=0.01, inner_momentum=0.9)
"""The :class:`~addrmem.config.DistillConfig` fields a task's distillation
uses unless ``ContinualConfig.distill`` overrides them (the other fields keep
DistillConfig's defaults; seed and device come from the continual config)."""


@dataclass
class ContinualConfig:
    """All settings of a continual-learning run (docs/continual.md, "Settings").

    Stream: ``benchmark`` (a key of :data:`BENCHMARKS`), ``data_root`` (the
    dataset's folder; None for split-digits), ``tasks``, ``train_per_task``,
    ``test_per_task`` and ``budget_images`` (storage budget in images'
    worth of floats): 0 takes the benchmark's value. ``methods``: a subset of
    :data:`METHODS`.
    Learner: ``network`` ("" = the benchmark's; "mlp" is Linear-ReLU layers of
    ``hidden`` units, two hidden layers), ``protocol`` ("replay": at task t,
    ``epochs`` epochs of SGD (``lr``) over task t's training images in
    shuffled batches of ``batch``, each joined by ``replay_batch`` images
    drawn uniformly from the memory of earlier tasks; "retrain": after each
    task, a fresh network trained ``epochs`` epochs on the memory alone,
    GDumb-style; ``finetune``, which keeps nothing, on task t alone).
    Addressable memory: ``bases`` ("task": K bases per task; "shared": one set
    learnt on the first task, then frozen). ``init``: where a task's memory
    starts ("real": from the task's real images, see ``init_from_real`` of
    :mod:`addrmem.memory`;
    "xavier": docs/method.md, "The memory"). Distillation: ``distill``, a
    mapping of :class:`~addrmem.config.DistillConfig` fields over
    :data:`DISTILL_DEFAULTS` (``n_bases``, ``downsample``, ``steps``,
    ``iterations``, ...).
    Run: ``seed`` (stream, networks, batches, distillation: one seed, one
    result), ``device``, ``threads`` (CPU intra-op threads the command sets;
    0 leaves torch's default).
    """

    benchmark: str = "split-digits"
    data_root: str | None = None
    tasks: int = 0
    train_per_task: int = 0
    test_per_task: int = 0
    budget_images: int = 0
    methods: list = dataclasses.field(default_factory=lambda: list(METHODS))
    network: str = ""
    hidden: int = 100
    protocol: str = "retrain"
    epochs: int = 50
    batch: int = 10
    replay_batch: int = 10
    lr: float = 0.03
    bases: str = "task"
    init: str = "real"
    distill: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    threads: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self) -> "ContinualConfig":
        """Check types, choices and ranges; raises TypeError or ValueError
        naming the field. Returns self."""
        check_field_types(self, "continual config")
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {self.benchmark!r}; known: {', '.join(BENCHMARKS)}")
        for name, allowed in (("protocol", ("replay", "retrain")), ("bases", ("task", "shared")),
                              ("init", ("real", "xavier"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"continual config field {name} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(self, name)!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"continual config field methods must list distinct methods of "
                             f"{', '.join(METHODS)}; got {self.methods!r}")
        if self.network and self.network not in NETWORKS:
            raise ValueError(f"continual config field network: unknown network {self.network!r}; known: "
                             f"{', '.join(sorted(NETWORKS))}")
        for name in ("tasks", "train_per_task", "test_per_task", "budget_images", "seed", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"continual config field {name} must be >= 0; got {getattr(self, name)}")
        for name in ("hidden", "epochs", "batch", "replay_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"continual config field {name} must be >= 1; got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"continual config field lr must be a finite number > 0; got {self.lr}")
        self.distill_config()
        return self

    def spec(self) -> dict:
        """The benchmark's definition (:data:`BENCHMARKS`) with this config's
        non-zero ``tasks``, ``train_per_task``, ``test_per_task``,
        ``budget_images`` and ``network`` in place of its own."""
        spec = dict(BENCHMARKS[self.benchmark])
        for name in ("tasks", "train_per_task", "test_per_task", "budget_images", "network"):
            if getattr(self, name):
                spec[name] = getattr(self, name)
        return spec

    def distill_config(self) -> DistillConfig:
        """The :class:`~addrmem.config.DistillConfig` every task is distilled
        with: :data:`DISTILL_DEFAULTS`, then ``distill``, with this config's
        dataset, seed and device. Raises ValueError for an unknown field."""
        values = {**DISTILL_DEFAULTS, **self.distill}
        for name in ("dataset", "seed", "device", "memory", "ipc"):
            if name in self.distill:
                raise ValueError(f"continual config field distill: {name} is set by the continual run; "
                                 f"remove it from distill")
        values.update(dataset=BENCHMARKS[self.benchmark]["dataset"], seed=self.seed, device=self.device)
        return DistillConfig.from_dict(values, base=DistillConfig())

    def to_dict(self) -> dict:
        """Plain dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ContinualConfig":
        """A config from a mapping of some fields (the others keep their
        defaults). Raises ValueError for unknown fields."""
        check_known_fields(cls, values, "continual config")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path, **overrides) -> "ContinualConfig":
        """A config from a YAML mapping of fields at ``path``, with ``overrides``
        replacing fields. Raises FileNotFoundError or ValueError naming the file."""
        return cls.from_dict({**read_yaml_mapping(path), **overrides})

    def to_yaml(self, path) -> None:
        """Write the config to ``path`` as YAML (atomically)."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---------------------------------------------------------------- streams


class Stream:
    """A sequence of tasks over one dataset, materialised on demand.

    ``images`` maps "train" and "test" to the dataset's (images (N, C, H, W)
    float32, labels (N,) int64); ``plans[t]`` holds task t's ``classes`` (the
    labels it uses), its ``train`` and ``test`` row indices into those images
    and its ``transform``: ("rotate", degrees), ("permute", pixel permutation
    (H*W,)) or None. ``background`` is the normalised value of a black pixel
    (C,), the fill of rotations.
    """

    def __init__(self, name: str, images: dict, plans: list, num_classes: int, image_shape: tuple,
                 background: torch.Tensor):
        self.name = name
        self.images = images
        self.plans = plans
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.background = background

    def __len__(self) -> int:
        return len(self.plans)

    def classes(self, t: int) -> list:
        """The labels task ``t`` uses (all classes for a domain-incremental task)."""
        return list(self.plans[t]["classes"])

    def train(self, t: int):
        """Task ``t``'s training images (N, C, H, W) and labels (N,)."""
        return self._split("train", t)

    def test(self, t: int):
        """Task ``t``'s test images (N, C, H, W) and labels (N,)."""
        return self._split("test", t)

    def _split(self, split: str, t: int):
        plan = self.plans[t]
        images, labels = self.images[split]
        rows = plan[split]
        return self.transform(images[rows], plan["transform"]), labels[rows]

    def transform(self, images: torch.Tensor, transform) -> torch.Tensor:
        """``images`` (N, C, H, W) with a task's ``transform`` applied."""
        if transform is None:
            return images
        kind, value = transform
        if kind == "rotate":
            from torchvision.transforms.v2.functional import InterpolationMode, rotate

            return rotate(images, float(value), interpolation=InterpolationMode.BILINEAR,
                          fill=self.background.tolist())
        return images.flatten(2)[:, :, value].view(images.shape)


def make_stream(config: ContinualConfig, dataset=None, download: bool = False) -> Stream:
    """The stream of ``config.benchmark`` (docs/continual.md, "Benchmarks"),
    from ``dataset`` (a :class:`~addrmem.data.Dataset`; default: loaded from
    ``config.data_root``, fetched there by torchvision if ``download``).
    Seeded by ``config.seed`` alone:

    * rotations: task t rotates by an angle uniform in [9t, 9t+9) degrees;
    * permutations, many: task t permutes the H*W pixels with its own random
      permutation (the first task too);
    * split-*: task t holds classes 2t and 2t+1 (as many tasks as class pairs).

    Domain-incremental tasks take the first ``train_per_task`` images of a
    task's own random permutation of the training split and the first
    ``test_per_task`` of one fixed permutation of the test split (all if 0);
    split tasks take their classes' images (the first of a random
    permutation if capped). Raises ValueError (a split benchmark with more
    tasks than class pairs) or FileNotFoundError (missing dataset files).
    """
    spec = config.spec()
    if dataset is None:
        dataset = load_dataset(spec["dataset"], config.data_root, download=download)
    images = {"train": dataset.train, "test": dataset.test}
    h, w = dataset.image_shape[1:]
    background = -dataset.mean / dataset.std
    n_train, n_test = len(dataset.train[1]), len(dataset.test[1])
    test_rows = torch.randperm(n_test, generator=generator(config.seed, "stream", "test"))
    plans = []
    for t in range(spec["tasks"]):
        draws = generator(config.seed, "stream", t)
        if spec["kind"] == "split":
            if 2 * t + 2 > dataset.num_classes:
                raise ValueError(f"{config.benchmark} has {dataset.num_classes // 2} tasks of two classes; "
                                 f"got tasks: {spec['tasks']}")
            classes = [2 * t, 2 * t + 1]
            train = _rows_of(dataset.train[1], classes, spec["train_per_task"], draws)
            test = _rows_of(dataset.test[1], classes, spec["test_per_task"], draws)
            transform = None
        else:
            classes = list(range(dataset.num_classes))
            train = torch.randperm(n_train, generator=draws)[:spec["train_per_task"] or n_train].sort().values
            test = test_rows[:spec["test_per_task"] or n_test].sort().values
            if spec["kind"] == "rotations":
                transform = ("rotate", 9.0 * t + 9.0 * float(torch.rand((), generator=draws, dtype=torch.float64)))
            else:
                transform = ("permute", torch.randperm(h * w, generator=draws))
        plans.append(dict(classes=classes, train=train, test=test, transform=transform))
    return Stream(config.benchmark, images, plans, dataset.num_classes, dataset.image_shape, background)


def _rows_of(labels: torch.Tensor, classes: list, cap: int, draws: torch.Generator) -> torch.Tensor:
    """The rows of ``labels`` in ``classes`` (sorted); the first ``cap`` of a random permutation if cap > 0."""
    rows = torch.isin(labels, torch.tensor(classes)).nonzero().squeeze(1)
    if cap:
        rows = rows[torch.randperm(len(rows), generator=draws)[:cap]].sort().values
    return rows


# ---------------------------------------------------------------- metrics


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


# ---------------------------------------------------------------- methods


def _budget_floats(config: ContinualConfig, stream: Stream) -> int:
    return config.spec()["budget_images"] * math.prod(stream.image_shape)


class _Method:
    """A method's learner and its memory of the tasks seen so far.

    ``recalled()`` is what the learner replays: (images (N, C, H, W), labels
    (N,)) or None; ``remember(t, images, labels)`` stores task t after it is
    learnt; ``num_floats()`` counts what is stored; ``state()`` and
    ``load(state)`` checkpoint it.
    """

    def __init__(self, name: str, config: ContinualConfig, stream: Stream):
        self.name = name
        self.config = config
        self.stream = stream
        self.budget = _budget_floats(config, stream)
        self.net = _learner(config, stream)
        self.progress = True  # progress bars while distilling

    def recalled(self):
        return None

    def remember(self, t, images, labels):
        pass

    def num_floats(self) -> int:
        return 0

    def state(self) -> dict:
        return {"net": {k: v.detach().clone() for k, v in self.net.state_dict().items()}}

    def load(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])


class _Replay(_Method):
    """Reservoir sampling over every training image seen, into a buffer of
    ``budget // (C*H*W)`` real images."""

    def __init__(self, *args):
        super().__init__(*args)
        self.capacity = self.budget // math.prod(self.stream.image_shape)
        self.images = torch.empty(0, *self.stream.image_shape)
        self.labels = torch.empty(0, dtype=torch.int64)
        self.seen = 0

    def recalled(self):
        return (self.images, self.labels) if len(self.labels) else None

    def remember(self, t, images, labels):
        order = torch.randperm(len(labels), generator=generator(self.config.seed, "reservoir", t))
        slots = torch.rand(len(labels), generator=generator(self.config.seed, "reservoir-slots", t),
                           dtype=torch.float64)
        for i, u in zip(order.tolist(), slots.tolist()):
            if len(self.labels) < self.capacity:
                self.images = torch.cat([self.images, images[i:i + 1]])
                self.labels = torch.cat([self.labels, labels[i:i + 1]])
            else:
                slot = int(u * (self.seen + 1))  # uniform in [0, seen]
                if slot < self.capacity:
                    self.images[slot], self.labels[slot] = images[i], labels[i]
            self.seen += 1

    def num_floats(self):
        return self.images.numel()

    def state(self):
        return {**super().state(), "images": self.images.clone(), "labels": self.labels.clone(), "seen": self.seen}

    def load(self, state):
        super().load(state)
        self.images, self.labels, self.seen = state["images"], state["labels"], int(state["seen"])


class _Joint(_Method):
    """Keeps every task's whole training data (no budget)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.kept = []

    def recalled(self):
        if not self.kept:
            return None
        return torch.cat([x for x, _ in self.kept]), torch.cat([y for _, y in self.kept])

    def remember(self, t, images, labels):
        self.kept.append((images.clone(), labels.clone()))

    def num_floats(self):
        return sum(x.numel() for x, _ in self.kept)

    def state(self):
        return {**super().state(), "kept": [list(pair) for pair in self.kept]}

    def load(self, state):
        super().load(state)
        self.kept = [tuple(pair) for pair in state["kept"]]


class _Distilled(_Method):
    """Each task distilled into its own memory (``image``: an ImageMemory;
    ``addressable``: an AddressableMemory, with bases per task or shared).

    The budget is divided equally among the tasks seen: after task t each
    of the t+1 memories gets budget / (t+1) floats (for shared bases, of the
    budget left after the bases) and as many rows per class as fit in it, at
    least one. A new task's memory is built at that size; the older ones
    keep the first rows of each class and drop the rest (their bases stay).
    When one row per class per task overflows the budget (ImageMemory on
    ``many``), the oldest tasks' memories are dropped until it fits.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.distill = self.config.distill_config()
        self.kind = "image" if self.name == "image" else "addressable"
        self.shared = self.kind == "addressable" and self.config.bases == "shared"
        self.memories = []  # (task, classes, memory) of the tasks kept
        self.shared_bases = None
        self.cache = None

    def base_floats(self) -> int:
        """Floats of one set of bases (0 for ImageMemory)."""
        if self.kind == "image":
            return 0
        c, h, w = self.stream.image_shape
        ds = self.distill.downsample
        return self.distill.n_bases * c * (h // ds) * (w // ds)

    def row_floats(self) -> int:
        """Floats of one row: K addressing coefficients, or one image."""
        return self.distill.n_bases if self.kind == "addressable" else math.prod(self.stream.image_shape)

    def per_class(self, num_classes: int, seen: int) -> int:
        """Rows per class of a task with ``num_classes`` classes when ``seen``
        tasks share the budget (see the class docstring)."""
        share = (self.budget - self.base_floats()) // seen if self.shared else \
            self.budget // seen - self.base_floats()
        return max(1, share // (num_classes * self.row_floats()))

    def check_budget(self) -> None:
        """Raise ValueError if one task's memory with one row per class exceeds the whole budget."""
        need = self.base_floats() + max(len(self.stream.classes(t)) for t in range(len(self.stream))) \
            * self.row_floats()
        if need > self.budget:
            what = (f"{self.distill.n_bases} bases of {self.base_floats() // self.distill.n_bases} floats and one "
                    f"row per class" if self.kind == "addressable" else "one image per class of a task")
            raise ValueError(f"the budget of {self.budget} floats ({self.config.spec()['budget_images']} images) "
                             f"is too small for the {self.name} memory: {what} take {need} floats; raise "
                             f"budget_images or lower distill n_bases")

    def build(self, t: int, num_classes: int, per_class: int):
        draws = generator(self.config.seed, self.name, "init", t)
        if self.kind == "image":
            memory = ImageMemory(num_classes, self.stream.image_shape, per_class, generator=draws)
        else:
            memory = AddressableMemory(num_classes, self.stream.image_shape, self.distill.n_bases, per_class,
                                       self.distill.downsample, generator=draws)
        return memory.to(*self.distill.device_dtype())

    @torch.no_grad()
    def keep_rows(self, t: int, memory, per_class: int):
        """``memory`` of task ``t`` with the first ``per_class`` rows of each class (all its bases)."""
        if per_class >= memory.per_class:
            return memory
        kept = self.build(t, memory.num_classes, per_class)
        for name, p in memory.named_parameters():
            if name == "bases":
                kept.bases.copy_(p)
            else:  # addresses or images: rows grouped by class
                rows = p.view(memory.num_classes, memory.per_class, *p.shape[1:])[:, :per_class]
                getattr(kept, name).copy_(rows.reshape(getattr(kept, name).shape))
        return kept

    def remember(self, t, images, labels):
        classes = self.stream.classes(t)
        memory = self.build(t, len(classes), self.per_class(len(classes), t + 1))
        local = torch.searchsorted(torch.tensor(classes), labels)
        learnt = memory
        if self.shared and self.shared_bases is not None:
            memory.bases.data.copy_(self.shared_bases)
            learnt = torch.nn.ParameterList([memory.addresses])  # the bases stay frozen
        if self.config.init == "real":
            draws = generator(self.config.seed, self.name, "init-rows", t)
            own_bases = {"bases": learnt is memory} if self.kind == "addressable" else {}
            memory.init_from_real(images.to(next(memory.parameters())), local, draws, **own_bases)
        loop = OuterLoop(memory, self.distill, images, local, len(classes), learnt=learnt,
                         seed=derive_seed(self.config.seed, self.name, "distill", t))
        for it in tqdm(range(self.distill.iterations), desc=f"distill {self.name} task {t}", leave=False,
                       disable=None if self.progress else True):
            loop.step(it)
        if self.shared and self.shared_bases is None:
            self.shared_bases = memory.bases.detach().clone()
        self.memories.append((t, classes, memory))
        self.memories = [(task, c, self.keep_rows(task, m, self.per_class(len(c), t + 1)))
                         for task, c, m in self.memories]
        while len(self.memories) > 1 and self.num_floats() > self.budget:
            self.memories.pop(0)
        self.cache = None

    def recalled(self):
        if not self.memories:
            return None
        if self.cache is None:
            parts = [(memory.recall(), classes) for _, classes, memory in self.memories]
            self.cache = (torch.cat([x.float().cpu() for (x, _), _ in parts]),
                          torch.cat([torch.tensor(classes)[y.cpu()] for (_, y), classes in parts]))
        return self.cache

    def num_floats(self):
        floats = sum(m.num_floats() for _, _, m in self.memories)
        if self.shared:  # the bases are stored once
            floats -= (len(self.memories) - 1) * self.base_floats() if self.memories else 0
        return floats

    def state(self):
        return {**super().state(),
                "memories": [{"task": t, "classes": c, "per_class": m.per_class,
                              "state": {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}}
                             for t, c, m in self.memories],
                "shared_bases": self.shared_bases}

    def load(self, state):
        super().load(state)
        self.shared_bases = state["shared_bases"]
        self.memories = []
        for entry in state["memories"]:
            memory = self.build(entry["task"], len(entry["classes"]), entry["per_class"])
            memory.load_state_dict(entry["state"])
            self.memories.append((entry["task"], entry["classes"], memory))
        self.cache = None


_METHOD_CLASSES = {"finetune": _Method, "replay": _Replay, "image": _Distilled, "addressable": _Distilled,
                   "joint": _Joint}


def _learner(config: ContinualConfig, stream: Stream) -> torch.nn.Module:
    """The learner, initialised the same for every method: an MLP of ``hidden``
    units or a network of the registry."""
    network = config.spec()["network"]
    seed = derive_seed(config.seed, "learner")
    if network == "mlp":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = MLP(stream.image_shape, stream.num_classes, hidden=config.hidden)
    else:
        net = make_network(network, stream.image_shape, stream.num_classes, seed=seed)
    return net.to(resolve_device(config.device))


def _train(method: _Method, config: ContinualConfig, t: int, images, labels, replay) -> None:
    """``config.epochs`` epochs of SGD on (images, labels) in shuffled batches
    of ``config.batch``, each joined by ``replay_batch`` images drawn
    uniformly from ``replay`` (images, labels) if given. The batch order is
    the same for every method; the replay draws are each method's own."""
    device = next(method.net.parameters()).device
    optimizer = torch.optim.SGD(method.net.parameters(), lr=config.lr)
    order_draws = generator(config.seed, "batches", t)
    replay_draws = generator(config.seed, method.name, "replay", t)
    method.net.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(labels), generator=order_draws)
        for start in range(0, len(labels), config.batch):
            rows = order[start:start + config.batch]
            x, y = images[rows], labels[rows]
            if replay is not None:
                pick = torch.randint(len(replay[1]), (config.replay_batch,), generator=replay_draws)
                x, y = torch.cat([x, replay[0][pick]]), torch.cat([y, replay[1][pick]])
            loss = F.cross_entropy(method.net(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def _learn(method: _Method, config: ContinualConfig, t: int, images, labels) -> None:
    """Task ``t`` under ``config.protocol`` (see :class:`ContinualConfig`)."""
    if config.protocol == "replay":
        _train(method, config, t, images, labels, method.recalled())
        method.remember(t, images, labels)
    else:
        method.remember(t, images, labels)
        method.net = _learner(config, method.stream)
        recalled = method.recalled()  # None for finetune, which keeps nothing: it trains on task t alone
        _train(method, config, t, *(recalled if recalled is not None else (images, labels)), None)


# ---------------------------------------------------------------- the run


def run_continual(config: ContinualConfig, run_dir: str | None = None, resume: bool = False,
                  stream: Stream | None = None, progress: bool = True) -> dict:
    """Run every method of ``config`` through the stream (docs/continual.md).

    For task t = 0 .. T-1: each method learns task t (:class:`ContinualConfig`
    ``protocol``) and stores it in its memory; then each is tested on tasks
    0 .. t, giving row t of its matrix R (R[t][j] is null for j > t). With
    ``run_dir`` (opened by :func:`addrmem.runs.open_run_folder`: ``resume``
    False starts it, True continues it from the last checkpoint with the
    result of an uninterrupted run, "auto" does whichever fits) it
    checkpoints after each task and
    writes ``config.yaml``, ``results.json``, ``accuracy.png`` and
    ``R-<method>.png``. ``stream`` defaults to :func:`make_stream` (config).

    Returns the results dict: ``methods`` maps each method to {"ra", "bti",
    "la", "curve", "R", "num_floats" (stored after the last task),
    "max_floats" (the most stored after any task), "seconds"}; plus
    ``budget_floats``, ``tasks`` and the run's settings.

    In a torch.distributed process group every rank runs the whole protocol
    and shares out each task's distillation (``distill`` ``meta_batch``,
    :func:`addrmem.distill.outer_step`); rank 0 alone writes.

    Raises ValueError (bad config, a budget too small for a memory, a
    checkpoint of another config), FileNotFoundError (missing dataset files),
    FileExistsError (``run_dir`` not empty and not ``resume``) and OSError.
    """
    config.validate()
    stream = stream or make_stream(config)
    methods = {name: _METHOD_CLASSES[name](name, config, stream) for name in config.methods}

    def check():
        """What can fail on bad input, on every rank, before the folder is written."""
        if any(m in ("image", "addressable") for m in config.methods):
            parallel.check_meta_batch(config.distill_config().meta_batch)
        for method in methods.values():
            if isinstance(method, _Distilled):
                method.check_budget()

    parallel.everywhere(check)  # a mistake every rank meets is reported once
    T = len(stream)
    state = {"task": 0, "R": {name: [[None] * T for _ in range(T)] for name in methods},
             "floats": {name: [] for name in methods}, "seconds": {name: 0.0 for name in methods}}
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
            method.load(blob["methods"][name])
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
                _learn(method, config, t, images, labels)
                state["seconds"][name] += time.perf_counter() - start
                state["floats"][name].append(method.num_floats())
            for j in range(t + 1):
                test_images, test_labels = stream.test(j)
                for name, method in methods.items():
                    device = next(method.net.parameters()).device
                    state["R"][name][t][j] = accuracy(method.net, test_images.to(device), test_labels.to(device))
            state["task"] = t + 1
            bar.update(1)
            if writer:
                save_checkpoint(checkpoint, {"config": config.to_dict(), "state": state,
                                             "methods": {n: m.state() for n, m in methods.items()}})
    finally:
        bar.close()
    results = {"benchmark": stream.name, "tasks": T, "protocol": config.protocol, "seed": config.seed,
               "budget_floats": _budget_floats(config, stream), "bases": config.bases,
               "device": device_name(resolve_device(config.device)), "threads": torch.get_num_threads(),
               "methods": {name: {**metrics(state["R"][name]), "R": state["R"][name],
                                  "num_floats": state["floats"][name][-1], "max_floats": max(state["floats"][name]),
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
