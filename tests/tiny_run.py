"""The tiny distillation settings the tests share (an MLP, T=3, a few outer
iterations, 2 evaluation epochs: a run in well under a second), and the
digits dataset as a fixture."""

import pytest

from addrmem.config import default_config
from addrmem.data import load_dataset

TINY = dict(network="mlp", ipc=1, n_bases=4, downsample=1, steps=3, n_per_c=3, iterations=4, eval_every=2,
            val_nets=1, eval_nets=1, eval_epochs=2, full_data_epochs=2, checkpoint_every=2,
            outer_optimizer="adam", outer_lr=0.03, device="cpu")


def tiny(**overrides):
    """The digits config with TINY and ``overrides``."""
    return default_config("digits", **{**TINY, **overrides})


def records(log):
    """Log records without their timings."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in log]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")
