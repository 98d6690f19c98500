"""Time one outer iteration of distillation, part by part (docs/method.md,
"One outer iteration").

An outer iteration is one call of the library's ``addrmem.distill.OuterLoop.step``
(``addrmem.distill.outer_step``), whose parts the benchmark times through its
``phase`` hook:

- **network**: a fresh, seeded network (``addrmem.make_network``, then
  ``.to(device, dtype)``);
- **1 sample**: the T row-index tensors of the inner loop
  (``memory.sample_index`` for all classes, ``n_per_c`` rows each) and the real
  batch (``real_per_class`` images per class, without replacement, from an
  ``addrmem.distill.RealPool`` of random "real" images resident on the
  device), from the outer loop's seeded CPU generators (and, with
  ``--augment``, the iteration's flip/rotate transform);
- **2+3 hypergradient**: ``addrmem.hypergradient``, which is
  **2 inner forward** (T SGD-momentum steps, keeping their graphs where
  they fit), the outer loss on the real batch, and **3 reverse** (T
  double-backward steps, each after recomputing its step if its graph was
  not kept);
- **4 outer update**: the gradients set as ``.grad``, clipped to a global
  norm of 2.0, one step of SGD(lr 0.1, momentum 0.5); it reads the loss, so
  it waits for the GPU.

The inner lr is 0.01 and the inner momentum 0.9: ``DistillConfig()``'s
defaults, the official ones (docs/method.md, "Reference settings").

How it is timed. Two passes over the same job, after one warm-up iteration:

- **wall** (the headline): ``--iterations`` iterations with no profiler. Each
  part is timed from outside the calls: ``time.perf_counter`` on the CPU, CUDA
  events recorded on the stream around each part on CUDA (no synchronisation
  until the iteration ends, so the GPU timeline is what is measured). The
  inner forward and the reverse are not separate calls, so they have no wall
  time; the total per outer iteration is the median of whole iterations.
- **profiled** (the breakdown): ``--iterations`` more iterations, each under
  its own ``torch.profiler.profile``. The benchmark wraps each part in a
  ``record_function`` range (``outer_step.<part>``), and
  ``addrmem/hypergradient.py`` runs its forward and reverse loops inside the
  ranges ``addrmem.inner_forward`` and ``addrmem.reverse``. On the CPU a range
  lasts as long as its CPU span. On CUDA (with the profiler's CUDA activity)
  a range is done when both its CPU span and its GPU span (the
  ``gpu_user_annotation`` the profiler records from the first to the last
  kernel launched inside it) have ended; a part lasts from when the previous
  part was done (or its own start, if later) until it is done, so the parts
  of an iteration add up to it. "outer loss, checks, set-up" is the
  hypergradient's time outside its two loops. The profiler adds overhead per
  op: compare the two passes' totals; shares are of the profiled total.

Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` over the wall pass,
next to what was allocated before it (memory, optimizer state, the real pool);
on the CPU it is not measured (n/a).

Settings: the default is the README's CIFAR-10 IPC-1 job (docs/method.md,
"Reference settings"):
``AddressableMemory.from_budget(1, 10, (3, 32, 32), 16, 2)`` (115 rows per
class), ConvNet width 128 depth 3, T = 150, 32 rows per class per step (320
synthetic images), 64 real images per class (640) from a pool of 4500 per
class (CIFAR-10's training split less the 10 % validation split).
``--cpu-cifar`` is the CPU CIFAR-10 setting (issue 16): the same memory and
real batch with ConvNet width 32 depth 3 (instance norm), T = 10 and 10 rows
per class per step (100 synthetic images). ``--mnist`` is
the MNIST job of ``configs/mnist-ipc1-cpu.yaml`` (28x28 images, K = 16 bases
at 14x14, 29 rows per class, MLP, T = 100, 29 rows and 64 real images per
class and step). ``--quick``
is a tiny digits-like job (1x8x8, 10 classes, K = 4, 14 rows per class, T = 5,
4 rows and 8 real images per class) that runs in seconds on a CPU.

A benchmark measures and prints; it never fails on time (the exit status is 0
unless the arguments are bad). The profiler may print its own log lines on
stderr.

Usage (from the repository root)::

    python benchmarks/outer_step.py                         # GPU if there is one
    python benchmarks/outer_step.py --quick --device cpu
    OMP_NUM_THREADS=2 python benchmarks/outer_step.py --cpu-cifar --device cpu --iterations 3
    python benchmarks/outer_step.py --cpu-cifar --net-width 64 --steps 30   # wider, longer
    OMP_NUM_THREADS=1 python benchmarks/outer_step.py --mnist --device cpu --iterations 3
    python benchmarks/outer_step.py --mnist --snapshot-every 10   # recompute 9 of every 10 steps
    python benchmarks/outer_step.py --steps 10 --iterations 1 --json out.json
    python benchmarks/outer_step.py --net resnet18 --augment --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

try:
    import addrmem
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import addrmem
from addrmem import AddressableMemory, make_network
from addrmem.config import DistillConfig, resolve_device
from addrmem.distill import OuterLoop
from addrmem.networks import NETWORKS
from common import Stopwatch, at_least, device_name, fmt_bytes, fmt_time, medians

DTYPES = ("float32", "float64", "bfloat16")  # torch dtype names
OFFICIAL = DistillConfig()  # inner lr 0.01 / momentum 0.9, outer SGD 0.1 / 0.5, clip 2 (the official settings)
PARTS = ("network", "sample", "hypergradient", "update")  # the benchmark's ranges, in order
LOOPS = ("inner_forward", "reverse")  # addrmem.hypergradient's ranges, in order


@dataclasses.dataclass(frozen=True)
class Setting:
    """One distillation job's shape (the memory from a budget of ``ipc``)."""

    name: str
    image_shape: tuple
    num_classes: int
    ipc: int
    n_bases: int
    downsample: int
    net: str
    steps: int  # T
    n_per_c: int  # memory rows per class per inner step
    real_per_class: int
    pool_per_class: int
    augment: bool
    snapshot_every: int = 1  # the hypergradient keeps every k-th inner step's weights
    net_width: int = 128  # DistillConfig's net_width and net_depth (0: the network's default depth)
    net_depth: int = 0


