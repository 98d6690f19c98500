"""The settings of a continual-learning run: :class:`ContinualConfig`, the
streams it can run (:data:`BENCHMARKS`) and the distillation a task gets
unless told otherwise (:data:`DISTILL_DEFAULTS`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import yaml

from ..config import DistillConfig, check_field_types, check_known_fields, read_yaml_mapping
from ..files import atomic_write_text
from ..networks import parse_network
from .methods import MEMORY_DTYPES, METHODS

__all__ = ["BENCHMARKS", "DISTILL_DEFAULTS", "PROTOCOLS", "ContinualConfig"]

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

PROTOCOLS = ("replay", "retrain", "online")
"""How the learner learns a task (docs/continual.md, "The learner's protocols")."""

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
    ``test_per_task`` and ``budget_images`` (0 takes the benchmark's value).
    Storage: every method stores at most ``budget_bytes`` bytes (0: the bytes
    of ``budget_images`` float32 images); the distilled and compressed
    memories store their values in ``memory_dtype`` (float32, float16 or
    bfloat16). ``methods``: names of
    :data:`~addrmem.continual.methods.METHODS`.
    Learner: ``network`` ("" = the benchmark's; "mlp" is Linear-ReLU layers of
    ``hidden`` units, two hidden layers; any other network spec of
    :func:`addrmem.networks.parse_network`, e.g. "convnet:width=32") and ``protocol``, one of
    :data:`PROTOCOLS`: "replay" (at task t, ``epochs`` epochs of SGD (``lr``)
    over task t's images in shuffled batches of ``batch``, each batch taking
    ``glances`` steps, each joined by ``replay_batch`` images drawn from the
    memory of earlier tasks), "online" (La-MAML's: as replay but one pass
    (``epochs`` must be 1), and a memory that can (replay) is filled batch by
    batch while the task streams, so its draws include the task's earlier
    batches) or "retrain" (after each task, a fresh network trained
    ``epochs`` epochs on the memory alone, GDumb-style; ``finetune``, which
    keeps nothing, on task t alone).
    Addressable memory: ``bases`` ("task": K bases per task; "shared": one set
    learnt on the first task, then frozen). ``init``: where a task's memory
    starts ("real": from the task's real images, ``init_from_real`` of
    :mod:`addrmem.memory`, which ``compressed`` needs; "xavier":
    docs/method.md, "The memory"). ``distill``: a mapping of
    :class:`~addrmem.config.DistillConfig` fields over
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
    budget_bytes: int = 0
    memory_dtype: str = "float32"
    methods: list = dataclasses.field(default_factory=lambda: list(METHODS))
    network: str = ""
    hidden: int = 100
    protocol: str = "retrain"
    epochs: int = 50
    batch: int = 10
    replay_batch: int = 10
    glances: int = 1
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
        for name, allowed in (("protocol", PROTOCOLS), ("bases", ("task", "shared")), ("init", ("real", "xavier")),
                              ("memory_dtype", tuple(MEMORY_DTYPES))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"continual config field {name} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(self, name)!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"continual config field methods must list distinct methods of "
                             f"{', '.join(METHODS)}; got {self.methods!r}")
        if "compressed" in self.methods and self.init != "real":
            raise ValueError("continual config: method compressed is the memory's start from real images; "
                             "it needs init: real (or remove compressed from methods)")
        if self.network:
            try:
                parse_network(self.network)
            except ValueError as exc:
                raise ValueError(f"continual config field network: {exc}") from None
        for name in ("tasks", "train_per_task", "test_per_task", "budget_images", "budget_bytes", "seed",
                     "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"continual config field {name} must be >= 0; got {getattr(self, name)}")
        for name in ("hidden", "epochs", "batch", "replay_batch", "glances"):
            if getattr(self, name) < 1:
                raise ValueError(f"continual config field {name} must be >= 1; got {getattr(self, name)}")
        if self.protocol == "online" and self.epochs != 1:
            raise ValueError(f"continual config: the online protocol is a single pass; set epochs: 1 "
                             f"(got {self.epochs})")
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

    def budget(self, image_shape) -> int:
        """The storage budget in bytes for images of ``image_shape`` (C, H, W):
        ``budget_bytes``, or 4 bytes per float of ``budget_images`` images."""
        return self.budget_bytes or 4 * self.spec()["budget_images"] * math.prod(image_shape)

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
