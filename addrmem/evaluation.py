"""Evaluation: train fresh networks on given images and measure them
(docs/method.md, "Evaluation protocol").

:func:`evaluate` is what monitors a distillation on the validation split and
what tests every method on the test split; :class:`EvalSettings` says how it
trains, :class:`Accuracy` is its result.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import parallel
from .augment import augment_per_image
from .config import DistillConfig, derive_seed, generator
from .data import Dataset
from .networks import make_network

__all__ = ["Accuracy", "EvalSettings", "evaluate"]


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


@dataclass(frozen=True)
class EvalSettings:
    """How :func:`evaluate` trains each network: ``network`` (a spec such as
    "convnet" or "mlp:hidden=64"), ``epochs`` over the training images, or
    exactly ``steps`` steps if ``steps`` > 0 (the same number of updates
    whatever the number of images); SGD with ``lr`` and ``momentum`` (no
    weight decay) in shuffled batches of ``batch`` images; per-image
    flip/rotate augmentation at every step if ``augment``; on ``device``
    in ``dtype``. :meth:`of` takes them from a DistillConfig."""

    network: str
    epochs: int
    steps: int
    batch: int
    lr: float
    momentum: float
    augment: bool
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, config: DistillConfig, **changes) -> "EvalSettings":
        """``config``'s settings (``network_spec()``, ``eval_epochs``,
        ``eval_steps``, ``eval_batch``, ``eval_lr``, ``eval_momentum``,
        ``augment == "flip_rotate"``, ``device_dtype()``), with ``changes``
        (fields of this class) in their place. Raises ValueError for a
        device this machine does not have."""
        device, dtype = config.device_dtype()
        settings = cls(network=config.network_spec(), epochs=config.eval_epochs, steps=config.eval_steps,
                       batch=config.eval_batch, lr=config.eval_lr, momentum=config.eval_momentum,
                       augment=config.augment == "flip_rotate", device=device, dtype=dtype)
        return dataclasses.replace(settings, **changes)


@torch.no_grad()
def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1024) -> float:
    """Top-1 accuracy (%) of ``net`` on images (N, C, H, W), labels (N,)."""
    net.eval()
    correct = 0
    for start in range(0, len(labels), batch):
        logits = net(images[start:start + batch])
        correct += int((logits.argmax(1) == labels[start:start + batch]).sum())
    return 100.0 * correct / len(labels)


def evaluate(images: torch.Tensor, labels: torch.Tensor, dataset: Dataset, settings: EvalSettings,
             n_nets: int, *, split: str = "val", seed: int = 0, progress: bool = True,
             desc: str = "evaluate") -> Accuracy:
    """Train ``n_nets`` fresh networks on (images (N, C, H, W), labels (N,)
    int64) and measure them on ``dataset``'s ``split`` ("val" or "test").
    Labels may also be soft: (N, num_classes) class probabilities in
    ``settings.dtype``, trained with the soft-label cross-entropy (as
    :mod:`addrmem.query` does).

    Each network (``settings.network``) starts from its own seeded init
    (network j of seed s is the same for every call, so methods compared
    with the same seed see the same networks) and trains as ``settings``
    says (:class:`EvalSettings`; docs/method.md, "Evaluation protocol"), on
    ``settings.device`` in ``settings.dtype``. In a torch.distributed
    process group the ranks share the networks out (network j on rank j mod
    N, :mod:`addrmem.parallel`) and every rank must call it. Returns the
    :class:`Accuracy` (%) of the ``n_nets`` networks on the split.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test'; got {split!r}")
    device, dtype = settings.device, settings.dtype
    images = images.detach().to(device, dtype)
    labels = labels.to(device)
    eval_images, eval_labels = getattr(dataset, split)
    eval_images, eval_labels = eval_images.to(device, dtype), eval_labels.to(device)
    runs = []
    mine = parallel.shard(n_nets)
    for j in tqdm(mine, desc=desc, leave=False, disable=None if progress and parallel.is_writer() else True):
        net = make_network(settings.network, dataset.image_shape, dataset.num_classes,
                           seed=derive_seed(seed, "net", j)).to(device, dtype)
        draws = generator(seed, "batches", j)
        optimizer = torch.optim.SGD(net.parameters(), lr=settings.lr, momentum=settings.momentum)
        net.train()
        for batch in _batches(len(labels), settings, draws):
            batch = batch.to(device)
            x = images[batch]
            if settings.augment:
                x = augment_per_image(x, draws)
            loss = F.cross_entropy(net(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        runs.append(accuracy(net, eval_images, eval_labels))
    return Accuracy.of(parallel.gather(runs, n_nets))


def _batches(n: int, settings: EvalSettings, draws: torch.Generator):
    """The row indices of each training step over ``n`` images: shuffled
    epochs cut into batches of ``settings.batch`` (the last one short), for
    ``settings.epochs`` epochs, or until ``settings.steps`` steps if that
    is set."""
    taken = 0
    for _ in itertools.count() if settings.steps else range(settings.epochs):
        order = torch.randperm(n, generator=draws)
        for start in range(0, n, settings.batch):
            yield order[start:start + settings.batch]
            taken += 1
            if taken == settings.steps:
                return
