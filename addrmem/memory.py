"""Distilled memories: what addrmem learns, stores, saves and recalls.

:class:`AddressableMemory` is the paper's memory (docs/method.md, "The
memory"): K shared bases M (stored at 1/ds resolution) and one addressing row
per synthetic image, ``addresses[c * per_class + i] = A_i[c, :]``. Every image
it makes comes from :func:`addrmem.ops.synthesize`. :class:`ImageMemory` is the
baseline without addressing: one free image per slot. Both share one interface:

* ``memory(index)`` -> (images, labels) for rows ``index`` (differentiable);
* ``memory.recall()`` / ``memory.recall(queries)`` -> the whole memory, or the
  images of general label queries (no gradients);
* ``memory.sample_index(classes, n_per_c, generator)`` -> one inner step's rows;
* storage: ``storage`` (shared floats, floats per row), ``rows_per_class``
  (for a budget in floats), ``from_budget``, ``num_floats``, ``truncate``
  (the first rows of each class);
* ``config``, ``save`` and :func:`load_memory`.

Rows are grouped by class: rows ``[c * per_class, (c + 1) * per_class)`` hold
class ``c``, and their labels (the ``labels`` buffer) are fixed.

Index checking: ``memory(index)`` checks an index's type, shape and device in
Python; its range is checked where the rows are read (an ``IndexError`` on the
CPU, a device-side assertion on CUDA), with no host synchronisation.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from .files import atomic_torch_save, load_torch
from .networks import _positive_int
from .ops import synthesize, validate_index

__all__ = ["AddressableMemory", "ImageMemory", "load_memory"]


def _image_shape(image_shape):
    if not isinstance(image_shape, (tuple, list, torch.Size)) or len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W); got {image_shape!r}")
    return tuple(_positive_int(f"image_shape[{i}]", s) for i, s in enumerate(image_shape))


def _xavier_uniform(shape, fan_sum, generator):
    """Uniform(-b, b) with b = sqrt(6 / fan_sum), drawn from ``generator``."""
    bound = math.sqrt(6.0 / fan_sum)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class _Memory(nn.Module):
    """What both memories share: labels, indexing, queries, sampling, saving.

    Subclasses implement ``_images(index)`` (rows -> images, differentiable),
    ``_mix(queries)`` (general queries -> images) and ``config()``.
    """

    def __init__(self, num_classes, image_shape, per_class):
        super().__init__()
        self.num_classes = _positive_int("num_classes", num_classes)
        self.image_shape = _image_shape(image_shape)
        self.per_class = _positive_int("per_class", per_class)
        self.rows = num_classes * per_class
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        # Derived from the config, so not saved: a file cannot carry other labels.
        self.register_buffer("labels", labels, persistent=False)
        self.extra = {}  # the extras a loaded memory was saved with (see load_memory)

    @property
    def device(self) -> torch.device:
        """The device of the memory's tensors."""
        return self.labels.device

    def num_floats(self) -> int:
        """Stored floats: all parameters (labels are not counted)."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def storage(cls, image_shape, **shape) -> tuple[int, int]:
        """(floats shared by all rows, floats of one row) of a memory of
        ``image_shape`` (C, H, W) and ``shape`` (the subclass's other
        constructor arguments, e.g. n_bases and downsample)."""
        raise NotImplementedError

    @classmethod
    def rows_per_class(cls, budget_floats: int, num_classes: int, image_shape, **shape) -> int:
        """The most rows per class that fit ``budget_floats`` floats together
        with the shared part (:meth:`storage`); 0 or less when not even one
        row per class fits."""
        shared, row = cls.storage(image_shape, **shape)
        return (budget_floats - shared) // (num_classes * row)

    def shape(self) -> dict:
        """The ``shape`` keyword arguments of :meth:`storage` for this memory."""
        return {name: value for name, value in self.config().items()
                if name not in ("num_classes", "image_shape", "per_class")}

    @torch.no_grad()
    def truncate(self, per_class: int) -> "_Memory":
        """A memory of the same kind, dtype and device holding the first
        ``per_class`` rows of each class and everything shared (the bases);
        self if it holds no more than that."""
        _positive_int("per_class", per_class)
        if per_class >= self.per_class:
            return self
        kept = type(self)(**{**self.config(), "per_class": per_class}, generator=torch.Generator())
        kept.to(self.labels.device, next(self.parameters()).dtype)
        for name, p in self.named_parameters():
            target = getattr(kept, name)
            if target.shape == p.shape:  # shared by all rows
                target.copy_(p)
            else:  # one entry per row, rows grouped by class
                rows = p.view(self.num_classes, self.per_class, *p.shape[1:])[:, :per_class]
                target.copy_(rows.reshape(target.shape))
        return kept

    def validate_index(self, index: torch.Tensor) -> torch.Tensor:
        """Check a (N,) integer row index's type, shape and device; returns it
        as int64. Rows outside [0, rows) fail where they are read."""
        return validate_index(index, self.device)

    def forward(self, index: torch.Tensor | None = None):
        """Images and labels of rows ``index`` ((N,) int; all rows if None).

        Returns (images (N, C, H, W), labels (N,) int64), differentiable in the
        parameters. A row outside [0, rows) raises ``IndexError`` (a
        device-side assertion on CUDA).
        """
        if index is None:
            return self._images(None), self.labels.clone()
        index = self.validate_index(index)
        return self._images(index), self.labels[index]

    @torch.no_grad()
    def recall(self, queries: torch.Tensor | None = None):
        """Recall images, without gradients (use ``memory(index)`` to train).

        ``recall()`` -> (images (rows, C, H, W), labels (rows,) int64): the
        whole memory, row order as stored.

        ``recall(queries)`` with float queries (B, num_classes) -> (images (B *
        per_class, C, H, W), soft labels (B * per_class, num_classes)):
        x'_i(y)^T = y^T A_i M for each query y and slot i (docs/method.md, "The
        memory"), in query-major order (row ``b * per_class + i`` is query b,
        slot i); each image's label is its query. Linear in the queries, and
        one-hot queries e_c give exactly ``recall()``'s images of class c.
        """
        if queries is None:
            return self(None)
        if not isinstance(queries, torch.Tensor) or not queries.dtype.is_floating_point:
            raise TypeError("queries must be a floating tensor (B, num_classes)")
        if queries.dim() != 2 or queries.shape[1] != self.num_classes:
            raise ValueError(
                f"queries must have shape (B, {self.num_classes}); got {tuple(queries.shape)}"
            )
        if queries.device != self.device:
            raise ValueError(f"queries are on {queries.device} but the memory is on {self.device}")
        queries = queries.to(next(self.parameters()).dtype)
        return self._mix(queries), queries.repeat_interleave(self.per_class, dim=0)

    def _mix_rows(self, queries, table):
        """Per slot i, the query-weighted sum of the class rows of ``table``
        (rows, D): (B, num_classes) -> (B * per_class, D)."""
        table = table.reshape(self.num_classes, self.per_class, -1)
        return torch.einsum("bc,cpd->bpd", queries, table).reshape(-1, table.shape[-1])

    def sample_index(self, classes, n_per_c: int, generator: torch.Generator | None) -> torch.Tensor:
        """One inner step's rows (docs/method.md, "One outer iteration"):
        for each class in ``classes`` (sequence or 1-D tensor of distinct
        class ids), ``n_per_c`` distinct rows of that class chosen uniformly
        at random.

        Returns an int64 (len(classes) * n_per_c,) index on the memory's device,
        class-major in the order of ``classes``. All randomness comes from
        ``generator`` (drawn on its device).
        """
        classes = torch.as_tensor(classes)
        if classes.dim() != 1 or classes.numel() == 0 or classes.dtype.is_floating_point:
            raise ValueError(f"classes must be a non-empty 1-D sequence of class ids; got {classes!r}")
        classes = classes.long().cpu()
        if int(classes.min()) < 0 or int(classes.max()) >= self.num_classes:
            raise ValueError(f"classes must lie in [0, {self.num_classes}); got {classes.tolist()}")
        if classes.unique().numel() != classes.numel():
            raise ValueError(f"classes must be distinct; got {classes.tolist()}")
        _positive_int("n_per_c", n_per_c)
        if n_per_c > self.per_class:
            raise ValueError(f"n_per_c={n_per_c} exceeds the {self.per_class} rows per class")
        draw_device = generator.device if generator is not None else torch.device("cpu")
        # The top n_per_c of per_class iid uniforms is a uniform random subset.
        keys = torch.rand(classes.numel(), self.per_class, generator=generator,
                          dtype=torch.float64, device=draw_device)
        rows = keys.topk(n_per_c, dim=1).indices + classes.to(draw_device)[:, None] * self.per_class
        return rows.reshape(-1).to(self.device)

    def _check_real(self, images, labels):
        num_classes, image_shape = self.num_classes, self.image_shape
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError("images and labels must be tensors")
        if images.dim() != 4 or tuple(images.shape[1:]) != tuple(image_shape) or not images.is_floating_point():
            raise ValueError(f"images must be floating (N, {', '.join(map(str, image_shape))}); got "
                             f"{images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1] or labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64 ({images.shape[0]},); got {labels.dtype} {tuple(labels.shape)}")
        missing = sorted(set(range(num_classes)) - set(labels.unique().tolist()))
        if missing or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}) and cover every class; "
                             f"{'missing ' + str(missing) if missing else 'some lie outside'}")

    def _pick_real(self, labels, generator) -> torch.Tensor:
        """``per_class`` indices of real images of each class, class-major: a
        random subset without repeats (with repeats where a class has fewer
        images), drawn from ``generator``."""
        picks = []
        for c in range(self.num_classes):
            members = (labels == c).nonzero().squeeze(1).cpu()
            if len(members) >= self.per_class:
                picks.append(members[torch.randperm(len(members), generator=generator)[:self.per_class]])
            else:
                picks.append(members[torch.randint(len(members), (self.per_class,), generator=generator)])
        return torch.cat(picks)

    def save(self, path, **extra) -> None:
        """Write the memory to one file, atomically (torch.save of {"kind",
        "config", "state_dict", "extra"}), loadable with :func:`load_memory`.
        ``extra`` values must be plain data: None, bool, int, float, str,
        tensors, and lists, tuples and str-keyed dicts of these. Raises
        OSError (naming ``path``) if it cannot be written."""
        for key, value in extra.items():
            _check_plain(value, f"extra[{key!r}]")
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        atomic_torch_save(path, {"kind": type(self).__name__, "config": self.config(), "state_dict": state,
                                 "extra": extra})


def _check_plain(value, where):
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-str key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; saved extras must be plain data")


class AddressableMemory(_Memory):
    """K shared bases plus one addressing row per synthetic image
    (docs/method.md, "The memory").

    Parameters: ``bases`` (n_bases, C, H/ds, W/ds) and ``addresses``
    (num_classes * per_class, n_bases), Xavier-uniform initialised as the
    official code (docs/method.md, "The memory") from ``generator`` (the
    global RNG if None).
    Images are ``upsample_ds(addresses[row] @ bases)`` (C, H, W).
    """

    def __init__(self, num_classes: int, image_shape, n_bases: int, per_class: int,
                 downsample: int = 1, *, generator: torch.Generator | None = None):
        super().__init__(num_classes, image_shape, per_class)
        self.n_bases = _positive_int("n_bases", n_bases)
        self.downsample = _positive_int("downsample", downsample)
        c, h, w = self.image_shape
        if h % downsample or w % downsample:
            raise ValueError(f"image size {h}x{w} is not divisible by downsample={downsample}")
        low = (c, h // downsample, w // downsample)
        d_low = math.prod(low)
        self.bases = nn.Parameter(_xavier_uniform((n_bases, *low), n_bases + d_low, generator))
        self.addresses = nn.Parameter(_xavier_uniform((self.rows, n_bases), self.rows + n_bases, generator))

    @classmethod
    def storage(cls, image_shape, n_bases: int, downsample: int = 1) -> tuple[int, int]:
        """(floats of the bases, floats of one addressing row) of a memory of
        this shape: (K*C*(H/ds)*(W/ds), K). Raises ValueError for a shape that
        does not fit."""
        k, ds = _positive_int("n_bases", n_bases), _positive_int("downsample", downsample)
        c, h, w = _image_shape(image_shape)
        if h % ds or w % ds:
            raise ValueError(f"image size {h}x{w} is not divisible by downsample={ds}")
        return k * c * (h // ds) * (w // ds), k

    @classmethod
    def from_budget(cls, ipc: int, num_classes: int, image_shape, n_bases: int, downsample: int = 1,
                    **kw) -> "AddressableMemory":
        """The memory that fits a storage budget of ``ipc`` raw images per class
        (docs/method.md, "The storage budget"; ``cal_ncoef``): per_class
        r = floor((ipc*C*H*W*n - K*C*(H/ds)*(W/ds)) / (n*K)). Raises
        ValueError if r < 1, naming the largest n_bases that fits. ``kw`` goes
        to the constructor."""
        ipc, n = _positive_int("ipc", ipc), _positive_int("num_classes", num_classes)
        budget = ipc * math.prod(_image_shape(image_shape)) * n
        per_class = cls.rows_per_class(budget, n, image_shape, n_bases=n_bases, downsample=downsample)
        if per_class < 1:
            d_low = cls.storage(image_shape, 1, downsample)[0]
            k_max = budget // (d_low + n)  # largest K with budget - K*d_low >= n*K
            fits = (f"at most n_bases={k_max} fits" if k_max >= 1
                    else "no n_bases fits; lower downsample or raise ipc")
            raise ValueError(
                f"n_bases={n_bases} bases of {d_low} floats leave no addressing row per class within a "
                f"budget of {ipc} image(s) per class ({budget} floats): {fits}"
            )
        return cls(n, image_shape, n_bases, per_class, downsample, **kw)

    @torch.no_grad()
    def init_from_real(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                       *, bases: bool = True) -> "AddressableMemory":
        """Start from real images (docs/method.md, "Starting from real data"),
        in place; returns self.

        ``images`` (N, C, H, W) floating, ``labels`` (N,) int64 covering every
        class. With ``bases`` the K bases become the best rank-K basis of the
        images as this memory can recall them: each image's least-squares
        low-resolution version Z (the one whose upsampling is closest to it),
        then the top K principal directions of Z (uncentred, as the memory has
        no mean term) in the metric of the upsampling, so that
        ``upsample(a @ bases)`` is the best rank-K recall of the data. Without
        ``bases`` the current bases are kept (e.g. frozen shared ones). Each
        row of class c then holds the coordinates of a random real image of
        class c over the bases (its least-squares address), drawn from
        ``generator`` without repeats where the class has enough images. The
        bases are scaled so that bases and addresses have the same RMS, which
        lets one outer learning rate move both. Raises TypeError or
        ValueError for images or labels that do not fit.
        """
        self._check_real(images, labels)
        param = self.bases
        picks = self._pick_real(labels, generator)
        low, metric = self._least_squares_low(images.to(param.device, torch.float64))  # (N, d_low), (d_low, d_low)
        if bases:
            _, _, vh = torch.linalg.svd(low @ metric, full_matrices=False)  # metric-orthonormal directions
            k = min(self.n_bases, vh.shape[0])
            basis = torch.zeros(self.n_bases, low.shape[1], dtype=torch.float64, device=low.device)
            basis[:k] = torch.linalg.solve(metric, vh[:k].T).T  # back from the metric's coordinates
        else:
            basis = self.bases.detach().reshape(self.n_bases, -1).to(torch.float64)
        # Least-squares addresses in the metric: argmin_a ||metric (z - a B)||.
        gram = basis @ metric @ metric @ basis.T
        coords = torch.linalg.lstsq(gram, basis @ metric @ metric @ low[picks].T).solution.T  # (rows, K)
        if bases:
            scale = (coords.square().mean() / basis.square().mean().clamp_min(1e-300)).sqrt().sqrt()
            scale = float(scale) if float(scale) > 0 else 1.0
            basis, coords = basis * scale, coords / scale
            self.bases.copy_(basis.view_as(self.bases).to(param.dtype))
        self.addresses.copy_(coords.to(param.dtype))
        return self

    def _least_squares_low(self, images):
        """(Z (N, d_low), L (d_low, d_low)): the low-resolution images whose
        upsampling U (this memory's, :func:`addrmem.ops.synthesize`) best fits
        ``images`` (N, C, H, W), Z = (U^T U)^-1 U^T x, and L = (U^T U)^(1/2),
        with ||U z|| = ||L z||. U is separable (rows, columns, per channel),
        so both are built from its 1-D factors."""
        c, h, w = self.image_shape
        ds = self.downsample
        if ds == 1:
            eye = torch.eye(c * h * w, dtype=images.dtype, device=images.device)
            return images.reshape(len(images), -1), eye

        def factor(n):  # U_1d (n, n // ds), read off the op itself: the upsampling of each unit vector
            unit = torch.eye(n // ds, dtype=images.dtype, device=images.device)
            return synthesize(unit, unit.view(n // ds, 1, n // ds, 1), scale=ds)[:, 0, :, 0].T
        uh, uw = factor(h), factor(w)

        def sqrt_psd(m):
            vals, vecs = torch.linalg.eigh(m)
            return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
        pinv_h, pinv_w = torch.linalg.pinv(uh), torch.linalg.pinv(uw)
        z = torch.einsum("ah,nchw,bw->ncab", pinv_h, images, pinv_w).reshape(len(images), -1)
        lh, lw = sqrt_psd(uh.T @ uh), sqrt_psd(uw.T @ uw)
        metric = torch.kron(torch.eye(c, dtype=images.dtype, device=images.device), torch.kron(lh, lw))
        return z, metric

    def config(self) -> dict:
        """The constructor's keyword arguments (without ``generator``)."""
        return {"num_classes": self.num_classes, "image_shape": self.image_shape,
                "n_bases": self.n_bases, "per_class": self.per_class, "downsample": self.downsample}

    def _images(self, index):
        return synthesize(self.addresses, self.bases, index=index, scale=self.downsample)

    def _mix(self, queries):
        rows = self._mix_rows(queries, self.addresses)
        return synthesize(rows, self.bases, scale=self.downsample)


class ImageMemory(_Memory):
    """The baseline without addressing: one free image per slot.

    Parameter ``images`` (num_classes * per_class, C, H, W), Xavier-uniform
    initialised as the official ``imgs_embedding`` compressor (bound
    sqrt(6 / (rows + C*H*W)), docs/method.md, "The memory") from
    ``generator``.
    """

    def __init__(self, num_classes: int, image_shape, per_class: int, *,
                 generator: torch.Generator | None = None):
        super().__init__(num_classes, image_shape, per_class)
        d = math.prod(self.image_shape)
        self.images = nn.Parameter(_xavier_uniform((self.rows, *self.image_shape), self.rows + d, generator))

    @classmethod
    def storage(cls, image_shape) -> tuple[int, int]:
        """(0 shared floats, C*H*W floats per image)."""
        return 0, math.prod(_image_shape(image_shape))

    @classmethod
    def from_budget(cls, ipc: int, num_classes: int, image_shape, **kw) -> "ImageMemory":
        """``ipc`` images per class: the budget is spent on the images themselves."""
        return cls(num_classes, image_shape, ipc, **kw)

    @torch.no_grad()
    def init_from_real(self, images: torch.Tensor, labels: torch.Tensor,
                       generator: torch.Generator | None = None) -> "ImageMemory":
        """Start from real images, in place: each slot of class c holds a random
        real image of class c from ``images`` (N, C, H, W) with ``labels`` (N,)
        int64 covering every class, drawn from ``generator`` without repeats
        where the class has enough images. Returns self."""
        self._check_real(images, labels)
        picks = self._pick_real(labels, generator)
        self.images.copy_(images[picks].to(self.images))
        return self

    def config(self) -> dict:
        """The constructor's keyword arguments (without ``generator``)."""
        return {"num_classes": self.num_classes, "image_shape": self.image_shape,
                "per_class": self.per_class}

    def _images(self, index):
        # index_select, not images[index]: a negative row raises IndexError instead of counting from the end
        return self.images.clone() if index is None else self.images.index_select(0, index)

    def _mix(self, queries):
        return self._mix_rows(queries, self.images).view(-1, *self.image_shape)


_KINDS = {cls.__name__: cls for cls in (AddressableMemory, ImageMemory)}


def load_memory(path, map_location="cpu") -> _Memory:
    """Load a memory written by ``memory.save(path)``; returns an
    :class:`AddressableMemory` or :class:`ImageMemory` on ``map_location``
    (a device), with the saved dtype, ready to recall; ``memory.extra`` is
    the dict of extras it was saved with. Raises ValueError for a file that
    is not an addrmem memory or whose bytes are corrupt (the archive's CRCs
    are checked)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no memory file at {path!r}")
    blob = load_torch(path, "a readable addrmem memory file")
    if not isinstance(blob, dict) or set(blob) != {"kind", "config", "state_dict", "extra"}:
        raise ValueError(f"{path!r} is not an addrmem memory file (expected keys kind, config, "
                         f"state_dict, extra)")
    cls = _KINDS.get(blob["kind"])
    if cls is None:
        raise ValueError(f"{path!r} holds an unknown memory kind {blob['kind']!r}; known: {sorted(_KINDS)}")
    state = blob["state_dict"]
    if (not isinstance(state, dict) or not state
            or not all(isinstance(v, torch.Tensor) and v.dtype.is_floating_point for v in state.values())):
        raise ValueError(f"{path!r} has a malformed state_dict")
    try:
        memory = cls(**blob["config"], generator=torch.Generator())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} has an invalid {blob['kind']} config {blob['config']!r}: {exc}") from exc
    memory.to(dtype=next(iter(state.values())).dtype)
    try:
        memory.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path!r}: the saved tensors do not match its config: {exc}") from exc
    memory.extra = blob["extra"]
    return memory.to(map_location)
