"""Partitioning the clients' training pool among clients: IID, Dirichlet, pathological, natural silos.

Each partitioner is a frozen dataclass built by Hydra (``_target_`` plus fields) whose
``split`` hands the labels to the matching flwr-datasets partitioner and returns
plain index arrays (IID cuts flwr-datasets' shards itself, in one pass).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedpriv.checks import check_int, check_real
from fedpriv.logs import get_logger

if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner import Partitioner

logger = get_logger(__name__)


@dataclass(frozen=True, eq=False)
class Partitioning:
    """Which training examples each client holds.

    Attributes
    ----------
    indices : tuple[np.ndarray, ...]
        One sorted int64 array of training-example indices per client; disjoint.
    dropped : np.ndarray
        Sorted int64 indices of the training examples no client holds (empty except
        for ``Pathological``).
    """

    indices: tuple[np.ndarray, ...]
    dropped: np.ndarray


def _check_request(labels: np.ndarray, *, num_partitions: int, seed: int) -> np.ndarray:
    """Validate the arguments common to every ``split`` and return labels as an array."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels: must be one-dimensional, got shape {labels.shape}")
    check_int("num_clients", num_partitions, minimum=1)
    if num_partitions > labels.size:
        raise ValueError(
            f"num_clients={num_partitions}: more clients than training examples "
            f"({labels.size})"
        )
    check_int("seed", seed, minimum=0)
    return labels


def _label_dataset(labels: np.ndarray) -> datasets.Dataset:
    """In-memory Hugging Face dataset of labels plus each example's original index."""
    import datasets  # slow to import, so only when partitioning

    return datasets.Dataset.from_dict({"label": labels, "idx": np.arange(labels.size)})


def _partition_indices(
    partitioner: Partitioner, *, num_partitions: int
) -> tuple[np.ndarray, ...]:
    return tuple(
        np.sort(np.asarray(partitioner.load_partition(pid)["idx"], dtype=np.int64))
        for pid in range(num_partitions)
    )


def contiguous_shard_bounds(size: int, *, num_shards: int) -> np.ndarray:
    """Bounds of ``datasets.Dataset.shard(num_shards, i, contiguous=True)`` for every ``i``.

    Shard ``i`` is ``[bounds[i], bounds[i + 1])``; the first ``size % num_shards`` shards
    have one more row.
    """
    shard = np.arange(num_shards + 1)
    return (size // num_shards) * shard + np.minimum(shard, size % num_shards)


@dataclass(frozen=True)
class IID:
    """Uniformly random partition into near-equal parts (sizes differ by at most 1)."""

    def split(self, labels: np.ndarray, *, num_partitions: int, seed: int) -> Partitioning:
        """Give every training example to exactly one client, uniformly at random.

        Parameters
        ----------
        labels : np.ndarray
            One-dimensional class labels of the training pool.
        num_partitions : int
            Number of clients.
        seed : int
            Seed of the shuffle; equal seeds give equal partitionings.

        Returns
        -------
        Partitioning
            The clients' indices; nothing is dropped.
        """
        labels = _check_request(labels, num_partitions=num_partitions, seed=seed)
        # flwr-datasets' IidPartitioner cuts contiguous shards of a dataset it does not
        # shuffle. Its shards are cut here from the shuffled order in one pass: asking it for
        # each partition costs milliseconds per client, 8 s per process at 10,000 clients.
        shuffled = np.asarray(_label_dataset(labels).shuffle(seed=int(seed))["idx"], dtype=np.int64)
        bounds = contiguous_shard_bounds(shuffled.size, num_shards=int(num_partitions))
        return Partitioning(
            indices=tuple(np.sort(shuffled[start:end]) for start, end in zip(bounds[:-1], bounds[1:])),
            dropped=np.empty(0, dtype=np.int64),
        )


@dataclass(frozen=True)
class Dirichlet:
    """Label skew: each class is spread over clients by a Dirichlet(alpha) draw.

    Parameters
    ----------
    alpha : float
        Concentration, > 0; small values give each client few classes, large values
        approach IID.
    min_partition_size : int
        Every client gets at least this many examples (>= 1); draws are repeated until
        this holds, a bounded number of times.
    """

    alpha: float = 0.5
    min_partition_size: int = 1

    def __post_init__(self) -> None:
        check_real("partition.alpha", self.alpha, above=0.0)
        check_int("partition.min_partition_size", self.min_partition_size, minimum=1)

    def split(self, labels: np.ndarray, *, num_partitions: int, seed: int) -> Partitioning:
        """Give every training example to exactly one client, skewed by label.

        Parameters
        ----------
        labels : np.ndarray
            One-dimensional class labels of the training pool.
        num_partitions : int
            Number of clients.
        seed : int
            Seed of the Dirichlet draws; equal seeds give equal partitionings.

        Returns
        -------
        Partitioning
            The clients' indices; nothing is dropped.

        Raises
        ------
        ValueError
            If no draw gives every client ``min_partition_size`` examples.
        """
        labels = _check_request(labels, num_partitions=num_partitions, seed=seed)
        num_partitions = int(num_partitions)
        if num_partitions * self.min_partition_size > labels.size:
            raise ValueError(
                f"partition.min_partition_size={self.min_partition_size}: "
                f"{num_partitions} clients need at least "
                f"{num_partitions * self.min_partition_size} training examples, "
                f"there are {labels.size}"
            )
        from flwr_datasets.partitioner import DirichletPartitioner

        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(self.alpha),
            min_partition_size=self.min_partition_size,
            self_balancing=False,
            shuffle=False,
            seed=int(seed),
        )
        partitioner.dataset = _label_dataset(labels)
        with warnings.catch_warnings():
            # flwr-datasets warns on every rejected draw; only the outcome matters.
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            try:
                indices = _partition_indices(partitioner, num_partitions=num_partitions)
            except ValueError as err:
                raise ValueError(
                    f"partition.alpha={self.alpha}, partition.min_partition_size="
                    f"{self.min_partition_size}: flwr-datasets' repeated Dirichlet "
                    f"draws never gave each of the {num_partitions} clients at least "
                    f"{self.min_partition_size} of the {labels.size} training examples; "
                    "raise partition.alpha or lower partition.min_partition_size or "
                    "num_clients"
                ) from err
        return Partitioning(indices=indices, dropped=np.empty(0, dtype=np.int64))