DEFAULT = Setting("cifar10-ipc1", (3, 32, 32), 10, 1, 16, 2, "convnet", 150, 32, 64, 4500, False)
# The CPU CIFAR-10 setting of issue 16: the README job's memory, ConvNet width 32, T=10, 10 rows per class.
CPU_CIFAR = Setting("cifar10-ipc1-cpu", (3, 32, 32), 10, 1, 16, 2, "convnet", 10, 10, 64, 4500, False,
                    net_width=32)
QUICK = Setting("quick", (1, 8, 8), 10, 1, 4, 2, "convnet", 5, 4, 8, 100, False)
# configs/mnist-ipc1-cpu.yaml's job: K=16 bases at 14x14 for 28x28 images (29 rows per class), MLP, T=100.
MNIST = Setting("mnist-ipc1-cpu", (1, 28, 28), 10, 1, 16, 2, "mlp", 100, 29, 64, 500, False)
OPS = ("addrmem::synthesize", "addrmem::synthesize_backward")  # the fused op's profiler names


class Job:
    """What outer iterations work on: the setting's distillation config
    (``OFFICIAL`` with the setting's network and its size, T, rows and real
    images per class, augmentation), its memory and real pool
    (``pool_per_class`` random images per class), all from ``seed``, on
    ``device`` in ``dtype``; ``loop``, the memory's
    ``addrmem.distill.OuterLoop`` (:meth:`outer_loop`); ``net_weights``, the
    network's number of weights. Raises ValueError for a setting that does
    not fit (e.g. a network too deep for the images)."""

    def __init__(self, setting: Setting, device: torch.device, dtype: torch.dtype, seed: int):
        self.setting, self.device, self.dtype, self.seed = setting, device, dtype, seed
        self.config = dataclasses.replace(OFFICIAL, network=setting.net, net_width=setting.net_width,
                                          net_depth=setting.net_depth, steps=setting.steps,
                                          n_per_c=setting.n_per_c, real_per_class=setting.real_per_class,
                                          augment="flip_rotate" if setting.augment else "none",
                                          snapshot_every=setting.snapshot_every)
        net = make_network(self.config.network_spec(), setting.image_shape, setting.num_classes, seed=0)
        self.net_weights = sum(p.numel() for p in net.parameters())
        g = torch.Generator().manual_seed(seed)
        memory = AddressableMemory.from_budget(setting.ipc, setting.num_classes, setting.image_shape,
                                               setting.n_bases, setting.downsample, generator=g)
        if setting.n_per_c > memory.per_class:
            raise ValueError(f"n_per_c={setting.n_per_c} exceeds the memory's {memory.per_class} rows per class")
        self.memory = memory.to(device=device, dtype=dtype)
        n_pool = setting.num_classes * setting.pool_per_class
        # On the device once: every loop of the job uses these tensors, so two loops hold one pool.
        self.real_images = torch.randn(n_pool, *setting.image_shape, generator=g).to(device, dtype)
        self.real_labels = torch.arange(setting.num_classes).repeat_interleave(setting.pool_per_class).to(device)
        self.loop = self.outer_loop(self.memory)
        self.iterations = 0

    def outer_loop(self, memory) -> OuterLoop:
        """An OuterLoop over ``memory`` (the job's, or one of its geometry on
        its device) with the job's config, real pool and generators of
        ``seed``: the loops it makes draw the same inputs, step for step."""
        return OuterLoop(memory, self.config, self.real_images, self.real_labels, self.setting.num_classes,
                         seed=self.seed)

    def iteration(self, part) -> None:
        """One outer iteration of :attr:`loop`; ``part(name)`` is a context
        manager entered around each of PARTS."""
        self.loop.step(self.iterations, phase=part)
        self.iterations += 1


