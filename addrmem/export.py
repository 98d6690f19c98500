"""Export a memory's recalled images to formats other tools read
(``addrmem export``; docs/guide.md, "Exporting").

* :func:`export_imagefolder`: one PNG per recalled image in torchvision's
  ImageFolder layout, ``DIR/<class>/<n>.png``, with the normalisation and
  any ZCA whitening undone (:func:`addrmem.data.to_display`);
* :func:`export_tensors`: one ``torch.save`` file holding the tuple
  (images (N, C, H, W) float32, labels (N,) int64) as the networks were
  trained on them (normalised, and whitened if the run used ZCA), the
  convention of dataset-distillation evaluation code (DC, DSA, DM, MTT),
  which applies the same preprocessing to its real test images.
"""

from __future__ import annotations

import os

import torch

from .data import to_display
from .files import atomic_torch_save, atomic_write

__all__ = ["class_folders", "export_imagefolder", "export_tensors"]


def class_folders(classes: list) -> list:
    """Folder names for ``classes`` (in label order) whose sorted order, which
    ImageFolder gives its labels in, is the label order: the class names
    themselves when they sort that way, else each prefixed by its
    zero-padded label ("03-cat")."""
    names = [str(c).replace(os.sep, "_") for c in classes]
    if names == sorted(names) and len(set(names)) == len(names):
        return names
    width = len(str(len(names) - 1))
    return [f"{label:0{width}d}-{name}" for label, name in enumerate(names)]


def _recalled(memory):
    """The memory's recalled images (N, C, H, W) float32 and labels (N,) on the CPU."""
    with torch.no_grad():
        images, labels = memory.recall()
    return images.detach().float().cpu(), labels.cpu()


def export_imagefolder(memory, folder: str) -> int:
    """Write every image ``memory`` (saved with its dataset's ``preprocessing``
    and ``classes`` in ``memory.extra``) recalls as an 8-bit PNG
    ``folder/<class>/<n>.png`` (:func:`class_folders`; n counts a class's
    images from 0, zero-padded so that names sort in order), grey for one
    channel, RGB for three. ``folder`` must
    not exist or be empty. Returns the number of images written."""
    from torchvision.transforms.functional import to_pil_image

    images, labels = _recalled(memory)
    pixels = (to_display(images, memory.extra["preprocessing"]) * 255).round().to(torch.uint8)
    names = class_folders(memory.extra["classes"])
    counts = [0] * len(names)
    width = len(str(max(int(torch.bincount(labels).max()) - 1, 0)))
    for image, label in zip(pixels, labels.tolist()):
        path = os.path.join(folder, names[label], f"{counts[label]:0{width}d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: to_pil_image(image).save(f, format="png"))
        counts[label] += 1
    return len(labels)


def export_tensors(memory, path: str) -> int:
    """``torch.save`` (images (N, C, H, W) float32, labels (N,) int64), the
    images ``memory`` recalls as the networks saw them, to ``path``
    (atomically). Returns N."""
    images, labels = _recalled(memory)
    atomic_torch_save(path, (images, labels))
    return len(labels)
