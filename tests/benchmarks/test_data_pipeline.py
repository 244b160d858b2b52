"""The data pipeline: batches/s of kdbench's in-memory, batch-level augmentation
(BatchStream.epoch) against torchvision's per-sample transforms through a DataLoader.

Both sides make the common CIFAR recipe's training batches from the same CIFAR-sized uint8
images (random pixels: speed does not depend on content): a random 32-px crop of the image
zero-padded by 4, a random horizontal flip, conversion to float and normalisation with the
CIFAR-100 statistics, 64 images a batch, shuffled. torchvision's side is the usual recipe
(RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize) over PIL images, as
torchvision.datasets.CIFAR100 serves them, with 0 and with 2 worker processes (persistent, so
the workers' start-up is not counted against them). kdbench runs on one CPU thread here.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision import transforms

from kdbench.data import NORMALISATION, BatchStream, Dataset
from kdbench.settings import COMMON_CIFAR

IMAGES = 5000  # a tenth of CIFAR's training split: ~2 s per DataLoader epoch here
SMOKE_IMAGES = 512  # --benchmark-disable (CI)
ROUNDS = 5
BATCH = COMMON_CIFAR.batch_size


class PILImages(torch.utils.data.Dataset):
    """uint8 (N, H, W, C) images served as PIL images through transforms, like
    torchvision.datasets.CIFAR100."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: transforms.Compose) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def one_epoch(batches) -> tuple[int, int, Tensor]:
    """(batches, images, labels in the order seen) of one pass over ``batches``."""
    count, labels = 0, []
    for batch in batches:
        images, batch_labels = batch[0], batch[1]
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        labels.append(batch_labels)
        count += 1
    seen = torch.cat(labels)
    return count, len(seen), seen


def test_data_pipeline_throughput(benchmark, interleave, report) -> None:
    size = IMAGES if benchmark.enabled else SMOKE_IMAGES
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 100, (size,), generator=generator)
    dataset = Dataset("cifar100", images, labels, images[:BATCH], labels[:BATCH], num_classes=100)
    stream = BatchStream(dataset, torch.device("cpu"), BATCH, COMMON_CIFAR.augmentation, seed=0)

    mean, std = NORMALISATION["cifar100"]
    recipe = transforms.Compose([
        transforms.RandomCrop(32, padding=COMMON_CIFAR.augmentation.crop_padding),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    pil = PILImages(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), recipe)
    loaders = {f"loader_{workers}w": DataLoader(pil, batch_size=BATCH, shuffle=True, num_workers=workers,
                                               persistent_workers=workers > 0)
               for workers in (0, 2)}
    epochs: dict[str, list[tuple[int, int, Tensor]]] = {name: [] for name in (*loaders, "kdbench")}

    def epoch_of(name: str, batches) -> None:
        epochs[name].append(one_epoch(batches))

    comparison = interleave(
        candidate=("kdbench", lambda: epoch_of("kdbench", stream.epoch())),
        baselines={name: (lambda name=name, loader=loader: epoch_of(name, loader))
                   for name, loader in loaders.items()},
        rounds=ROUNDS)
    del loaders  # ends the persistent workers

    # Same work: every pipeline delivered each image once per epoch, in as many batches.
    for name, passes in epochs.items():
        for count, seen, seen_labels in passes:
            assert (count, seen) == (stream.steps_per_epoch, size), name
            assert torch.equal(seen_labels.sort().values, labels.sort().values), name

    # Wall clock here: the DataLoader's workers do their work in other processes.
    batches = stream.steps_per_epoch
    rates = {name: batches / comparison.median(name, "wall") for name in comparison.seconds["wall"]}
    # Speed-up = the baseline's time per epoch over kdbench's, paired by round.
    report("speedup_vs_loader_0w", comparison.ratio("loader_0w", "kdbench", "wall"),
           speedup_vs_loader_2w=round(comparison.ratio("loader_2w", "kdbench", "wall"), 2),
           **{f"{name}_batches_per_s": round(rate, 1) for name, rate in rates.items()},
           images=size, batch=BATCH, rounds=comparison.rounds(), target=5.0)