def wall_iteration(job: Job) -> dict:
    """One unprofiled iteration: {"network", "sample", "hypergradient",
    "update", "iteration"} -> seconds."""
    watch = Stopwatch(job.device)
    with watch("iteration"):
        job.iteration(watch)
    return watch.seconds()


def profiled_iteration(job: Job) -> tuple[dict, bool]:
    """One iteration under torch.profiler: ({PARTS, LOOPS, "hypergradient_other",
    "iteration"} -> seconds, whether the hypergradient's loops had GPU-side
    ranges (None on the CPU))."""
    cuda = job.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with record_function("outer_step.iteration"):
            job.iteration(lambda name: record_function(f"outer_step.{name}"))
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    names = ["outer_step.iteration", *(f"outer_step.{p}" for p in PARTS), *(f"addrmem.{p}" for p in LOOPS)]
    spans = {name: range_span(events, name) for name in names}
    start, done, _ = spans["outer_step.iteration"]
    seconds = {"iteration": (done - start) / 1e6}
    seconds.update(chain(spans, PARTS, "outer_step", start))
    seconds.update(chain(spans, LOOPS, "addrmem", spans["outer_step.sample"][1]))
    seconds["hypergradient_other"] = seconds["hypergradient"] - sum(seconds[loop] for loop in LOOPS)
    seconds["op"] = op_seconds(events)
    gpu_found = all(spans[f"addrmem.{loop}"][2] for loop in LOOPS) if cuda else None
    return seconds, gpu_found


