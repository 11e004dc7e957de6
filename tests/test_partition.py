"""Property tests for fedpriv.partition."""

import logging

import datasets
import numpy as np
import pytest
from flwr_datasets.partitioner import IidPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpriv.partition import IID, Dirichlet, Partitioning, Pathological

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def label_pools(draw, *, min_per_class: int) -> np.ndarray:
    """Shuffled labels of 1..10 classes with at least ``min_per_class`` examples each."""
    sizes = draw(st.lists(st.integers(min_per_class, 40), min_size=1, max_size=10))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1))).permutation(labels)


def _assert_exact_cover(partitioning: Partitioning, size: int) -> None:
    assert all(part.dtype == np.int64 for part in partitioning.indices)
    held = np.concatenate([*partitioning.indices, partitioning.dropped])
    np.testing.assert_array_equal(np.sort(held), np.arange(size))


def _same(first: Partitioning, second: Partitioning) -> bool:
    return len(first.indices) == len(second.indices) and all(
        np.array_equal(a, b) for a, b in zip(first.indices, second.indices)
    )


@PROPERTY_SETTINGS
@given(
    labels=label_pools(min_per_class=20),
    partitioner=st.sampled_from([IID(), Dirichlet(alpha=1.0), Dirichlet(alpha=10.0)]),
    num_partitions=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_iid_and_dirichlet_cover_every_example_exactly_once(
    labels, partitioner, num_partitions, seed
):
    # Prepare / Execute
    partitioning = partitioner.split(labels, num_partitions=num_partitions, seed=seed)

    # Assert
    assert len(partitioning.indices) == num_partitions
    assert partitioning.dropped.size == 0
    assert all(part.size >= 1 for part in partitioning.indices)
    _assert_exact_cover(partitioning, labels.size)


@PROPERTY_SETTINGS
@given(
    labels=label_pools(min_per_class=20),
    partitioner=st.sampled_from([IID(), Dirichlet(alpha=0.5), Pathological(classes_per_client=1)]),
    num_partitions=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_same_seed_gives_same_partitioning(labels, partitioner, num_partitions, seed):
    # Prepare / Execute
    first = partitioner.split(labels, num_partitions=num_partitions, seed=seed)
    second = partitioner.split(labels.copy(), num_partitions=num_partitions, seed=seed)

    # Assert
    assert _same(first, second)
    np.testing.assert_array_equal(first.dropped, second.dropped)


@PROPERTY_SETTINGS
@given(size=st.integers(1, 300), num_partitions=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_iid_equals_flwr_datasets_iid_partitioner_on_the_shuffled_pool(size, num_partitions, seed):
    # Prepare
    labels = np.arange(size) % 3
    num_partitions = min(num_partitions, size)
    reference = IidPartitioner(num_partitions=num_partitions)
    reference.dataset = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(size)}).shuffle(seed=seed)

    # Execute
    ours = IID().split(labels, num_partitions=num_partitions, seed=seed)

    # Assert
    expected = [np.sort(np.asarray(reference.load_partition(i)["idx"])) for i in range(num_partitions)]
    assert len(ours.indices) == num_partitions
    assert all(np.array_equal(a, b) for a, b in zip(ours.indices, expected))


def test_iid_sizes_differ_by_at_most_one():
    # Prepare
    labels = np.zeros(103, dtype=np.int64)

    # Execute
    partitioning = IID().split(labels, num_partitions=10, seed=0)

    # Assert
    assert sorted(part.size for part in partitioning.indices) == [10] * 7 + [11] * 3


@pytest.mark.parametrize(
    "partitioner", [IID(), Dirichlet(alpha=0.5), Pathological(classes_per_client=2)]
)
def test_different_seeds_give_different_partitionings(partitioner):
    # Prepare
    labels = np.repeat(np.arange(10), 20)

    # Execute
    first = partitioner.split(labels, num_partitions=4, seed=0)
    second = partitioner.split(labels, num_partitions=4, seed=1)

    # Assert
    assert not _same(first, second)


def test_dirichlet_small_alpha_skews_labels():
    # Prepare
    labels = np.repeat(np.arange(10), 100)

    # Execute
    partitioning = Dirichlet(alpha=0.05).split(labels, num_partitions=5, seed=0)

    # Assert: with a small alpha most clients lack several classes entirely
    classes_held = [np.unique(labels[part]).size for part in partitioning.indices]
    assert min(classes_held) < 10


@PROPERTY_SETTINGS
@given(
    labels=label_pools(min_per_class=15),
    num_partitions=st.integers(1, 15),
    classes_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_pathological_limits_classes_and_reports_dropped(
    labels, num_partitions, classes_fraction, seed
):
    # Prepare
    num_classes = np.unique(labels).size
    classes_per_client = 1 + round(classes_fraction * (num_classes - 1))

    # Execute
    partitioning = Pathological(classes_per_client=classes_per_client).split(
        labels, num_partitions=num_partitions, seed=seed
    )

    # Assert
    _assert_exact_cover(partitioning, labels.size)
    held_classes = [set(np.unique(labels[part]).tolist()) for part in partitioning.indices]
    assert all(1 <= len(classes) <= classes_per_client for classes in held_classes)
    dropped_classes = set(labels[partitioning.dropped].tolist())
    assert dropped_classes.isdisjoint(set().union(*held_classes))
    if num_partitions >= num_classes:
        assert partitioning.dropped.size == 0


def test_pathological_logs_dropped_examples(caplog):
    # Prepare
    labels = np.repeat(np.arange(10), 5)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedpriv.partition"):
        partitioning = Pathological(classes_per_client=2).split(
            labels, num_partitions=2, seed=0
        )

    # Assert
    assert partitioning.dropped.size == 30
    assert "30 of 50 training examples" in caplog.text


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf")])
def test_dirichlet_rejects_non_positive_or_non_finite_alpha(alpha):
    # Prepare / Execute
    with pytest.raises(ValueError) as caught:
        Dirichlet(alpha=alpha)

    # Assert
    assert str(caught.value).startswith(f"partition.alpha={alpha}: must be > 0")


@pytest.mark.parametrize(
    "partitioner", [IID(), Dirichlet(alpha=0.5), Pathological(classes_per_client=1)]
)
def test_more_clients_than_examples_is_rejected(partitioner):
    # Prepare
    labels = np.array([0, 1, 0])

    # Execute
    with pytest.raises(ValueError) as caught:
        partitioner.split(labels, num_partitions=4, seed=0)

    # Assert
    assert str(caught.value) == "num_clients=4: more clients than training examples (3)"


@pytest.mark.parametrize(
    "partitioner", [IID(), Dirichlet(alpha=0.5), Pathological(classes_per_client=1)]
)
def test_zero_clients_is_rejected(partitioner):
    # Prepare / Execute
    with pytest.raises(ValueError, match=r"^num_clients=0: must be an integer >= 1"):
        partitioner.split(np.array([0, 1]), num_partitions=0, seed=0)


def test_classes_per_client_below_one_is_rejected():
    # Prepare / Execute
    with pytest.raises(ValueError, match=r"^partition\.classes_per_client=0: "):
        Pathological(classes_per_client=0)


def test_classes_per_client_above_class_count_is_rejected():
    # Prepare
    labels = np.repeat(np.arange(3), 4)

    # Execute
    with pytest.raises(ValueError) as caught:
        Pathological(classes_per_client=4).split(labels, num_partitions=2, seed=0)

    # Assert
    assert str(caught.value).startswith(
        "partition.classes_per_client=4: more than the 3 classes"
    )


def test_pathological_class_spread_over_too_many_clients_is_rejected():
    # Prepare: class 2 has one example but every client must hold all three classes
    labels = np.array([0, 0, 0, 1, 1, 1, 2])

    # Execute
    with pytest.raises(ValueError, match=r"^partition\.classes_per_client=3, num_clients=2: "):
        Pathological(classes_per_client=3).split(labels, num_partitions=2, seed=0)


def test_dirichlet_min_partition_size_beyond_pool_is_rejected():
    # Prepare
    labels = np.repeat(np.arange(5), 10)

    # Execute
    with pytest.raises(ValueError, match=r"^partition\.min_partition_size=30: "):
        Dirichlet(min_partition_size=30).split(labels, num_partitions=2, seed=0)


def test_dirichlet_unreachable_min_partition_size_is_a_clear_error():
    # Prepare: with alpha this small each class lands on about one client
    labels = np.repeat(np.arange(10), 50)

    # Execute
    with pytest.raises(ValueError) as caught:
        Dirichlet(alpha=0.01, min_partition_size=20).split(labels, num_partitions=10, seed=0)

    # Assert
    assert str(caught.value).startswith("partition.alpha=0.01, partition.min_partition_size=20:")


def test_dirichlet_rejects_min_partition_size_below_one():
    # Prepare / Execute
    with pytest.raises(ValueError, match=r"^partition\.min_partition_size=0: "):
        Dirichlet(min_partition_size=0)


def test_a_partitioning_is_stored_on_disk_and_read_back_by_the_next_process(tmp_path, monkeypatch):
    # Prepare: an empty cache, a partitioning computed once
    from fedpriv.partition import IID, Partitioning
    from fedpriv.partition_cache import FORMAT, cache_folder, cached_partitioning, partition_key

    monkeypatch.setenv("FEDPRIV_CACHE", str(tmp_path))
    labels = np.arange(100) % 10
    key = partition_key(dataset="d", partition=IID(), num_partitions=4, seed=1, labels=labels)
    calls = []

    def compute():
        calls.append(1)
        return IID().split(labels, num_partitions=4, seed=1)

    # Execute
    first = cached_partitioning(key, compute)
    second = cached_partitioning(key, compute)
    (cache_folder() / f"{key}.{FORMAT}.npz").write_bytes(b"damaged")
    third = cached_partitioning(key, compute)

    # Assert: computed once, read back equal; a damaged file is recomputed
    assert len(calls) == 2
    for other in (second, third):
        assert isinstance(other, Partitioning)
        assert len(other.indices) == len(first.indices)
        assert all(np.array_equal(a, b) for a, b in zip(first.indices, other.indices, strict=True))
    keys = {
        partition_key(dataset="d", partition=IID(), num_partitions=4, seed=s, labels=labels) for s in (1, 2)
    } | {partition_key(dataset="d", partition=IID(), num_partitions=4, seed=1, labels=labels[::-1])}
    assert len(keys) == 3


def test_a_cached_partitioning_with_empty_clients_and_drops_reads_back_equal(tmp_path, monkeypatch):
    # Prepare: clients with no examples at the start, middle and end, and dropped examples
    from fedpriv.partition import Partitioning
    from fedpriv.partition_cache import cached_partitioning

    monkeypatch.setenv("FEDPRIV_CACHE", str(tmp_path))
    parts = (np.array([], dtype=np.int64), np.array([3, 1]), np.array([], dtype=np.int64), np.array([7]), np.array([], dtype=np.int64))
    stored = Partitioning(indices=parts, dropped=np.array([0, 9]))
    cached_partitioning("k", lambda: stored)

    # Execute
    read = cached_partitioning("k", lambda: pytest.fail("recomputed a cached partitioning"))

    # Assert
    assert [p.tolist() for p in read.indices] == [p.tolist() for p in parts]
    assert read.dropped.tolist() == [0, 9]
