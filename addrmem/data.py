"""Real datasets: loading, the fixed splits, preprocessing (docs/method.md, "Preprocessing").

:func:`load_dataset` returns a :class:`Dataset` with three splits:

* ``train``: what distillation and the baselines learn from;
* ``val``: a seeded, per-class ``val_fraction`` (10 %) of the original training
  set, used to monitor distillation and to choose the memory;
* ``test``: the official test set (or, for datasets without one, a fixed,
  seeded, stratified hold-out), reported once at the end.

Images are float32 (N, C, H, W). Without ZCA they are normalised per channel:
with the official code's constants for mnist, fashionmnist, svhn, cifar10 and
cifar100, else with the mean and std of the ``train`` split. With ``zca > 0``
they are ZCA-whitened (:class:`ZCA`, fitted on ``train``) straight from their
pixel values, without the per-channel normalisation, as the official code
does. :meth:`Dataset.preprocessing` describes all this as plain data, saved
with a distilled memory; :func:`to_display` undoes it for pictures.

Datasets are registered by name in :data:`DATASETS`. Each entry is a function
``loader(root, download) -> RawData``; :func:`register_dataset` adds one.
Built in:

* ``digits``: scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10
  classes, no files needed); its test split is a fixed stratified third
  (seed 0).
* ``mnist``, ``fashionmnist``, ``svhn``, ``cifar10``, ``cifar100``: read with
  torchvision's dataset classes from the folder layout they use under
  ``root`` (``MNIST/raw/``, ``FashionMNIST/raw/``, ``train_32x32.mat`` and
  ``test_32x32.mat``, ``cifar-10-batches-py/``, ``cifar-100-python/``);
  torchvision downloads them there only when ``download`` is true.
  ``cifar10`` also reads an ImageFolder copy (``root/train/<class>/<image>``
  and ``root/test/<class>/<image>``), e.g. CIFAR-10 exported as JPEG or PNG
  files.
* ``imagefolder``: any ``root/train/<class>/<image>`` and
  ``root/test/<class>/<image>`` tree: classes sorted by folder name, the same
  in both splits; every image the same size; RGB, or one channel when every
  image is grayscale.

Decoded file datasets are cached as uint8 tensors in ``$ADDRMEM_CACHE``
(default ``~/.cache/addrmem``), one file per dataset and root, rewritten when
the source files change (their paths, sizes or modification times).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["DATASETS", "Dataset", "RawData", "ZCA", "load_dataset", "register_dataset", "to_display"]

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")  # what torchvision.io.decode_image reads
_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_ZCA_CHUNK = 4096  # images per block when accumulating the ZCA covariance
_TRAIN_TEST = ({"train": True}, {"train": False})  # torchvision's split arguments
_DIGIT_NAMES = [str(c) for c in range(10)]


@dataclass
class RawData:
    """What a registered loader returns, before splitting and normalising.

    ``train_images`` (N, C, H, W) and ``test_images`` (M, C, H, W) are either
    uint8 in 0-255 (file datasets) or float in [0, 1] (e.g. digits);
    ``train_labels`` (N,) and ``test_labels`` (M,) are int64 in
    [0, len(classes)); ``classes`` names the classes in label order.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list


