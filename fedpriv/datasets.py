"""Datasets: the clients' training pool and the server's held-out test split.

Every dataset is a frozen dataclass built by Hydra from a flat config (``_target_``
plus fields). Constructing one only validates the fields; ``load()`` reads the data
and is memoized per dataset value, because every simulated client in a process
calls it every round.
"""

from __future__ import annotations

import abc
import functools
import gzip
import math
import os
import tempfile
from importlib.util import find_spec
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from fedpriv.checks import check_int, fail

_SPLIT_SOURCES = ("official", "test_file")
_IDX_KINDS = ("images-idx3-ubyte", "labels-idx1-ubyte")


class DatasetNotFoundError(ValueError):
    """The dataset's files are not on disk and downloading is switched off."""


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """The clients' training pool and the server's held-out test split, as tensors.

    The tensors are shared by every caller of the memoized ``load()``: treat them as
    read-only.

    Attributes
    ----------
    train_x : torch.Tensor
        float32, shape ``[N, *input_shape]``; the pool that is partitioned among clients.
    train_y : torch.Tensor
        int64, shape ``[N]``.
    test_x : torch.Tensor
        float32, shape ``[M, *input_shape]``; the server's held-out split.
    test_y : torch.Tensor
        int64, shape ``[M]``.
    num_classes : int
        Number of classes of the task.
    train_silo : torch.Tensor or None
        int64, shape ``[N]``: the natural silo of each training example
        (``partition=natural``); ``None`` for data sets without silos.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    train_silo: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, without the batch dimension."""
        return tuple(self.train_x.shape[1:])


def check_test_fraction(key: str, value: object) -> None:
    """Refuse a ``dataset.<key>`` outside (0, 1), naming it."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < 1:
        raise fail(f"dataset.{key}", value, "must be in (0, 1)")


def stratified_split(
    labels: np.ndarray, *, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, test), holding out ``test_fraction`` of each class.

    Parameters
    ----------
    labels : np.ndarray
        Class label of every example.
    test_fraction : float
        Fraction of each class that goes to the test side (rounded half up per class).
    rng : np.random.Generator
        Source of the per-class shuffles.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        Sorted, disjoint train and test indices that together cover all examples.

    Raises
    ------
    ValueError
        If one side would be empty.
    """
    # Round half up: Python's round() would send a 1-example class to train at 0.5.
    held_out = [
        rng.permutation(members)[: math.floor(test_fraction * members.size + 0.5)]
        for members in (np.flatnonzero(labels == c) for c in np.unique(labels))
    ]
    test = np.sort(np.concatenate(held_out))
    train = np.setdiff1d(np.arange(labels.size), test)
    if test.size == 0 or train.size == 0:
        raise ValueError(
            f"dataset.test_fraction={test_fraction}: splits {labels.size} examples into "
            f"{train.size} training and {test.size} test examples; both must be non-empty"
        )
    return train, test


