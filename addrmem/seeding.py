"""The random streams of a run: every draw comes from a generator seeded by
the run's seed and the name of its stream (:func:`derive_seed`), so one seed
gives one result."""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["derive_seed", "generator"]


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed for the stream named by ``keys`` (ints or strings) of run
    seed ``seed``, via numpy's SeedSequence: independent streams, stable
    across platforms and versions."""
    words = [seed] + [zlib.crc32(str(k).encode()) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def generator(seed: int, *keys) -> torch.Generator:
    """A CPU torch.Generator seeded with :func:`derive_seed` (``seed``, ``keys``)."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))
