"""The streams of tasks a continual learner meets (docs/continual.md, "Benchmarks")."""

from __future__ import annotations

import math

import torch

from ..data import load_dataset
from ..seeding import generator

__all__ = ["Stream", "make_stream"]


class Stream:
    """A sequence of tasks over one dataset, materialised on demand.

    ``images`` maps "train", "val" and "test" to the dataset's (images (N, C,
    H, W) float32, labels (N,) int64) ("val": the training images the dataset
    holds out); ``plans[t]`` holds task t's ``classes`` (the labels it uses),
    its ``train``, ``val`` and ``test`` row indices into those images and its
    ``transform``: ("rotate", degrees), ("permute", pixel permutation (H*W,))
    or None. ``mean`` and ``std`` (C,) are the per-channel statistics the
    pixel values in [0, 1] were normalised with.
    """

    def __init__(self, name: str, images: dict, plans: list, num_classes: int, image_shape: tuple,
                 mean: torch.Tensor, std: torch.Tensor):
        self.name = name
        self.images = images
        self.plans = plans
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return len(self.plans)

    def classes(self, t: int) -> list:
        """The labels task ``t`` uses (all classes for a domain-incremental task)."""
        return list(self.plans[t]["classes"])

    def train(self, t: int):
        """Task ``t``'s training images (N, C, H, W) and labels (N,)."""
        return self._split("train", t)

    def val(self, t: int):
        """Task ``t``'s held-out training images (N, C, H, W) and labels (N,),
        about a tenth as many as :meth:`train`'s: what settings are chosen by."""
        return self._split("val", t)

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

            background = (-self.mean / self.std).tolist()  # a black pixel, normalised
            return rotate(images, float(value), interpolation=InterpolationMode.BILINEAR, fill=background)
        return images.flatten(2)[:, :, value].view(images.shape)

    def to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, C, H, W) -> their pixel values, rounded to uint8."""
        shape = (1, -1, 1, 1)
        pixels = images * self.std.view(shape) + self.mean.view(shape)
        return (pixels * 255).round().clamp(0, 255).to(torch.uint8)

    def from_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_uint8` (up to its rounding): float32, normalised."""
        shape = (1, -1, 1, 1)
        return (pixels.float() / 255 - self.mean.view(shape)) / self.std.view(shape)


def make_stream(config, dataset=None, download: bool = False) -> Stream:
    """The stream of ``config.benchmark`` (a
    :class:`~addrmem.continual.ContinualConfig`; docs/continual.md,
    "Benchmarks"), from ``dataset`` (a :class:`~addrmem.data.Dataset`;
    default: loaded from ``config.data_root``, fetched there by torchvision
    if ``download``). Seeded by ``config.seed`` alone:

    * rotations: task t rotates by an angle uniform in [9t, 9t+9) degrees;
    * permutations, many: task t permutes the H*W pixels with its own random
      permutation (the first task too);
    * split-*: task t holds classes 2t and 2t+1 (as many tasks as class pairs).

    Domain-incremental tasks take the first ``train_per_task`` images of a
    task's own random permutation of the training split, the first tenth as
    many of one fixed permutation of the dataset's held-out training images
    (val), and the first ``test_per_task`` of one fixed permutation of the
    test split (all if 0). Split tasks take their classes' images of each
    split (the first of a random permutation if capped; val then a tenth of
    the cap). Raises ValueError (a split benchmark with more tasks than class
    pairs) or FileNotFoundError (missing dataset files).
    """
    spec = config.spec()
    if dataset is None:
        dataset = load_dataset(spec["dataset"], config.data_root, download=download)
    images = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    h, w = dataset.image_shape[1:]
    sizes = {split: len(labels) for split, (_, labels) in images.items()}
    fixed = {split: torch.randperm(sizes[split], generator=generator(config.seed, "stream", split))
             for split in ("val", "test")}
    cap = spec["train_per_task"]
    caps = {"train": cap, "val": math.ceil(cap / 10), "test": spec["test_per_task"]}
    plans = []
    for t in range(spec["tasks"]):
        draws = generator(config.seed, "stream", t)
        if spec["kind"] == "split":
            if 2 * t + 2 > dataset.num_classes:
                raise ValueError(f"{config.benchmark} has {dataset.num_classes // 2} tasks of two classes; "
                                 f"got tasks: {spec['tasks']}")
            classes = [2 * t, 2 * t + 1]
            rows = {split: _rows_of(images[split][1], classes, caps[split], draws) for split in images}
            transform = None
        else:
            classes = list(range(dataset.num_classes))
            rows = {"train": torch.randperm(sizes["train"], generator=draws)[:cap or sizes["train"]].sort().values}
            rows.update({split: fixed[split][:caps[split] or sizes[split]].sort().values for split in fixed})
            if spec["kind"] == "rotations":
                transform = ("rotate", 9.0 * t + 9.0 * float(torch.rand((), generator=draws, dtype=torch.float64)))
            else:
                transform = ("permute", torch.randperm(h * w, generator=draws))
        plans.append(dict(classes=classes, **rows, transform=transform))
    return Stream(config.benchmark, images, plans, dataset.num_classes, dataset.image_shape, dataset.mean,
                  dataset.std)


def _rows_of(labels: torch.Tensor, classes: list, cap: int, draws: torch.Generator) -> torch.Tensor:
    """The rows of ``labels`` in ``classes`` (sorted); the first ``cap`` of a random permutation if cap > 0."""
    rows = torch.isin(labels, torch.tensor(classes)).nonzero().squeeze(1)
    if cap:
        rows = rows[torch.randperm(len(rows), generator=draws)[:cap]].sort().values
    return rows
