"""Data-parallel distillation over processes with torch.distributed
(docs/scaling.md).

An outer iteration with ``meta_batch`` M averages the hypergradients of M
independent inner trajectories. Under ``torchrun`` the ranks share them
out, trajectory m to rank m mod N (:func:`shard`), and :func:`combine` adds
their results in trajectory order on every rank, so that every rank holds
the same memory and N processes give the memory one process gives with the
same M, bit for bit where each trajectory is computed the same way
(the CPU with gloo at the same thread count). Evaluation networks are
shared out the same way (:func:`gather`). Rank 0 alone writes files;
what it reads for every rank (a checkpoint to resume) it sends to the
others (:func:`from_writer`).

Without a process group, every function here is the single-process case:
rank 0 of 1.

A collective that fails because another process stopped, or did not answer
within the group's timeout, raises :class:`PeerError`. Under torchrun a
process also stops when torchrun itself dies (:func:`setup`).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT", "PeerError", "barrier", "check_device", "check_meta_batch", "combine", "everywhere",
           "exchanged_bytes", "from_writer", "gather", "is_writer", "launched_by_torchrun", "leave", "rank", "setup", "shard",
           "world_size"]

DEFAULT_TIMEOUT = 600
"""Seconds a process waits in a collective for the others before giving up (:func:`setup`)."""


class PeerError(RuntimeError):
    """A collective failed: another process of the group stopped, or did not
    answer within the group's timeout."""


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if _active() else 0


def barrier() -> None:
    """Wait for every process of the group (nothing without one)."""
    if world_size() > 1:
        with _collective():
            dist.barrier()


