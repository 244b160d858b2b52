"""The validation protocol: a held-out split of the training set, fixed per dataset.

Choosing a method's variant (its temperature, the students' learning rate) by test accuracy
and then reporting that test accuracy is optimistic: the test set has been used to fit a
hyperparameter. ``--select-on val`` holds out part of the training set instead, trains the
students on the rest, evaluates them on both, chooses each method's variant by mean
validation accuracy over seeds and reports the chosen variant's test accuracy
(kdbench/aggregate.py ``select_variants``).

The split:
- ``VALIDATION_FRACTION`` (10 %) of every class of the run's training set (the setting's
  training subset where it has one), so the held-out images have the training set's class
  proportions: class-balanced on every built-in dataset, whose classes are of equal size.
  Each class's share is rounded half up and leaves the class at least one training image.
- Drawn from one permutation seeded by ``split_seed(dataset)``, the CRC-32 of the dataset's
  name: fixed per dataset and the same for every run seed (a run's seed changes its
  initialisation and data order, never which images it may train on), so the runs of every
  method and seed train on the same images and the seeds of a variant are comparable.
  Different datasets get different seeds.
- The teacher is not part of the protocol: it is trained once on the full training set and
  shared by every student (as in KD papers, the teacher is given), so the student rows and
  the Teacher row of a table are the same experiment with and without the protocol.

A run that holds out the split has ``RunSpec.held_out`` set (the fraction): it computes
something else than the run without it, so it has its own id, and runs without it keep
theirs. Its record stores the split's facts under ``validation`` and its validation accuracy
beside the test accuracy (``val_top1`` in the history, ``val_top1_last``/``val_top1_best`` in
the metrics).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from kdbench.data import Dataset

VALIDATION_FRACTION = 0.1


def split_seed(dataset: str) -> int:
    """The seed of ``dataset``'s split: the CRC-32 of its name (module docstring)."""
    return zlib.crc32(dataset.encode("utf-8"))


@dataclass(frozen=True)
class HeldOut:
    """What a record says about its run's split (``record["validation"]``)."""

    dataset: str
    fraction: float
    seed: int
    images: int  # held out
    train_images: int  # left to train on
    rule: str = "the same fraction of every class, one permutation per dataset"

    def to_json(self) -> dict:
        return asdict(self)


def held_out_indices(labels: Tensor, num_classes: int, fraction: float, seed: int) -> Tensor:
    """Sorted indices of the held-out samples: per class, its first round(fraction × its
    count) samples in one seeded permutation of the whole set (at most count - 1)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    ordered = labels[order]
    counts = torch.bincount(labels, minlength=num_classes)
    # Round half up (torch.round would round half to even), and keep a class in training.
    share = torch.minimum(torch.floor(counts.double() * fraction + 0.5).long(),
                          (counts - 1).clamp(min=0))
    # Each sample's rank within its class in the permuted order (as data.balanced_subset
    # computes it): a stable sort by class keeps the permuted order within a class.
    by_class = torch.sort(ordered, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[by_class] = torch.arange(len(order)) - starts[ordered[by_class]]
    return order[rank < share[ordered]].sort().values


def split(dataset: Dataset, fraction: float = VALIDATION_FRACTION) -> tuple[Dataset, Dataset, HeldOut]:
    """(the training set without the held-out images, the held-out images as the *test*
    split of a Dataset of their own, the split's facts). The first keeps the test split, so a
    run trains and tests as before on fewer images; the second is evaluated exactly as the
    test split is (``train.evaluate`` over its BatchStream's test batches). Its training split
    is empty: nothing trains on it."""
    seed = split_seed(dataset.name)
    held = held_out_indices(dataset.train_labels, dataset.num_classes, fraction, seed)
    keep = torch.ones(dataset.num_train, dtype=torch.bool)
    keep[held] = False
    kept = torch.nonzero(keep).flatten()  # CPU, once per run: not the training loop
    training = Dataset(dataset.name, dataset.train_images[kept].contiguous(),
                       dataset.train_labels[kept].contiguous(), dataset.test_images,
                       dataset.test_labels, dataset.num_classes, dataset.normalisation)
    images = dataset.train_images[held].contiguous()
    held_out = Dataset(dataset.name, images[:0], dataset.train_labels[:0], images,
                       dataset.train_labels[held].contiguous(), dataset.num_classes,
                       dataset.normalisation)  # a dataset plugin's own statistics, if any
    facts = HeldOut(dataset.name, fraction, seed, len(held), len(kept))
    return training, held_out, facts
