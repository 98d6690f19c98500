"""What the continual-learning tests share: tiny settings, a fake MNIST and a
stream that records which task's data is read."""

import torch

from addrmem.continual import Stream
from addrmem.data import Dataset

# Two tasks of split-digits, 2 outer iterations of 2 unrolled steps per task, one epoch.
TINY = dict(tasks=2, distill=dict(iterations=2, steps=2, n_per_c=2, real_per_class=8), epochs=1, batch=16)


def fake_mnist(n_train=300, n_test=50, shape=(1, 28, 28)):
    """A Dataset shaped like MNIST (``shape``, 10 classes) of random images."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        return torch.randn(n, *shape, generator=g), torch.arange(n) % 10

    c = shape[0]
    return Dataset(name="mnist", train=split(n_train), val=split(40), test=split(n_test), num_classes=10,
                   image_shape=shape, mean=torch.full((c,), 0.1307), std=torch.full((c,), 0.3081),
                   classes=[str(c) for c in range(10)])


def copy_stream(stream, cls=Stream, **kw):
    """``stream``'s tasks as an instance of ``cls`` (a Stream subclass)."""
    return cls(stream.name, stream.images, stream.plans, stream.num_classes, stream.image_shape, stream.mean,
               stream.std, **kw)


class RecordingStream(Stream):
    """A stream that records which task's data is read, and refuses a later task's."""

    def __init__(self, *args, first=0):
        super().__init__(*args)
        self.reads = []
        self.learnt = first - 1  # the latest task whose training data has been read (or learnt before)

    def train(self, t):
        assert t <= self.learnt + 1, f"task {t}'s training data read while learning task {self.learnt}"
        self.learnt = max(self.learnt, t)
        self.reads.append(("train", t))
        return super().train(t)

    def val(self, t):
        assert t <= self.learnt, f"task {t}'s held-out data read after learning only up to task {self.learnt}"
        self.reads.append(("val", t))
        return super().val(t)

    def test(self, t):
        assert t <= self.learnt, f"task {t}'s test data read after learning only up to task {self.learnt}"
        self.reads.append(("test", t))
        return super().test(t)

    def classes(self, t):
        assert t <= self.learnt or not self.reads, f"task {t}'s classes read while learning {self.learnt}"
        return super().classes(t)