def _subset(size: int, *, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted random subset of ``range(size)`` of at most ``limit`` indices (0 = all)."""
    if limit == 0 or limit >= size:
        return np.arange(size)
    return np.sort(rng.choice(size, size=limit, replace=False))


@functools.lru_cache(maxsize=4)
def _load_cached(dataset: Dataset) -> DatasetSplits:
    return dataset._build()


class Dataset(abc.ABC):
    """Memoized loading shared by all datasets (subclasses are frozen dataclasses)."""

    input_shape: ClassVar[tuple[int, ...]]
    num_classes: ClassVar[int]
    def local_features(self, x: torch.Tensor) -> torch.Tensor:
        """One party's rows as its model sees them (tabular data: its own imputation and scaling)."""
        return x

    def load(self) -> DatasetSplits:
        """Load the splits; repeated calls with an equal dataset return the same object.

        Returns
        -------
        DatasetSplits
            The clients' training pool and the server's held-out test split.
        """
        return _load_cached(self)

    @abc.abstractmethod
    def _build(self) -> DatasetSplits:
        """Read and split the data (uncached)."""


@dataclass(frozen=True)
class Synthetic(Dataset):
    """Random 8x8 single-channel images with random labels (10 classes): as many as you ask for.

    For scale and speed measurements (digits has too few examples for 10,000
    clients); nothing can be learned from it.

    Parameters
    ----------
    test_fraction : float
        Fraction of ``num_examples`` held out for the server, in (0, 1).
    seed : int
        Seed of the data.
    num_examples : int
        Examples in all, before the hold-out, ``>= 2``.
    """

    test_fraction: float = 0.2
    seed: int = 0
    num_examples: int = 2_000

    input_shape: ClassVar[tuple[int, ...]] = (1, 8, 8)
    num_classes: ClassVar[int] = 10

    def __post_init__(self) -> None:
        """Validate the settings."""
        check_test_fraction("test_fraction", self.test_fraction)
        check_int("dataset.seed", self.seed, minimum=0)
        check_int("dataset.num_examples", self.num_examples, minimum=2, maximum=10**8)

    def _build(self) -> DatasetSplits:
        generator = torch.Generator().manual_seed(self.seed)
        x = torch.rand(self.num_examples, *self.input_shape, generator=generator)
        y = torch.randint(0, self.num_classes, (self.num_examples,), generator=generator)
        cut = min(max(int(self.num_examples * (1 - self.test_fraction)), 1), self.num_examples - 1)
        return DatasetSplits(
            train_x=x[:cut], train_y=y[:cut], test_x=x[cut:], test_y=y[cut:], num_classes=self.num_classes
        )


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images ``[1797, 8, 8]`` (values 0 to 16) and labels.

    Read from the file scikit-learn bundles, as ``load_digits`` reads it, but
    without importing scikit-learn: that costs 0.5 s, which every fresh
    ClientApp process of a deployment would pay for each message.
    """
    spec = find_spec("sklearn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():  # a scikit-learn that keeps it elsewhere
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    with gzip.open(path, "rt", encoding="utf-8") as file:
        data = np.loadtxt(file, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


@dataclass(frozen=True)
class Digits(Dataset):
    """scikit-learn's 8x8 handwritten digits (1,797 images, bundled, works offline).

    Images are ``[N, 1, 8, 8]`` float32 scaled to [0, 1]; the split is stratified.

    Parameters
    ----------
    test_fraction : float
        Fraction of each class held out for the server's test split, in (0, 1).
    seed : int
        Seed of the train/test split.
    """

    test_fraction: float = 0.2
    seed: int = 0

    input_shape: ClassVar[tuple[int, ...]] = (1, 8, 8)
    num_classes: ClassVar[int] = 10

    def __post_init__(self) -> None:
        check_test_fraction("test_fraction", self.test_fraction)
        check_int("dataset.seed", self.seed, minimum=0)

    def _build(self) -> DatasetSplits:
        images, labels = digits_arrays()
        x = torch.from_numpy(images / 16.0).float().unsqueeze(1)
        y = torch.from_numpy(labels).long()
        train, test = stratified_split(
            labels,
            test_fraction=self.test_fraction,
            rng=np.random.default_rng(self.seed),
        )
        return DatasetSplits(
            train_x=x[train],
            train_y=y[train],
            test_x=x[test],
            test_y=y[test],
            num_classes=self.num_classes,
        )


@dataclass(frozen=True)
class BreastCancer(Dataset):
    """scikit-learn's Wisconsin breast cancer table (569 rows, 30 features, 2 classes).

    Features are standardised with the mean and standard deviation of the training
    pool only, so nothing about the held-out split leaks into training.

    Parameters
    ----------
    test_fraction : float
        Fraction of each class held out for the server's test split, in (0, 1).
    seed : int
        Seed of the train/test split.
    """

    test_fraction: float = 0.2
    seed: int = 0

    input_shape: ClassVar[tuple[int, ...]] = (30,)
    num_classes: ClassVar[int] = 2

    def __post_init__(self) -> None:
        check_test_fraction("test_fraction", self.test_fraction)
        check_int("dataset.seed", self.seed, minimum=0)

    def _build(self) -> DatasetSplits:
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        train, test = stratified_split(
            bunch.target,
            test_fraction=self.test_fraction,
            rng=np.random.default_rng(self.seed),
        )
        mean = bunch.data[train].mean(axis=0)
        std = bunch.data[train].std(axis=0)
        x = torch.from_numpy((bunch.data - mean) / std).float()
        y = torch.from_numpy(bunch.target).long()
        return DatasetSplits(
            train_x=x[train],
            train_y=y[train],
            test_x=x[test],
            test_y=y[test],
            num_classes=self.num_classes,
        )


@dataclass(frozen=True)
class _TorchvisionImages(Dataset):
    """Image datasets read through torchvision; see ``MNIST`` for the parameters."""

    root: str
    download: bool = False
    split_source: str = "official"
    test_fraction: float = 0.2
    max_train_examples: int = 0
    max_test_examples: int = 0
    seed: int = 0

    _mean: ClassVar[tuple[float, ...]]
    _std: ClassVar[tuple[float, ...]]

    def __post_init__(self) -> None:
        if not isinstance(self.root, (str, os.PathLike)) or not os.fspath(self.root):
            raise ValueError(f"dataset.root={self.root}: must be a non-empty path")
        if not isinstance(self.download, bool):
            raise ValueError(f"dataset.download={self.download}: must be true or false")
        if self.split_source not in _SPLIT_SOURCES:
            raise ValueError(
                f"dataset.split_source={self.split_source}: "
                f"must be one of {', '.join(_SPLIT_SOURCES)}"
            )
        check_test_fraction("test_fraction", self.test_fraction)
        check_int("dataset.max_train_examples", self.max_train_examples, minimum=0)
        check_int("dataset.max_test_examples", self.max_test_examples, minimum=0)
        check_int("dataset.seed", self.seed, minimum=0)

    @property
    def _root(self) -> str:
        return os.path.expanduser(os.fspath(self.root))

    @abc.abstractmethod
    def _read(self, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one official split as uint8 images ``[N, C, H, W]`` and int64 labels."""

    def _build(self) -> DatasetSplits:
        rng = np.random.default_rng(self.seed)
        if self.split_source == "official":
            train_x, train_y = self._read(train=True)
            test_x, test_y = self._read(train=False)
        else:
            x, y = self._read(train=False)
            train, test = stratified_split(
                y.numpy(), test_fraction=self.test_fraction, rng=rng
            )
            train_x, train_y, test_x, test_y = x[train], y[train], x[test], y[test]
        keep_train = _subset(len(train_y), limit=self.max_train_examples, rng=rng)
        keep_test = _subset(len(test_y), limit=self.max_test_examples, rng=rng)
        return DatasetSplits(
            train_x=self._normalise(train_x[keep_train]),
            train_y=train_y[keep_train],
            test_x=self._normalise(test_x[keep_test]),
            test_y=test_y[keep_test],
            num_classes=self.num_classes,
        )

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self._mean).view(-1, 1, 1)
        std = torch.tensor(self._std).view(-1, 1, 1)
        return (images.float() / 255.0 - mean) / std