class ZCA:
    """KIP-style ZCA whitening of images with D = C·H·W values, as the official
    code applies it (its ``preprocess``).

    Each image is flattened, centred on its own mean and divided by its L2
    norm; the result is multiplied by W = V·diag(1/√(λ + reg·mean λ))·Vᵀ, where
    V, λ are the eigenvectors and eigenvalues of the covariance (1/N)·XᵀX of
    the (centred, unit-norm) training images. CPU tensors.

    The per-image centring and scaling make the result independent of any
    per-image affine change of the pixels (0-255 or 0-1, say). The official
    code decomposes with ``np.linalg.eig``; this uses ``torch.linalg.eigh``
    (the covariance is symmetric), which gives the same matrix up to rounding.
    """

    def __init__(self, eigenvectors: torch.Tensor, eigenvalues: torch.Tensor, reg: float):
        """``eigenvectors`` (D, D) (columns), ``eigenvalues`` (D,), ``reg`` > 0."""
        if not reg > 0:
            raise ValueError(f"the ZCA regularisation must be positive; got {reg}")
        self.eigenvectors = eigenvectors.float().cpu()
        self.eigenvalues = eigenvalues.double().cpu()
        self.reg = float(reg)

    @classmethod
    def fit(cls, images: torch.Tensor, reg: float) -> ZCA:
        """Fit on ``images`` (N, C, H, W) with regularisation ``reg`` > 0. The
        covariance is accumulated in blocks of images, then decomposed in float64."""
        flat = images.flatten(1)
        cov = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64)
        for block in flat.split(_ZCA_CHUNK):
            x = _centre_unit(block)
            cov += (x.T @ x).double()
        eigenvalues, eigenvectors = torch.linalg.eigh(cov / len(flat))
        return cls(eigenvectors, eigenvalues, reg)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Whiten: (N, C, H, W) -> (N, C, H, W) float32."""
        return self._project(_centre_unit(images.flatten(1)), -0.5).reshape(images.shape)

    def inverse(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the whitening matrix: (N, C, H, W) -> (N, C, H, W) float32, the
        centred, unit-norm images (the per-image mean and norm are lost)."""
        return self._project(images.flatten(1).float(), 0.5).reshape(images.shape)

    def _project(self, flat: torch.Tensor, power: float) -> torch.Tensor:
        """``flat`` (N, D) times V·diag((λ + reg·mean λ)^power)·Vᵀ, choosing the
        cheaper order of the matrix products."""
        v = self.eigenvectors
        scale = (self.eigenvalues + self.reg * self.eigenvalues.mean()).pow(power).float()
        if len(flat) > len(scale):
            return flat @ ((v * scale) @ v.T)
        return ((flat @ v) * scale) @ v.T

    def state_dict(self) -> dict:
        """Plain data for :func:`torch.save`: ``eigenvectors`` (D, D) float32,
        ``eigenvalues`` (D,) float64, ``reg`` float."""
        return {"eigenvectors": self.eigenvectors, "eigenvalues": self.eigenvalues, "reg": self.reg}

    @classmethod
    def from_state_dict(cls, state: dict) -> ZCA:
        """The inverse of :meth:`state_dict`."""
        return cls(state["eigenvectors"], state["eigenvalues"], state["reg"])


