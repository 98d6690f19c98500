"""addrmem.data: the digits splits, normalisation, the registry, MNIST files."""

import gzip
import os
import shutil

import pytest
import torch

from addrmem.data import DATASETS, Dataset, RawData, load_dataset, register_dataset

SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_and_splits(digits):
    assert isinstance(digits, Dataset)
    assert digits.num_classes == 10 and digits.image_shape == (1, 8, 8)
    assert digits.classes == [str(c) for c in range(10)]
    sizes = [len(split[1]) for split in (digits.train, digits.val, digits.test)]
    assert sum(sizes) == 1797 and sizes[2] == 599  # a third held out for test
    for images, labels in (digits.train, digits.val, digits.test):
        assert images.dtype == torch.float32 and images.shape[1:] == (1, 8, 8)
        assert labels.dtype == torch.int64 and len(images) == len(labels)
    # stratified: every class in every split; validation is 10 % of each class
    train_counts = digits.train[1].bincount(minlength=10)
    val_counts = digits.val[1].bincount(minlength=10)
    assert (digits.test[1].bincount(minlength=10) >= 58).all()
    assert ((val_counts - 0.1 * (train_counts + val_counts)).abs() <= 1).all()


def test_digits_splits_are_disjoint(digits):
    rows = [set(map(tuple, split[0].flatten(1).tolist())) for split in (digits.train, digits.val, digits.test)]
    # digits has a few duplicate images, so compare how many distinct images each split adds
    assert len(rows[0] | rows[1] | rows[2]) >= 0.99 * sum(len(r) for r in rows)


def test_normalised_with_train_statistics(digits):
    images = digits.train[0]
    assert abs(float(images.mean())) < 1e-5 and abs(float(images.std()) - 1) < 1e-5
    raw = digits.denormalize(images)
    assert raw.min() >= 0 and raw.max() <= 1
    # digits values are multiples of 1/16
    assert torch.allclose(raw * 16, (raw * 16).round(), atol=1e-4)


def test_deterministic_and_seeded():
    a, b = load_dataset("digits"), load_dataset("digits")
    for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    c = load_dataset("digits", split_seed=1)
    assert torch.equal(c.test[1], a.test[1])  # the test split is fixed
    assert torch.allclose(c.denormalize(c.test[0]), a.denormalize(a.test[0]), atol=1e-6)
    assert not torch.equal(c.val[0], a.val[0])  # the validation draw follows split_seed


def test_unknown_dataset_lists_known():
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*digits"):
        load_dataset("nope")


def test_bad_val_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.5)


def test_registry_accepts_new_dataset():
    def loader(root):
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(3).repeat(10)
        return RawData(torch.rand(30, 2, 4, 4, generator=g), labels, torch.rand(6, 2, 4, 4, generator=g),
                       torch.arange(3).repeat(2), ["a", "b", "c"])

    register_dataset("toy-test", loader)
    try:
        data = load_dataset("toy-test")
        assert data.image_shape == (2, 4, 4) and data.num_classes == 3 and data.mean.shape == (2,)
        assert len(data.val[1]) == 3 and len(data.train[1]) == 27
    finally:
        del DATASETS["toy-test"]


def test_mnist_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-root"):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("mnist", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="MNIST/raw"):
        load_dataset("mnist", str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="no shared MNIST copy")
def test_mnist_from_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in os.listdir(SHARED_MNIST):
        if name.endswith(".gz"):
            with gzip.open(os.path.join(SHARED_MNIST, name)) as src, open(raw / name[:-3], "wb") as dst:
                shutil.copyfileobj(src, dst)
    data = load_dataset("mnist", str(tmp_path))
    assert data.image_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.train[1]) + len(data.val[1]) == 60000 and len(data.test[1]) == 10000
    assert abs(len(data.val[1]) - 6000) <= 5
    assert abs(float(data.mean) - 0.1307) < 2e-3 and abs(float(data.std) - 0.3081) < 2e-3
