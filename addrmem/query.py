"""General queries: classifiers for new label spaces recalled from a saved memory.

A memory distilled for C classes answers any label vector y (C,): slot i's
image is x_i(y)^T = y^T A_i M (:meth:`addrmem.memory.AddressableMemory.recall`;
an :class:`~addrmem.memory.ImageMemory` mixes its images the same way). Given
a :class:`LabelMap` from the memory's classes to a new label space (each old
class assigned to one new class, or left out), :func:`run_query` builds
training sets for the new labels at the same storage, trains fresh networks on
each and tests them on the real test set relabelled through the map:

* ``one-hot``: ``recall()``'s images, relabelled;
* ``aggregated``: one query per new class, the normalised multi-hot vector of
  its old classes (entries 1/|group|), recalled with ``recall(queries)``;
* ``soft``: the one-hot images plus :data:`SOFT_QUERIES_PER_CLASS` random
  convex combinations per kept old class of two old-class queries
  (λ e_a + (1-λ) e_b, λ ~ U(0, 1)), each image labelled with its query pushed
  through the map (soft labels, trained with the soft-label cross-entropy);
* ``random real``: ``ipc`` random real training images per kept old class,
  relabelled (the same draw as ``addrmem distill``'s random real subset);
* ``full data``: the whole training split, relabelled (upper reference);
* ``distilled on new labels``: a memory of the run's kind distilled directly
  on the relabelled dataset with the run's settings at ``ipc`` images per new
  class, ipc = floor(run ipc · kept old classes / new classes), so that its
  storage does not exceed the run's.

The three memory sets are built from the run's memory and, when the run has
one, from its ImageMemory baseline. See docs/query.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import torch
import yaml
from tqdm.auto import tqdm

from .config import DistillConfig, derive_seed, generator
from .data import Dataset, to_display
from .distill import distill
from .evaluation import EvalSettings, evaluate
from .experiment import random_subset
from .files import atomic_write, atomic_write_text
from .runs import create_run_folder, enlarge

__all__ = ["BUILTIN_MAPS", "LabelMap", "SOFT_QUERIES_PER_CLASS", "format_query", "label_map", "load_map",
           "memory_training_sets", "relabel_dataset", "run_query", "save_query_grid", "soft_queries"]

_DIGITS = ("digits", "mnist")
BUILTIN_MAPS = {
    "parity": (_DIGITS, {"even": ["0", "2", "4", "6", "8"], "odd": ["1", "3", "5", "7", "9"]}),
    "ge5": (_DIGITS, {"<5": ["0", "1", "2", "3", "4"], ">=5": ["5", "6", "7", "8", "9"]}),
    "mod3": (_DIGITS, {"0 mod 3": ["0", "3", "6", "9"], "1 mod 3": ["1", "4", "7"], "2 mod 3": ["2", "5", "8"]}),
    "animal-vehicle": (("cifar10",), {"animal": ["bird", "cat", "deer", "dog", "frog", "horse"],
                                      "vehicle": ["airplane", "automobile", "ship", "truck"]}),
}
"""name -> (the datasets it applies to, {new class: [old class names]})."""

SOFT_QUERIES_PER_CLASS = 10
"""Soft queries drawn per kept old class (each recalls ``per_class`` images)."""


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """A map from a memory's ``num_old`` classes to new classes.

    ``classes`` names the new classes; ``groups[k]`` lists the old class ids
    (ints in [0, num_old)) of new class k. Groups are disjoint and non-empty;
    old classes in no group are left out. Build with :func:`label_map`.
    """

    name: str
    classes: list
    groups: list
    num_old: int

    @property
    def num_new(self) -> int:
        return len(self.classes)

    def assignment(self) -> torch.Tensor:
        """(num_old,) int64: the new class of each old class, -1 if left out."""
        assign = torch.full((self.num_old,), -1, dtype=torch.long)
        for k, group in enumerate(self.groups):
            assign[group] = k
        return assign

    def kept(self) -> list:
        """The old class ids that some new class holds, ascending."""
        return sorted(c for group in self.groups for c in group)

    def matrix(self) -> torch.Tensor:
        """(num_old, num_new) float32 0/1: row c is the one-hot new class of
        old class c (zero if c is left out)."""
        return torch.stack([torch.zeros(self.num_old).index_fill_(0, torch.tensor(g), 1.0)
                            for g in self.groups], dim=1)

    def aggregated_queries(self) -> torch.Tensor:
        """(num_new, num_old) float32: row k is the multi-hot vector of new
        class k's old classes, normalised to sum 1."""
        m = self.matrix().T
        return m / m.sum(dim=1, keepdim=True)

    def relabel(self, images: torch.Tensor, labels: torch.Tensor):
        """Images (N, C, H, W) with old labels (N,) int64 -> (images (M, C, H,
        W), new labels (M,) int64), dropping the left-out classes' images."""
        new = self.assignment().to(labels.device)[labels]
        keep = new >= 0
        return images[keep], new[keep]