def _centre_unit(flat: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D) float32: each row minus its mean, divided by its L2 norm
    (a constant row becomes zeros)."""
    x = flat.float()
    x = x - x.mean(dim=1, keepdim=True)
    return x.div_(x.norm(dim=1, keepdim=True).clamp_min(1e-12))


@dataclass
class Dataset:
    """A dataset ready for distillation: three preprocessed splits and metadata.

    ``train``, ``val`` and ``test`` are (images (N, C, H, W) float32, labels
    (N,) int64); ``mean`` and ``std`` (C,) float32 are the per-channel
    statistics the images were normalised with (zeros and ones when ``zca``
    is set: the whitening then replaces the normalisation); ``zca`` is the
    whitening applied to the pixel values in [0, 1] (fitted on ``train``), or
    None.
    """

    name: str
    train: tuple
    val: tuple
    test: tuple
    num_classes: int
    image_shape: tuple
    mean: torch.Tensor
    std: torch.Tensor
    classes: list
    zca: ZCA | None = None

    def preprocessing(self) -> dict:
        """The preprocessing as plain data, for :func:`to_display`:
        ``{"mean": [C floats], "std": [C floats], "zca": ZCA state dict or None}``."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist(),
                "zca": None if self.zca is None else self.zca.state_dict()}

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W) float32 in [0, 1] on the CPU, ready for
        :func:`torchvision.utils.save_image`; see :func:`to_display`."""
        return to_display(images, self.preprocessing())


def to_display(images: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    """Undo ``preprocessing`` (from :meth:`Dataset.preprocessing`) for pictures:
    (N, C, H, W) -> (N, C, H, W) float32 on the CPU in [0, 1].

    Without ZCA: ``images · std + mean``, clamped to [0, 1]. With ZCA: the
    inverse whitening, then each image rescaled to [0, 1] by its own minimum
    and maximum; the per-image centring and normalisation that came before the
    whitening cannot be undone, so brightness and contrast are each image's own.
    """
    images = images.detach().float().cpu()
    if preprocessing["zca"] is None:
        mean = torch.tensor(preprocessing["mean"])[:, None, None]
        std = torch.tensor(preprocessing["std"])[:, None, None]
        return (images * std + mean).clamp(0, 1)
    flat = ZCA.from_state_dict(preprocessing["zca"]).inverse(images).flatten(1)
    low, high = flat.aminmax(dim=1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(images.shape)


DATASETS: dict[str, Callable[[str | None, bool], RawData]] = {}
_STATS: dict[str, tuple | None] = {}  # by dataset name: fixed per-channel (mean, std), or None


def register_dataset(name: str, loader: Callable[[str | None, bool], RawData], *,
                     stats: tuple[Sequence[float], Sequence[float]] | None = None) -> None:
    """Make ``load_dataset(name)`` available.

    ``loader(root, download)`` returns a :class:`RawData`; ``root`` is the data
    folder (None when the user gave none) and ``download`` whether fetching the
    files is allowed. It should raise FileNotFoundError (files missing) or
    ValueError (files malformed) saying where the files belong. ``stats`` are
    fixed per-channel (mean, std) to normalise with when there is no ZCA
    whitening; None computes them from the train split.
    """
    DATASETS[name] = loader
    _STATS[name] = stats


def load_dataset(name: str, root: str | None = None, *, download: bool = False, zca: float = 0.0,
                 val_fraction: float = 0.1, split_seed: int = 0) -> Dataset:
    """Load dataset ``name`` (a key of :data:`DATASETS`) from ``root``.

    The validation split is a per-class ``val_fraction`` of the training set
    (at least one image per class) drawn with ``split_seed``; the splits are
    the same on every call with the same arguments. Images come back float32
    (N, C, H, W): with ``zca`` == 0, normalised per channel (the official
    constants, or the train split's mean and std); with ``zca`` > 0,
    ZCA-whitened with regularisation ``zca`` from their pixel values in [0, 1]
    (fitted on the train split, applied to all three) and not normalised per
    channel, as in the official code (whose whitening starts from the raw
    pixels). ``download`` lets torchvision fetch missing files into ``root``.

    Raises ValueError for an unknown name, a bad ``val_fraction`` or ``zca``,
    or malformed files, and FileNotFoundError when the files are missing.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1); got {val_fraction}")
    if zca < 0:
        raise ValueError(f"zca (the whitening regularisation) must be >= 0; got {zca}")
    raw = DATASETS[name](root, download)
    train_images, train_labels, val_images, val_labels = _split_validation(
        raw.train_images, raw.train_labels, len(raw.classes), val_fraction, split_seed)
    splits = [_to_float(train_images), _to_float(val_images), _to_float(raw.test_images)]
    channels = splits[0].shape[1]
    whitening = None
    stats = _STATS.get(name)
    if zca > 0:  # whitened from the pixels, as the official code: no per-channel normalisation
        mean, std = torch.zeros(channels), torch.ones(channels)
        whitening = ZCA.fit(splits[0], zca)
        splits = [whitening(images) for images in splits]
    else:
        if stats is None:
            mean, std = splits[0].mean(dim=(0, 2, 3)), splits[0].std(dim=(0, 2, 3))
        else:
            mean, std = (torch.tensor(s, dtype=torch.float32) for s in stats)
        for images in splits:  # in place
            images.sub_(mean[:, None, None]).div_(std[:, None, None])
    return Dataset(
        name=name,
        train=(splits[0], train_labels),
        val=(splits[1], val_labels),
        test=(splits[2], raw.test_labels),
        num_classes=len(raw.classes),
        image_shape=tuple(raw.train_images.shape[1:]),
        mean=mean,
        std=std,
        classes=list(raw.classes),
        zca=whitening,
    )


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (0-255) or float ([0, 1]) images -> a new float32 tensor in [0, 1]."""
    out = images.to(torch.float32, copy=True)
    return out.div_(255) if images.dtype == torch.uint8 else out


def _split_validation(images, labels, num_classes, fraction, seed):
    """Per class, a random ``fraction`` (at least one image) goes to val.
    Returns train images, train labels, val images, val labels; both splits
    keep the original order."""
    generator = torch.Generator().manual_seed(seed)
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        if len(members) < 2:
            raise ValueError(f"class {c} has {len(members)} training image(s): too few to hold out validation")
        n_val = max(1, round(fraction * len(members)))
        is_val[members[torch.randperm(len(members), generator=generator)[:n_val]]] = True
    return images[~is_val], labels[~is_val], images[is_val], labels[is_val]


# ---------------------------------------------------------------- errors, cache


def _how(name: str, layout: str, download: bool = True) -> str:
    """The hint ending every data error: where the files go and which flags to pass."""
    return f"{name} needs {layout}: pass --data-root DIR" + (", or --download to fetch it" if download else "")


def _check_root(root: str | None, how: str, download: bool = False) -> str:
    """``root``, or FileNotFoundError when it is None or (unless downloading) missing."""
    if root is None:
        raise FileNotFoundError(f"no data folder given: {how}")
    if not download and not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root!r} does not exist: {how}")
    return root


def _cache_path(name: str, root: str) -> str:
    """The cache file of dataset ``name`` read from ``root``."""
    folder = os.environ.get("ADDRMEM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "addrmem")
    digest = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
    return os.path.join(folder, f"{name}-{digest}.pt")


def _signature(root: str, sources: list[str]) -> str:
    """A hash of the relative path, size and modification time of every file
    in ``sources`` (files or folders, relative to ``root``; missing ones count too)."""
    digest = hashlib.sha256()
    for source in sources:
        top = os.path.join(root, source)
        paths = [top] if os.path.isfile(top) else sorted(
            os.path.join(folder, f) for folder, _, files in os.walk(top) for f in files)
        digest.update(f"{source}:{len(paths)}\n".encode())
        for path in paths:
            st = os.stat(path)
            digest.update(f"{path[len(root):]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cached(name: str, root: str, sources: list[str], decode: Callable[[], RawData]) -> RawData:
    """``decode()``'s RawData, from the cache when it was saved with the same
    signature of ``sources`` (relative to ``root``); otherwise decoded and saved.
    An unreadable or stale cache file is ignored and replaced."""
    path = _cache_path(name, root)
    try:
        entry = torch.load(path, weights_only=True)
        if entry["signature"] == _signature(root, sources):
            return RawData(**entry["data"])
    except Exception:  # missing, corrupt or of another format: decode again
        pass
    raw = decode()
    _save_atomically({"signature": _signature(root, sources), "data": dict(vars(raw))}, path)
    return raw


def _save_atomically(entry: dict, path: str) -> None:
    """torch.save ``entry`` to ``path`` through a temporary file and os.replace;
    warn (and go on) when the cache folder cannot be written."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(entry, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as exc:
        warnings.warn(f"could not write the dataset cache {path!r}: {exc}")