def op_seconds(events) -> float:
    """Seconds of the fused op's outermost calls (OPS) on the CPU: on CUDA,
    their launch spans, not the kernels' device time."""
    def nested(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name in OPS:
                return True
            parent = parent.cpu_parent
        return False

    return sum(e.time_range.elapsed_us() for e in events
               if e.name in OPS and e.device_type == DeviceType.CPU and not nested(e)) / 1e6


def chain(spans: dict, parts, prefix: str, previous_done: float) -> dict:
    """Seconds of consecutive ranges ``prefix.part``: each lasts from when the
    one before was done (``previous_done`` for the first), or from its own
    start if that is later, until it is done."""
    seconds = {}
    for part in parts:
        start, done, _ = spans[f"{prefix}.{part}"]
        seconds[part] = (done - max(start, previous_done)) / 1e6
        previous_done = done
    return seconds


def range_span(events, name: str) -> tuple[float, float, bool]:
    """(start, done, GPU span found) in microseconds of the one ``name``
    range in ``events``: its CPU start, and the later of its CPU end and the
    end of its device-side annotation, if the profile has one."""
    cpu = [e for e in events if e.name == name and e.device_type == DeviceType.CPU]
    if len(cpu) != 1:
        raise RuntimeError(f"the profile holds {len(cpu)} CPU ranges named {name!r}; expected one")
    device_ends = [e.time_range.end for e in events if e.name == name and e.device_type != DeviceType.CPU]
    return cpu[0].time_range.start, max([cpu[0].time_range.end, *device_ends]), bool(device_ends)


ROWS = [  # (key, label)
    ("network", "network: fresh init + to device"),
    ("sample", "1 sample: T index tensors + real batch"),
    ("inner_forward", "2 inner forward: T SGD-momentum steps"),
    ("reverse", "3 reverse: T double-backward steps"),
    ("hypergradient_other", "  outer loss, checks, set-up"),
    ("hypergradient", "2+3 hypergradient"),
    ("update", "4 outer update: clip + SGD step"),
    ("iteration", "outer iteration"),
]


def print_table(wall: dict, profiled: dict) -> None:
    print(f"{'part':<42}{'wall':>12}{'profiled':>12}{'share':>9}")
    for key, label in ROWS:
        share = f"{100 * profiled[key] / profiled['iteration']:.1f}%"
        print(f"{label:<42}{fmt_time(wall.get(key)):>12}{fmt_time(profiled[key]):>12}{share:>9}")


def run_info(setting: Setting, memory, net_params: int, device: torch.device, dtype: str, seed: int) -> dict:
    """What a benchmark's JSON says about the job, the machine and the build."""
    return {
        "setting": dataclasses.asdict(setting),
        "memory": memory.config(),
        "net_weights": net_params,
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "build_info": addrmem.build_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype,
        "seed": seed,
    }


def add_job_arguments(p: argparse.ArgumentParser, dtypes) -> argparse._MutuallyExclusiveGroup:
    """The arguments outer_step.py and distill_speed.py share: the setting
    (``args.setting``: DEFAULT, or --quick's or --cpu-cifar's, options of the
    group returned, where a benchmark adds its own), --steps, --net,
    --net-width, --net-depth, --device (``args.device``, a torch.device this
    machine has), --dtype (a name of ``dtypes``), --iterations, --seed and
    --json."""
    def device(name: str) -> torch.device:
        try:
            return resolve_device(name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    jobs = p.add_mutually_exclusive_group()
    jobs.add_argument("--quick", dest="setting", action="store_const", const=QUICK, default=DEFAULT,
                      help="a tiny digits-like job (1x8x8, T=5) instead of the README's CIFAR-10 IPC-1 job")
    jobs.add_argument("--cpu-cifar", dest="setting", action="store_const", const=CPU_CIFAR,
                      help="the CPU CIFAR-10 setting: the README job's memory with ConvNet width 32, T=10, "
                           "10 rows per class per step")
    p.add_argument("--device", type=device, default="auto", help="auto (default: cuda if available, else cpu), "
                   "cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=dtypes, default="float32")
    p.add_argument("--steps", type=at_least(1), metavar="T", help="inner steps (default: the setting's; 150, "
                   "5 with --quick, 10 with --cpu-cifar)")
    p.add_argument("--net", choices=sorted(NETWORKS), help="network (default: convnet)")
    p.add_argument("--net-width", type=at_least(1), metavar="W", help="the ConvNet's channels or the MLP's hidden "
                   "units (default: 128, 32 with --cpu-cifar)")
    p.add_argument("--net-depth", type=at_least(0), metavar="D", help="the ConvNet's blocks or the MLP's hidden "
                   "layers (default: the network's own)")
    p.add_argument("--iterations", type=at_least(1), metavar="N", help="timed outer iterations after one warm-up "
                   "(default: 5, 3 with --quick)")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of everything (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return jobs


def chosen_setting(args, **fixed) -> Setting:
    """``args.setting`` with the values of --steps, --net, --net-width,
    --net-depth and, where the benchmark has them, --n-per-c and
    --snapshot-every that were given, and ``fixed``."""
    names = ("steps", "net", "net_width", "net_depth", "n_per_c", "snapshot_every")
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return dataclasses.replace(args.setting, **given, **fixed)


def job_from(args, script: str, **fixed) -> Job | None:
    """The Job the arguments choose: ``chosen_setting(args, **fixed)`` on
    ``args.device`` in ``args.dtype``, from ``args.seed``; None, after
    ``script: error: ...`` on stderr, for a setting that does not fit."""
    try:
        return Job(chosen_setting(args, **fixed), args.device, getattr(torch, args.dtype), args.seed)
    except ValueError as exc:
        print(f"{script}: error: {exc}", file=sys.stderr)
        return None


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Time one outer iteration of addrmem's distillation, part by part.",
        epilog="See the module docstring for what is measured and how.",
    )
    jobs = add_job_arguments(p, DTYPES)
    jobs.add_argument("--mnist", dest="setting", action="store_const", const=MNIST,
                      help="configs/mnist-ipc1-cpu.yaml's job (28x28, K=16 bases at 14x14, 29 rows per class, "
                           "MLP, T=100) instead of the CIFAR-10 one")
    p.add_argument("--n-per-c", type=at_least(1), metavar="N",
                   help="memory rows per class per inner step (default: 32, 4 with --quick, 10 with --cpu-cifar)")
    p.add_argument("--augment", action="store_true", help="flip/rotate augmentation (docs/method.md)")
    p.add_argument("--snapshot-every", type=at_least(1), metavar="K",
                   help="keep every K-th inner step's weights, recompute the others (default: 1, keep all)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    job = job_from(args, "outer_step.py", augment=args.augment)
    if job is None:
        return 2
    setting, device, memory = job.setting, job.device, job.memory
    cuda = device.type == "cuda"
    iterations = args.iterations or (3 if args.setting is QUICK else 5)
    net_params = job.net_weights
    print(f"outer_step benchmark on {device_name(device)}, torch {torch.__version__}, {args.dtype}")
    print(f"setting {setting.name}: {job.config.network_spec()} ({net_params:,} weights) on {setting.image_shape} images, "
          f"{setting.num_classes} classes; AddressableMemory ipc {setting.ipc}, K={memory.n_bases}, "
          f"ds={memory.downsample}, {memory.per_class} rows/class; T={setting.steps}, "
          f"{setting.n_per_c * setting.num_classes} synthetic and {setting.real_per_class * setting.num_classes} "
          f"real images per step; augment {'flip/rotate' if setting.augment else 'none'}")
    print(f"median of {iterations} iteration(s) per pass, after 1 warm-up")

    wall_iteration(job)  # warm-up
    resident = peak = None
    if cuda:
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    wall_runs = [wall_iteration(job) for _ in range(iterations)]
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    profiled = [profiled_iteration(job) for _ in range(iterations)]
    profiled_runs = [seconds for seconds, _ in profiled]
    gpu_found = all(found for _, found in profiled) if cuda else None

    wall, prof = medians(wall_runs), medians(profiled_runs)
    print()
    print_table(wall, prof)
    print()
    print(f"seconds per outer iteration: {wall['iteration']:.4f} (wall, median); profiled "
          f"{prof['iteration']:.4f} ({prof['iteration'] / wall['iteration']:.2f}x the wall time)")
    print(f"peak memory: {fmt_bytes(peak)}" + (f" allocated ({fmt_bytes(resident)} before the iterations)"
                                               if cuda else " (not measured on the CPU)"))
    k, steps = setting.snapshot_every, setting.steps
    kept = steps + 1 if k == 1 else 2 * -(-steps // k) + k  # weights (and, for k > 1, momenta) held at once
    graphs = ("the inner steps' graphs that fit in half the free memory and, for the other steps, "
              if k == 1 else "no step graph (snapshot_every > 1) and ")
    print(f"the hypergradient keeps {graphs}at most {kept} weight vectors of {net_params:,} values at once "
          f"(snapshot_every={k}, T={steps}; by construction, not measured)")
    share = 100 * prof["op"] / prof["iteration"]
    print(f"the fused op (addrmem::synthesize and its backward, outermost calls): {fmt_time(prof['op'])} of the "
          f"profiled iteration, {share:.1f}%" + (" (CPU launch spans)" if cuda else ""))
    if gpu_found is False:
        print("WARNING: the profile has no GPU-side ranges; the profiled CUDA times are CPU (launch) spans")
    if args.json:
        result = {
            **run_info(setting, memory, net_params, device, args.dtype, args.seed),
            "iterations": iterations,
            "seconds_per_iteration": wall["iteration"],
            "wall": {"median": wall, "runs": wall_runs},
            "profiled": {"median": prof, "runs": profiled_runs, "gpu_ranges": gpu_found},
            "peak_memory_bytes": peak,
            "weight_vectors_held": kept,
            "resident_memory_bytes": resident,
        }
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
