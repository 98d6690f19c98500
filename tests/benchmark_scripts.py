"""Loading a benchmark script (benchmarks/NAME.py) as a module, as the
benchmark tests do: benchmarks/ goes on sys.path first, where running a
script puts it, so that the scripts import their siblings (common.py,
outer_step.py)."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    """benchmarks/``name``.py, executed afresh as module ``name``."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
