"""addrmem.config: defaults, presets, YAML round-trips and quirks, validation
(finite numbers, device names), seed streams and device resolution."""

import dataclasses
import math

import pytest
import torch

from addrmem.config import DistillConfig, default_config, derive_seed, resolve_device

from tiny_run import tiny


def test_defaults_follow_the_official_readme():
    c = DistillConfig()
    assert (c.steps, c.inner_lr, c.inner_momentum, c.n_per_c, c.real_per_class) == (150, 0.01, 0.9, 32, 64)
    assert (c.outer_optimizer, c.outer_lr, c.outer_momentum, c.clip) == ("sgd", 0.1, 0.5, 2.0)
    assert (c.ipc, c.n_bases, c.downsample, c.task_classes, c.augment) == (1, 16, 2, 0, "none")
    assert (c.eval_nets, c.eval_epochs, c.eval_batch, c.eval_lr, c.eval_momentum) == (10, 300, 640, 0.01, 0.9)
    assert c.coeff_reg == "none" and c.device == "auto"
    assert default_config("digits").downsample == 1  # the tuned digits preset
    assert default_config("mnist") == DistillConfig(dataset="mnist")


def test_config_yaml_round_trip(tmp_path):
    config = tiny(seed=7, coeff_reg="l1", augment="flip_rotate", data_root="/some/where", device="cpu")
    config.to_yaml(tmp_path / "c.yaml")
    assert DistillConfig.from_yaml(tmp_path / "c.yaml") == config
    assert DistillConfig.from_yaml(tmp_path / "c.yaml", seed=8) == dataclasses.replace(config, seed=8)
    assert not list(tmp_path.glob("*.tmp"))


def test_partial_yaml_fills_in_the_dataset_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 5\ninner_lr: 1\n")
    config = DistillConfig.from_yaml(tmp_path / "c.yaml")
    assert config == default_config("digits", steps=5, inner_lr=1.0)


def test_yaml_exponents_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-2 as a string; addrmem reads it as YAML 1.2 does."""
    (tmp_path / "c.yaml").write_text("inner_lr: 1e-2\nouter_lr: 3E-2\ncoeff_reg_alpha: +1e-4\nzca: 1.5e+1\n"
                                     "data_root: '1e5'\n")
    config = DistillConfig.from_yaml(tmp_path / "c.yaml")
    assert (config.inner_lr, config.outer_lr, config.coeff_reg_alpha, config.zca) == (0.01, 0.03, 1e-4, 15.0)
    assert config.data_root == "1e5"  # quoted: still a string
    (tmp_path / "c.yaml").write_text("steps: 1e2\n")
    with pytest.raises(TypeError, match="steps must be int"):
        DistillConfig.from_yaml(tmp_path / "c.yaml")


def test_binary_config_file_is_named(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\x80\x04\x95 binary \xff\xfe")
    with pytest.raises(ValueError, match="config.yaml' is not a text file"):
        DistillConfig.from_yaml(path)


@pytest.mark.parametrize("values, match", [
    ({"stepz": 3}, "unknown config field"),
    ({"memory": "pixels"}, "memory must be one of"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"outer_lr": -1.0}, "outer_lr must be > 0"),
    ({"steps": "3"}, "steps must be int"),
    ({"memory": "image", "coeff_reg": "l2"}, "needs memory: addressable"),
    ({"eval_archs": ["vgg11", "resnet9"]}, "unknown network 'resnet9'"),
    ({"eval_archs": "vgg11"}, "eval_archs must be list"),
    ({"zca": -0.1}, "zca must be >= 0"),
    ({"full_data_epochs": -1}, "full_data_epochs must be >= 0"),
    ({"zca": math.inf}, "zca must be a finite number"),
    ({"inner_lr": math.nan}, "inner_lr must be a finite number"),
    ({"clip": -math.inf}, "clip must be a finite number"),
    ({"device": "foo"}, "device must be auto, cpu, cuda or cuda:N"),
    ({"device": "cuda:x"}, "device must be auto, cpu, cuda or cuda:N"),
    ({"net_width": 0}, "net_width must be >= 1"),
    ({"net_depth": -1}, "net_depth must be >= 0"),
    ({"net_depth": 1.5}, "net_depth must be int"),
    ({"net_norm": "batch"}, "net_norm must be one of instance, none"),
    ({"network": "alexnet", "net_width": 64}, "net_width: network alexnet has no width setting"),
    ({"network": "mlp", "net_norm": "none"}, "net_norm: network mlp has no norm setting"),
    ({"network": "lenet"}, "unknown network 'lenet'"),
    ({"eval_archs": ["convnet:width=x"]}, "width must be a whole number"),
    ({"eval_archs": ["convnet:heads=2"]}, "'heads=2' is not an option of convnet"),
    ({"eval_archs": ["alexnet:width=2"]}, "it takes no options"),
    ({"init": "zeros"}, "init must be one of xavier, real"),
    ({"eval_steps": -1}, "eval_steps must be >= 0"),
])
def test_bad_config_values(values, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DistillConfig.from_dict(values)


def test_derive_seed_streams_differ():
    assert derive_seed(0, "val") == derive_seed(0, "val")
    assert len({derive_seed(0, "val"), derive_seed(1, "val"), derive_seed(0, "test"), derive_seed(0, "val", 1)}) == 4


def test_resolve_device_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="sees no CUDA GPU.*--device cpu"):
            resolve_device(name)
    with pytest.raises(ValueError, match="unknown device 'foo': use auto, cpu, cuda or cuda:N"):
        resolve_device("foo")


def test_resolve_device_with_one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="'cuda:1' does not exist: this machine has 1 CUDA GPU"):
        resolve_device("cuda:1")


def test_network_size_fields_make_the_spec_and_round_trip(tmp_path):
    assert DistillConfig().network_spec() == "convnet"  # the defaults are the paper's ConvNet
    config = DistillConfig(net_width=32, net_depth=2, net_norm="none", eval_archs=["mlp:width=64", "convnet"])
    assert config.network_spec() == "convnet:width=32:depth=2:norm=none"
    config.to_yaml(tmp_path / "c.yaml")
    assert DistillConfig.from_yaml(tmp_path / "c.yaml") == config
    assert DistillConfig(network="mlp", net_width=64).network_spec() == "mlp:width=64"
