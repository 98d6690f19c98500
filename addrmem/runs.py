"""Run folders: what a distillation writes, its checkpoints, its log and its pictures.

A run folder holds

=================== ================================================================
``config.yaml``     the config (:meth:`addrmem.config.DistillConfig.to_yaml`)
``log.jsonl``       one JSON record per outer iteration: ``iteration``,
                    ``loss`` and ``grad_norm`` (of that iteration's update),
                    ``val_mean``/``val_std`` (%, of the memory before it, when
                    evaluated; the last record has only these) and ``seconds``
``checkpoint.pt``   everything needed to resume exactly
``memory.pt``       the chosen memory (:func:`addrmem.memory.load_memory`)
``bases.png``,      the bases (each scaled to [0, 1]) and the recalled images,
``recall.png``      one row per class, normalisation undone (:func:`save_grids`)
``results.json``    the final comparison (:func:`addrmem.experiment.run_experiment`)
``baseline-image/`` the same files for the ImageMemory baseline
=================== ================================================================

Every file is written atomically (:mod:`addrmem.files`), except that
``log.jsonl`` is appended a record at a time; a checkpoint says how many
records it covers, and a resumed run drops the rest.
"""

from __future__ import annotations

import json
import math
import os

import torch.nn.functional as F

from . import parallel
from .data import to_display
from .files import atomic_torch_save, atomic_write, atomic_write_text, load_torch
from .memory import AddressableMemory

__all__ = ["BASELINE_DIR", "CHECKPOINT_FORMAT", "cpu_state", "create_run_folder", "load_checkpoint", "open_run_folder",
           "read_json", "read_log", "read_run_config", "report_state", "save_checkpoint", "save_grids", "write_log"]

CHECKPOINT_FORMAT = 1
BASELINE_DIR = "baseline-image"


def create_run_folder(run_dir: str) -> None:
    """Create ``run_dir`` (and its parents) for a new run. Raises
    FileExistsError if it holds anything (or is a file), NotADirectoryError
    if a part of its path is a file, OSError if it cannot be created."""
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        raise FileExistsError(f"{run_dir!r} is not empty: choose another output folder, or resume it")
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise FileExistsError(f"{run_dir!r} is a file, not a folder: choose another output folder")
    parent = os.path.dirname(os.path.abspath(run_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"cannot create the run folder {run_dir!r}: {parent!r} is a file, not a folder: "
                                 f"choose another output folder")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, run_dir) from exc


def read_run_config(run_dir: str, config_class):
    """The config (an instance of ``config_class``: DistillConfig or
    ContinualConfig) saved in ``run_dir``/config.yaml. Raises
    FileNotFoundError if there is none, ValueError if it is not a valid
    config."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} is not an addrmem run folder (no config.yaml): give the folder "
                                f"that addrmem wrote")
    return config_class.from_yaml(path)


def open_run_folder(run_dir: str, config, resume) -> str:
    """Open ``run_dir`` for a run of ``config`` (a DistillConfig or
    ContinualConfig): with ``resume`` False, start it (create the folder,
    which must be new or empty, and write config.yaml); with True, continue
    it (its config.yaml must be ``config``); with "auto", continue it if it
    holds config.yaml and start it otherwise (what torchrun's restarts and a
    scheduler's requeues need). Returns "started", "resumed" (it holds a
    checkpoint), "restarted" (it was stopped before its first checkpoint,
    so it starts over) or "finished" (it holds results.json). Raises
    FileNotFoundError, ValueError (another config), FileExistsError,
    NotADirectoryError or OSError, naming the fix."""
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume must be False, True or 'auto'; got {resume!r}")
    saved = os.path.join(run_dir, "config.yaml")
    if resume is False or (resume == "auto" and not os.path.isfile(saved)):
        create_run_folder(run_dir)
        config.to_yaml(saved)
        return "started"
    if read_run_config(run_dir, type(config)) != config:
        raise ValueError(f"{run_dir!r} holds a run of another config: give another output folder, or resume it "
                         f"with its own config (--resume {run_dir})")
    if os.path.exists(os.path.join(run_dir, "results.json")):
        return "finished"
    return "resumed" if os.path.exists(os.path.join(run_dir, "checkpoint.pt")) else "restarted"


def report_state(run_dir: str, state: str) -> None:
    """Say on rank 0 what :func:`open_run_folder` found, unless it started a new run."""
    notes = {"resumed": f"resuming {run_dir} from its last checkpoint",
             "restarted": f"{run_dir} stopped before its first checkpoint: starting it over",
             "finished": f"{run_dir} had finished: its saved results"}
    if state in notes and parallel.is_writer():
        print(notes[state], flush=True)


def read_json(path: str):
    """The JSON document in the file ``path``; ValueError naming the file if it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path!r} is not valid JSON ({exc}): delete it, then resume the run") from exc


