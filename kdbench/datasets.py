"""What a caption says about each dataset: its printed name and the sizes of its splits.

Torch-free, so that tables (``kdbench.tables``) can name the data without loading it.
``kdbench.data`` holds the loaders; tests/test_captions.py checks that the sizes here equal
the ones the loaders produce (``data.DATASET_SIZES`` and the synthetic generator's).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetFacts:
    display_name: str  # as papers print it
    train_images: int
    test_images: int


DATASETS: dict[str, DatasetFacts] = {
    # Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images": 50 000
    # training and 10 000 test images for both CIFAR sets.
    "cifar10": DatasetFacts("CIFAR-10", 50_000, 10_000),
    "cifar100": DatasetFacts("CIFAR-100", 50_000, 10_000),
    # Xiao, Rasul, Vollgraf 2017 (arXiv:1708.07747): 60 000 training, 10 000 test images.
    "fashion_mnist": DatasetFacts("Fashion-MNIST", 60_000, 10_000),
    # kdbench.data.synthetic's defaults: 10 classes x (120 train, 40 test).
    "synthetic": DatasetFacts("synthetic images", 1_200, 400),
}


def facts(dataset: str) -> DatasetFacts | None:
    """The dataset's facts, or None for a dataset this table does not know (a plugin's)."""
    return DATASETS.get(dataset)


def display_name(dataset: str) -> str:
    known = DATASETS.get(dataset)
    return known.display_name if known else dataset