def label_map(spec: dict, old_classes: list, name: str = "map") -> LabelMap:
    """Validate ``spec`` ({new class name: [old classes]}; an old class is its
    name in ``old_classes`` or its int index) against the memory's
    ``old_classes`` and return the :class:`LabelMap`. Raises ValueError (one
    line, naming ``name``) for a spec that is not such a mapping, fewer than
    two new classes, an old class the memory does not have, a new class with
    no old class, or an old class assigned twice."""
    if not isinstance(spec, dict) or not all(isinstance(v, list) for v in spec.values()):
        raise ValueError(f"{name}: a map is a mapping of each new class to a list of old classes, "
                         f"e.g. {{even: ['0', '2'], odd: ['1', '3']}}")
    if len(spec) < 2:
        raise ValueError(f"{name}: a classifier needs at least two new classes; got {len(spec)}")
    index = {str(c): i for i, c in enumerate(old_classes)}
    unknown = [repr(c) for group in spec.values() for c in group
               if not (isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(old_classes))
               and str(c) not in index]
    if unknown:
        raise ValueError(f"{name} names classes the memory does not have: {', '.join(unknown)} "
                         f"(its classes: {', '.join(map(str, old_classes))})")
    owner, groups = {}, []
    for new, group in spec.items():
        if not group:
            raise ValueError(f"{name}: new class {str(new)!r} has no old classes: give it at least one")
        ids = []
        for c in group:
            i = c if isinstance(c, int) and not isinstance(c, bool) else index[str(c)]
            if i in owner:
                raise ValueError(f"{name} assigns old class {str(old_classes[i])!r} twice (to {owner[i]!r} and "
                                 f"{str(new)!r}): assign each old class to one new class at most")
            owner[i] = str(new)
            ids.append(i)
        groups.append(sorted(ids))
    return LabelMap(name, [str(k) for k in spec], groups, len(old_classes))


def load_map(name_or_path: str, old_classes: list, dataset: str) -> LabelMap:
    """A built-in map of :data:`BUILTIN_MAPS` by name, or a map read from a
    YAML or JSON file ({new class: [old classes]}), validated against
    ``old_classes`` of a memory distilled on ``dataset`` (:func:`label_map`).
    Raises ValueError (one line) for an unknown name, a built-in map of
    another dataset, or a file that is not such a map."""
    if name_or_path in BUILTIN_MAPS:
        datasets, spec = BUILTIN_MAPS[name_or_path]
        if dataset not in datasets:
            raise ValueError(f"the built-in map {name_or_path!r} is for {', '.join(datasets)}; this memory was "
                             f"distilled on {dataset}: give a map file instead")
        return label_map(spec, old_classes, name_or_path)
    if not os.path.isfile(name_or_path):
        raise ValueError(f"unknown map {name_or_path!r}: give a built-in map ({', '.join(BUILTIN_MAPS)}) or a "
                         f"YAML or JSON file mapping each new class to a list of old classes")
    try:
        with open(name_or_path, encoding="utf-8") as f:
            spec = json.load(f) if name_or_path.endswith(".json") else yaml.safe_load(f)
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:  # JSONDecodeError is a ValueError
        lines = str(exc).strip().splitlines()
        raise ValueError(f"{name_or_path!r} is not a YAML or JSON map: {lines[0] if lines else exc}") from exc
    return label_map(spec, old_classes, repr(name_or_path))


