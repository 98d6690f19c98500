"""Files written whole or not at all, and read back checked.

Every file addrmem writes (configs, logs, checkpoints, memories, pictures,
results) goes through :func:`atomic_write`: a temporary file next to the
target, then ``os.replace``, so an interrupted or failed write leaves the old
file intact. A write that fails (full disk, read-only folder) removes its
temporary file and raises ``OSError`` with the errno and the target's path.

``torch.save`` files are zip archives holding a CRC-32 of every record, which
``torch.load`` does not check: :func:`load_torch` does, so bytes overwritten
inside tensor data are refused instead of loaded.
"""

from __future__ import annotations

import os
import zipfile

import torch

__all__ = ["atomic_write", "atomic_write_text", "atomic_torch_save", "load_torch"]


def atomic_write(path, write, binary: bool = True) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file ``path.tmp``
    (opened "wb", or "w" if not ``binary``), which then replaces ``path``.
    Raises OSError (errno and ``filename=path`` set) if it cannot be written;
    ``path`` is then unchanged and no temporary file is left."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(exc.errno, exc.strerror or str(exc), path) from exc


def atomic_write_text(path, text: str) -> None:
    """Write the string ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_torch_save(path, obj) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path, what: str):
    """``torch.load(path, map_location="cpu", weights_only=True)`` after
    checking the CRC-32 of every record of the archive. Raises ValueError
    naming ``path`` and ``what`` it should be (e.g. "an addrmem memory file")
    if it is truncated, corrupt or not loadable."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise ValueError(f"{path!r} is not {what}: it is truncated or corrupt ({exc})") from exc
    if bad is not None:
        raise ValueError(f"{path!r} is corrupt: the bytes of its record {bad!r} fail their CRC-32 check")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a malformed archive
        lines = str(exc).strip().splitlines()
        raise ValueError(f"{path!r} is not {what}: {lines[0] if lines else type(exc).__name__}") from exc