@dataclass(frozen=True)
class Pathological:
    """Each client holds examples of exactly ``classes_per_client`` classes.

    Client ``i`` gets class ``i mod C`` plus random others (flwr-datasets'
    "first-deterministic" assignment, as in Li et al. 2021), and each class is
    split evenly among the clients that have it. With fewer clients than classes some
    classes may go to no client: their examples are reported in
    ``Partitioning.dropped`` and logged as a warning.

    Parameters
    ----------
    classes_per_client : int
        Number of classes per client, between 1 and the number of classes.
    """

    classes_per_client: int = 2

    def __post_init__(self) -> None:
        check_int("partition.classes_per_client", self.classes_per_client, minimum=1)

    def split(self, labels: np.ndarray, *, num_partitions: int, seed: int) -> Partitioning:
        """Give each client the examples of a few classes.

        Parameters
        ----------
        labels : np.ndarray
            One-dimensional class labels of the training pool.
        num_partitions : int
            Number of clients.
        seed : int
            Seed of the class assignment; equal seeds give equal partitionings.

        Returns
        -------
        Partitioning
            The clients' indices and the examples of classes no client was given.

        Raises
        ------
        ValueError
            If ``classes_per_client`` exceeds the number of classes, or a class has
            fewer examples than clients assigned to it.
        """
        labels = _check_request(labels, num_partitions=num_partitions, seed=seed)
        num_partitions = int(num_partitions)
        num_classes = np.unique(labels).size
        if self.classes_per_client > num_classes:
            raise ValueError(
                f"partition.classes_per_client={self.classes_per_client}: more than "
                f"the {num_classes} classes in the training labels"
            )
        from flwr_datasets.partitioner import PathologicalPartitioner

        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(self.classes_per_client),
            class_assignment_mode="first-deterministic",
            shuffle=False,
            seed=int(seed),
        )
        partitioner.dataset = _label_dataset(labels)
        with warnings.catch_warnings():
            # Unused classes are reported through `dropped` and the log below; the
            # flwr-datasets warning also suggests a parameter that no longer exists.
            warnings.filterwarnings("ignore", message="Classes: .* will NOT be used")
            try:
                indices = _partition_indices(partitioner, num_partitions=num_partitions)
            except ValueError as err:
                raise ValueError(
                    f"partition.classes_per_client={self.classes_per_client}, "
                    f"num_clients={num_partitions}: a class was assigned to more "
                    "clients than it has training examples; lower num_clients or "
                    "partition.classes_per_client"
                ) from err
        held = np.zeros(labels.size, dtype=bool)
        held[np.concatenate(indices)] = True
        dropped = np.flatnonzero(~held)
        if dropped.size:
            logger.warning(
                "Pathological partition: %d of %d training examples (classes %s) are "
                "held by no client; %d clients x %d classes per client do not cover "
                "all %d classes",
                dropped.size,
                labels.size,
                np.unique(labels[dropped]).tolist(),
                num_partitions,
                self.classes_per_client,
                num_classes,
            )
        return Partitioning(indices=indices, dropped=dropped)


@dataclass(frozen=True)
class Natural:
    """One client per natural silo of the data set (``dataset=heart_disease``: one per hospital).

    ``num_clients`` must equal the number of silos; client ``i`` holds silo ``i``
    (the order of the data set's ``silos``).
    """

    needs_silos: ClassVar[bool] = True
    """``split`` takes the silo of every training example."""

    def split(self, labels: np.ndarray, *, num_partitions: int, seed: int, silos: np.ndarray) -> Partitioning:
        """Give each client the training examples of its silo.

        Parameters
        ----------
        labels : np.ndarray
            One-dimensional class labels of the training pool.
        num_partitions : int
            Number of clients; must equal the number of silos.
        seed : int
            Unused: the partition is the data's own.
        silos : np.ndarray
            The silo id (0, 1, ...) of every training example.

        Raises
        ------
        ValueError
            If ``num_partitions`` is not the number of silos, or a silo has no example.
        """
        _check_request(labels, num_partitions=num_partitions, seed=seed)
        silos = np.asarray(silos)
        count = int(silos.max()) + 1 if silos.size else 0
        if num_partitions != count:
            raise ValueError(f"num_clients={num_partitions}: partition=natural needs one client per silo ({count})")
        indices = tuple(np.flatnonzero(silos == silo).astype(np.int64) for silo in range(count))
        empty = [silo for silo, held in enumerate(indices) if not held.size]
        if empty:
            raise ValueError(f"partition=natural: silo(s) {empty} have no training example")
        return Partitioning(indices=indices, dropped=np.empty(0, dtype=np.int64))
