"""addrmem.data: splits, normalisation, the registry, the file datasets and
their cache, data errors, ZCA whitening and display."""

import gzip
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
from torchvision.io import write_jpeg, write_png

from addrmem import data as data_module
from addrmem.data import DATASETS, ZCA, Dataset, RawData, load_dataset, register_dataset, to_display

# Optional real data, in a folder beside the checkout (../shared/data, or $ADDRMEM_TEST_DATA); the tests
# that need it are skipped when it is absent. To get the same files:
# * mnist/: the four gzipped IDX files of MNIST (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
#   t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz), e.g. what
#   `torchvision.datasets.MNIST(DIR, download=True)` leaves in DIR/MNIST/raw/;
# * cifar10-jpeg.tar.gz: CIFAR-10 as an ImageFolder tree of 32x32 JPEG files (quality about 75),
#   train/<class>/NNNN.jpg (5,000 per class) and test/<class>/NNNN.jpg (1,000 per class), the class
#   folders named as torchvision's CIFAR10.classes, files numbered from 0000 in each folder, packed with
#   `tar -czf cifar10-jpeg.tar.gz train test`. Make it from `torchvision.datasets.CIFAR10(DIR,
#   download=True)` (train=True and train=False) by saving each image under its class with its index
#   in that class (e.g. torchvision.io.write_jpeg(image, path, quality=75)).
SHARED_DATA = os.environ.get("ADDRMEM_TEST_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                                  "data")
SHARED_MNIST = os.path.join(SHARED_DATA, "mnist")
SHARED_CIFAR10 = os.path.join(SHARED_DATA, "cifar10-jpeg.tar.gz")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = 20  # images per class and split taken from the CIFAR-10 JPEG copy

# torchvision 0.29 deprecates its image decoders (in favour of TorchCodec); they still work
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test caches decoded datasets in its own folder, never in ~/.cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("ADDRMEM_CACHE", str(folder))
    return folder


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
    assert digits.mean.dtype == torch.float32 and digits.mean.shape == (1,) and digits.zca is None
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


def test_bad_val_fraction_and_zca():
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.5)
    with pytest.raises(ValueError, match="zca"):
        load_dataset("digits", zca=-1)


def _toy_loader(root, download):
    """30 train and 6 test random float images (2, 4, 4) of 3 classes."""
    g = torch.Generator().manual_seed(0)
    return RawData(torch.rand(30, 2, 4, 4, generator=g), torch.arange(3).repeat(10),
                   torch.rand(6, 2, 4, 4, generator=g), torch.arange(3).repeat(2), ["a", "b", "c"])


@pytest.fixture
def toy():
    register_dataset("toy-test", _toy_loader)
    yield "toy-test"
    del DATASETS["toy-test"]


def test_registry_accepts_new_dataset(toy):
    data = load_dataset(toy)
    assert data.image_shape == (2, 4, 4) and data.num_classes == 3 and data.mean.shape == (2,)
    assert len(data.val[1]) == 3 and len(data.train[1]) == 27
    assert torch.allclose(data.train[0].mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)  # own statistics


def test_registry_takes_fixed_statistics():
    register_dataset("toy-stats", _toy_loader, stats=((0.5, 0.25), (0.5, 0.125)))
    try:
        data = load_dataset("toy-stats")
    finally:
        del DATASETS["toy-stats"]
    assert data.mean.tolist() == [0.5, 0.25] and data.std.tolist() == [0.5, 0.125]
    assert torch.allclose(data.denormalize(data.test[0]), _toy_loader(None, False).test_images, atol=1e-6)


# ---------------------------------------------------------------- torchvision datasets


def test_mnist_missing_files_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-root"):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("mnist", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="MNIST/raw"):
        load_dataset("mnist", str(tmp_path))


@pytest.mark.parametrize("name, layout", [("fashionmnist", "FashionMNIST/raw/"), ("svhn", "train_32x32.mat"),
                                          ("cifar100", "cifar-100-python/"), ("cifar10", "cifar-10-batches-py/")])
