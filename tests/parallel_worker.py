"""What tests/test_parallel.py runs in each process it starts with torchrun:
``python -m torch.distributed.run --standalone --nproc-per-node N
tests/parallel_worker.py JOB OUT``. Rank 0 saves what the test compares
(torch.save) to OUT; JOB is one of the functions below."""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_run import tiny  # noqa: E402

from addrmem import cli  # noqa: E402
from addrmem import distill as distill_module  # noqa: E402
from addrmem import parallel  # noqa: E402
from addrmem.data import load_dataset  # noqa: E402


def vectors(n, numel):
    """n seeded random vectors (numel,) in float32, vector m from seed m."""
    return [torch.randn(numel, generator=torch.Generator().manual_seed(m)) for m in range(n)]


def collectives(out):
    """combine, gather and from_writer on odd sizes."""
    n, numel = 5, 1031
    mine = parallel.shard(n)
    total = parallel.combine([vectors(n, numel)[m] for m in mine], n)
    items = parallel.gather([f"item {m} from rank {parallel.rank()}" for m in mine], n)
    value = parallel.from_writer(lambda: {"rank": parallel.rank()})
    try:
        parallel.from_writer(lambda: int("not a number"))
        error = None
    except ValueError as exc:
        error = str(exc)
    everyone = [None] * parallel.world_size()
    dist.all_gather_object(everyone, (total, items, value, error))
    if parallel.is_writer():
        torch.save(everyone, out)


def recording_step(config, digits):
    """One outer step of ``config`` (OuterLoop.step): (each of this rank's
    trajectories' hypergradient, the combined gradient the optimizer stepped
    with)."""
    loop = distill_module.OuterLoop(distill_module.build_memory(config, digits), config, *digits.train,
                                    digits.num_classes)
    memory, optimizer = loop.memory, loop.optimizer
    stepped = {}
    original_step = optimizer.step

    def step(*args, **kwargs):
        stepped.update({name: p.grad.clone() for name, p in memory.named_parameters()})
        return original_step(*args, **kwargs)

    optimizer.step = step
    own = []

    def gradient(*args, **kwargs):
        loss, grads = distill_module.hypergradient(*args, **kwargs)
        own.append({name: g.clone() for name, g in grads.items()})
        return loss, grads

    loop.step(gradient=gradient)
    return own, stepped


def step(out):
    """One outer step with meta_batch 4: each rank's trajectories and the combined gradient."""
    digits = load_dataset("digits")
    own, stepped = recording_step(tiny(meta_batch=4, clip=1e9), digits)
    everyone = [None] * parallel.world_size()
    dist.all_gather_object(everyone, (list(parallel.shard(4)), own, stepped))
    if parallel.is_writer():
        torch.save(everyone, out)


def run(out, resume=False, interrupt_at=None):
    """A whole distillation with meta_batch 2 into the run folder OUT.run."""
    digits = load_dataset("digits")
    config = tiny(meta_batch=2, iterations=5, checkpoint_every=2, val_nets=3)
    folder = out + ".run"
    if parallel.is_writer() and not resume:
        os.makedirs(folder)
        config.to_yaml(os.path.join(folder, "config.yaml"))
    dist.barrier()
    if interrupt_at is not None:
        real, calls = distill_module.hypergradient, []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == interrupt_at:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        distill_module.hypergradient = interrupted
        try:
            distill_module.distill(config, digits, folder, progress=False)
        except KeyboardInterrupt:
            return
        raise AssertionError("not interrupted")
    result = distill_module.distill(config, digits, folder, resume=resume, progress=False)
    if parallel.is_writer():
        torch.save({"memory": dict(result.memory.state_dict()), "log": result.log, "iteration": result.iteration,
                    "val": result.val.runs}, out)


def linger(out):
    """Write this process's pid to OUT.RANK, then wait to be stopped."""
    with open(f"{out}.{parallel.rank()}.tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(f"{out}.{parallel.rank()}.tmp", f"{out}.{parallel.rank()}")
    time.sleep(600)


def elastic(out):
    """``addrmem distill --config OUT.yaml --out OUT.run``, as torchrun --max-restarts starts it: in the first
    attempt rank 1 is killed (SIGKILL) in its 4th hypergradient, after the checkpoint of iteration 2."""
    if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        real, calls = distill_module.hypergradient, []

        def killed(*args, **kwargs):
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        distill_module.hypergradient = killed
    cli.main(["distill", "--config", out + ".yaml", "--out", out + ".run"])  # leaves the process itself


if __name__ == "__main__":
    torch.set_num_threads(1)
    job, out = sys.argv[1], sys.argv[2]
    if job == "elastic":
        elastic(out)
    parallel.setup()
    {"collectives": collectives, "step": step, "run": run, "linger": linger,
     "interrupt": lambda out: run(out, interrupt_at=4), "resume": lambda out: run(out, resume=True)}[job](out)
    parallel.barrier()
    parallel.leave()
