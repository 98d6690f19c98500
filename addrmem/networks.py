"""Networks trained on recalled images (docs/method.md, "Evaluation protocol" and "Where addrmem departs from the official code"), and a registry by name.

Every network takes (N, C, H, W) images and returns plain logits
(N, num_classes). They hold parameters only (no buffers), so that the inner
loop can run them statelessly (:mod:`addrmem.hypergradient`); the
cross-architecture nets (:class:`AlexNet`, :class:`VGG11`, :class:`ResNet18`)
are therefore the instance-norm versions of DC/DSA/MTT/RTP, GroupNorm(c, c,
affine) in place of BatchNorm. To add one, write a builder
``(image_shape, num_classes, **options) -> nn.Module`` and add it to
``NETWORKS`` (its options, if any, to ``NETWORK_OPTIONS``).

A network is named by a spec (:func:`parse_network`): a registry name,
optionally with size options, e.g. ``"convnet:width=32:depth=3"`` or
``"convnet:norm=none"`` (the official ConvNetNN).

Input sizes: the cross-architecture nets are built for 28x28 and 32x32 images
with 1 or 3 channels. AlexNet and VGG11 pad a 28x28 input by two more pixels
per side in their first convolution, so that its map is 32x32 (DC/MTT do this
for 1-channel input, i.e. MNIST; here it depends on the size only, so that a
3-channel 28x28 input fits VGG11's five poolings). Other sizes work while every
map stays large enough; a smaller input raises ValueError naming the layer that
does not fit (a 2x2 pooling needs a map of >= 2 px per side, and instance norm
needs >= 2 px, since on a single pixel it outputs its bias whatever the input).
Smallest square inputs: AlexNet 8x8, VGG11 32x32, ResNet18 9x9.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

__all__ = ["AlexNet", "ConvNet", "MLP", "NETWORKS", "NETWORK_OPTIONS", "ResNet18", "VGG11", "make_network",
           "network_spec", "parse_network"]


def _positive_int(name, value, minimum=1):
    """``value`` if it is an int (not a bool) >= ``minimum``; else TypeError
    or ValueError naming ``name``. The memories' checks use it too."""
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
    """The ConvNet of DC/DSA/MTT/RTP (docs/method.md, "Evaluation protocol").

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


class _FeatureMap:
    """The (H, W) of a network's feature map while its layers are built.

    Each method makes one layer and updates the size; a layer that does not fit
    raises ValueError naming the network, the input size and the layer.
    """

    def __init__(self, net: str, image_size):
        self.net = net
        self.input = _size(image_size)
        self.h, self.w = self.input

    def _misfit(self, why):
        raise ValueError(f"{self.net} cannot take {self.input[0]}x{self.input[1]} images: {why}")

    def conv(self, in_channels, out_channels, kernel, *, stride=1, padding=None, bias=True) -> nn.Conv2d:
        """Conv2d(kernel, stride, padding; default padding kernel // 2)."""
        padding = kernel // 2 if padding is None else padding
        self.h, self.w = ((s + 2 * padding - kernel) // stride + 1 for s in (self.h, self.w))
        return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=bias)

    def norm(self, channels) -> nn.GroupNorm:
        """Instance norm, GroupNorm(channels, channels, affine), of the current map."""
        if self.h * self.w < 2:
            self._misfit(f"an instance-norm layer would see a {self.h}x{self.w} map, where it outputs its "
                         f"bias whatever the input")
        return nn.GroupNorm(channels, channels, affine=True)

    def pool(self, kind) -> nn.Module:
        """A 2x2, stride-2 pooling layer ``kind`` (nn.AvgPool2d or nn.MaxPool2d)."""
        if min(self.h, self.w) < 2:
            self._misfit(f"a 2x2 pooling layer would get a {self.h}x{self.w} map")
        self.h, self.w = self.h // 2, self.w // 2
        return kind(2, 2)

    def conv_norm_relu(self, in_channels, out_channels, kernel, padding=None) -> list:
        """[Conv2d, GroupNorm, ReLU]."""
        return [self.conv(in_channels, out_channels, kernel, padding=padding), self.norm(out_channels), nn.ReLU()]

    def first_padding(self, kernel) -> int:
        """Padding of a first, size-preserving convolution: kernel // 2, plus 2
        for a 28x28 input so that its map is 32x32."""
        return kernel // 2 + (2 if self.input == (28, 28) else 0)


class AlexNet(nn.Module):
    """AlexNet of DC/MTT in RTP's instance-norm version (docs/method.md, "Evaluation protocol").

    Conv5x5(128) -> pool -> Conv5x5(192) -> pool -> Conv3x3(256) ->
    Conv3x3(192) -> Conv3x3(192) -> pool, each convolution followed by
    GroupNorm(c, c, affine) and ReLU, the pools AvgPool 2x2 (as RTP; DC's
    normless AlexNet max-pools), then Linear(192 * h * w, num_classes):
    192 * 4 * 4 for 28x28 and 32x32 input. The first convolution pads by 2,
    or 4 for a 28x28 input. Fits inputs from 8x8 up.

    Input (N, in_channels, H, W) -> logits (N, num_classes).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size):
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("num_classes", num_classes)
        fmap = _FeatureMap("AlexNet", image_size)
        self.features = nn.Sequential(
            *fmap.conv_norm_relu(in_channels, 128, 5, padding=fmap.first_padding(5)), fmap.pool(nn.AvgPool2d),
            *fmap.conv_norm_relu(128, 192, 5), fmap.pool(nn.AvgPool2d),
            *fmap.conv_norm_relu(192, 256, 3),
            *fmap.conv_norm_relu(256, 192, 3),
            *fmap.conv_norm_relu(192, 192, 3), fmap.pool(nn.AvgPool2d),
        )
        self.classifier = nn.Linear(192 * fmap.h * fmap.w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_classes)."""
        return self.classifier(self.features(x).flatten(1))


class VGG11(nn.Module):
    """VGG11 of DC/MTT with instance norm (their ``VGG11``).

    The standard configuration 64, M, 128, M, 256, 256, M, 512, 512, M, 512,
    512, M: each number a Conv3x3 -> GroupNorm(c, c, affine) -> ReLU, each M a
    MaxPool 2x2; then Linear(512 * h * w, num_classes): 512 for 28x28 and
    32x32 input (a 1x1 map). The first convolution pads by 1, or 3 for a 28x28
    input. Fits inputs from 32x32 up (28x28 through the padding).

    Input (N, in_channels, H, W) -> logits (N, num_classes).
    """

    CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, in_channels: int, num_classes: int, image_size):
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("num_classes", num_classes)
        fmap = _FeatureMap("VGG11", image_size)
        layers = []
        channels = in_channels
        for item in self.CONFIG:
            if item == "M":
                layers.append(fmap.pool(nn.MaxPool2d))
            else:
                padding = fmap.first_padding(3) if not layers else 1
                layers += fmap.conv_norm_relu(channels, item, 3, padding=padding)
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * fmap.h * fmap.w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_classes)."""
        return self.classifier(self.features(x).flatten(1))


class _BasicBlock(nn.Module):
    """ResNet's basic block with instance norm: (N, in_channels, H, W) ->
    (N, out_channels, ceil(H / stride), ceil(W / stride)).

    relu(norm(conv3x3(relu(norm(conv3x3_stride(x))))) + shortcut(x)), where the
    shortcut is the identity, or conv1x1_stride -> norm when the shape changes.
    Convolutions have no bias (a norm follows each).
    """

    def __init__(self, fmap: _FeatureMap, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = fmap.conv(in_channels, out_channels, 3, stride=stride, bias=False)
        self.norm1 = fmap.norm(out_channels)
        self.conv2 = fmap.conv(out_channels, out_channels, 3, bias=False)
        self.norm2 = fmap.norm(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          fmap.norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 of DC/MTT with instance norm (their ``ResNet18``).

    Conv3x3(64, stride 1, no bias) -> GroupNorm -> ReLU, then basic blocks
    [2, 2, 2, 2] of width 64, 128, 256, 512 (the first block of each stage
    after the first has stride 2), global average pooling (DC/MTT's
    ``avg_pool2d(out, 4)`` on the 4x4 map of 28x28 and 32x32 input) and
    Linear(512, num_classes). Fits inputs from 9x9 up.

    Input (N, in_channels, H, W) -> logits (N, num_classes).
    """

    STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (width, stride of its first block)

    def __init__(self, in_channels: int, num_classes: int, image_size):
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("num_classes", num_classes)
        fmap = _FeatureMap("ResNet18", image_size)
        self.stem = nn.Sequential(fmap.conv(in_channels, 64, 3, bias=False), fmap.norm(64), nn.ReLU())
        blocks = []
        channels = 64
        for width, stride in self.STAGES:
            for block_stride in (stride, 1):
                blocks.append(_BasicBlock(fmap, channels, width, block_stride))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_classes)."""
        return self.classifier(self.blocks(self.stem(x)).mean(dim=(2, 3)))


NETWORKS = {
    "convnet": lambda image_shape, num_classes, width=128, depth=None, norm="instance":
        ConvNet(image_shape[0], num_classes, image_shape[1:], width=width, depth=depth, norm=norm),
    "mlp": lambda image_shape, num_classes, width=128, depth=2: MLP(image_shape, num_classes, hidden=width,
                                                                   depth=depth),
    "alexnet": lambda image_shape, num_classes: AlexNet(image_shape[0], num_classes, image_shape[1:]),
    "vgg11": lambda image_shape, num_classes: VGG11(image_shape[0], num_classes, image_shape[1:]),
    "resnet18": lambda image_shape, num_classes: ResNet18(image_shape[0], num_classes, image_shape[1:]),
}
"""name -> builder (image_shape (C, H, W), num_classes, **options) -> nn.Module."""

NETWORK_OPTIONS = {"convnet": {"width": int, "depth": int, "norm": str}, "mlp": {"width": int, "depth": int}}
"""name -> the options its spec may set (:func:`parse_network`): the ConvNet's
``width`` (channels), ``depth`` (blocks) and ``norm`` ("instance" or
"none"); the MLP's ``width`` (hidden units) and ``depth`` (hidden layers)."""


