"""Real datasets: loading, the fixed splits, normalisation (METHOD.md §3.5, §12.3).

:func:`load_dataset` returns a :class:`Dataset` with three splits:

* ``train``: what distillation and the baselines learn from;
* ``val``: a seeded, per-class ``val_fraction`` (10 %) of the original training
  set, used to monitor distillation and to choose the memory (METHOD.md §12.3);
* ``test``: the official test set (or, for datasets without one, a fixed,
  seeded, stratified hold-out), reported once at the end.

Images are float32 (N, C, H, W), normalised per channel with the mean and std
of the ``train`` split; labels are int64 (N,).

Datasets are registered by name in :data:`DATASETS`. Each entry is a function
``loader(root) -> RawData`` giving images in [0, 1]; :func:`register_dataset`
adds one. Built in:

* ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10
  classes, no files needed); its test split is a fixed stratified third
  (seed 0).
* ``mnist``: the IDX files, read through ``torchvision.datasets.MNIST(root,
  download=False)`` from ``root/MNIST/raw/`` (uncompressed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = ["DATASETS", "Dataset", "RawData", "load_dataset", "register_dataset"]


@dataclass
class RawData:
    """What a registered loader returns, before splitting and normalising.

    ``train_images`` (N, C, H, W) and ``test_images`` (M, C, H, W) are float32
    in [0, 1]; ``train_labels`` (N,) and ``test_labels`` (M,) are int64 in
    [0, len(classes)); ``classes`` names the classes in label order.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list


@dataclass
class Dataset:
    """A dataset ready for distillation: three normalised splits and metadata.

    ``train``, ``val`` and ``test`` are (images (N, C, H, W) float32, labels
    (N,) int64); ``mean`` and ``std`` (C,) are the per-channel statistics the
    images were normalised with (those of ``train``).
    """

    name: str
    train: tuple
    val: tuple
    test: tuple
    num_classes: int
    image_shape: tuple
    mean: torch.Tensor
    std: torch.Tensor
    classes: list

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: (N, C, H, W) -> (N, C, H, W) in [0, 1]
        (clamped), on the CPU, ready for :func:`torchvision.utils.save_image`."""
        images = images.detach().float().cpu()
        return (images * self.std[:, None, None] + self.mean[:, None, None]).clamp(0, 1)


DATASETS: dict[str, Callable[[str | None], RawData]] = {}


def register_dataset(name: str, loader: Callable[[str | None], RawData]) -> None:
    """Make ``load_dataset(name)`` available. ``loader(root)`` returns a
    :class:`RawData`; it should raise FileNotFoundError saying where the files
    belong when they are missing (``root`` is None when the user gave none)."""
    DATASETS[name] = loader


def load_dataset(name: str, root: str | None = None, *, val_fraction: float = 0.1,
                 split_seed: int = 0) -> Dataset:
    """Load dataset ``name`` (a key of :data:`DATASETS`) from ``root``.

    The validation split is a per-class ``val_fraction`` of the training set
    (at least one image per class) drawn with ``split_seed``; the splits are
    the same on every call with the same arguments. Images come back float32
    (N, C, H, W) normalised per channel with the train split's mean and std.

    Raises ValueError for an unknown name or a bad ``val_fraction`` and
    FileNotFoundError (from the loader) when the data files are missing.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1); got {val_fraction}")
    raw = DATASETS[name](root)
    train_images, train_labels, val_images, val_labels = _split_validation(
        raw.train_images, raw.train_labels, len(raw.classes), val_fraction, split_seed)
    mean = train_images.mean(dim=(0, 2, 3))
    std = train_images.std(dim=(0, 2, 3))

    def norm(images):
        return ((images - mean[:, None, None]) / std[:, None, None]).contiguous()

    return Dataset(
        name=name,
        train=(norm(train_images), train_labels),
        val=(norm(val_images), val_labels),
        test=(norm(raw.test_images), raw.test_labels),
        num_classes=len(raw.classes),
        image_shape=tuple(raw.train_images.shape[1:]),
        mean=mean,
        std=std,
        classes=list(raw.classes),
    )


def _split_validation(images, labels, num_classes, fraction, seed):
    """Per class, a random ``fraction`` (at least one image) goes to val.
    Returns train images, train labels, val images, val labels; both splits
    keep the original order."""
    generator = torch.Generator().manual_seed(seed)
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        if len(members) < 2:
            raise ValueError(f"class {c} has {len(members)} training image(s): too few to hold out validation")
        n_val = max(1, round(fraction * len(members)))
        is_val[members[torch.randperm(len(members), generator=generator)[:n_val]]] = True
    return images[~is_val], labels[~is_val], images[is_val], labels[is_val]


def _digits(root: str | None) -> RawData:
    """scikit-learn's 8×8 digits (values 0-16), split 2/3 train, 1/3 test,
    stratified, seed 0. ``root`` is unused: the data ships with scikit-learn."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=1 / 3, random_state=0,
                                           stratify=bunch.target)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return RawData(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                   [str(c) for c in bunch.target_names])


def _mnist(root: str | None) -> RawData:
    """MNIST from ``root/MNIST/raw/`` (the four uncompressed IDX files)."""
    from torchvision.datasets import MNIST

    how = ("pass --data-root DIR with the four uncompressed IDX files (train-images-idx3-ubyte, "
           "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) in DIR/MNIST/raw/ "
           "(gunzip the .gz files there)")
    if root is None:
        raise FileNotFoundError(f"mnist needs its files: {how}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root!r} does not exist: {how}")
    try:
        splits = [MNIST(root, train=train, download=False) for train in (True, False)]
    except RuntimeError as exc:
        raise FileNotFoundError(f"MNIST not found under {os.path.join(root, 'MNIST', 'raw')!r}: {how}") from exc
    images = [s.data.float().div_(255.0)[:, None] for s in splits]
    return RawData(images[0], splits[0].targets.long(), images[1], splits[1].targets.long(),
                   [str(c) for c in range(10)])


register_dataset("digits", _digits)
register_dataset("mnist", _mnist)