# ---------------------------------------------------------------- loaders


def _digits(root: str | None, download: bool) -> RawData:
    """scikit-learn's 8×8 digits (values 0-16, as floats in [0, 1]), split 2/3
    train, 1/3 test, stratified, seed 0. ``root`` and ``download`` are unused:
    the data ships with scikit-learn."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=1 / 3, random_state=0,
                                           stratify=bunch.target)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return RawData(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                   [str(c) for c in bunch.target_names])


def _torchvision_loader(name: str, class_name: str, sources: list[str], layout: str, splits: tuple,
                        classes: list | None = None) -> Callable[[str | None, bool], RawData]:
    """The loader of ``torchvision.datasets.<class_name>``, whose files are
    ``sources`` under the root (described by ``layout`` in errors); ``splits``
    are the (train, test) keyword arguments; ``classes`` overrides the
    dataset's own class names."""
    how = _how(name, layout)

    def loader(root: str | None, download: bool) -> RawData:
        root = _check_root(root, how, download)

        def decode() -> RawData:
            import torchvision.datasets

            try:
                train, test = (getattr(torchvision.datasets, class_name)(root, download=download, **split)
                               for split in splits)
            except (RuntimeError, OSError) as exc:  # "Dataset not found or corrupted"; a download that failed
                if download and not isinstance(exc, FileNotFoundError):  # offline, blocked, or a mirror down
                    reason = str(getattr(exc, "reason", exc)).strip().splitlines()
                    raise FileNotFoundError(f"{name} could not be downloaded into {root!r} "
                                            f"({reason[0] if reason else type(exc).__name__}): place "
                                            f"{layout} yourself, and run without --download") from exc
                raise FileNotFoundError(f"{name} not found (or corrupted) under {root!r}: {how}") from exc
            return RawData(*_tensors(train), *_tensors(test), list(classes or train.classes))

        return _cached(name, root, sources, decode)

    return loader