def test_torchvision_datasets_missing_never_download(tmp_path, name, layout):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match="--data-root DIR, or --download") as error:
        load_dataset(name, str(root))
    assert layout in str(error.value) and "\n" not in str(error.value)
    assert list(root.iterdir()) == []  # nothing was fetched
    with pytest.raises(FileNotFoundError, match="--data-root"):
        load_dataset(name)


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="no shared MNIST copy")
def test_mnist_from_idx_files(tmp_path, cache_dir):
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
    assert data.mean.tolist() == [pytest.approx(0.1307)] and data.std.tolist() == [pytest.approx(0.3081)]
    assert len(os.listdir(cache_dir)) == 1  # decoded once, cached


# ---------------------------------------------------------------- the CIFAR-10 JPEG copy


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory):
    """The first PER_CLASS images of each class and split of the shared
    CIFAR-10 JPEG copy, extracted into a fresh ImageFolder tree."""
    if not os.path.isfile(SHARED_CIFAR10):
        pytest.skip("no shared CIFAR-10 JPEG copy")
    root = tmp_path_factory.mktemp("cifar10-jpeg")
    taken = {}
    with tarfile.open(SHARED_CIFAR10, "r|gz") as tar:
        for member in tar:
            folder = os.path.dirname(member.name)
            if member.isfile() and taken.get(folder, 0) < PER_CLASS:
                taken[folder] = taken.get(folder, 0) + 1
                os.makedirs(root / folder, exist_ok=True)
                with tar.extractfile(member) as src, open(root / member.name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return root


@pytest.fixture
def cifar_copy(cifar_subset, tmp_path):
    """A private copy of the subset that a test may change."""
    return shutil.copytree(cifar_subset, tmp_path / "cifar10-jpeg")


def _no_decoding(path):
    raise AssertionError(f"decoded {path} although the cache was valid")


def test_cifar10_jpeg_copy_as_cifar10_and_imagefolder(cifar_subset, cache_dir, monkeypatch):
    cifar = load_dataset("cifar10", str(cifar_subset))
    assert cifar.image_shape == (3, 32, 32) and cifar.num_classes == 10 and cifar.classes == CIFAR10_CLASSES
    assert len(cifar.train[1]) + len(cifar.val[1]) == 10 * PER_CLASS and len(cifar.test[1]) == 10 * PER_CLASS
    assert (cifar.test[1].bincount(minlength=10) == PER_CLASS).all()
    assert cifar.mean.tolist() == pytest.approx([0.4914, 0.4822, 0.4465])  # the official constants
    assert cifar.std.tolist() == pytest.approx([0.2023, 0.1994, 0.2010])
    assert len(os.listdir(cache_dir)) == 1

    monkeypatch.setattr(data_module, "_decode", _no_decoding)  # both now read the cache
    folder = load_dataset("imagefolder", str(cifar_subset))
    assert folder.classes == CIFAR10_CLASSES and folder.image_shape == (3, 32, 32)
    assert torch.allclose(folder.train[0].mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)  # own statistics
    assert torch.allclose(folder.denormalize(folder.test[0]), cifar.denormalize(cifar.test[0]), atol=1e-5)
    again = load_dataset("cifar10", str(cifar_subset))
    assert torch.equal(again.train[0], cifar.train[0]) and torch.equal(again.test[1], cifar.test[1])


def test_cache_follows_added_and_changed_files(cifar_copy, monkeypatch):
    before = load_dataset("cifar10", str(cifar_copy))
    shutil.copy(cifar_copy / "train" / "cat" / "0000.jpg", cifar_copy / "train" / "cat" / "9999.jpg")
    added = load_dataset("cifar10", str(cifar_copy))
    assert len(added.train[1]) + len(added.val[1]) == 10 * PER_CLASS + 1

    changed = cifar_copy / "test" / "airplane" / "0000.jpg"  # the first test image
    shutil.copy(cifar_copy / "test" / "truck" / "0000.jpg", changed)
    os.utime(changed, ns=(1, 1))
    after = load_dataset("cifar10", str(cifar_copy))
    assert torch.equal(after.test[0][0], before.test[0][-PER_CLASS])  # now the first truck
    assert torch.equal(after.test[0][1:], before.test[0][1:])

    monkeypatch.setattr(data_module, "_decode", _no_decoding)
    load_dataset("cifar10", str(cifar_copy))  # unchanged since: from the cache


def test_corrupt_cache_is_rewritten(cifar_copy, cache_dir):
    first = load_dataset("imagefolder", str(cifar_copy))
    (entry,) = cache_dir.iterdir()
    entry.write_bytes(b"not a torch file")
    again = load_dataset("imagefolder", str(cifar_copy))
    assert torch.equal(again.train[0], first.train[0])
    assert torch.load(entry, weights_only=True)["data"]["train_images"].dtype == torch.uint8
    assert [p.name for p in cache_dir.iterdir()] == [entry.name]  # no temporary file left


def test_cifar10_imagefolder_with_other_classes_is_refused(tmp_path):
    _write_tree(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}, (3, 32, 32))
    with pytest.raises(ValueError, match="CIFAR-10 classes.*--data-root"):
        load_dataset("cifar10", str(tmp_path))


