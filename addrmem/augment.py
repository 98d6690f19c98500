"""Flip/rotate augmentation (docs/method.md, "Augmentation": the official 'flip_rotate').

* Distillation: :meth:`SiameseAugment.draw` makes one transform per outer
  iteration, applied identically to every inner step's synthetic batch, to the
  backward recomputation and to the real batch.
* Evaluation: :func:`augment_per_image` draws a fresh transform per call, as
  the official code does: the operation (flip or rotate) is chosen once per
  minibatch, its parameters independently per image.

Rotations use ``affine_grid``/``grid_sample`` (bilinear, zero padding,
align_corners=False) in normalised coordinates; flips are exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["MAX_ANGLE", "SiameseAugment", "augment_per_image"]

MAX_ANGLE = 15.0
"""Rotations are uniform in [-MAX_ANGLE, MAX_ANGLE] degrees."""


def _check_images(images):
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.dtype.is_floating_point:
        raise ValueError("images must be a floating tensor (N, C, H, W)")


def _rotate(images, degrees):
    """Rotate (N, C, H, W) images counter-clockwise by ``degrees`` ((N,) or
    (1,) tensor, on the images' device and dtype) about their centres."""
    rad = degrees * (math.pi / 180.0)
    cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], -2)
    grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _uniforms(n, generator):
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, dtype=torch.float64, device=device)


class SiameseAugment:
    """One fixed transform: an optional horizontal flip, then a rotation by
    ``angle`` degrees (0: none). Callable on any (N, C, H, W) batch,
    differentiable, and the same on every call."""

    def __init__(self, flip: bool = False, angle: float = 0.0):
        self.flip = bool(flip)
        self.angle = float(angle)

    @classmethod
    def draw(cls, generator: torch.Generator | None) -> "SiameseAugment":
        """One outer iteration's transform: w.p. 1/2 a flip w.p. 1/2, else a
        rotation uniform in [-15, 15] degrees. Two draws from ``generator``."""
        op, u = _uniforms(2, generator).tolist()
        if op < 0.5:
            return cls(flip=u < 0.5)
        return cls(angle=(2.0 * u - 1.0) * MAX_ANGLE)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        _check_images(images)
        if self.flip:
            images = images.flip(-1)
        if self.angle:
            images = _rotate(images, images.new_full((1,), self.angle))
        return images

    def __repr__(self):
        return f"SiameseAugment(flip={self.flip}, angle={self.angle:.4g})"


def augment_per_image(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Evaluation-time augmentation of (N, C, H, W) images: w.p. 1/2 flip each
    image independently w.p. 1/2, else rotate each by its own angle uniform in
    [-15, 15] degrees. All draws from ``generator`` (on its device)."""
    _check_images(images)
    n = images.shape[0]
    draws = _uniforms(n + 1, generator)
    u = draws[1:].to(images.device)
    if float(draws[0]) < 0.5:
        return torch.where((u < 0.5).view(n, 1, 1, 1), images.flip(-1), images)
    return _rotate(images, ((2.0 * u - 1.0) * MAX_ANGLE).to(images.dtype))