def _tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision dataset object's images (N, C, H, W) uint8 and labels (N,) int64."""
    images = torch.as_tensor(np.asarray(split.data))
    if images.ndim == 3:  # (N, H, W): MNIST, FashionMNIST
        images = images[:, None]
    elif images.shape[-1] == 3:  # (N, H, W, C): CIFAR
        images = images.permute(0, 3, 1, 2)
    labels = split.labels if hasattr(split, "labels") else split.targets  # SVHN has .labels
    return images.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.int64)


_IMAGEFOLDER_LAYOUT = ("DIR/train/<class>/<image> and DIR/test/<class>/<image> (the same class folders in both, "
                       "every image the same size)")
_CIFAR10_LAYOUT = ("torchvision's cifar-10-batches-py/ folder under DIR, or an ImageFolder copy "
                   "(DIR/train/<class>/<image>, DIR/test/<class>/<image>, the 10 CIFAR-10 classes, 32x32 RGB)")


def _imagefolder(root: str | None, download: bool) -> RawData:
    """Any ``root/{train,test}/<class>/<image>`` tree (``download`` is unused)."""
    return _imagefolder_data(root, _how("imagefolder", _IMAGEFOLDER_LAYOUT, download=False))


def _imagefolder_data(root: str | None, how: str) -> RawData:
    """The ImageFolder tree under ``root``, decoded or from the cache; ``how``
    ends the error messages."""
    root = _check_root(root, how)
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(root, split)):
            raise FileNotFoundError(f"{os.path.join(root, split)!r} does not exist: {how}")
    return _cached("imagefolder", root, ["train", "test"], lambda: _decode_imagefolder(root, how))


def _decode_imagefolder(root: str, how: str) -> RawData:
    """Decode ``root/{train,test}/<class>/<image>``: classes sorted by folder
    name, images sorted by path, uint8 (N, C, H, W) with C = 1 when every image
    is grayscale, else 3 (gray repeated, alpha dropped)."""
    classes = {split: sorted(entry.name for entry in os.scandir(os.path.join(root, split))
                             if entry.is_dir() and not entry.name.startswith("."))
               for split in ("train", "test")}
    for split, other in (("train", "test"), ("test", "train")):
        for name in classes[split]:
            if name not in classes[other]:
                raise ValueError(f"{os.path.join(root, split, name)!r} has no counterpart in "
                                 f"{os.path.join(root, other)!r}: {how}")
    if not classes["train"]:
        raise ValueError(f"{os.path.join(root, 'train')!r} holds no class folders: {how}")
    paths, labels = {}, {}
    for split in ("train", "test"):
        paths[split], labels[split] = [], []
        for label, name in enumerate(classes["train"]):
            folder = os.path.join(root, split, name)
            found = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                           if f.lower().endswith(_IMAGE_EXTENSIONS) and not f.startswith("."))
            if not found:
                raise ValueError(f"{folder!r} holds no images ({', '.join(_IMAGE_EXTENSIONS)}): {how}")
            paths[split] += found
            labels[split] += [label] * len(found)
    images = _decode_same_size(paths["train"] + paths["test"], how)
    n_train = len(paths["train"])
    return RawData(images[:n_train], torch.tensor(labels["train"]), images[n_train:],
                   torch.tensor(labels["test"]), classes["train"])


