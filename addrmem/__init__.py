"""addrmem: distill a labelled image dataset into an addressable memory.

A few shared bases plus learned addressing coefficients (Deng & Russakovsky,
"Remember the Past", NeurIPS 2022), with fused CPU and CUDA kernels.
"""

from .augment import SiameseAugment, augment_per_image
from .data import ZCA, Dataset, load_dataset
from .distill import DistillConfig, default_config, evaluate, run_experiment
from .hypergradient import hypergradient
from .memory import AddressableMemory, ImageMemory, load_memory
from .networks import MLP, NETWORKS, VGG11, AlexNet, ConvNet, ResNet18, make_network
from .ops import build_info, synthesize, synthesize_reference

__version__ = "0.1.0"

__all__ = [
    "AddressableMemory",
    "AlexNet",
    "ConvNet",
    "Dataset",
    "DistillConfig",
    "ImageMemory",
    "MLP",
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
    "load_memory",
    "make_network",
    "run_experiment",
    "synthesize",
    "synthesize_reference",
]