# ---------------------------------------------------------------- synthetic ImageFolder trees


def _write_tree(root, counts, shape, writer=write_png):
    """Write ``counts[split][class]`` random images of ``shape`` (C, H, W)
    under ``root/split/class/``; returns {path: image}."""
    g = torch.Generator().manual_seed(0)
    images = {}
    for split, classes in counts.items():
        for name, n in classes.items():
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(n):
                path = root / split / name / f"{i:03d}.{'png' if writer is write_png else 'jpg'}"
                images[path] = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
                writer(images[path], str(path))
    return images


def test_imagefolder_grayscale_exact(tmp_path):
    images = _write_tree(tmp_path, {"train": {"b": 3, "a": 4}, "test": {"a": 1, "b": 2}}, (1, 5, 6))
    (tmp_path / "train" / "a" / "notes.txt").write_text("ignored: not an image")
    data = load_dataset("imagefolder", str(tmp_path))
    assert data.image_shape == (1, 5, 6) and data.classes == ["a", "b"]  # sorted by name
    assert data.test[1].tolist() == [0, 1, 1]
    expected = torch.stack([images[tmp_path / "test" / c / f"{i:03d}.png"] for c, i in (("a", 0), ("b", 0), ("b", 1))])
    assert torch.equal((data.denormalize(data.test[0]) * 255).round().to(torch.uint8), expected)


def test_imagefolder_mixed_gray_and_rgb_is_rgb(tmp_path):
    _write_tree(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}, (1, 4, 4))
    _write_tree(tmp_path, {"train": {"c": 3}}, (3, 4, 4), writer=write_jpeg)
    _write_tree(tmp_path, {"test": {"c": 1}}, (1, 4, 4))
    data = load_dataset("imagefolder", str(tmp_path))
    assert data.image_shape == (3, 4, 4) and len(data.train[1]) + len(data.val[1]) == 7
    gray = data.denormalize(data.test[0])
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-6) and torch.allclose(gray[:, 0], gray[:, 2], atol=1e-6)