def relabel_dataset(dataset: Dataset, label_map: LabelMap) -> Dataset:
    """``dataset`` with every split relabelled through ``label_map`` (the
    left-out classes' images dropped) and ``num_classes``/``classes`` those
    of the new label space; the preprocessing is unchanged."""
    splits = {name: label_map.relabel(*getattr(dataset, name)) for name in ("train", "val", "test")}
    return dataclasses.replace(dataset, **splits, num_classes=label_map.num_new, classes=list(label_map.classes))


def soft_queries(label_map: LabelMap, n: int, draws: torch.Generator) -> torch.Tensor:
    """``n`` random convex combinations of two distinct kept old-class
    queries: (n, num_old) float32 rows λ e_a + (1 - λ) e_b, λ ~ U(0, 1),
    drawn from ``draws``."""
    kept = torch.tensor(label_map.kept())
    pairs = torch.rand(n, len(kept), generator=draws).topk(2, dim=1).indices  # two distinct per query
    lam = torch.rand(n, generator=draws)
    queries = torch.zeros(n, label_map.num_old)
    rows = torch.arange(n)
    queries[rows, kept[pairs[:, 0]]] = lam
    queries[rows, kept[pairs[:, 1]]] += 1 - lam
    return queries


def memory_training_sets(memory, label_map: LabelMap, draws: torch.Generator) -> dict:
    """The training sets for the new labels that ``memory`` gives:
    {"one-hot", "aggregated", "soft"} -> (images (N, C, H, W), labels: (N,)
    int64, or (N, num_new) float class probabilities for "soft"). Soft
    queries come from ``draws``."""
    images, labels = memory.recall()
    one_hot = label_map.relabel(images, labels)
    to_new = label_map.matrix().to(memory.device, images.dtype)
    aggregated, agg_labels = memory.recall(label_map.aggregated_queries().to(memory.device, images.dtype))
    queries = soft_queries(label_map, SOFT_QUERIES_PER_CLASS * len(label_map.kept()), draws)
    soft, soft_labels = memory.recall(queries.to(memory.device, images.dtype))
    hard_as_soft = torch.nn.functional.one_hot(one_hot[1], label_map.num_new).to(images.dtype)
    return {"one-hot": one_hot,
            "aggregated": (aggregated, (agg_labels @ to_new).argmax(1)),
            "soft": (torch.cat([one_hot[0], soft]), torch.cat([hard_as_soft, soft_labels @ to_new]))}


def save_query_grid(memory, label_map: LabelMap, path: str, max_per_class: int = 16) -> None:
    """Write a PNG grid to ``path``: one row per new class, the first
    ``max_per_class`` images its aggregated query recalls from ``memory``
    (saved with its dataset's preprocessing, which is undone)."""
    from torchvision.utils import save_image

    queries = label_map.aggregated_queries().to(memory.device, next(memory.parameters()).dtype)
    images, _ = memory.recall(queries)
    per_class = min(memory.per_class, max_per_class)
    images = images.view(label_map.num_new, memory.per_class, *images.shape[1:])[:, :per_class].flatten(0, 1)
    tiles = enlarge(to_display(images, memory.extra["preprocessing"]))
    atomic_write(path, lambda f: save_image(tiles, f, format="png", nrow=per_class, padding=1, pad_value=1.0))