def _decode_same_size(paths: list[str], how: str) -> torch.Tensor:
    """Decode image files that must share one size -> (N, C, H, W) uint8, C = 1
    if every file is grayscale (with or without alpha), else 3."""
    images = [_decode(path) for path in paths]
    expected = images[0].shape[1:]
    for path, image in zip(paths, images):
        if image.shape[1:] != expected:
            raise ValueError(f"{path!r} is {image.shape[1]}x{image.shape[2]} (height x width) but {paths[0]!r} "
                             f"is {expected[0]}x{expected[1]}; every image must have the same size: {how}")
    if all(len(image) <= 2 for image in images):
        return torch.stack([image[:1] for image in images])
    return torch.stack([image[:3] if len(image) >= 3 else image[:1].expand(3, -1, -1) for image in images])


def _decode(path: str) -> torch.Tensor:
    """One image file -> (C, H, W) uint8 with its stored channels (1-4);
    ValueError naming the file when it cannot be read."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(path, mode=ImageReadMode.UNCHANGED)
    except RuntimeError as exc:
        raise ValueError(f"cannot read image {path!r}: not a valid JPEG, PNG, WEBP or GIF file") from exc


_cifar10_batches = _torchvision_loader("cifar10", "CIFAR10", ["cifar-10-batches-py"], _CIFAR10_LAYOUT, _TRAIN_TEST)


def _cifar10(root: str | None, download: bool) -> RawData:
    """CIFAR-10 from an ImageFolder copy when ``root`` has train/ and test/
    folders, else from torchvision's batches (downloaded if ``download``)."""
    if root is None or not all(os.path.isdir(os.path.join(root, split)) for split in ("train", "test")):
        return _cifar10_batches(root, download)
    how = _how("cifar10", _CIFAR10_LAYOUT)
    raw = _imagefolder_data(root, how)
    if raw.classes != _CIFAR10_CLASSES or tuple(raw.train_images.shape[1:]) != (3, 32, 32):
        raise ValueError(f"{root!r} holds classes {raw.classes} of {tuple(raw.train_images.shape[1:])} "
                         f"images: {how}")
    return raw


register_dataset("digits", _digits)
register_dataset("mnist", _torchvision_loader(
    "mnist", "MNIST", ["MNIST/raw"], "torchvision's MNIST/raw/ folder (the four IDX files, gunzipped) under DIR",
    _TRAIN_TEST, _DIGIT_NAMES), stats=((0.1307,), (0.3081,)))
register_dataset("fashionmnist", _torchvision_loader(
    "fashionmnist", "FashionMNIST", ["FashionMNIST/raw"],
    "torchvision's FashionMNIST/raw/ folder (the four IDX files, gunzipped) under DIR", _TRAIN_TEST),
    stats=((0.2861,), (0.3530,)))
register_dataset("svhn", _torchvision_loader(
    "svhn", "SVHN", ["train_32x32.mat", "test_32x32.mat"], "torchvision's train_32x32.mat and test_32x32.mat in DIR",
    ({"split": "train"}, {"split": "test"}), _DIGIT_NAMES),
    stats=((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)))
register_dataset("cifar10", _cifar10, stats=((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)))
register_dataset("cifar100", _torchvision_loader(
    "cifar100", "CIFAR100", ["cifar-100-python"], "torchvision's cifar-100-python/ folder under DIR", _TRAIN_TEST),
    stats=((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)))
register_dataset("imagefolder", _imagefolder)