def save_checkpoint(path: str, state: dict) -> None:
    """Write a checkpoint: ``state`` (plain data and tensors, without the
    format number, which is added) to ``path``, atomically."""
    atomic_torch_save(path, {"format": CHECKPOINT_FORMAT, **state})


def load_checkpoint(path: str, config: dict) -> dict:
    """The checkpoint at ``path`` (a dict as given to :func:`save_checkpoint`,
    plus "format"), after checking its bytes (CRC-32), its format and that it
    was written with ``config`` (a :meth:`~addrmem.config.DistillConfig.to_dict`).
    Raises ValueError naming the file and the fix."""
    fix = f"delete {os.path.dirname(path) or '.'!r} and start the run again"
    try:
        blob = load_torch(path, "an addrmem checkpoint")
    except ValueError as exc:
        raise ValueError(f"{exc}: {fix}") from exc
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not an addrmem checkpoint (format {CHECKPOINT_FORMAT}): {fix}")
    if blob.get("config") != config:
        raise ValueError(f"{path!r} was written with another config than the run's config.yaml: {fix}")
    return blob


def read_log(path: str, records: int | None = None) -> list:
    """The first ``records`` (default: all) records of a log.jsonl, as dicts;
    lines after them (perhaps half-written) are not read. Raises ValueError
    naming the file and line if one of them is not a JSON record, or if the
    file has fewer than ``records``."""
    if not os.path.exists(path):
        lines = []
    else:
        with open(path, "rb") as f:
            lines = [line for line in f if line.strip()]
    if records is not None and len(lines) < records:
        raise ValueError(f"{path!r} has {len(lines)} records, fewer than the {records} its checkpoint covers: "
                         f"the log was cut; restore it, or delete the run folder and start again")
    log = []
    for number, line in enumerate(lines[:records], 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError too
            raise ValueError(f"{path!r}: record {number} is garbled ({exc}); the checkpoint is fine: repair or "
                             f"restore that line, then resume") from exc
        log.append(record)
    return log


def write_log(path: str, records: list) -> None:
    """Write ``records`` (dicts) as a log.jsonl, atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def save_grids(memory, folder: str, max_per_class: int = 16) -> list:
    """Write PNG grids of a memory saved with its dataset's ``preprocessing``
    in ``memory.extra`` (as :func:`addrmem.distill.distill` does):
    ``recall.png`` (one row per class, its first ``max_per_class`` images,
    with the normalisation and any ZCA whitening undone by
    :func:`addrmem.data.to_display`) and, for an addressable memory,
    ``bases.png`` (each base (C, h, w) scaled to [0, 1]). Tiles are enlarged
    (nearest) to at least 32 px. Returns the paths written. Raises
    ValueError if ``memory.extra`` has no preprocessing."""
    from torchvision.utils import save_image

    if "preprocessing" not in memory.extra:
        raise ValueError("the memory was saved without its dataset's preprocessing, which the pictures undo: "
                         "save it with memory.save(path, preprocessing=dataset.preprocessing())")
    images, _ = memory.recall()
    per_class = min(memory.per_class, max_per_class)
    images = images.float().cpu().view(memory.num_classes, memory.per_class, *images.shape[1:])
    grids = {"recall.png": (to_display(images[:, :per_class].flatten(0, 1), memory.extra["preprocessing"]),
                            per_class)}
    if isinstance(memory, AddressableMemory):
        bases = memory.bases.detach().float().cpu()
        lo = bases.amin(dim=(1, 2, 3), keepdim=True)
        hi = bases.amax(dim=(1, 2, 3), keepdim=True)
        grids["bases.png"] = ((bases - lo) / (hi - lo).clamp_min(1e-12), min(len(bases), 16))
    paths = []
    for name, (tiles, nrow) in grids.items():
        path = os.path.join(folder, name)
        atomic_write(path, lambda f: save_image(enlarge(tiles), f, format="png", nrow=nrow, padding=1,
                                                pad_value=1.0))
        paths.append(path)
    return paths


def enlarge(images):
    """Images (N, C, H, W) scaled up by nearest neighbours to at least 32
    pixels a side, for pictures."""
    factor = max(1, math.ceil(32 / min(images.shape[-2:])))
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def cpu_state(state: dict) -> dict:
    """A copy of a state dict with every tensor detached, on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}
