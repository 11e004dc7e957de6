"""Real cross-silo tabular data shipped with fedpriv: four hospitals' heart disease data, a bank's credit data.

The files live in ``fedpriv/data/<name>/`` with their README (citation, CC BY 4.0).
Nothing here computes a statistic over more than one client's rows: the
training pool keeps raw values (missing ones as NaN, plus a missing-indicator
column each), and each client imputes and standardizes with its own rows only
(:func:`standardize_locally`, called on a client's partition). The server's
test split is prepared the same way with the test split's own statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import ClassVar

import numpy as np
import torch

from fedpriv.checks import check_int
from fedpriv.datasets import DatasetSplits, check_test_fraction, Dataset, stratified_split

HEART_DISEASE_SILOS = ("cleveland", "hungarian", "switzerland", "va")
"""The four hospitals, in silo-id order: Cleveland, Budapest, Zurich/Basel, Long Beach."""
HEART_DISEASE_FEATURES = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak", "slope", "ca", "thal",
)


def _data_file(folder: str, name: str) -> str:
    return str(resources.files("fedpriv").joinpath("data", folder, name))


def standardize_locally(x: torch.Tensor, *, value_columns: int) -> torch.Tensor:
    """Impute and standardize the first ``value_columns`` columns with ``x``'s own statistics.

    Missing values (NaN) become the column's mean over the rows that have it; then
    each column is centred and scaled by its own standard deviation (1 where it
    is 0). A column missing in every row becomes 0. Columns after
    ``value_columns`` (the missing indicators) are left as they are.

    Parameters
    ----------
    x : torch.Tensor
        ``[n, d]`` rows of one party (a client, or the server's test split); left untouched.
    value_columns : int
        How many leading columns hold values.

    Returns
    -------
    torch.Tensor
        A new float32 tensor without NaN.
    """
    values = x[:, :value_columns].double()
    present = ~torch.isnan(values)
    counts = present.sum(dim=0)
    filled = torch.where(present, values, torch.zeros_like(values))
    mean = filled.sum(dim=0) / counts.clamp(min=1)
    centred = torch.where(present, values - mean, torch.zeros_like(values))
    std = torch.sqrt((centred**2).sum(dim=0) / counts.clamp(min=1))
    scaled = centred / torch.where(std > 0, std, torch.ones_like(std))
    return torch.cat([scaled.float(), x[:, value_columns:].float()], dim=1)


@dataclass(frozen=True)
class HeartDisease(Dataset):
    """UCI Heart Disease from four hospitals (303, 294, 123, 200 patients), binary target ``num > 0``.

    Each example has the 13 clinical values (missing ones, and ``chol = 0``, as
    NaN in the training pool) followed by 13 missing-indicator columns; clients
    impute and standardize with their own rows (:func:`standardize_locally`).
    The silo of every training example is kept for ``partition=natural``. The
    test split holds ``test_fraction`` of each hospital's patients, per label.

    Parameters
    ----------
    test_fraction : float
        Fraction of each (hospital, label) group held out for the server, in (0, 1).
    seed : int
        Seed of the train/test split.
    """

    test_fraction: float = 0.2
    seed: int = 0

    input_shape: ClassVar[tuple[int, ...]] = (2 * len(HEART_DISEASE_FEATURES),)
    num_classes: ClassVar[int] = 2

    def __post_init__(self) -> None:
        check_test_fraction("test_fraction", self.test_fraction)
        check_int("dataset.seed", self.seed, minimum=0)

    def local_features(self, x: torch.Tensor) -> torch.Tensor:
        """One party's rows, imputed and standardized with that party's own statistics."""
        return standardize_locally(x, value_columns=len(HEART_DISEASE_FEATURES))

    def _build(self) -> DatasetSplits:
        tables = [
            np.genfromtxt(_data_file("heart_disease", f"processed.{silo}.data"), delimiter=",")
            for silo in HEART_DISEASE_SILOS
        ]
        table = np.concatenate(tables)
        silo = np.concatenate([np.full(len(t), i) for i, t in enumerate(tables)])
        values = table[:, : len(HEART_DISEASE_FEATURES)].copy()
        values[:, HEART_DISEASE_FEATURES.index("chol")] = np.where(
            values[:, HEART_DISEASE_FEATURES.index("chol")] == 0, np.nan, values[:, HEART_DISEASE_FEATURES.index("chol")]
        )
        labels = (table[:, -1] > 0).astype(np.int64)
        train, test = stratified_split(
            silo * 2 + labels, test_fraction=self.test_fraction, rng=np.random.default_rng(self.seed)
        )
        x = torch.from_numpy(np.concatenate([values, np.isnan(values)], axis=1)).float()
        y = torch.from_numpy(labels)
        return DatasetSplits(
            train_x=x[train],
            train_y=y[train],
            test_x=self.local_features(x[test]),
            test_y=y[test],
            num_classes=self.num_classes,
            train_silo=torch.from_numpy(silo[train]),
        )


@dataclass(frozen=True)
class GermanCredit(Dataset):
    """Statlog German Credit: 1,000 applicants, 24 numeric attributes; label 1 = bad risk (300), 0 = good.

    No natural silos: partition it to simulate banks. Each client standardizes
    with its own rows; the cost of a model is the data set's documented matrix
    (a bad risk predicted good costs 5, a good one predicted bad costs 1).

    Parameters
    ----------
    test_fraction : float
        Fraction of each class held out for the server, in (0, 1).
    seed : int
        Seed of the train/test split.
    """

    test_fraction: float = 0.2
    seed: int = 0

    input_shape: ClassVar[tuple[int, ...]] = (24,)
    num_classes: ClassVar[int] = 2
    costs: ClassVar[tuple[float, float]] = (1.0, 5.0)
    """Cost of a false positive (good predicted bad) and of a false negative (bad predicted good)."""

    def __post_init__(self) -> None:
        check_test_fraction("test_fraction", self.test_fraction)
        check_int("dataset.seed", self.seed, minimum=0)

    def local_features(self, x: torch.Tensor) -> torch.Tensor:
        """One party's rows, standardized with that party's own statistics."""
        return standardize_locally(x, value_columns=x.shape[1])

    def _build(self) -> DatasetSplits:
        table = np.loadtxt(_data_file("german_credit", "german.data-numeric"))
        labels = (table[:, -1] == 2).astype(np.int64)
        train, test = stratified_split(labels, test_fraction=self.test_fraction, rng=np.random.default_rng(self.seed))
        x = torch.from_numpy(table[:, :-1]).float()
        y = torch.from_numpy(labels)
        return DatasetSplits(
            train_x=x[train], train_y=y[train], test_x=self.local_features(x[test]), test_y=y[test], num_classes=2
        )
