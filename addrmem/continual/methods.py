"""What a continual learner keeps of the tasks it has seen: the
:class:`Method` interface and its implementations, in the registry
:data:`METHODS` (docs/continual.md, "Methods").

Every method has the same storage budget in bytes. Float32 values count 4
bytes, float16 and bfloat16 values 2, uint8 pixels 1; labels are not counted
(docs/method.md, "The storage budget").
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..distill import OuterLoop
from ..memory import AddressableMemory, ImageMemory
from ..seeding import derive_seed, generator

__all__ = ["METHODS", "Compressed", "Distilled", "Finetune", "Joint", "Method", "Replay", "make_method"]

FLOAT_BYTES = 4  # replay and joint keep float32 images

MEMORY_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""How a distilled memory may be stored (``ContinualConfig.memory_dtype``)."""


class Method:
    """The interface: what a learner keeps of the tasks seen so far.

    ``name``: the method's registry name; ``config``: the run's
    :class:`~addrmem.continual.ContinualConfig`; ``stream``: its
    :class:`~addrmem.continual.Stream`; ``budget``: the bytes it may store.
    ``online`` is True for a method whose memory can take a task batch by
    batch while it streams (the online protocol then calls :meth:`remember`
    per batch; otherwise once, with the whole task, after it).

    This base class keeps nothing (finetuning, the lower bound).
    """

    online = False

    def __init__(self, name: str, config, stream):
        self.name = name
        self.config = config
        self.stream = stream
        self.budget = config.budget(stream.image_shape)
        self.progress = True  # progress bars while distilling

    def check(self) -> None:
        """Raise ValueError if the budget cannot hold what the method needs."""

    def remember(self, t: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Store (part of) task ``t``: images (N, C, H, W) float32, labels (N,) int64."""

    def recalled(self):
        """What the learner replays: (images (M, C, H, W) float32, labels (M,)), or None when empty."""
        return None

    def num_floats(self) -> int:
        """Values stored (floats, or uint8 pixels)."""
        return 0

    def num_bytes(self) -> int:
        """Bytes stored."""
        return 0

    def state_dict(self) -> dict:
        """What :meth:`load_state_dict` needs to continue, on the CPU."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`."""


Finetune = Method


class Replay(Method):
    """Reservoir sampling over every training image seen, into a buffer of
    as many real images as the budget holds: float32 values (``replay``) or
    uint8 pixels (``replay-uint8``: four times as many images for the same
    bytes, each rounded to 8 bits)."""

    online = True

    def __init__(self, name, config, stream, dtype=torch.float32):
        super().__init__(name, config, stream)
        self.dtype = dtype
        self.capacity = self.budget // (math.prod(stream.image_shape) * dtype.itemsize)
        self.images = torch.empty(0, *stream.image_shape, dtype=dtype)
        self.labels = torch.empty(0, dtype=torch.int64)
        self.seen = 0
        self.draws = generator(config.seed, name, "reservoir")
        self.cache = None  # the decoded buffer

    def check(self):
        if self.capacity < 1:
            raise ValueError(f"the budget of {self.budget} bytes holds no image for {self.name}; raise budget_bytes")

    def remember(self, t, images, labels):
        stored = images if self.dtype == torch.float32 else self.stream.to_uint8(images)
        order = torch.randperm(len(labels), generator=self.draws)
        slots = torch.rand(len(labels), generator=self.draws, dtype=torch.float64)
        for i, u in zip(order.tolist(), slots.tolist()):
            if len(self.labels) < self.capacity:
                self.images = torch.cat([self.images, stored[i:i + 1]])
                self.labels = torch.cat([self.labels, labels[i:i + 1]])
            else:
                slot = int(u * (self.seen + 1))  # uniform in [0, seen]
                if slot < self.capacity:
                    self.images[slot], self.labels[slot] = stored[i], labels[i]
            self.seen += 1
        self.cache = None

    def recalled(self):
        if not len(self.labels):
            return None
        if self.cache is None:
            self.cache = (self.images if self.dtype == torch.float32 else self.stream.from_uint8(self.images),
                          self.labels)
        return self.cache

    def num_floats(self):
        return self.images.numel()

    def num_bytes(self):
        return self.images.numel() * self.dtype.itemsize

    def state_dict(self):
        return {"images": self.images.clone(), "labels": self.labels.clone(), "seen": self.seen,
                "draws": self.draws.get_state()}

    def load_state_dict(self, state):
        self.images, self.labels, self.seen = state["images"], state["labels"], int(state["seen"])
        self.draws.set_state(state["draws"])
        self.cache = None


class Joint(Method):
    """Keeps every task's whole training data (the upper bound; no budget)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.kept = []

    def remember(self, t, images, labels):
        self.kept.append((images.clone(), labels.clone()))

    def recalled(self):
        if not self.kept:
            return None
        return torch.cat([x for x, _ in self.kept]), torch.cat([y for _, y in self.kept])

    def num_floats(self):
        return sum(x.numel() for x, _ in self.kept)

    def num_bytes(self):
        return FLOAT_BYTES * self.num_floats()

    def state_dict(self):
        return {"kept": [list(pair) for pair in self.kept]}

    def load_state_dict(self, state):
        self.kept = [tuple(pair) for pair in state["kept"]]


class Distilled(Method):
    """Each task in its own memory of ``memory_class``
    (:class:`~addrmem.memory.AddressableMemory`, with bases per task or
    shared, or :class:`~addrmem.memory.ImageMemory`), started from the
    task's real images or at random (``init``) and distilled by
    :class:`~addrmem.distill.OuterLoop` for ``distill.iterations`` outer
    iterations. Its values are stored in ``config.memory_dtype``: float32,
    or float16 / bfloat16 (half the bytes a value, so twice the rows;
    distillation runs in float32 and the result is rounded to the storage
    dtype, which is then exactly what the learner recalls).

    The budget is divided equally among the tasks seen: after task t each
    of the t+1 memories gets budget / (t+1) (for shared bases, of the budget
    left after the bases) and as many rows per class as fit in it, at least
    one. A new task's memory is built at that size; the older ones keep the
    first rows of each class (:meth:`~addrmem.memory.AddressableMemory.truncate`).
    When one row per class per task overflows the budget (ImageMemory on
    ``many``), the oldest tasks' memories are dropped until it fits.
    """

    def __init__(self, name, config, stream, memory_class=AddressableMemory, iterations=None):
        super().__init__(name, config, stream)
        self.distill = config.distill_config()
        self.iterations = self.distill.iterations if iterations is None else iterations
        self.memory_class = memory_class
        self.shape = ({"n_bases": self.distill.n_bases, "downsample": self.distill.downsample}
                      if memory_class is AddressableMemory else {})
        self.shared_floats, self.row_floats = memory_class.storage(stream.image_shape, **self.shape)
        self.shared = self.shared_floats > 0 and config.bases == "shared"
        self.storage_dtype = MEMORY_DTYPES[config.memory_dtype]
        self.value_bytes = self.storage_dtype.itemsize
        self.memories = []  # (task, classes, memory) of the tasks kept
        self.shared_state = None  # the frozen shared part (bases), learnt on the first task
        self.cache = None

    def per_class(self, num_classes: int, seen: int) -> int:
        """Rows per class of a task with ``num_classes`` classes when ``seen``
        tasks share the budget (see the class docstring)."""
        floats = self.budget // self.value_bytes
        if self.shared:  # stored once: the tasks share what is left
            floats = self.shared_floats + (floats - self.shared_floats) // seen
        else:
            floats //= seen
        return max(1, self.memory_class.rows_per_class(floats, num_classes, self.stream.image_shape, **self.shape))

    def check(self) -> None:
        """Raise ValueError if one task's memory with one row per class exceeds the whole budget."""
        most = max(len(self.stream.classes(t)) for t in range(len(self.stream)))
        need = self.value_bytes * (self.shared_floats + most * self.row_floats)
        if need > self.budget:
            raise ValueError(f"the budget of {self.budget} bytes is too small for the {self.name} memory: its "
                             f"shared part ({self.shared_floats} floats) and one row per class of a task "
                             f"({self.row_floats} floats each) take {need} bytes; raise budget_images or "
                             f"budget_bytes, or lower distill n_bases")

    def build(self, t: int, num_classes: int, per_class: int):
        draws = generator(self.config.seed, self.name, "init", t)
        memory = self.memory_class(num_classes, self.stream.image_shape, per_class=per_class, **self.shape,
                                   generator=draws)
        return memory.to(*self.distill.device_dtype())

    def remember(self, t, images, labels):
        classes = self.stream.classes(t)
        memory = self.build(t, len(classes), self.per_class(len(classes), t + 1))
        local = torch.searchsorted(torch.tensor(classes), labels)
        frozen = self.shared and self.shared_state is not None
        if frozen:
            memory.bases.data.copy_(self.shared_state)
            memory.bases.requires_grad_(False)  # the outer loop leaves frozen parameters alone
        if self.config.init == "real":
            draws = generator(self.config.seed, self.name, "init-rows", t)
            own = {"bases": not frozen} if self.shared_floats else {}
            memory.init_from_real(images.to(next(memory.parameters())), local, draws, **own)
        if self.iterations:
            loop = OuterLoop(memory, self.distill, images, local, len(classes),
                             seed=derive_seed(self.config.seed, self.name, "distill", t))
            for it in tqdm(range(self.iterations), desc=f"distill {self.name} task {t}", leave=False,
                           disable=None if self.progress else True):
                loop.step(it)
        with torch.no_grad():  # stored in the storage dtype: recall exactly what is stored
            for p in memory.parameters():
                p.copy_(p.to(self.storage_dtype))
        if self.shared and self.shared_state is None:
            self.shared_state = memory.bases.detach().clone()
        self.memories.append((t, classes, memory))
        self.memories = [(task, c, m.truncate(self.per_class(len(c), t + 1))) for task, c, m in self.memories]
        while len(self.memories) > 1 and self.num_bytes() > self.budget:
            self.memories.pop(0)
        self.cache = None

    def recalled(self):
        if not self.memories:
            return None
        if self.cache is None:
            parts = [(memory.recall(), classes) for _, classes, memory in self.memories]
            self.cache = (torch.cat([x.float().cpu() for (x, _), _ in parts]),
                          torch.cat([torch.tensor(classes)[y.cpu()] for (_, y), classes in parts]))
        return self.cache

    def num_floats(self):
        floats = sum(m.num_floats() for _, _, m in self.memories)
        if self.shared and self.memories:  # the bases are stored once
            floats -= (len(self.memories) - 1) * self.shared_floats
        return floats

    def num_bytes(self):
        return self.value_bytes * self.num_floats()

    def state_dict(self):
        return {"memories": [{"task": t, "classes": c, "per_class": m.per_class,
                              "state": {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}}
                             for t, c, m in self.memories],
                "shared_state": self.shared_state}

    def load_state_dict(self, state):
        self.shared_state = state["shared_state"]
        self.memories = []
        for entry in state["memories"]:
            memory = self.build(entry["task"], len(entry["classes"]), entry["per_class"])
            memory.load_state_dict(entry["state"])
            self.memories.append((entry["task"], entry["classes"], memory))
        self.cache = None


def Compressed(name, config, stream):
    """The addressable memory at its undistilled start: each task's real
    images as coordinates over their own top principal directions
    (:meth:`~addrmem.memory.AddressableMemory.init_from_real`), no outer
    iteration. What :class:`Distilled` adds to it is what distillation adds."""
    return Distilled(name, config, stream, AddressableMemory, iterations=0)


METHODS = {
    "finetune": Finetune,
    "replay": Replay,
    "replay-uint8": lambda name, config, stream: Replay(name, config, stream, torch.uint8),
    "compressed": Compressed,
    "image": lambda name, config, stream: Distilled(name, config, stream, ImageMemory),
    "addressable": Distilled,
    "joint": Joint,
}
"""name -> factory (name, config, stream) -> :class:`Method`, in the order
the methods are run and reported (docs/continual.md, "Methods")."""


def make_method(name: str, config, stream) -> Method:
    """The method ``name`` of :data:`METHODS` for a run of ``config`` over ``stream``."""
    return METHODS[name](name, config, stream)
