"""Evaluation: train fresh networks on given images and measure them
(docs/method.md, "Evaluation protocol").

:func:`evaluate` is what monitors a distillation on the validation split and
what tests every method on the test split; :class:`Accuracy` is its result.
"""

from __future__ import annotations

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

__all__ = ["Accuracy", "evaluate"]


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


@torch.no_grad()
def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1024) -> float:
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
    Labels may also be soft: (N, num_classes) class probabilities in
    ``config.dtype``, trained with the soft-label cross-entropy (as
    :mod:`addrmem.query` does).

    Each network (``network``, a spec; default ``config.network_spec()``) starts from its own
    seeded init (network j of seed s is the same for every call, so methods
    compared with the same seed see the same networks) and trains
    ``config.eval_epochs`` epochs (or, if ``config.eval_steps`` is set, that
    many steps: the same number of updates whatever the number of images) of
    SGD (``eval_lr``, ``eval_momentum``, no weight decay) in shuffled batches
    of ``eval_batch``, with per-image
    flip/rotate augmentation at every step if ``config.augment`` is on
    (docs/method.md, "Evaluation protocol"). Runs on ``config.device`` in
    ``config.dtype``; in a torch.distributed process group the ranks share
    the networks out (network j on rank j mod N, :mod:`addrmem.parallel`) and
    every rank must call it. Returns the :class:`Accuracy` (%) of the ``n_nets``
    networks on the split.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test'; got {split!r}")
    device, dtype = config.device_dtype()
    images = images.detach().to(device, dtype)
    labels = labels.to(device)
    eval_images, eval_labels = getattr(dataset, split)
    eval_images, eval_labels = eval_images.to(device, dtype), eval_labels.to(device)
    runs = []
    mine = parallel.shard(n_nets)
    for j in tqdm(mine, desc=desc, leave=False, disable=None if progress and parallel.is_writer() else True):
        net = make_network(network or config.network_spec(), dataset.image_shape, dataset.num_classes,
                           seed=derive_seed(seed, "net", j)).to(device, dtype)
        draws = generator(seed, "batches", j)
        optimizer = torch.optim.SGD(net.parameters(), lr=config.eval_lr, momentum=config.eval_momentum)
        net.train()
        for batch in _batches(len(labels), config, draws):
            batch = batch.to(device)
            x = images[batch]
            if config.augment == "flip_rotate":
                x = augment_per_image(x, draws)
            loss = F.cross_entropy(net(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        runs.append(accuracy(net, eval_images, eval_labels))
    return Accuracy.of(parallel.gather(runs, n_nets))


def _batches(n: int, config: DistillConfig, draws: torch.Generator):
    """The row indices of each training step over ``n`` images: shuffled
    epochs cut into batches of ``eval_batch`` (the last one short), for
    ``eval_epochs`` epochs, or until ``eval_steps`` steps if that is set."""
    taken = 0
    for _ in itertools.count() if config.eval_steps else range(config.eval_epochs):
        order = torch.randperm(n, generator=draws)
        for start in range(0, n, config.eval_batch):
            yield order[start:start + config.eval_batch]
            taken += 1
            if taken == config.eval_steps:
                return
