"""Continual learning with distilled memories (docs/continual.md).

A learner meets a stream of tasks one after another and must keep what it
learnt. Every method uses the same learner, the same stream, the same seeds
and the same storage budget in bytes; they differ only in what they keep of
the tasks already seen (:data:`METHODS`): nothing (``finetune``), real
images (``replay`` in float32, ``replay-uint8`` as 8-bit pixels), the
addressable memory at its undistilled start (``compressed``), each task
distilled into an ImageMemory (``image``) or an addressable memory
(``addressable``), or everything (``joint``).

One job per module: :mod:`~addrmem.continual.config` (the settings),
:mod:`~addrmem.continual.streams` (the tasks),
:mod:`~addrmem.continual.methods` (what is kept),
:mod:`~addrmem.continual.learner` (the protocols) and
:mod:`~addrmem.continual.run` (the run, its metrics and plots).
"""

from .config import BENCHMARKS, DISTILL_DEFAULTS, PROTOCOLS, ContinualConfig
from .learner import learn, make_learner
from .methods import METHODS, Method, make_method
from .run import metrics, plot, run_continual
from .streams import Stream, make_stream

__all__ = ["BENCHMARKS", "DISTILL_DEFAULTS", "METHODS", "PROTOCOLS", "ContinualConfig", "Method", "Stream", "learn",
           "make_learner", "make_method", "make_stream", "metrics", "plot", "run_continual"]