def leave(code: int = 0) -> None:
    """End a process of a group: leave the group, flush the output and exit
    at once with status ``code``. Exiting without the interpreter's teardown
    keeps the collective library's threads, torn down in an order that
    depends on timing, from aborting (SIGABRT) a process whose work is
    done, as they can on a loaded machine."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def world_size() -> int:
    """The number of processes in the default process group (1 without one)."""
    return dist.get_world_size() if _active() else 1


def is_writer() -> bool:
    """True on the process that writes files: rank 0."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started (it sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def setup(timeout: float = DEFAULT_TIMEOUT) -> str:
    """Join the process group ``torchrun`` describes in the environment
    (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), if it started
    this process with WORLD_SIZE > 1 and no group exists yet: gloo for CPU
    tensors, and NCCL for CUDA tensors when torch sees a GPU, each process
    then on GPU LOCAL_RANK. A collective then waits ``timeout`` seconds for
    the other processes before raising :class:`PeerError`. Under torchrun
    the process is also made to stop when torchrun dies
    (:func:`_stop_with_parent`), whatever the group size. Returns the
    backend, or "" if nothing was started."""
    if launched_by_torchrun():
        _stop_with_parent()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _active():
        return ""
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local < torch.cuda.device_count():
            torch.cuda.set_device(local)
    wait = datetime.timedelta(seconds=timeout)
    store, rank_, size = next(dist.rendezvous("env://", timeout=wait))
    # torchrun keeps one store across its restarts: without a prefix of its own, a restarted group would read
    # the addresses of the processes it replaces, and fail to connect
    store = dist.PrefixStore(f"addrmem/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend, store=store, rank=rank_, world_size=size, timeout=wait)
    return backend


def _stop_with_parent() -> None:
    """Have Linux send this process SIGTERM when its parent (torchrun) dies,
    so that workers never outlive it (prctl PR_SET_PDEATHSIG); exit at once
    if it died already. Does nothing where prctl is not available."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # it died before the signal was armed (torchrun may itself be pid 1)
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def _collective():
    """Turn a collective's failure (a peer that stopped or timed out) into :class:`PeerError`."""
    try:
        yield
    except RuntimeError as exc:
        raise PeerError("another process of the group stopped, or did not answer within the group's timeout "
                        "(torchrun's log says which)") from exc


def check_device(device: torch.device) -> None:
    """Raise ValueError if a process of the group cannot use ``device``
    alone: a GPU named by index (every process would share it), or fewer
    GPUs than processes on this node."""
    if world_size() == 1 or device.type != "cuda":
        return
    if device.index is not None:
        raise ValueError(f"device {str(device)!r} with {world_size()} processes: every process would use that "
                         f"one GPU; use --device cuda (or auto), which gives each process the GPU of its "
                         f"LOCAL_RANK")
    local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= count:
        raise ValueError(f"process LOCAL_RANK {local} has no GPU of its own: this node has {count} CUDA GPU(s); "
                         f"start at most {count} processes per node")


def check_meta_batch(meta_batch: int) -> None:
    """Raise ValueError if ``meta_batch`` trajectories leave a process of the
    group without one (each process computes whole trajectories)."""
    if meta_batch < world_size():
        raise ValueError(f"meta_batch {meta_batch} is smaller than the {world_size()} processes: each process "
                         f"computes whole trajectories; set meta_batch to a multiple of {world_size()}")


def shard(n: int) -> range:
    """The items of 0 .. n-1 this rank computes: m with m mod N = rank."""
    return range(rank(), n, world_size())


def combine(local: list, n: int) -> torch.Tensor:
    """The sum of n vectors, vector m held by rank m mod N: ``local`` holds
    this rank's, in the order of :func:`shard` (n), each (P,), all of one
    dtype and device. Adds them in the order 0, 1, ..., n-1 on every rank,
    so the sum is the same bits as one process adding the n vectors in that
    order. Every rank must call it (a collective all-gather of
    ceil(n/N) * P values per rank; :func:`exchanged_bytes`)."""
    size = world_size()
    if size == 1:
        vectors = local
    else:
        per_rank = -(-n // size)
        mine = torch.zeros(per_rank, local[0].numel(), dtype=local[0].dtype, device=local[0].device)
        if local:
            mine[:len(local)] = torch.stack(local)
        everyone = [torch.empty_like(mine) for _ in range(size)]
        with _collective():
            dist.all_gather(everyone, mine)
        vectors = [everyone[m % size][m // size] for m in range(n)]
    total = vectors[0].clone()
    for vector in vectors[1:]:
        total += vector
    return total


def exchanged_bytes(n: int, numel: int, element_size: int = 4, size: int | None = None) -> int:
    """Bytes each rank receives when :func:`combine` adds n vectors of
    ``numel`` elements over ``size`` ranks (default: this group's): the
    other ranks' ceil(n/size) vectors each, (size-1) * ceil(n/size) * numel *
    element_size; 0 for one process."""
    size = world_size() if size is None else size
    return (size - 1) * -(-n // size) * numel * element_size if size > 1 else 0


def gather(local: list, n: int) -> list:
    """The n items 0 .. n-1, item m computed by rank m mod N (``local`` holds
    this rank's, in the order of :func:`shard` (n)), in order, on every rank.
    Items are any picklable values (e.g. accuracies)."""
    size = world_size()
    if size == 1:
        return list(local)
    everyone = [None] * size
    with _collective():
        dist.all_gather_object(everyone, list(local))
    return [everyone[m % size][m // size] for m in range(n)]


def from_writer(read):
    """``read()`` run on rank 0 and its result sent to every rank; if it
    raises, every rank raises the same exception. Use it for what every rank
    needs from files only rank 0 may be able to see (a checkpoint, a saved
    config). The exception has ``reporter = 0``: rank 0 alone reports it."""
    if world_size() == 1:
        return read()
    box = [None]
    if is_writer():
        try:
            box[0] = ("value", read())
        except Exception as exc:  # sent to the other ranks, raised everywhere
            box[0] = ("error", exc)
    with _collective():
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        value.reporter = 0
        raise value
    return value


def everywhere(check):
    """``check()`` run on every rank; if it raises on any, every rank raises
    the error of the lowest rank that failed, with ``reporter`` set to that
    rank, so that a mistake every process meets (a bad config, a missing
    GPU) is reported once. Returns this rank's result. Every rank must call
    it."""
    try:
        value, error = check(), None
    except Exception as exc:  # compared across the ranks, then raised everywhere
        value, error = None, exc
    if world_size() == 1:
        if error is not None:
            raise error
        return value
    everyone = [None] * world_size()
    with _collective():
        dist.all_gather_object(everyone, error)
    failed = [r for r, e in enumerate(everyone) if e is not None]
    if failed:
        first = everyone[failed[0]]
        first.reporter = failed[0]
        raise first
    return value
