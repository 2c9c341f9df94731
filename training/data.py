"""Fashion-MNIST as uint8 tensors: from IDX files on disk, or downloaded by torchvision."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# Where Debian's `dataset-fashion-mnist` package installs the four IDX files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_ROOT = Path("~/.pytorch/F_MNIST_data").expanduser()
SPLITS = {"train": "train", "test": "t10k"}


class DataNotFoundError(FileNotFoundError):
    """Fashion-MNIST is neither on disk nor downloadable; the message says how to get it."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, 28, 28) uint8
    labels: torch.Tensor  # (N,) int64


@dataclass(frozen=True)
class FashionMNIST:
    train: Split
    test: Split
    source: str


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the format of the MNIST family of data sets."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header declares {dims} ({expected} bytes), file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for sub in (folder, folder / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (sub / name).is_file():
                return sub / name
    return None


def _load_folder(folder: Path) -> FashionMNIST | None:
    paths = {}
    for split, prefix in SPLITS.items():
        for kind, ndim in (("images", 3), ("labels", 1)):
            path = _find_idx(folder, f"{prefix}-{kind}-idx{ndim}-ubyte")
            if path is None:
                return None
            paths[split, kind] = path
    splits = {}
    for split in SPLITS:
        images = torch.from_numpy(read_idx(paths[split, "images"]).copy())
        labels = torch.from_numpy(read_idx(paths[split, "labels"]).astype(np.int64))
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(f"{folder}: {split} images {tuple(images.shape)} do not match labels {len(labels)}")
        splits[split] = Split(images, labels)
    return FashionMNIST(splits["train"], splits["test"], source=f"idx:{folder}")


def _download(root: Path) -> FashionMNIST:
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    train = TorchvisionFashionMNIST(str(root), train=True, download=True)
    test = TorchvisionFashionMNIST(str(root), train=False, download=True)
    return FashionMNIST(
        Split(train.data.clone(), train.targets.long()),
        Split(test.data.clone(), test.targets.long()),
        source=f"torchvision:{root}",
    )


def load_fashion_mnist(data_dir: Path | None = None, download: bool = False) -> FashionMNIST:
    """Find Fashion-MNIST: `data_dir`, $FASHION_MNIST_DIR, Debian's package, torchvision's cache.

    With `download`, fall back to torchvision's download into `data_dir` (or its cache).
    """
    candidates = [data_dir] if data_dir else []
    if os.environ.get("FASHION_MNIST_DIR"):
        candidates.append(Path(os.environ["FASHION_MNIST_DIR"]))
    candidates += [DEBIAN_DIR, TORCHVISION_ROOT]
    for folder in candidates:
        if folder.is_dir() and (found := _load_folder(folder)) is not None:
            return found
    if download:
        return _download(data_dir or TORCHVISION_ROOT)
    searched = ", ".join(str(c) for c in candidates)
    raise DataNotFoundError(
        f"Fashion-MNIST not found (looked in {searched}). Either install it with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), pass --data-dir DIR holding "
        "the four IDX files (train-images-idx3-ubyte[.gz], ...), or add --download to fetch it "
        "with torchvision (needs internet)."
    )
