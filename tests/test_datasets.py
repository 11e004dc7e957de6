"""Tests for fedpriv.datasets: tiny IDX/CIFAR files on disk, bundled scikit-learn sets."""

import gzip
import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets
from sklearn.datasets import load_breast_cancer, load_digits
from torchvision.datasets.utils import calculate_md5

from fedpriv.datasets import (
    CIFAR10,
    MNIST,
    BreastCancer,
    DatasetNotFoundError,
    Digits,
    FashionMNIST,
    digits_arrays,
)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding: magic 0x0000, type 0x08 (uint8), ndim; big-endian dims; data."""
    header = bytes([0, 0, 0x08, array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + dims + array.astype(np.uint8).tobytes()


def _mnist_like(count: int, *, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixel [0, 0] is their number and whose label is number mod 10."""
    numbers = np.arange(offset, offset + count)
    images = (numbers[:, None, None] * 7 + np.arange(28 * 28).reshape(28, 28)) % 256
    images[:, 0, 0] = numbers
    return images.astype(np.uint8), (numbers % 10).astype(np.uint8)


def _write_idx(folder, prefix: str, images, labels, *, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        data = _idx_bytes(array)
        if gz:
            (folder / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / f"{prefix}-{kind}").write_bytes(data)


def _pixels(x: torch.Tensor, *, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> np.ndarray:
    """Undo the normalisation back to uint8 pixel values."""
    return np.rint((x.numpy() * std + mean) * 255).astype(np.int64)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_flat_folder_official_split(tmp_path, gz):
    # Prepare
    train_images, train_labels = _mnist_like(30)
    test_images, test_labels = _mnist_like(20, offset=100)
    _write_idx(tmp_path, "train", train_images, train_labels, gz=gz)
    _write_idx(tmp_path, "t10k", test_images, test_labels, gz=gz)

    # Execute
    splits = MNIST(root=str(tmp_path)).load()

    # Assert
    assert splits.train_x.shape == (30, 1, 28, 28)
    assert splits.test_x.shape == (20, 1, 28, 28)
    assert splits.train_x.dtype == torch.float32
    assert splits.train_y.dtype == torch.int64
    assert splits.input_shape == MNIST.input_shape == (1, 28, 28)
    assert splits.num_classes == 10
    np.testing.assert_array_equal(splits.train_y.numpy(), train_labels)
    np.testing.assert_array_equal(splits.test_y.numpy(), test_labels)
    np.testing.assert_array_equal(_pixels(splits.train_x)[:, 0], train_images)
    np.testing.assert_array_equal(_pixels(splits.test_x)[:, 0], test_images)


def test_mnist_torchvision_layout_matches_flat_folder(tmp_path):
    # Prepare
    train_images, train_labels = _mnist_like(30)
    test_images, test_labels = _mnist_like(20, offset=100)
    for folder in (tmp_path / "tv" / "MNIST" / "raw", tmp_path / "flat"):
        _write_idx(folder, "train", train_images, train_labels, gz=False)
        _write_idx(folder, "t10k", test_images, test_labels, gz=False)

    # Execute
    from_torchvision = MNIST(root=str(tmp_path / "tv")).load()
    from_flat = MNIST(root=str(tmp_path / "flat")).load()

    # Assert
    assert torch.equal(from_torchvision.train_x, from_flat.train_x)
    assert torch.equal(from_torchvision.test_y, from_flat.test_y)
    np.testing.assert_array_equal(_pixels(from_torchvision.test_x)[:, 0], test_images)


def test_mnist_normalised_with_standard_statistics(tmp_path):
    # Prepare
    images, labels = _mnist_like(20)
    _write_idx(tmp_path, "train", images, labels, gz=True)
    _write_idx(tmp_path, "t10k", images, labels, gz=True)

    # Execute
    splits = MNIST(root=str(tmp_path)).load()

    # Assert
    expected = (torch.from_numpy(images).float() / 255 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(splits.train_x[:, 0], expected)


@pytest.mark.parametrize("layout", ["flat_gz", "raw"])
def test_mnist_test_file_split_needs_only_t10k(tmp_path, layout):
    # Prepare
    images, labels = _mnist_like(50)
    folder = tmp_path if layout == "flat_gz" else tmp_path / "MNIST" / "raw"
    _write_idx(folder, "t10k", images, labels, gz=layout == "flat_gz")

    # Execute
    splits = MNIST(root=str(tmp_path), split_source="test_file", test_fraction=0.2).load()

    # Assert
    train_numbers = _pixels(splits.train_x)[:, 0, 0, 0]
    test_numbers = _pixels(splits.test_x)[:, 0, 0, 0]
    assert len(train_numbers) == 40 and len(test_numbers) == 10
    assert sorted(np.concatenate([train_numbers, test_numbers]).tolist()) == list(range(50))
    np.testing.assert_array_equal(splits.train_y.numpy(), train_numbers % 10)
    np.testing.assert_array_equal(splits.test_y.numpy(), test_numbers % 10)
    assert sorted(splits.test_y.tolist()) == list(range(10))  # stratified: one per class


def test_mnist_subsets_are_seeded(tmp_path):
    # Prepare
    images, labels = _mnist_like(50)
    _write_idx(tmp_path, "t10k", images, labels, gz=True)
    config = dict(root=str(tmp_path), split_source="test_file", max_train_examples=15)

    # Execute
    first = MNIST(**config, max_test_examples=4, seed=1).load()
    same = MNIST(**config, max_test_examples=4, seed=1)._build()
    other = MNIST(**config, max_test_examples=4, seed=2).load()

    # Assert
    assert first.train_x.shape[0] == 15 and first.test_x.shape[0] == 4
    assert torch.equal(first.train_x, same.train_x) and torch.equal(first.test_y, same.test_y)
    assert not torch.equal(first.train_x, other.train_x)


@pytest.mark.parametrize(
    ("split_source", "expected_files"),
    [
        ("test_file", ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
        ("official", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    ],
)
def test_mnist_missing_files_raise_one_line_error(tmp_path, split_source, expected_files):
    # Prepare
    dataset = MNIST(root=str(tmp_path / "nowhere"), split_source=split_source)

    # Execute
    with pytest.raises(DatasetNotFoundError) as caught:
        dataset.load()

    # Assert
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "\n" not in message
    assert f"dataset.root={tmp_path / 'nowhere'}" in message
    assert "dataset.download=true" in message
    assert all(name in message for name in expected_files)


def test_mnist_official_split_without_training_files_is_not_found(tmp_path):
    # Prepare
    images, labels = _mnist_like(20)
    _write_idx(tmp_path, "t10k", images, labels, gz=True)

    # Execute
    with pytest.raises(DatasetNotFoundError) as caught:
        MNIST(root=str(tmp_path)).load()

    # Assert
    assert "missing: train-images-idx3-ubyte, train-labels-idx1-ubyte)" in str(caught.value)


def test_fashion_mnist_reads_its_own_torchvision_folder(tmp_path):
    # Prepare
    images, labels = _mnist_like(30)
    _write_idx(tmp_path / "FashionMNIST" / "raw", "train", images, labels, gz=False)
    _write_idx(tmp_path / "FashionMNIST" / "raw", "t10k", images[:10], labels[:10], gz=False)

    # Execute
    splits = FashionMNIST(root=str(tmp_path)).load()

    # Assert
    assert splits.train_x.shape == (30, 1, 28, 28) and splits.test_x.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(_pixels(splits.train_x, mean=0.2860, std=0.3530)[:, 0], images)
    np.testing.assert_array_equal(splits.test_y.numpy(), labels[:10])


def _write_cifar(folder, monkeypatch) -> dict[str, np.ndarray]:
    """Tiny CIFAR-10 batches; torchvision's checksums are patched to match them."""
    folder.mkdir(parents=True)
    cifar = torchvision.datasets.CIFAR10
    batches = {}
    for number, (name, _) in enumerate(cifar.train_list + cifar.test_list):
        # Channel c of example i of batch b is filled with 40 * b + 10 * i + c (< 256).
        values = 40 * number + 10 * np.arange(4)[:, None] + np.arange(3)[None, :]
        data = np.repeat(values[:, :, None], 32 * 32, axis=2).reshape(4, 3072)
        batches[name] = data.astype(np.uint8)
        entry = {"data": batches[name], "labels": [number, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"label_names": [str(c) for c in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    md5 = {name: calculate_md5(folder / name) for name in [*batches, "batches.meta"]}
    monkeypatch.setattr(cifar, "train_list", [[n, md5[n]] for n, _ in cifar.train_list])
    monkeypatch.setattr(cifar, "test_list", [[n, md5[n]] for n, _ in cifar.test_list])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": md5["batches.meta"]})
    return batches


def test_cifar10_reads_torchvision_batches_channels_first(tmp_path, monkeypatch):
    # Prepare
    batches = _write_cifar(tmp_path / "cifar-10-batches-py", monkeypatch)

    # Execute
    splits = CIFAR10(root=str(tmp_path)).load()

    # Assert
    assert splits.train_x.shape == (20, 3, 32, 32) and splits.test_x.shape == (4, 3, 32, 32)
    assert splits.input_shape == CIFAR10.input_shape
    assert splits.train_y[:4].tolist() == [0, 1, 2, 3]
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    pixels = torch.round((splits.test_x * std + mean) * 255).long()
    expected = torch.from_numpy(batches["test_batch"].reshape(4, 3, 32, 32)).long()
    assert torch.equal(pixels, expected)


def test_cifar10_missing_files_raise_one_line_error(tmp_path):
    # Prepare
    dataset = CIFAR10(root=str(tmp_path), split_source="test_file")

    # Execute
    with pytest.raises(DatasetNotFoundError) as caught:
        dataset.load()

    # Assert
    message = str(caught.value)
    assert "\n" not in message
    assert f"dataset.root={tmp_path}" in message
    assert "test_batch" in message and "dataset.download=true" in message


def test_digits_shapes_and_disjoint_stratified_split():
    # Prepare
    reference = load_digits()

    # Execute
    splits = Digits(test_fraction=0.25, seed=5).load()

    # Assert
    assert splits.train_x.shape[1:] == Digits.input_shape == (1, 8, 8)
    assert splits.train_x.dtype == torch.float32 and splits.test_y.dtype == torch.int64
    assert splits.num_classes == Digits.num_classes == 10
    assert 0.0 <= splits.train_x.min() and splits.train_x.max() <= 1.0
    rows = [
        (x.tobytes(), int(y))
        for xs, ys in ((splits.train_x, splits.train_y), (splits.test_x, splits.test_y))
        for x, y in zip((xs.numpy() * 16).round().astype(np.int64), ys.numpy())
    ]
    expected = [
        (x.astype(np.int64).tobytes(), int(y))
        for x, y in zip(reference.images[:, None], reference.target)
    ]
    assert sorted(rows) == sorted(expected)
    class_sizes = np.bincount(reference.target)
    held_out = np.bincount(splits.test_y.numpy(), minlength=10)
    assert np.all(np.abs(held_out - 0.25 * class_sizes) <= 1)


def test_digits_read_without_scikit_learn_equal_load_digits():
    # Prepare
    reference = load_digits()

    # Execute
    images, labels = digits_arrays()

    # Assert
    assert images.dtype == reference.images.dtype and labels.dtype == reference.target.dtype
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(labels, reference.target)


def test_digits_split_is_deterministic_by_seed():
    # Prepare
    config = dict(test_fraction=0.2, seed=11)

    # Execute
    first = Digits(**config)._build()
    again = Digits(**config)._build()
    other = Digits(test_fraction=0.2, seed=12)._build()

    # Assert
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_y, again.test_y)
    assert not torch.equal(first.test_x, other.test_x)


def test_breast_cancer_standardised_with_training_statistics():
    # Prepare
    reference = load_breast_cancer()

    # Execute
    splits = BreastCancer(seed=3).load()

    # Assert
    assert splits.train_x.shape[1:] == BreastCancer.input_shape == (30,)
    assert splits.train_x.shape[0] + splits.test_x.shape[0] == reference.data.shape[0]
    assert splits.num_classes == BreastCancer.num_classes == 2
    assert set(splits.train_y.tolist()) == {0, 1}
    train = splits.train_x.double()
    zeros, ones = torch.zeros(30, dtype=torch.float64), torch.ones(30, dtype=torch.float64)
    torch.testing.assert_close(train.mean(0), zeros, atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(0, unbiased=False), ones, atol=1e-5, rtol=0)
    assert splits.test_x.double().mean(0).abs().max() > 1e-3  # test stats were not used


def test_load_is_memoized_per_value():
    # Prepare
    dataset = Digits(seed=7)

    # Execute
    first = dataset.load()
    second = Digits(seed=7).load()

    # Assert
    assert first is second
    assert Digits(seed=8).load() is not first


def test_construction_does_not_touch_the_disk(tmp_path):
    # Prepare
    root = tmp_path / "absent"

    # Execute
    dataset = MNIST(root=str(root))

    # Assert
    assert dataset.input_shape == (1, 28, 28) and dataset.num_classes == 10
    assert not root.exists()
    assert hash(dataset) == hash(MNIST(root=str(root)))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Digits(test_fraction=1.5), "dataset.test_fraction=1.5: must be in (0, 1)"),
        (lambda: BreastCancer(test_fraction=0), "dataset.test_fraction=0: must be in (0, 1)"),
        (lambda: Digits(test_fraction=float("nan")), "dataset.test_fraction=nan: must be in"),
        (lambda: Digits(seed=-1), "dataset.seed=-1: must be an integer >= 0"),
        (lambda: MNIST(root=""), "dataset.root=: must be a non-empty path"),
        (lambda: MNIST(root="r", split_source="val"), "dataset.split_source=val: must be one of"),
        (lambda: MNIST(root="r", download="yes"), "dataset.download=yes: must be true or false"),
        (lambda: FashionMNIST(root="r", max_train_examples=-3), "dataset.max_train_examples=-3"),
        (lambda: CIFAR10(root="r", max_test_examples=2.5), "dataset.max_test_examples=2.5"),
    ],
)
def test_invalid_fields_name_key_and_value(build, message):
    # Prepare / Execute
    with pytest.raises(ValueError) as caught:
        build()

    # Assert
    assert str(caught.value).startswith(message)


def test_tiny_test_file_split_that_leaves_a_side_empty_is_rejected(tmp_path):
    # Prepare
    images, labels = _mnist_like(10)
    _write_idx(tmp_path, "t10k", images, labels, gz=True)

    # Execute
    with pytest.raises(ValueError) as caught:
        MNIST(root=str(tmp_path), split_source="test_file", test_fraction=0.2).load()

    # Assert
    assert str(caught.value).startswith("dataset.test_fraction=0.2:")


def test_load_cache_is_keyed_by_class(tmp_path):
    # Prepare
    images, labels = _mnist_like(20)
    _write_idx(tmp_path / "MNIST" / "raw", "t10k", images, labels, gz=False)
    config = dict(root=str(tmp_path), split_source="test_file", test_fraction=0.5)
    MNIST(**config).load()

    # Execute
    with pytest.raises(DatasetNotFoundError) as caught:
        FashionMNIST(**config).load()

    # Assert
    assert "FashionMNIST files not found" in str(caught.value)
