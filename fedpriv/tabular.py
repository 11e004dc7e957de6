"""Tabular data: four hospitals' heart disease data and a bank's credit data (shipped), and the user's own CSV.

The files live in ``fedpriv/data/<name>/`` with their README (citation, CC BY 4.0).
Nothing here computes a statistic over more than one client's rows: the
training pool keeps raw values (missing ones as NaN, plus a missing-indicator
column each), and each client imputes and standardizes with its own rows only
(:func:`standardize_locally`, called on a client's partition). The server's
test split is prepared the same way with the test split's own statistics.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import ClassVar

import numpy as np
import torch

from fedpriv.checks import check_int, check_text, fail
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
        chol = values[:, HEART_DISEASE_FEATURES.index("chol")]  # a view: 0 means missing
        chol[chol == 0] = np.nan
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


_MISSING = ("", "na", "nan", "null", "?")


def _column_list(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise fail(key, value, "must be a list of column names")
    names = tuple(str(name) for name in value)
    if len(set(names)) != len(names):
        raise fail(key, value, "names a column twice")
    return names


def _number(text: str, *, column: str, row: int, path: str) -> float:
    if text.strip().lower() in _MISSING:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"dataset.path={path!r}: column {column!r} has the non-numeric value {text!r} in row {row}"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"dataset.path={path!r}: column {column!r} has the value {text!r} in row {row}")
    return value


@dataclass(frozen=True)
class CSV(Dataset):
    """The user's own table: a CSV file with a header row, one example per row.

    Numeric feature columns may have missing cells (empty, ``NA``, ``NaN``,
    ``?``): they become NaN plus a missing-indicator column, and each client
    imputes and standardizes with its own rows (:func:`standardize_locally`).
    Categorical columns are one-hot encoded with the category list given in the
    config, so no party needs anyone else's data to agree on the columns; a
    missing category is all zeros. Classes are the label column's distinct
    values, sorted.

    Parameters
    ----------
    path : str
        The CSV file.
    label_column : str
        The column holding the class.
    feature_columns : list of str or None
        Numeric feature columns; ``None``: every column that is not the label,
        the silo or categorical.
    categorical_columns : mapping of str to list of str, or None
        Categorical columns and their categories (``{color: [red, green]}``).
    silo_column : str or None
        The column naming each row's silo (hospital, bank): ``partition=natural``
        gives one client per silo.
    test_fraction : float
        Fraction of each (silo, class) group held out for the server, in (0, 1).
    seed : int
        Seed of the train/test split.
    """

    path: str | None = None
    label_column: str = "label"
    feature_columns: Sequence[str] | None = None
    categorical_columns: Mapping[str, Sequence[str]] | None = None
    silo_column: str | None = None
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise fail("dataset.path", self.path, "set it to your CSV file")
        check_text("dataset.label_column", self.label_column)
        if self.silo_column is not None:
            check_text("dataset.silo_column", self.silo_column)
        if self.feature_columns is not None:
            object.__setattr__(self, "feature_columns", _column_list("dataset.feature_columns", self.feature_columns))
        categorical = self.categorical_columns
        if categorical is not None and not isinstance(categorical, Mapping | tuple):
            raise fail("dataset.categorical_columns", categorical, "must map each column to its categories")
        pairs = tuple(categorical.items()) if isinstance(categorical, Mapping) else tuple(categorical or ())
        normalised = []
        for column, categories in pairs:
            names = _column_list(f"dataset.categorical_columns.{column}", categories)
            if not names:
                raise fail(f"dataset.categorical_columns.{column}", categories, "must list at least one category")
            normalised.append((str(column), names))
        object.__setattr__(self, "categorical_columns", tuple(normalised))
        check_test_fraction("test_fraction", self.test_fraction)
        check_int("dataset.seed", self.seed, minimum=0)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Numeric values, their missing indicators and the one-hot columns (read from the file)."""
        return self.load().input_shape

    @property
    def num_classes(self) -> int:
        """The label column's distinct values (read from the file)."""
        return self.load().num_classes

    def local_features(self, x: torch.Tensor) -> torch.Tensor:
        """One party's rows, imputed and standardized with that party's own statistics."""
        return standardize_locally(x, value_columns=self._value_columns)

    @functools.cached_property
    def _value_columns(self) -> int:
        # Read once per dataset object: every client calls local_features every round.
        return len(self._numeric_columns(self._header()))

    def _header(self) -> list[str]:
        if not os.path.isfile(self.path):
            raise ValueError(f"dataset.path={self.path!r}: no such file")
        with open(self.path, newline="") as handle:
            header = next(csv.reader(handle), None)
        if not header:
            raise ValueError(f"dataset.path={self.path!r}: the file is empty")
        return [name.strip() for name in header]

    def _numeric_columns(self, header: list[str]) -> tuple[str, ...]:
        if self.feature_columns is not None:
            return tuple(self.feature_columns)
        other = {self.label_column, self.silo_column, *(column for column, _ in self.categorical_columns)}
        return tuple(name for name in header if name not in other)

    def _build(self) -> DatasetSplits:
        header = self._header()
        numeric = self._numeric_columns(header)
        wanted = {
            "dataset.label_column": [self.label_column],
            "dataset.feature_columns": list(numeric),
            "dataset.categorical_columns": [column for column, _ in self.categorical_columns],
            "dataset.silo_column": [self.silo_column] if self.silo_column else [],
        }
        for key, columns in wanted.items():
            absent = [column for column in columns if column not in header]
            if absent:
                raise ValueError(f"{key}: no column {absent[0]!r} in {self.path} (columns: {', '.join(header)})")
        if not numeric and not self.categorical_columns:
            raise ValueError(f"dataset.feature_columns: {self.path} has no feature column")
        reserved = {self.label_column, self.silo_column, *(column for column, _ in self.categorical_columns)}
        overlap = [column for column in numeric if column in reserved]
        if overlap:
            raise ValueError(
                f"dataset.feature_columns: {overlap[0]!r} is the label, the silo or a categorical column"
            )
        where = {name: i for i, name in enumerate(header)}
        values, onehots, labels, silos = [], [], [], []
        with open(self.path, newline="") as handle:
            reader = csv.reader(handle)
            next(reader)
            for row_number, row in enumerate(reader, start=2):
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise ValueError(
                        f"dataset.path={self.path!r}: row {row_number} has {len(row)} cells, the header {len(header)}"
                    )
                values.append([_number(row[where[c]], column=c, row=row_number, path=self.path) for c in numeric])
                onehots.append(self._one_hot(row, where=where, row_number=row_number))
                label = row[where[self.label_column]].strip()
                if label.lower() in _MISSING:
                    raise ValueError(f"dataset.label_column={self.label_column!r}: row {row_number} of {self.path} has no label")
                labels.append(label)
                if self.silo_column:
                    silos.append(row[where[self.silo_column]].strip())
        classes = sorted(set(labels), key=_sort_key)
        if len(classes) < 2:
            raise ValueError(
                f"dataset.label_column={self.label_column!r}: {self.path} has only one class ({classes[0]!r})"
                if classes else f"dataset.path={self.path!r}: no data rows"
            )
        y = np.array([classes.index(label) for label in labels], dtype=np.int64)
        silo_names = sorted(set(silos), key=_sort_key)
        silo = np.array([silo_names.index(s) for s in silos], dtype=np.int64) if silos else np.zeros(len(y), np.int64)
        table = np.asarray(values, dtype=np.float64).reshape(len(y), len(numeric))
        x = np.concatenate([table, np.isnan(table), np.asarray(onehots, dtype=np.float64).reshape(len(y), -1)], axis=1)
        train, test = stratified_split(
            silo * len(classes) + y, test_fraction=self.test_fraction, rng=np.random.default_rng(self.seed)
        )
        if self.silo_column:
            empty = [name for i, name in enumerate(silo_names) if not np.any(silo[train] == i)]
            if empty:
                raise ValueError(
                    f"dataset.silo_column={self.silo_column!r}: silo {empty[0]!r} has no training row "
                    f"(dataset.test_fraction={self.test_fraction})"
                )
        x_tensor, y_tensor = torch.from_numpy(x).float(), torch.from_numpy(y)
        return DatasetSplits(
            train_x=x_tensor[train],
            train_y=y_tensor[train],
            test_x=standardize_locally(x_tensor[test], value_columns=len(numeric)),
            test_y=y_tensor[test],
            num_classes=len(classes),
            train_silo=torch.from_numpy(silo[train]) if self.silo_column else None,
        )

    def _one_hot(self, row: list[str], *, where: dict[str, int], row_number: int) -> list[float]:
        encoded: list[float] = []
        for column, categories in self.categorical_columns:
            cell = row[where[column]].strip()
            if cell and cell.lower() not in _MISSING and cell not in categories:
                raise ValueError(
                    f"dataset.categorical_columns.{column}: the value {cell!r} in row {row_number} of "
                    f"{self.path} is not one of {list(categories)}"
                )
            encoded += [float(cell == category) for category in categories]
        return encoded


def _sort_key(value: str) -> tuple[int, float | str]:
    # Numbers in numeric order, then text: classes 2 and 10 sort as 2, 10.
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)