@dataclass(frozen=True)
class MNIST(_TorchvisionImages):
    """MNIST handwritten digits, parsed by torchvision, normalised with mean/std.

    The IDX files are found either where torchvision puts them
    (``root/MNIST/raw/``) or directly in ``root`` (a flat folder of the four
    ``*-idx?-ubyte`` files, gzipped or not).

    Parameters
    ----------
    root : str
        Folder holding the files (flat, or torchvision's layout below it).
    download : bool
        Download through torchvision when the files are missing.
    split_source : str
        ``"official"``: the official train split goes to the clients and the official
        test split to the server. ``"test_file"``: only the official test file is
        read and split by ``test_fraction`` (stratified) into the clients' pool and
        the server's held-out split.
    test_fraction : float
        Held-out fraction for ``split_source="test_file"``, in (0, 1).
    max_train_examples : int
        Keep a seeded random subset of this many training examples (0 = all).
    max_test_examples : int
        Keep a seeded random subset of this many test examples (0 = all).
    seed : int
        Seed of the split and of the subsets.
    """

    input_shape: ClassVar[tuple[int, ...]] = (1, 28, 28)
    num_classes: ClassVar[int] = 10
    _torchvision_name: ClassVar[str] = "MNIST"
    _mean: ClassVar[tuple[float, ...]] = (0.1307,)
    _std: ClassVar[tuple[float, ...]] = (0.3081,)

    def _read(self, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        import torchvision.datasets
        from torchvision.datasets.mnist import read_image_file, read_label_file

        torchvision_class = getattr(torchvision.datasets, self._torchvision_name)
        root = self._root
        # The same folder as torchvision's MNIST.raw_folder, known before any reading.
        raw_folder = os.path.join(root, torchvision_class.__name__, "raw")
        # torchvision's own check needs all four files uncompressed in raw/, even to
        # read one split; anything short of that is read file by file below.
        complete_layout = all(
            os.path.isfile(os.path.join(raw_folder, os.path.splitext(name)[0]))
            for name, _ in torchvision_class.resources
        )
        if complete_layout:
            dataset = torchvision_class(root, train=train, download=False)
            return dataset.data.unsqueeze(1), dataset.targets

        # Look for every file the split source needs, so one error names them all.
        prefixes = ("train", "t10k") if self.split_source == "official" else ("t10k",)
        stems = [f"{p}-{kind}" for p in prefixes for kind in _IDX_KINDS]
        found = {stem: _find_file(stem, folders=(raw_folder, root)) for stem in stems}
        missing = [stem for stem, path in found.items() if path is None]
        if not missing:
            prefix = "train" if train else "t10k"
            images = _read_idx(found[f"{prefix}-{_IDX_KINDS[0]}"], reader=read_image_file)
            labels = _read_idx(found[f"{prefix}-{_IDX_KINDS[1]}"], reader=read_label_file)
            return images.unsqueeze(1), labels
        if self.download:
            dataset = torchvision_class(root, train=train, download=True)
            return dataset.data.unsqueeze(1), dataset.targets
        raise DatasetNotFoundError(
            f"dataset.root={root}: {self._torchvision_name} files not found: looked for "
            f"{', '.join(f'{stem}[.gz]' for stem in stems)} in {raw_folder} and "
            f"in {root} (missing: {', '.join(missing)}); put them there or set "
            "dataset.download=true"
        )


@dataclass(frozen=True)
class FashionMNIST(MNIST):
    """Fashion-MNIST (Zalando clothing images), in MNIST's file format and layout.

    Same parameters and file lookup as ``MNIST``, with ``root/FashionMNIST/raw/``
    as torchvision's layout.
    """

    _torchvision_name: ClassVar[str] = "FashionMNIST"
    _mean: ClassVar[tuple[float, ...]] = (0.2860,)
    _std: ClassVar[tuple[float, ...]] = (0.3530,)


@dataclass(frozen=True)
class CIFAR10(_TorchvisionImages):
    """CIFAR-10 colour images, parsed by torchvision, normalised per channel.

    Same parameters as ``MNIST``; the files are torchvision's extracted
    ``root/cifar-10-batches-py/``. torchvision checks the checksums of all batches
    before reading either split, so ``split_source="test_file"`` also needs the
    training batches on disk.
    """

    input_shape: ClassVar[tuple[int, ...]] = (3, 32, 32)
    num_classes: ClassVar[int] = 10
    _mean: ClassVar[tuple[float, ...]] = (0.4914, 0.4822, 0.4465)
    _std: ClassVar[tuple[float, ...]] = (0.2470, 0.2435, 0.2616)

    def _read(self, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        import torchvision.datasets

        cifar = torchvision.datasets.CIFAR10
        root = self._root
        folder = os.path.join(root, cifar.base_folder)
        names = [name for name, _ in cifar.train_list + cifar.test_list]
        names.append(cifar.meta["filename"])
        missing = [name for name in names if not os.path.isfile(os.path.join(folder, name))]
        if missing and not self.download:
            raise DatasetNotFoundError(
                f"dataset.root={root}: CIFAR10 files not found: looked for "
                f"{', '.join(names)} in {folder} (missing: {', '.join(missing)}); "
                "extract cifar-10-python.tar.gz into dataset.root or set "
                "dataset.download=true"
            )
        dataset = cifar(root, train=train, download=self.download)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(dataset.targets, dtype=torch.int64)


def _find_file(stem: str, *, folders: tuple[str, ...]) -> str | None:
    """First of ``folder/stem`` or ``folder/stem.gz`` that exists, searching in order."""
    for folder in folders:
        for name in (stem, f"{stem}.gz"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def _read_idx(path: str, *, reader: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Parse an IDX file with torchvision's ``reader``, decompressing ``.gz`` first.

    torchvision's readers ``open()`` the path as is, so a gzipped file is first
    decompressed (by torchvision's own ``extract_archive``) into a temporary folder,
    leaving the data folder untouched.
    """
    if not path.endswith(".gz"):
        return reader(path)
    from torchvision.datasets.utils import extract_archive

    with tempfile.TemporaryDirectory() as scratch:
        return reader(extract_archive(path, scratch))
