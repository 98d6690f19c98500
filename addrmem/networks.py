"""Networks trained on recalled images (METHOD.md §4), and a registry by name.

Every network takes (N, C, H, W) images and returns plain logits
(N, num_classes). They hold parameters only (no buffers), so that the inner
loop can run them statelessly (:mod:`addrmem.hypergradient`). To add one, write
a builder ``(image_shape, num_classes) -> nn.Module`` and add it to
``NETWORKS``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["ConvNet", "MLP", "NETWORKS", "make_network"]


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def _size(image_size):
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if not isinstance(image_size, (tuple, list, torch.Size)) or len(image_size) != 2:
        raise ValueError(f"image_size must be an int or (H, W); got {image_size!r}")
    return tuple(_positive_int("image_size", s) for s in image_size)


class ConvNet(nn.Module):
    """The ConvNet of DC/DSA/MTT/RTP (METHOD.md §4).

    ``depth`` blocks of Conv3x3 (padding 1; padding 3 on the first layer for
    1-channel 28x28 input, so MNIST maps are 32x32) -> GroupNorm(width, width,
    affine) (instance norm; ``norm="none"`` drops it, the official ConvNetNP)
    -> ReLU -> AvgPool 2x2, then Linear(width * h * w, num_classes).

    Default depth: 4 when the (padded) side is >= 64, else min(3,
    floor(log2(side))), so 28/32 -> 3 as in the paper and small inputs
    (e.g. 8x8 digits -> 3, 4x4 -> 2) still end with a map of at least 1 px.

    Input (N, in_channels, H, W) -> logits (N, num_classes).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size, width: int = 128,
                 depth: int | None = None, norm: str = "instance"):
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("num_classes", num_classes)
        _positive_int("width", width)
        if norm not in ("instance", "none"):
            raise ValueError(f"norm must be 'instance' or 'none'; got {norm!r}")
        h, w = _size(image_size)
        pad = 3 if (in_channels, h, w) == (1, 28, 28) else 1
        h, w = h + 2 * pad - 2, w + 2 * pad - 2  # after the first convolution
        if depth is None:
            side = min(h, w)
            if side < 2:
                raise ValueError(f"a {h}x{w} feature map is too small to pool; the ConvNet needs >= 2 px")
            depth = 4 if side >= 64 else min(3, side.bit_length() - 1)  # floor(log2(side))
        _positive_int("depth", depth)
        if min(h, w) >> depth < 1:
            raise ValueError(f"depth {depth} pools a {h}x{w} feature map below 1 px")
        layers = []
        channels = in_channels
        for block in range(depth):
            layers.append(nn.Conv2d(channels, width, 3, padding=pad if block == 0 else 1))
            if norm == "instance":
                layers.append(nn.GroupNorm(width, width, affine=True))
            layers += [nn.ReLU(), nn.AvgPool2d(2, 2)]
            channels = width
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_classes)."""
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """Flatten -> ``depth`` hidden layers of Linear(hidden) + ReLU -> Linear.

    ``in_features`` is an int or an image shape (C, H, W). depth 0 is a linear
    classifier; depth 2, hidden 100 is La-MAML's continual-learning MLP.
    Input (N, *image_shape) or (N, in_features) -> logits (N, num_classes).
    """

    def __init__(self, in_features, num_classes: int, hidden: int = 128, depth: int = 2):
        super().__init__()
        if not isinstance(in_features, int):
            in_features = math.prod(_positive_int("in_features", s) for s in in_features)
        _positive_int("in_features", in_features)
        _positive_int("num_classes", num_classes)
        _positive_int("hidden", hidden)
        _positive_int("depth", depth, minimum=0)
        layers = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (N, num_classes)."""
        return self.layers(x.flatten(1))


NETWORKS = {
    "convnet": lambda image_shape, num_classes: ConvNet(image_shape[0], num_classes, image_shape[1:]),
    "mlp": lambda image_shape, num_classes: MLP(image_shape, num_classes),
}
"""name -> builder (image_shape (C, H, W), num_classes) -> nn.Module."""


def make_network(name: str, image_shape, num_classes: int, *, seed: int | None = None) -> nn.Module:
    """A freshly initialised network ``name`` (case-insensitive, a key of
    ``NETWORKS``) for (C, H, W) images, on the CPU. With ``seed`` its
    initialisation is reproducible and the global RNG is left untouched;
    without, it draws from the global RNG (PyTorch default init)."""
    builder = NETWORKS.get(name.lower())
    if builder is None:
        raise ValueError(f"unknown network {name!r}; known: {sorted(NETWORKS)}")
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W); got {image_shape!r}")
    if seed is None:
        return builder(tuple(image_shape), num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(tuple(image_shape), num_classes)