def test_imagefolder_sizes_must_match(tmp_path):
    _write_tree(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}, (3, 8, 8))
    write_png(torch.zeros(3, 8, 7, dtype=torch.uint8), str(tmp_path / "test" / "b" / "odd.png"))
    with pytest.raises(ValueError, match=r"odd\.png' is 8x7 .* is 8x8"):
        load_dataset("imagefolder", str(tmp_path))


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-root"):
        load_dataset("imagefolder")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"test' does not exist.*DIR/test/<class>/<image>.*--data-root DIR"):
        load_dataset("imagefolder", str(tmp_path))
    (tmp_path / "test").mkdir()
    with pytest.raises(ValueError, match="holds no class folders"):
        load_dataset("imagefolder", str(tmp_path))
    _write_tree(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1}}, (1, 4, 4))
    with pytest.raises(ValueError, match=r"train/b' has no counterpart"):
        load_dataset("imagefolder", str(tmp_path))
    (tmp_path / "test" / "b").mkdir()
    with pytest.raises(ValueError, match=r"test/b' holds no images"):
        load_dataset("imagefolder", str(tmp_path))
    (tmp_path / "test" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        load_dataset("imagefolder", str(tmp_path))


# ---------------------------------------------------------------- ZCA and display


def _correlated(n, shape=(2, 4, 4), seed=0):
    """``n`` random images whose pixels are strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    d = torch.Size(shape).numel()
    mixing = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[:, None]
    return (torch.randn(n, d, generator=g) @ mixing + 3).reshape(n, *shape)


def _centred_unit(images):
    x = images.flatten(1).double()
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True)


def test_zca_whitens_to_the_shrunk_identity():
    images, reg = _correlated(4000), 0.1
    zca = ZCA.fit(images, reg)
    x = _centred_unit(images)
    eigenvalues, eigenvectors = torch.linalg.eigh(x.T @ x / len(x))
    shrunk = eigenvalues / (eigenvalues + reg * eigenvalues.mean())
    white = zca(images)
    assert white.dtype == torch.float32 and white.shape == images.shape
    w = white.flatten(1).double()
    expected = eigenvectors @ torch.diag(shrunk) @ eigenvectors.T
    assert torch.allclose(w.T @ w / len(w), expected, atol=1e-4)
    assert torch.allclose(zca.eigenvalues, eigenvalues, atol=1e-6)
    assert not torch.allclose(x.T @ x / len(x), expected, atol=1e-2)  # whitening did something


def test_zca_inverse_and_state_dict(tmp_path):
    images = _correlated(500)
    zca = ZCA.fit(images, 0.1)
    many, few = images, images[:5]  # both orders of the matrix products
    for x in (many, few):
        assert torch.allclose(zca.inverse(zca(x)).flatten(1).double(), _centred_unit(x), atol=1e-5)
    state = zca.state_dict()
    assert set(state) == {"eigenvectors", "eigenvalues", "reg"} and isinstance(state["reg"], float)
    torch.save(state, tmp_path / "zca.pt")
    again = ZCA.from_state_dict(torch.load(tmp_path / "zca.pt", weights_only=True))
    assert torch.equal(again(images), zca(images)) and torch.equal(again.inverse(images), zca.inverse(images))
    with pytest.raises(ValueError, match="positive"):
        ZCA.fit(images, 0)


def test_load_dataset_whitens_every_split_with_the_train_fit(toy):
    plain, white = load_dataset(toy), load_dataset(toy, zca=0.1)
    assert plain.zca is None and isinstance(white.zca, ZCA)
    # the whitening replaces the per-channel normalisation: it starts from the pixels in [0, 1]
    assert torch.equal(white.mean, torch.zeros(2)) and torch.equal(white.std, torch.ones(2))

    raw = _toy_loader(None, False)
    train, _, val, _ = data_module._split_validation(raw.train_images, raw.train_labels, 3, 0.1, 0)
    refit = ZCA.fit(train, 0.1)
    assert torch.allclose(white.zca.eigenvalues, refit.eigenvalues, atol=1e-10)
    for x, (y, a), b in zip((train, val, raw.test_images), (white.train, white.val, white.test),
                            (plain.train[1], plain.val[1], plain.test[1])):
        assert torch.equal(a, b) and torch.allclose(y, refit(x), atol=1e-5)
    preprocessing = white.preprocessing()
    assert preprocessing["mean"] == [0.0, 0.0] and preprocessing["std"] == [1.0, 1.0]
    assert preprocessing["zca"]["reg"] == 0.1
    assert plain.preprocessing() == {"mean": plain.mean.tolist(), "std": plain.std.tolist(), "zca": None}


def _official_zca(train, test, reg):
    """The official code's ``preprocess`` (KIP's), rewritten in numpy from its description: raw
    uint8 images (N, H, W, C) -> flattened, each centred on its own mean and scaled to unit norm,
    multiplied by V diag(1/sqrt(lambda + reg * mean lambda)) V^T from ``np.linalg.eig`` of the
    training covariance (1/N) X^T X; returned (N, C, H, W) float64."""
    flat = [x.reshape(len(x), -1).astype(np.float64) for x in (train, test)]
    flat = [x - x.mean(axis=1, keepdims=True) for x in flat]
    flat = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in flat]
    eigenvalues, eigenvectors = np.linalg.eig(flat[0].T @ flat[0] / len(flat[0]))
    eigenvalues, eigenvectors = eigenvalues.real, eigenvectors.real
    whitening = eigenvectors @ np.diag((eigenvalues + reg * eigenvalues.sum() / len(eigenvalues)) ** -0.5) \
        @ eigenvectors.T
    return [(x @ whitening).reshape(image.shape).transpose(0, 3, 1, 2) for x, image in zip(flat, (train, test))]


@pytest.mark.parametrize("reg", [0.1, 100.0])
def test_zca_matches_the_official_pipeline_on_raw_pixels(reg):
    """CIFAR-like uint8 RGB images with the CIFAR-10 constants registered: load_dataset(zca=reg)
    equals the official whitening of the raw pixels (which ignores the per-channel constants)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (1, 3, 4, 4), generator=g).float()
    train = (base * 0.5 + torch.randint(0, 128, (200, 3, 4, 4), generator=g)).clamp(0, 255).to(torch.uint8)
    train[:, 2] //= 3  # channels with different statistics, where normalising first would differ
    test = train[:20].flip(-1).contiguous()
    labels = torch.arange(4).repeat(50)

    def loader(root, download):
        return RawData(train, labels, test, labels[:20], ["a", "b", "c", "d"])

    cifar_stats = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    register_dataset("toy-uint8", loader, stats=cifar_stats)
    register_dataset("toy-uint8-other-stats", loader, stats=((0.1, 0.9, 0.5), (1.0, 0.2, 3.0)))
    try:
        white = load_dataset("toy-uint8", zca=reg)
        other = load_dataset("toy-uint8-other-stats", zca=reg)
        normalised = load_dataset("toy-uint8")
    finally:
        del DATASETS["toy-uint8"], DATASETS["toy-uint8-other-stats"]
    # the official code fits on its whole training set; addrmem on the train split (no validation images)
    kept, _, _, _ = data_module._split_validation(torch.arange(len(labels)), labels, 4, 0.1, 0)
    nhwc = train.permute(0, 2, 3, 1).numpy()
    expected_train, expected_test = _official_zca(nhwc[kept.numpy()], test.permute(0, 2, 3, 1).numpy(), reg)
    for got, expected in ((white.train[0], expected_train), (white.test[0], expected_test)):
        expected = torch.from_numpy(expected)
        assert torch.allclose(got.double(), expected, atol=1e-4 * float(expected.abs().max()))
    assert torch.equal(white.train[0], other.train[0]) and torch.equal(white.test[0], other.test[0])
    assert white.preprocessing()["mean"] == [0.0] * 3 and white.preprocessing()["std"] == [1.0] * 3
    # whitening the per-channel-normalised images instead (addrmem before) gives other images
    before = ZCA.fit(normalised.train[0], reg)(normalised.test[0]).double()
    assert (before - torch.from_numpy(expected_test)).norm() > 0.01 * before.norm()
    shown = to_display(white.test[0], white.preprocessing())
    assert shown.shape == (20, 3, 4, 4) and shown.min() >= 0 and shown.max() <= 1


