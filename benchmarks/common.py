"""What the benchmarks share: timing spans, medians, printing times and
sizes, the machine's name, and an argparse type for bounded ints.

The benchmarks import it as a sibling module (``from common import ...``):
run as scripts, their folder is on ``sys.path``; the tests put it there
(tests/benchmark_scripts.py).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch


class Stopwatch:
    """Times named spans: perf_counter on the CPU; on CUDA, events recorded on
    the current stream, read (after one synchronisation) by :meth:`seconds`.
    Called with a name, it is a context manager timing that span (a span of
    the same name timed again replaces it)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans = {}

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @contextlib.contextmanager
    def __call__(self, name):
        start = self._now()
        yield
        self.spans[name] = (start, self._now())

    def seconds(self) -> dict:
        """{name: seconds} of the spans timed so far."""
        if self.cuda:
            torch.cuda.synchronize()
            return {name: start.elapsed_time(end) / 1e3 for name, (start, end) in self.spans.items()}
        return {name: end - start for name, (start, end) in self.spans.items()}


def medians(runs: list[dict]) -> dict:
    """{key: median over ``runs``} for the keys of the first run."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def fmt_time(t) -> str:
    """Seconds ``t`` in us, ms or s; "-" for None."""
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.3f} s"


def fmt_bytes(n) -> str:
    """``n`` bytes in B, KiB, MiB or GiB; "n/a" for None (not measured)."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.3f} GiB"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model (speed ratios differ between CPU
    models) and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {name} ({threads} thread{'s' if threads > 1 else ''})"


def at_least(minimum: int):
    """An argparse type: an int >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}; got {value}")
        return value
    return parse