def run_query(config: DistillConfig, dataset: Dataset, memories: dict, label_map: LabelMap, out_dir: str,
              nets: int | None = None, progress: bool = True) -> dict:
    """Compare the training sets for ``label_map``'s new labels (module
    docstring) by the test accuracy of ``nets`` (default
    ``config.eval_nets``) fresh ``config.network_spec()`` networks each, on
    ``dataset``'s test split relabelled through the map.

    ``memories`` maps a kind ("addressable", "image") to a memory distilled
    with ``config`` on ``dataset`` (the first is drawn in ``query.png``).
    ``out_dir`` (created; must be new or empty) receives ``query.json``,
    ``query.png`` and ``distilled/``, the run folder of the memory distilled
    on the new labels. Networks are those of ``addrmem distill``'s test (the
    same seed). Returns the dict written to ``query.json``: ``methods`` maps
    each name to {"test": Accuracy fields, "images", "num_floats"}.
    """
    nets = config.eval_nets if nets is None else nets
    if nets < 1:
        raise ValueError(f"--nets must be >= 1; got {nets}")
    new_ipc = config.ipc * len(label_map.kept()) // label_map.num_new
    direct = dataclasses.replace(config, ipc=new_ipc, eval_archs=[])
    try:
        create_run_folder(out_dir)
    except FileExistsError:
        raise FileExistsError(f"{out_dir!r} is not empty: choose another --out folder") from None
    new_data = relabel_dataset(dataset, label_map)
    device, dtype = config.device_dtype()
    test_seed = derive_seed(config.seed, "test")
    image_floats = math.prod(dataset.image_shape)
    train_images, train_labels = dataset.train
    subset = random_subset(config, dataset)

    def sets():
        """(name, images, labels, floats, epochs) of every training set, built lazily."""
        for kind, memory in memories.items():
            built = memory_training_sets(memory, label_map, generator(config.seed, "query", kind))
            for name, (images, labels) in built.items():
                yield f"{kind} {name}", images, labels, memory.num_floats(), config.eval_epochs
        real = label_map.relabel(train_images[subset], train_labels[subset])
        yield "random real", *real, len(real[1]) * image_floats, config.eval_epochs
        if config.full_data_epochs:
            full = new_data.train
            yield "full data", *full, len(full[1]) * image_floats, config.full_data_epochs
        folder = os.path.join(out_dir, "distilled")
        os.makedirs(folder)
        direct.to_yaml(os.path.join(folder, "config.yaml"))
        result = distill(direct, new_data, folder, progress=progress)
        yield "distilled on new labels", *result.memory.recall(), result.memory.num_floats(), config.eval_epochs

    save_query_grid(next(iter(memories.values())), label_map, os.path.join(out_dir, "query.png"))
    methods = {}
    count = 3 * len(memories) + 2 + bool(config.full_data_epochs)
    for name, images, labels, floats, epochs in tqdm(sets(), total=count, desc="query", disable=None if progress
                                                     else True):
        labels = labels.to(dtype) if labels.is_floating_point() else labels
        acc = evaluate(images, labels, new_data, EvalSettings.of(config, epochs=epochs), nets, split="test",
                       seed=test_seed, progress=progress, desc=f"test {name}")
        methods[name] = {"test": dataclasses.asdict(acc), "images": len(labels), "num_floats": floats,
                         "epochs": epochs}
    results = {"dataset": dataset.name, "map": label_map.name,
               "classes": {new: [str(dataset.classes[c]) for c in group]
                           for new, group in zip(label_map.classes, label_map.groups)},
               "network": config.network_spec(), "nets": nets, "ipc": config.ipc, "distilled_ipc": new_ipc,
               "test_images": len(new_data.test[1]), "device": str(device), "methods": methods}
    atomic_write_text(os.path.join(out_dir, "query.json"), json.dumps(results, indent=2) + "\n")
    return results


def format_query(results: dict) -> str:
    """The table ``addrmem query`` prints."""
    classes = "; ".join(f"{new}: {' '.join(old)}" for new, old in results["classes"].items())
    width = max(len(name) for name in results["methods"])
    lines = [f"map {results['map']} on {results['dataset']} ({classes}); test accuracy (%) on "
             f"{results['test_images']} relabelled test images, {results['nets']} {results['network']} "
             f"networks, mean ± std:",
             f"  {'training set':<{width}}  {'accuracy':>13}  {'images':>6}  {'floats':>7}"]
    lines += [f"  {name:<{width}}  {m['test']['mean']:6.2f} ± {m['test']['std']:4.2f}  {m['images']:6d}  "
              f"{m['num_floats']:7d}" for name, m in results["methods"].items()]
    return "\n".join(lines)
