"""The settings of a distillation run: :class:`DistillConfig`, the dataset
presets (:data:`PRESETS`), YAML files and the device it runs on
(:func:`resolve_device`). The run's random streams are
:mod:`addrmem.seeding`'s (re-exported here).

:class:`DistillConfig`'s defaults are the official README example
(docs/method.md, "Reference settings"); :func:`default_config` adds the
tuned settings of a dataset (:data:`PRESETS`). Configs round-trip through YAML (:meth:`DistillConfig.to_yaml`,
:meth:`DistillConfig.from_yaml`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass

import torch
import yaml

from .files import atomic_write_text
from .networks import NETWORK_OPTIONS, NETWORKS, network_spec, parse_network
from .seeding import derive_seed, generator  # noqa: F401  (re-exported: addrmem.config.derive_seed keeps working)

__all__ = ["DistillConfig", "FieldTypeError", "PRESETS", "default_config", "derive_seed", "device_name", "generator",
           "resolve_device"]


@dataclass
class DistillConfig:
    """All settings of a distillation run. Defaults: the official README
    example (docs/method.md, "Reference settings"): CIFAR-10-style IPC 1,
    K=16 bases at half resolution, T=150, 32 rows per class per step, outer
    SGD 0.1 / 0.5, clip 2, evaluation by 10 nets x 300 epochs. Use
    :func:`default_config` for a dataset's tuned settings.

    Data: ``dataset`` (a name known to :func:`addrmem.data.load_dataset`),
    ``data_root`` (its folder; None for bundled data), ``zca`` (ZCA whitening
    strength, docs/method.md "Preprocessing": 0 = off; the official code
    uses 0.1 for CIFAR and 100 for SVHN).
    Memory: ``memory`` ("addressable" or "image"), ``init`` (where it starts:
    "xavier", random as the official code, or "real", from real training
    images; see :meth:`addrmem.memory.AddressableMemory.init_from_real`),
    ``ipc`` (storage budget in
    raw images per class, docs/method.md "The storage budget"), ``n_bases``
    (K), ``downsample`` (ds: bases stored at 1/ds resolution; ignored by
    "image").
    Inner loop: ``network`` (a name known to :func:`addrmem.networks.make_network`)
    and its size: ``net_width`` (the ConvNet's channels, the MLP's hidden
    units), ``net_depth`` (the ConvNet's blocks, the MLP's hidden layers; 0 =
    the network's default: for the ConvNet 3 on 28-32 px inputs, for the MLP
    2) and ``net_norm`` (the ConvNet's "instance" norm or "none"); the
    distillation, the validation and the test all use that network
    (:meth:`network_spec`), and the other architectures tested are
    ``eval_archs`` (specs such as "mlp" or "convnet:width=64:depth=2").
    ``steps`` (T), ``inner_lr``, ``inner_momentum``, ``n_per_c`` (rows per
    class per step; capped at the rows the memory has), ``task_classes``
    (classes per outer iteration; 0 = all), ``real_per_class`` (real images
    per class in the outer loss), ``augment`` ("none" or "flip_rotate",
    docs/method.md "Augmentation"), ``snapshot_every`` (k: the hypergradient
    keeps every k-th inner step's weights and recomputes the others, for
    long unrolls that do not fit in memory; the same result, bit for bit).
    Outer loop: ``iterations``, ``meta_batch`` (M: each outer iteration
    averages the hypergradients of M independent inner trajectories, shared
    out over the processes of a torch.distributed run; docs/scaling.md),
    ``outer_optimizer`` ("sgd" or "adam"),
    ``outer_lr``, ``baseline_outer_lr`` (the outer learning rate of the
    ImageMemory baseline that ``addrmem distill`` distills beside an
    addressable memory; 0 = ``outer_lr``: free images and addressing
    coefficients can want different rates, and each should get the one it
    does best with on the validation split), ``outer_momentum`` (SGD only), ``clip`` (global grad-norm
    clip over all memory parameters), ``coeff_reg`` ("none", "l1" or "l2")
    and ``coeff_reg_alpha``: alpha * dR/dA is added to the addresses'
    gradient, R = ||A||_1 or ||A||_F over the whole address table
    (docs/method.md "The outer update"; "addressable" only).
    Evaluation: every ``eval_every`` iterations (and after the last) ``val_nets``
    networks measure the memory on the validation split; at the end
    ``eval_nets`` networks of each architecture in ``network`` +
    ``eval_archs`` (cross-architecture evaluation) measure each method on
    the test split. Each network trains ``eval_epochs`` epochs, or
    ``eval_steps`` steps if that is set (> 0: every training set then gets
    the same number of updates, which makes large recalled sets cheap to
    test on the CPU; a memory of ``eval_batch`` images or fewer gets exactly
    as many steps as epochs),
    (``full_data_epochs`` on the full training set; 0 skips that reference)
    of SGD (``eval_lr``, ``eval_momentum``) in shuffled batches of
    ``eval_batch``.
    Run: ``checkpoint_every`` (iterations), ``seed``, ``device`` ("auto":
    a CUDA GPU if torch sees one, else the CPU; or "cpu", "cuda",
    "cuda:N"; see :func:`resolve_device`), ``dtype`` ("float32" or
    "float64"), ``threads`` (CPU intra-op threads that the ``addrmem``
    command sets, since results can differ in the last bits with the thread
    count; 0 leaves torch's default). All floats must be finite.
    """

    dataset: str = "digits"
    data_root: str | None = None
    zca: float = 0.0
    memory: str = "addressable"
    init: str = "xavier"
    ipc: int = 1
    n_bases: int = 16
    downsample: int = 2
    network: str = "convnet"
    net_width: int = 128
    net_depth: int = 0
    net_norm: str = "instance"
    steps: int = 150
    inner_lr: float = 0.01
    inner_momentum: float = 0.9
    n_per_c: int = 32
    task_classes: int = 0
    real_per_class: int = 64
    augment: str = "none"
    snapshot_every: int = 1
    iterations: int = 1000
    meta_batch: int = 1
    outer_optimizer: str = "sgd"
    outer_lr: float = 0.1
    baseline_outer_lr: float = 0.0
    outer_momentum: float = 0.5
    clip: float = 2.0
    coeff_reg: str = "none"
    coeff_reg_alpha: float = 1e-4
    eval_every: int = 200
    val_nets: int = 10
    eval_nets: int = 10
    eval_epochs: int = 300
    eval_steps: int = 0
    eval_batch: int = 640
    eval_lr: float = 0.01
    eval_momentum: float = 0.9
    eval_archs: list[str] = dataclasses.field(default_factory=list)
    full_data_epochs: int = 300
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> "DistillConfig":
        """Check types, choices and ranges (floats must be finite; ``device``
        must name a device, whether or not this machine has it: see
        :func:`resolve_device`); raises TypeError or ValueError naming the
        field. Returns self."""
        check_field_types(self, "config")
        choices = {"memory": ("addressable", "image"), "init": ("xavier", "real"),
                   "net_norm": ("instance", "none"), "augment": ("none", "flip_rotate"),
                   "outer_optimizer": ("sgd", "adam"), "coeff_reg": ("none", "l1", "l2"),
                   "dtype": ("float32", "float64")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config field {name} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(self, name)!r}")
        for name in ("ipc", "n_bases", "net_width", "downsample", "steps", "snapshot_every", "n_per_c", "real_per_class",
                     "iterations", "meta_batch",
                     "eval_every", "val_nets", "eval_nets", "eval_epochs", "eval_batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"config field {name} must be >= 1; got {getattr(self, name)}")
        self.network_spec()
        for arch in self.eval_archs:
            try:
                parse_network(arch)
            except ValueError as exc:
                raise ValueError(f"config field eval_archs: {exc}") from None
        for name in ("net_depth", "eval_steps", "task_classes", "seed", "threads", "full_data_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"config field {name} must be >= 0; got {getattr(self, name)}")
        for name in ("inner_lr", "outer_lr", "clip", "eval_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"config field {name} must be > 0; got {getattr(self, name)}")
        for name in ("inner_momentum", "outer_momentum", "eval_momentum", "coeff_reg_alpha", "zca",
                     "baseline_outer_lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"config field {name} must be >= 0; got {getattr(self, name)}")
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"config field device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.memory == "image" and self.coeff_reg != "none":
            raise ValueError("coeff_reg acts on the addresses: it needs memory: addressable")
        return self

    def network_spec(self) -> str:
        """The spec (:func:`addrmem.networks.parse_network`) of ``network`` at
        this config's size: "convnet" at the defaults, e.g.
        "convnet:width=32:depth=2" otherwise. Raises ValueError naming the
        field for a network that does not exist or does not take a size
        field that was changed."""
        if self.network.lower() not in NETWORKS:
            raise ValueError(f"config field network: unknown network {self.network!r}; known: "
                             f"{', '.join(sorted(NETWORKS))}")
        accepts = NETWORK_OPTIONS.get(self.network.lower(), {})
        sizes = {"width": (self.net_width, 128), "depth": (self.net_depth, 0), "norm": (self.net_norm, "instance")}
        changed = {key: value for key, (value, default) in sizes.items() if value != default}
        for key in changed:
            if key not in accepts:
                raise ValueError(f"config field net_{key}: network {self.network} has no {key} setting "
                                 f"(only {', '.join(f'net_{k}' for k in accepts) or 'none'})")
        return network_spec(self.network.lower(), **changed)

    def device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """The torch device (:func:`resolve_device` of ``device``) and dtype this
        config runs in on this machine; raises ValueError for a missing device."""
        return resolve_device(self.device), getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        """Plain dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, base: "DistillConfig | None" = None) -> "DistillConfig":
        """``base`` (default: :func:`default_config` of ``values["dataset"]``,
        or of the default dataset) with the fields in ``values`` replaced.
        Raises ValueError for unknown fields."""
        check_known_fields(cls, values, "config")
        if base is None:
            base = default_config(values.get("dataset", cls.dataset))
        return dataclasses.replace(base, **values)

    def to_yaml(self, path) -> None:
        """Write the config to ``path`` as YAML (atomically)."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path, **overrides) -> "DistillConfig":
        """Read a config written by :meth:`to_yaml`, or any YAML mapping of
        some fields (the others come from :func:`default_config` of its
        dataset), with the fields in ``overrides`` replaced. Numbers such as
        ``1e-2`` are floats (YAML 1.2; PyYAML's YAML 1.1 wants ``1.0e-2``).
        Raises FileNotFoundError or ValueError (naming the file)."""
        return cls.from_dict({**read_yaml_mapping(path), **overrides})


PRESETS = {
    # `addrmem distill` with no arguments: about two minutes on two CPU cores.
    # An 8x8 base costs as much as a whole image (64 floats), and every
    # recalled image lies in the span of the K bases: MLPs trained on all the
    # training digits projected onto their top 7 directions reach 89 %, onto
    # 11 directions 95 %, so IPC 1 (640 floats: K=7 leaves 2 rows per class)
    # caps the addressable memory, and half-resolution (4x4) bases lose the
    # strokes. IPC 2 with K=11 full-resolution bases (5 rows per class, 1,254
    # of 1,280 floats) gave the largest margin over ImageMemory of the
    # settings measured (benchmarks/digits_search/results.md); 10 networks
    # per measurement keep the comparison's noise below it. The MLP, not the ConvNet:
    # on 8x8 inputs the ConvNet's third block normalises 2x2 maps, learns
    # slowly at lr 0.01 and costs ~40x more per inner step on the CPU. Adam,
    # not SGD 0.1: hypergradient norms here are ~0.01-0.1, so SGD barely moves
    # the memory in a few hundred iterations. One thread: these ops are too
    # small for a second one to pay for its synchronisation.
    "digits": dict(network="mlp", ipc=2, n_bases=11, downsample=1, steps=100, iterations=300,
                   outer_optimizer="adam", outer_lr=0.03, eval_every=50, val_nets=10, eval_nets=10,
                   eval_epochs=300, checkpoint_every=50, threads=1),
}
"""dataset name -> the fields :func:`default_config` changes for it."""


def default_config(dataset: str = "digits", **overrides) -> DistillConfig:
    """The config for ``dataset``: the official defaults, then the dataset's
    :data:`PRESETS`, then ``overrides`` (field=value)."""
    return DistillConfig(**{"dataset": dataset, **PRESETS.get(dataset, {}), **overrides})


_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_known_fields(cls, values, label: str) -> None:
    """Check that ``values`` is a mapping of fields of the dataclass ``cls``;
    raises ValueError naming ``label`` and the unknown fields."""
    if not isinstance(values, dict):
        raise ValueError(f"a {label} must be a mapping of field: value; got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {label} field(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(known))}")


class FieldTypeError(TypeError, ValueError):
    """A config field of the wrong type: a TypeError, and a ValueError too,
    since it is bad input (a config file's value) that the command reports
    in one line."""


def check_field_types(config, label: str) -> None:
    """Check that every field of the dataclass ``config`` has its annotated
    type ("int", "float", "str", "str | None", "list...", "dict"; an int is
    accepted, and stored, as a float; floats must be finite). Raises
    :class:`FieldTypeError` or ValueError naming ``label`` and the field."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None and field.type == "str | None":
            continue
        kind = {"int": int, "float": float, "str": str, "str | None": str, "list[str]": list, "list": list,
                "dict": dict}[field.type]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(config, field.name, value)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise FieldTypeError(f"{label} field {field.name} must be {field.type}; got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{label} field {field.name} must be a finite number; got {value}")


def read_yaml_mapping(path) -> dict:
    """The YAML mapping in the file ``path`` ({} if empty), numbers such as
    ``1e-2`` read as floats. Raises FileNotFoundError or ValueError naming
    the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {str(path)!r}")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.load(f, Loader=_YamlLoader)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not a text file ({exc.reason} at byte {exc.start}): a config "
                         f"is YAML text of 'field: value' lines") from exc
    except yaml.YAMLError as exc:
        lines = str(exc).strip().splitlines()
        raise ValueError(f"{str(path)!r} is not valid YAML: {lines[0]}") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{str(path)!r} must hold a YAML mapping of config fields")
    return values


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-2`` as a float as YAML 1.2 does."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


def resolve_device(name: str) -> torch.device:
    """The torch.device that ``name`` ("auto", "cpu", "cuda" or "cuda:N") runs
    on here: "auto" is cuda (the current GPU) when torch sees a GPU, else
    the CPU. Raises ValueError naming the fix for a device this machine does
    not have (cuda without a GPU, cuda:N beyond the GPUs) or an unknown name."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: torch sees no CUDA GPU on this machine"
                             f"{'' if torch.version.cuda else ' (this torch is built without CUDA)'}: "
                             f"use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} does not exist: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return device


def device_name(device: torch.device) -> str:
    """``device`` in words, as results.json records it: "cpu" or "cuda (GPU name)"."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