def parse_network(spec: str) -> tuple[str, dict]:
    """A network spec -> (name, options).

    A spec is a name of ``NETWORKS`` (case-insensitive), optionally followed by
    ``:key=value`` options of :data:`NETWORK_OPTIONS`, e.g. ``"convnet"`` or
    ``"convnet:width=64:depth=2:norm=none"``. Raises ValueError naming what
    does not parse (an unknown name or option, a value that is not an int)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a network spec must be a non-empty string; got {spec!r}")
    name, *items = spec.strip().split(":")
    name = name.lower()
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; known: {sorted(NETWORKS)}")
    allowed = NETWORK_OPTIONS.get(name, {})
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            known = (f"its options: {', '.join(f'{k}=...' for k in allowed)}" if allowed
                     else "it takes no options")
            raise ValueError(f"network spec {spec!r}: {item!r} is not an option of {name} ({known})")
        if allowed[key] is int:
            if not re.fullmatch(r"[0-9]+", value):
                raise ValueError(f"network spec {spec!r}: {key} must be a whole number; got {value!r}")
            value = int(value)
        options[key] = value
    return name, options


def network_spec(name: str, **options) -> str:
    """The spec of network ``name`` with ``options`` (those that are None left
    out): ``network_spec("convnet", width=32, depth=None)`` -> "convnet:width=32"."""
    return ":".join([name] + [f"{k}={v}" for k, v in options.items() if v is not None])


def make_network(spec: str, image_shape, num_classes: int, *, seed: int | None = None) -> nn.Module:
    """A freshly initialised network of ``spec`` (a name of ``NETWORKS`` with
    optional options, :func:`parse_network`) for (C, H, W) images, on the
    CPU. With ``seed`` its initialisation is reproducible and the global RNG
    is left untouched; without, it draws from the global RNG (PyTorch default
    init). Raises ValueError for a spec that does not parse or a network that
    does not fit the images."""
    name, options = parse_network(spec)
    builder = NETWORKS[name]
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W); got {image_shape!r}")
    if seed is None:
        return builder(tuple(image_shape), num_classes, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(tuple(image_shape), num_classes, **options)
