"""addrmem: distill a labelled image dataset into an addressable memory.

A few shared bases plus learned addressing coefficients (Deng & Russakovsky,
"Remember the Past", NeurIPS 2022), with fused CPU and CUDA kernels.

The modules that need torch alone (ops, memory, hypergradient, augment,
networks) load with the package; those that also need numpy, PyYAML, tqdm or
torchvision (data, config, evaluation, distill, runs, experiment, continual,
query) load when one of their names is first used.
"""

import importlib

from .augment import SiameseAugment, augment_per_image
from .hypergradient import hypergradient
from .memory import AddressableMemory, ImageMemory, load_memory
from .networks import MLP, NETWORKS, VGG11, AlexNet, ConvNet, ResNet18, make_network
from .ops import build_info, synthesize, synthesize_reference

__version__ = "0.1.0"

_LAZY = {  # name -> the module that defines it, imported on first use
    "ZCA": "data", "Dataset": "data", "load_dataset": "data",
    "DistillConfig": "config", "default_config": "config",
    "EvalSettings": "evaluation", "evaluate": "evaluation",
    "run_experiment": "experiment",
    "ContinualConfig": "continual", "Method": "continual", "make_stream": "continual", "run_continual": "continual",
    "LabelMap": "query", "load_map": "query", "run_query": "query",
}

__all__ = [
    "AddressableMemory",
    "AlexNet",
    "ContinualConfig",
    "ConvNet",
    "Dataset",
    "DistillConfig",
    "EvalSettings",
    "ImageMemory",
    "LabelMap",
    "MLP",
    "Method",
    "NETWORKS",
    "ResNet18",
    "SiameseAugment",
    "VGG11",
    "ZCA",
    "augment_per_image",
    "build_info",
    "default_config",
    "evaluate",
    "hypergradient",
    "load_dataset",
    "load_map",
    "load_memory",
    "make_network",
    "make_stream",
    "run_continual",
    "run_experiment",
    "run_query",
    "synthesize",
    "synthesize_reference",
]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
