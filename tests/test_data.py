"""Data: real Fashion-MNIST from Debian's package, the CIFAR loader on a generated archive in
torchvision's on-disk format, the synthetic set, and the batch-level augmentation."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kdbench.data import (FASHION_MNIST_SYSTEM_DIR, NORMALISATION, Augmentation, BatchStream,
                          load_dataset, random_crop, require, synthetic)
from kdbench.errors import UserError


def write_cifar100(root: Path, n_train: int = 20, n_test: int = 10) -> tuple[np.ndarray, list[int]]:
    """A tiny CIFAR-100 in torchvision's format: pickled dicts with bytes keys."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(i % 100) for i in range(n)]
        with open(folder / split, "wb") as handle:
            pickle.dump({b"data": images, b"fine_labels": labels, b"coarse_labels": labels}, handle)
        data[split] = (images, labels)
    return data["train"]


def test_cifar100_loader_reads_torchvision_format(tmp_path):
    images, labels = write_cifar100(tmp_path)
    dataset = load_dataset("cifar100", tmp_path, download=False)
    assert dataset.train_images.shape == (20, 3, 32, 32)
    assert dataset.test_images.shape == (10, 3, 32, 32)
    assert dataset.num_classes == 100
    # Row-major (C, H, W) layout, as CIFAR stores it: pixel (c=1, y=2, x=3) of image 5.
    assert dataset.train_images[5, 1, 2, 3] == images[5, 1 * 1024 + 2 * 32 + 3]
    assert dataset.train_labels.tolist() == labels


def test_missing_cifar_names_the_file_and_the_offline_setting(tmp_path):
    with pytest.raises(UserError) as error:
        require("cifar100", tmp_path, download=False)
    message = str(error.value)
    assert "cifar-100-python" in message and "fashion_mnist/quick" in message
    assert "\n" not in message


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.exists(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_package(tmp_path):
    dataset = load_dataset("fashion_mnist", tmp_path)  # empty data dir: found in /usr/share
    assert dataset.train_images.shape == (60000, 1, 28, 28)
    assert dataset.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(dataset.train_labels).tolist() == [6000] * 10
    # The normalisation constants are this training set's statistics.
    pixels = dataset.train_images.float() / 255
    (mean,), (std,) = NORMALISATION["fashion_mnist"]
    assert abs(pixels.mean().item() - mean) < 1e-3 and abs(pixels.std().item() - std) < 1e-3


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.exists(), reason="apt-get install dataset-fashion-mnist")
def test_train_subset_is_balanced_and_fixed():
    a = load_dataset("fashion_mnist", train_subset=1000)
    b = load_dataset("fashion_mnist", train_subset=1000)
    assert torch.bincount(a.train_labels).tolist() == [100] * 10
    assert torch.equal(a.train_images, b.train_images)
    assert len(a.test_labels) == 10000  # the test split is never subsetted


def test_synthetic_is_deterministic_with_class_structure():
    a, b = synthetic(), synthetic()
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    # Class structure: nearest class mean classifies far above chance (10 %).
    x = a.train_images.float().flatten(1)
    means = torch.stack([x[a.train_labels == c].mean(0) for c in range(10)])
    test = a.test_images.float().flatten(1)
    predicted = torch.cdist(test, means).argmin(1)
    assert (predicted == a.test_labels).float().mean() > 0.5


def test_random_crop_matches_per_sample_slicing():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    offsets = torch.tensor([[0, 4], [2, 1]])
    cropped = random_crop(images, offsets, padding=2, mode="constant")
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(cropped[i], padded[i, :, dy:dy + 5, dx:dx + 5])


def test_batches_are_seeded_and_cover_the_epoch():
    dataset = synthetic()
    first = BatchStream(dataset, torch.device("cpu"), 64, Augmentation(), seed=3)
    second = BatchStream(dataset, torch.device("cpu"), 64, Augmentation(), seed=3)
    other = BatchStream(dataset, torch.device("cpu"), 64, Augmentation(), seed=4)
    epoch_a, epoch_b, epoch_c = list(first.epoch()), list(second.epoch()), list(other.epoch())
    assert all(torch.equal(x[0], y[0]) for x, y in zip(epoch_a, epoch_b))
    assert not torch.equal(epoch_a[0][0], epoch_c[0][0])
    indices = torch.cat([index for _, _, index in epoch_a])
    assert sorted(indices.tolist()) == list(range(dataset.num_train))  # each sample once
    # The state restores the order: what resume relies on.
    state = first.state_dict()
    next_a = list(first.epoch())[0][0]
    second.load_state_dict(state)
    assert torch.equal(next_a, list(second.epoch())[0][0])


def test_flip_and_crop_change_images_but_not_labels():
    dataset = synthetic()
    plain = BatchStream(dataset, torch.device("cpu"), 32, Augmentation(crop_padding=0, flip=False), 0)
    images, labels, index = next(plain.epoch())
    assert torch.allclose(images, plain.normalise(dataset.train_images[index]))
    augmented = BatchStream(dataset, torch.device("cpu"), 32, Augmentation(crop_padding=2), 0)
    images2, labels2, index2 = next(augmented.epoch())
    assert torch.equal(labels2, dataset.train_labels[index2])
    assert not torch.allclose(images2, augmented.normalise(dataset.train_images[index2]))
