"""configs/*.yaml: every setting loads, fits its storage budget and names
networks that exist; the official README examples are reproduced exactly;
the comments say what the paper's numbers come from."""

from pathlib import Path

import pytest

from addrmem.config import DistillConfig, default_config
from addrmem.memory import AddressableMemory, ImageMemory
from addrmem.networks import make_network

# Distillation settings (continual-*.yaml configure `addrmem continual`, tested with it).
CONFIGS = sorted(p for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")
                 if not p.stem.startswith("continual-"))
SHAPES = {"mnist": (1, 28, 28), "fashionmnist": (1, 28, 28), "svhn": (3, 32, 32), "cifar10": (3, 32, 32),
          "cifar100": (3, 32, 32)}
CLASSES = {"cifar100": 100}
OFFICIAL_FIELDS = ("steps", "inner_lr", "inner_momentum", "outer_optimizer", "outer_lr", "outer_momentum", "clip",
                   "real_per_class", "network")


def _config(stem):
    return DistillConfig.from_yaml(next(p for p in CONFIGS if p.stem == stem))


def _comment(path):
    return " ".join(line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#"))


def test_there_are_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_fits_its_budget(path):
    config = DistillConfig.from_yaml(path)
    assert path.stem.startswith(f"{config.dataset}-ipc{config.ipc}")
    shape, classes = SHAPES[config.dataset], CLASSES.get(config.dataset, 10)
    if config.memory == "image":
        memory = ImageMemory.from_budget(config.ipc, classes, shape)
    else:
        memory = AddressableMemory.from_budget(config.ipc, classes, shape, config.n_bases, config.downsample)
        assert f"r = {memory.per_class} rows per class" in _comment(path)  # the comment says how many rows
    assert memory.num_floats() <= config.ipc * classes * shape[0] * shape[1] * shape[2]
    assert config.n_per_c <= memory.per_class or config.n_per_c == DistillConfig().n_per_c
    for arch in dict.fromkeys([config.network, *config.eval_archs]):  # every network it tests with
        make_network(arch, shape, classes, seed=0)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_comments_point_nowhere_outside_the_repository(path):
    comment = _comment(path)
    for outside in ("METHOD", "shared/", "../", "workspace"):
        assert outside not in comment


def test_cifar10_ipc1_is_the_official_readme_example():
    config, official = _config("cifar10-ipc1"), default_config("cifar10")
    for field in ("ipc", "n_bases", "downsample", "n_per_c", "zca", "augment", "task_classes") + OFFICIAL_FIELDS:
        assert getattr(config, field) == getattr(official, field), field
    assert (config.n_bases, config.downsample, config.steps, config.n_per_c) == (16, 2, 150, 32)
    assert (config.zca, config.augment, config.task_classes) == (0.0, "none", 0)


def test_cifar10_ipc1_says_where_the_paper_number_comes_from():
    comment = _comment(next(p for p in CONFIGS if p.stem == "cifar10-ipc1"))
    assert "66.4" in comment and "no ZCA and no augmentation" in comment and "cifar10-ipc1-zca.yaml" in comment
    believed = _config("cifar10-ipc1-zca")
    plain = _config("cifar10-ipc1")
    assert (believed.zca, believed.augment) == (0.1, "flip_rotate")
    for field in ("ipc", "n_bases", "downsample", "n_per_c", "task_classes", "iterations") + OFFICIAL_FIELDS:
        assert getattr(believed, field) == getattr(plain, field), field


def test_cifar10_ipc1_image_is_the_official_no_addressing_example():
    config = _config("cifar10-ipc1-image")
    assert (config.memory, config.ipc, config.zca, config.augment, config.task_classes) == ("image", 1, 0.1, "none", 0)
    official = default_config("cifar10")
    for field in OFFICIAL_FIELDS:
        assert getattr(config, field) == getattr(official, field), field


@pytest.mark.parametrize("stem", ["cifar100-ipc1", "cifar100-ipc10"])
def test_cifar100_samples_all_classes_as_the_official_default(stem):
    assert _config(stem).task_classes == 0