def test_to_display_in_unit_range(toy):
    plain, white = load_dataset(toy), load_dataset(toy, zca=0.1)
    for data in (plain, white):
        shown = to_display(data.test[0], data.preprocessing())
        assert shown.shape == (6, 2, 4, 4) and shown.dtype == torch.float32 and shown.device.type == "cpu"
        assert shown.min() >= 0 and shown.max() <= 1
        assert torch.equal(shown, data.denormalize(data.test[0]))
    per_image = to_display(white.test[0], white.preprocessing()).flatten(1).aminmax(dim=1)
    assert torch.allclose(per_image.min, torch.zeros(6)) and torch.allclose(per_image.max, torch.ones(6))
    # with ZCA, what is shown is the image up to its own brightness and contrast
    original = _toy_loader(None, False).test_images.flatten(1)
    shown = to_display(white.test[0], white.preprocessing()).flatten(1)
    assert all(torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99 for a, b in zip(shown, original))


@pytest.mark.parametrize("name, layout", [("mnist", "MNIST/raw/"), ("cifar10", "cifar-10-batches-py/")])
def test_download_offline_says_where_to_place_the_files(tmp_path, monkeypatch, name, layout):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=f"{name} could not be downloaded into .*: place .*{layout}.* "
                                                f"yourself, and run without --download"):
        load_dataset(name, str(tmp_path / "data"), download=True)
