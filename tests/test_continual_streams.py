"""addrmem/continual/streams.py: the streams match their definitions and are
seeded; each task holds out a tenth of its training images, disjoint from them.

The one MNIST test needs MNIST's four original gzipped IDX files in a folder
``shared/data/mnist`` beside the repository; it gunzips them into
torchvision's layout, DIR/MNIST/raw/. It is skipped when they are absent;
nothing is downloaded.
"""

import gzip
import os

import pytest
import torch
from torchvision.transforms.v2.functional import InterpolationMode, rotate

from addrmem.continual import BENCHMARKS, ContinualConfig, make_stream
from continual_helpers import fake_mnist

SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


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
    assert stream.test(5)[0].shape == (50, 1, 28, 28)  # the whole test set, rotated
    val_images, val_labels = stream.val(5)  # a tenth as many held-out training images, rotated the same
    val_rows = stream.plans[5]["val"]
    assert val_images.shape == (4, 1, 28, 28) and torch.equal(val_labels, data.val[1][val_rows])
    assert torch.allclose(val_images, rotate(data.val[0][val_rows], stream.plans[5]["transform"][1],
                                             interpolation=InterpolationMode.BILINEAR, fill=[-0.1307 / 0.3081]),
                          atol=1e-6)
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
    assert len(stream.val(3)[1]) == -(-expected_train // 10)


def test_split_digits_has_five_disjoint_two_class_tasks_with_held_out_images():
    stream = make_stream(ContinualConfig())
    assert len(stream) == 5 and stream.image_shape == (1, 8, 8)
    seen = set()
    for t in range(5):
        assert stream.classes(t) == [2 * t, 2 * t + 1]
        for split in (stream.train, stream.val, stream.test):
            images, labels = split(t)
            assert set(labels.tolist()) == {2 * t, 2 * t + 1}
        rows = set(stream.plans[t]["train"].tolist())
        assert not rows & seen
        seen |= rows
        n_train, n_val = len(stream.plans[t]["train"]), len(stream.plans[t]["val"])
        assert 0.08 < n_val / (n_train + n_val) < 0.12  # a held-out tenth
    assert len(seen) == len(stream.images["train"][1])  # every training image, once
    train, val = stream.images["train"][0].flatten(1), stream.images["val"][0].flatten(1)
    assert not (torch.cdist(val, train) == 0).all(1).any()  # held-out images are not training images
    with pytest.raises(ValueError, match="5 tasks"):
        make_stream(ContinualConfig(tasks=6))


def test_uint8_round_trip_is_within_half_a_grey_level():
    stream = make_stream(ContinualConfig())
    images = stream.train(0)[0]
    pixels = stream.to_uint8(images)
    assert pixels.dtype == torch.uint8
    step = (1 / 255) / stream.std.view(1, -1, 1, 1)
    assert ((stream.from_uint8(pixels) - images).abs() <= step / 2 + 1e-6).all()


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
    assert stream.val(0)[0].shape == (100, 1, 28, 28)
    assert stream.test(19)[0].shape == (10000, 1, 28, 28)
