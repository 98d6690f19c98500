"""addrmem/continual/config.py: the shipped configs load and fit their budget;
bad settings are refused with the field named."""

import dataclasses
from pathlib import Path

import pytest

from addrmem.continual import ContinualConfig, make_method, make_stream
from continual_helpers import fake_mnist

CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("continual-*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_load_fit_their_budget_and_say_their_rows(path):
    config = ContinualConfig.from_yaml(path)
    assert path.stem.startswith(f"continual-{config.benchmark}")
    shape = (1, 8, 8) if config.benchmark == "split-digits" else (3, 32, 32) if "cifar" in path.stem else (1, 28, 28)
    stream = make_stream(config, fake_mnist(shape=shape))
    for name in config.methods:
        make_method(name, config, stream).check()
    memory = make_method("addressable", config, stream)
    comment = " ".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"{memory.per_class(len(stream.classes(0)), len(stream)):,} rows per class" in comment
    if path.stem == "continual-split-digits":  # the command's defaults
        default = ContinualConfig()
        assert default.distill_config() == config.distill_config()
        assert dataclasses.replace(default, distill=config.distill, budget_images=200) == config


@pytest.mark.parametrize("fields, match", [
    (dict(methods=["compressed"], init="xavier"), "needs init: real"),
    (dict(protocol="online", epochs=2), "single pass"),
    (dict(protocol="nope"), "protocol must be one of replay, retrain, online"),
    (dict(methods=["replay", "nope"]), "methods must list distinct methods"),
    (dict(budget_bytes=-1), "budget_bytes must be >= 0"),
    (dict(glances=0), "glances must be >= 1"),
    (dict(distill={"seed": 3}), "seed is set by the continual run"),
])
def test_bad_settings_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        ContinualConfig(**fields)


def test_the_budget_is_in_bytes():
    assert ContinualConfig().budget((1, 8, 8)) == 4 * 200 * 64  # the benchmark's 200 float32 images
    assert ContinualConfig(budget_images=10).budget((1, 8, 8)) == 4 * 10 * 64
    assert ContinualConfig(budget_bytes=1000, budget_images=10).budget((1, 8, 8)) == 1000
