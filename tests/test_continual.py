"""Continual learning (addrmem/continual.py): the streams match their
definitions and are seeded; no method reads a later task's data; every
method's storage stays within the budget; the metrics of a hand-made matrix;
resume equals an uninterrupted run; bad input gets a one-line error.

Runs use split-digits (scikit-learn's bundled digits) or small synthetic
28x28 datasets, with tiny settings. The one MNIST test needs MNIST's four
original gzipped IDX files (train-images-idx3-ubyte.gz,
train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,
t10k-labels-idx1-ubyte.gz) in a folder ``shared/data/mnist`` beside the
repository; it gunzips them into torchvision's layout, DIR/MNIST/raw/, which
is what ``torchvision.datasets.MNIST(DIR, download=True)`` leaves. It is
skipped when they are absent; nothing is downloaded.
"""

import dataclasses
import gzip
import json
import os
from pathlib import Path

import pytest
import torch
from torchvision.transforms.v2.functional import InterpolationMode, rotate

from addrmem.cli import main
from addrmem.continual import (BENCHMARKS, METHODS, ContinualConfig, Stream, _Distilled, make_stream, metrics,
                               run_continual)
from addrmem.data import Dataset

SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")

# Two tasks of split-digits, 2 outer iterations of 2 unrolled steps per task, one epoch.
TINY = dict(tasks=2, distill=dict(iterations=2, steps=2, n_per_c=2, real_per_class=8), epochs=1, batch=16)


