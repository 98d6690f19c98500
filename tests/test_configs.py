"""configs/*.yaml: every setting loads, fits its storage budget and names
networks that exist; the official README example is reproduced exactly."""

from pathlib import Path

import pytest

from addrmem.distill import DistillConfig, default_config, eval_networks
from addrmem.memory import AddressableMemory
from addrmem.networks import make_network

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
SHAPES = {"mnist": (1, 28, 28), "fashionmnist": (1, 28, 28), "svhn": (3, 32, 32), "cifar10": (3, 32, 32),
          "cifar100": (3, 32, 32)}
CLASSES = {"cifar100": 100}


def test_there_are_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_fits_its_budget(path):
    config = DistillConfig.from_yaml(path)
    assert path.stem.startswith(f"{config.dataset}-ipc{config.ipc}")
    shape, classes = SHAPES[config.dataset], CLASSES.get(config.dataset, 10)
    memory = AddressableMemory.from_budget(config.ipc, classes, shape, config.n_bases, config.downsample)
    assert memory.num_floats() <= config.ipc * classes * shape[0] * shape[1] * shape[2]
    assert config.n_per_c <= memory.per_class or config.n_per_c == DistillConfig().n_per_c
    for arch in eval_networks(config):
        make_network(arch, shape, classes, seed=0)
    comment = " ".join(path.read_text().replace("#", " ").split())
    assert f"r = {memory.per_class} rows per class" in comment  # the comment says how many rows


def test_cifar10_ipc1_is_the_official_readme_example():
    path = next(p for p in CONFIGS if p.stem == "cifar10-ipc1")
    config = DistillConfig.from_yaml(path)
    official = default_config("cifar10")
    for field in ("ipc", "n_bases", "downsample", "steps", "n_per_c", "inner_lr", "inner_momentum",
                  "outer_optimizer", "outer_lr", "outer_momentum", "clip", "real_per_class", "zca", "augment",
                  "network"):
        assert getattr(config, field) == getattr(official, field), field
    assert (config.n_bases, config.downsample, config.steps, config.n_per_c) == (16, 2, 150, 32)
