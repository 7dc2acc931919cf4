"""Data sets for the experiments.

``digits``: scikit-learn's bundled 8×8 handwritten digits (1797 images, shipped with scikit-learn,
so it works offline): a fixed-seed stratified train/test split, standardised with the training
set's per-pixel mean and std.

``mnist``: torchvision's MNIST under ``--data-dir``; it is only downloaded when asked
(``--download``), and a missing copy raises ``DatasetNotFoundError`` saying so.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DatasetNotFoundError", "digits", "mnist", "mnist_transform", "MNIST_MEAN", "MNIST_STD"]

# the usual MNIST training-set pixel statistics
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not on disk and downloading was not asked for."""


def digits(seed: int = 0, test_fraction: float = 0.25) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of scikit-learn's digits: float32 features (64), int64 labels; standardised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0  # border pixels that are always 0 stay 0
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std

    def as_dataset(xs: np.ndarray, ys: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(ys, dtype=torch.int64))

    return as_dataset(x_tr, y_tr), as_dataset(x_te, y_te)


def mnist_transform() -> Callable:
    """PIL image → normalised 1×28×28 float tensor."""
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])


def mnist(data_dir: str, download: bool = False,
          dataset_cls: Callable[..., Dataset] | None = None) -> tuple[Dataset, Dataset]:
    """(train, test) MNIST from ``data_dir`` (torchvision layout: ``data_dir/MNIST/raw``).

    ``dataset_cls`` defaults to ``torchvision.datasets.MNIST``; anything with the same
    ``(root, train=, download=, transform=)`` signature works (tests use FakeData this way).
    """
    if dataset_cls is None:
        from torchvision.datasets import MNIST as dataset_cls
    data_dir = os.path.expanduser(data_dir)
    try:
        train = dataset_cls(data_dir, train=True, download=download, transform=mnist_transform())
        test = dataset_cls(data_dir, train=False, download=download, transform=mnist_transform())
    except RuntimeError as e:  # torchvision: "Dataset not found. You can use download=True to download it"
        if download or "not found" not in str(e).lower():
            raise
        raise DatasetNotFoundError(
            f"MNIST was not found under {os.path.abspath(data_dir)!r}. Pass --download to fetch it "
            "(needs internet), or --data-dir pointing at a folder that holds MNIST/raw/."
        ) from e
    return train, test