def fake_mnist(n_train=300, n_test=50, shape=(1, 28, 28)):
    """A Dataset shaped like MNIST (``shape``, 10 classes) of random images."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        return torch.randn(n, *shape, generator=g), torch.arange(n) % 10

    c = shape[0]
    return Dataset(name="mnist", train=split(n_train), val=split(10), test=split(n_test), num_classes=10,
                   image_shape=shape, mean=torch.full((c,), 0.1307), std=torch.full((c,), 0.3081),
                   classes=[str(c) for c in range(10)])


CONFIGS = sorted(Path(__file__).resolve().parent.parent.joinpath("configs").glob("continual-*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_load_fit_their_budget_and_say_their_rows(path):
    config = ContinualConfig.from_yaml(path)
    assert path.stem == f"continual-{config.benchmark}"
    shape = (1, 8, 8) if config.benchmark == "split-digits" else (3, 32, 32) if "cifar" in path.stem else (1, 28, 28)
    stream = make_stream(config, fake_mnist(shape=shape))
    memory = _Distilled("addressable", config, stream)
    memory.check_budget()
    _Distilled("image", config, stream).check_budget()
    comment = " ".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"{memory.per_class(len(stream.classes(0)), len(stream)):,} rows per class" in comment
    if config.benchmark == "split-digits":  # the command's defaults
        default = ContinualConfig()
        assert default.distill_config() == config.distill_config()
        assert dataclasses.replace(default, distill=config.distill, budget_images=200) == config


def test_rotations_follow_their_definition_and_seed():
    data = fake_mnist()
    stream = make_stream(ContinualConfig(benchmark="rotations", train_per_task=40), data)
    assert len(stream) == 20
    for t in range(len(stream)):
        kind, angle = stream.plans[t]["transform"]
        assert kind == "rotate" and 9 * t <= angle < 9 * t + 9
    images, labels = stream.train(5)
    rows = stream.plans[5]["train"]
    assert images.shape == (40, 1, 28, 28) and len(rows.unique()) == 40
    expected = rotate(data.train[0][rows], stream.plans[5]["transform"][1],
                      interpolation=InterpolationMode.BILINEAR, fill=[-0.1307 / 0.3081])
    assert torch.allclose(images, expected, atol=1e-6) and torch.equal(labels, data.train[1][rows])
    test_images, _ = stream.test(5)
    assert test_images.shape == (50, 1, 28, 28)  # the whole test set, rotated
    again = make_stream(ContinualConfig(benchmark="rotations", train_per_task=40), data)
    other = make_stream(ContinualConfig(benchmark="rotations", train_per_task=40, seed=1), data)
    assert torch.equal(again.train(5)[0], images)
    assert not torch.equal(other.train(5)[0], images)


@pytest.mark.parametrize("benchmark, tasks, per_task", [("permutations", 20, 30), ("many", 100, 0)])
def test_permutation_streams_permute_every_task(benchmark, tasks, per_task):
    data = fake_mnist()
    stream = make_stream(ContinualConfig(benchmark=benchmark, train_per_task=per_task), data)
    assert len(stream) == tasks
    perms = [plan["transform"][1] for plan in stream.plans]
    for perm in perms:
        assert torch.equal(perm.sort().values, torch.arange(784))
    assert not torch.equal(perms[0], torch.arange(784))  # the first task is permuted too
    assert len({tuple(p.tolist()) for p in perms}) == tasks
    expected_train = per_task or BENCHMARKS[benchmark]["train_per_task"]
    images, labels = stream.train(3)
    rows = stream.plans[3]["train"]
    assert images.shape == (expected_train, 1, 28, 28)
    assert torch.equal(images.flatten(1), data.train[0][rows].flatten(1)[:, perms[3]])
    assert torch.equal(stream.test(3)[1], data.test[1][stream.plans[3]["test"]])


def test_split_digits_has_five_disjoint_two_class_tasks():
    stream = make_stream(ContinualConfig())
    assert len(stream) == 5 and stream.image_shape == (1, 8, 8)
    seen = set()
    for t in range(5):
        assert stream.classes(t) == [2 * t, 2 * t + 1]
        for split in (stream.train, stream.test):
            images, labels = split(t)
            assert set(labels.tolist()) == {2 * t, 2 * t + 1}
        rows = set(stream.plans[t]["train"].tolist())
        assert not rows & seen
        seen |= rows
    assert len(seen) == len(stream.images["train"][1])  # every training image, once
    with pytest.raises(ValueError, match="5 tasks"):
        make_stream(ContinualConfig(tasks=6))


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="no shared MNIST copy")
def test_mnist_rotations_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("ADDRMEM_CACHE", str(tmp_path / "cache"))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in os.listdir(SHARED_MNIST):
        with gzip.open(os.path.join(SHARED_MNIST, name)) as src, open(raw / name[:-3], "wb") as dst:
            dst.write(src.read())
    stream = make_stream(ContinualConfig(benchmark="rotations", data_root=str(tmp_path)))
    assert len(stream) == 20
    assert stream.train(0)[0].shape == (1000, 1, 28, 28)
    assert stream.test(19)[0].shape == (10000, 1, 28, 28)


def test_metrics_of_a_hand_made_matrix():
    R = [[90.0, None, None],
         [70.0, 80.0, None],
         [60.0, 50.0, 100.0]]
    m = metrics(R)
    assert m["ra"] == pytest.approx(70.0)  # (60 + 50 + 100) / 3
    assert m["bti"] == pytest.approx(-30.0)  # ((60 - 90) + (50 - 80)) / 2
    assert m["la"] == pytest.approx(90.0)  # (90 + 80 + 100) / 3
    assert m["curve"] == pytest.approx([90.0, 75.0, 70.0])
    assert metrics([[42.0]]) == {"ra": 42.0, "bti": 0.0, "la": 42.0, "curve": [42.0]}


class RecordingStream(Stream):
    """A stream that records which task's data is read, and refuses a later task's."""

    def __init__(self, stream, first=0):
        super().__init__(stream.name, stream.images, stream.plans, stream.num_classes, stream.image_shape,
                         stream.background)
        self.reads = []
        self.learnt = first - 1  # the latest task whose training data has been read (or learnt before)

    def train(self, t):
        assert t <= self.learnt + 1, f"task {t}'s training data read while learning task {self.learnt}"
        self.learnt = max(self.learnt, t)
        self.reads.append(("train", t))
        return super().train(t)

    def test(self, t):
        assert t <= self.learnt, f"task {t}'s test data read after learning only up to task {self.learnt}"
        self.reads.append(("test", t))
        return super().test(t)

    def classes(self, t):
        assert t <= self.learnt or not self.reads, f"task {t}'s classes read while learning {self.learnt}"
        return super().classes(t)


@pytest.mark.parametrize("protocol, bases", [("replay", "task"), ("retrain", "shared")])
def test_every_method_stays_within_budget_and_reads_no_later_task(protocol, bases):
    methods = list(METHODS)
    tiny = {**TINY, "tasks": 3, "distill": {**TINY["distill"], "n_bases": 2}}
    config = ContinualConfig(**tiny, budget_images=6, methods=methods, protocol=protocol, bases=bases)
    stream = RecordingStream(make_stream(config))
    results = run_continual(config, stream=stream, progress=False)
    assert [t for kind, t in stream.reads if kind == "train"] == [0, 1, 2]
    budget = 6 * 64  # six 8x8 images
    assert results["budget_floats"] == budget
    for name, m in results["methods"].items():
        assert all(m["R"][i][j] is None for i in range(3) for j in range(i + 1, 3))
        assert all(0 <= m["R"][i][j] <= 100 for i in range(3) for j in range(i + 1))
        if name != "joint":  # the upper bound keeps everything
            assert m["max_floats"] <= budget, name
    assert results["methods"]["joint"]["num_floats"] == sum(len(stream.plans[t]["train"]) for t in range(3)) * 64
    assert results["methods"]["replay"]["num_floats"] == budget
    assert results["methods"]["image"]["num_floats"] == 3 * 2 * 64  # one image per class of each task
    # Addressable, K = 2 bases of 64 floats (128) and rows of 2 coefficients. Bases per task: a task's share,
    # 384 / 3 = 128 floats, leaves no row, so each task keeps one row per class (128 + 2 * 2 = 132 floats) and
    # the oldest task is dropped to fit: 2 * 132. Shared bases: (384 - 128) // 3 = 85 floats per task,
    # 21 rows per class: 128 + 3 * 2 * 21 * 2.
    assert results["methods"]["addressable"]["num_floats"] == (2 * 132 if bases == "task" else 128 + 3 * 2 * 21 * 2)


def test_resume_gives_the_uninterrupted_result(tmp_path):
    config = ContinualConfig(**TINY)
    whole = run_continual(config, str(tmp_path / "whole"), progress=False)

    class Interrupted(Stream):
        def train(self, t):
            if t == 1:
                raise KeyboardInterrupt
            return super().train(t)

    stream = make_stream(config)
    cut = Interrupted(stream.name, stream.images, stream.plans, stream.num_classes, stream.image_shape,
                      stream.background)
    with pytest.raises(KeyboardInterrupt):
        run_continual(config, str(tmp_path / "cut"), stream=cut, progress=False)
    assert not os.path.exists(tmp_path / "cut" / "results.json")
    stream = RecordingStream(make_stream(config), first=1)
    resumed = run_continual(config, str(tmp_path / "cut"), resume=True, stream=stream, progress=False)
    assert [t for kind, t in stream.reads if kind == "train"] == [1]  # task 0 came from the checkpoint
    for name in config.methods:
        for key in ("R", "ra", "bti", "la", "num_floats"):
            assert resumed["methods"][name][key] == whole["methods"][name][key], (name, key)
    for name in ("config.yaml", "checkpoint.pt", "results.json", "accuracy.png", "R-addressable.png"):
        assert os.path.isfile(tmp_path / "cut" / name), name


@pytest.mark.parametrize("name", ["image", "addressable"])
def test_the_budget_is_divided_among_the_tasks_seen(name):
    """After task t every memory holds budget / (t+1): the older ones keep the
    first rows of each class, and their bases."""
    config = ContinualConfig(**{**TINY, "tasks": 3})
    stream = make_stream(config)
    method = _Distilled(name, config, stream)
    sizes = []
    for t in range(3):
        before = [(task, m) for task, _, m in method.memories]
        method.remember(t, *stream.train(t))
        sizes.append([m.per_class for _, _, m in method.memories])
        assert method.num_floats() <= method.budget
        for (task, old), (_, _, new) in zip(before, method.memories):
            for param_name, p in old.named_parameters():
                q = getattr(new, param_name)
                if param_name == "bases":
                    assert torch.equal(p, q)
                else:
                    kept = p.view(old.num_classes, old.per_class, *p.shape[1:])[:, :new.per_class]
                    assert torch.equal(kept.reshape(q.shape), q)
    assert sizes == [[method.per_class(2, 1)], [method.per_class(2, 2)] * 2, [method.per_class(2, 3)] * 3]
    assert sizes[0][0] > sizes[1][0] > sizes[2][0]


def fails(argv, match):
    """main(argv) exits with one line 'addrmem: error: ...' containing ``match``."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = info.value.code
    assert isinstance(message, str) and message.startswith("addrmem: error: "), message
    assert "\n" not in message and match in message, message


def test_cli_runs_split_digits_and_names_bad_input(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(TINY))  # JSON is YAML
    out = str(tmp_path / "run")
    assert main(["continual", "--config", str(config), "--out", out, "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "addressable" in printed and "RA" in printed and out in printed
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["seed"] == 2 and set(results["methods"]) == set(METHODS)
    for m in results["methods"].values():
        assert {"ra", "bti", "la", "R", "num_floats", "seconds"} <= set(m)
    fails(["continual", "--benchmark", "nope", "--out", str(tmp_path / "a")], "unknown benchmark 'nope'")
    small = tmp_path / "small.yaml"
    small.write_text("budget_images: 1\ndistill: {n_bases: 8}\n")
    fails(["continual", "--config", str(small), "--out", str(tmp_path / "b")], "too small")
    fails(["continual", "--benchmark", "rotations", "--data-root", str(tmp_path / "absent"),
           "--out", str(tmp_path / "c")], "does not exist")
    fails(["continual", "--resume", out, "--seed", "1"], "--resume")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
