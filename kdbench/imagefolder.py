"""ImageNet-format data: an ImageFolder ``train/`` and ``val/`` pair, read through a torch
DataLoader with workers and pinned memory: the ``kdbench.datasets`` plugins ``imagenet`` (at
``<data dir>/imagenet``, 1000 classes) and ``imagefolder`` (a setting's own folder).

The standard ImageNet augmentation of the KD papers' ImageNet tables (CRD, DKD, ReviewKD all
train with the PyTorch ImageNet example's pipeline; mdistiller's
``mdistiller/dataset/imagenet.py`` is it): training images are ``RandomResizedCrop(224)``
(scale 0.08-1, aspect ratio 3/4-4/3, bilinear) and ``RandomHorizontalFlip()``; validation
images ``Resize(256)`` and ``CenterCrop(224)``; both normalised with the ImageNet mean and std.
A setting may shrink the sizes (``image_size``, ``resize_size``) for a quick check.

Seeded per run and resumable, as kdbench's in-memory batches are (kdbench/data.py): at each
epoch's start one CPU generator, seeded with the run's seed, draws the epoch's order and one
seed per sample; a worker crops and flips a sample from a generator of its own seed, drawing
exactly what torchvision's transforms draw from the global one. So an epoch's batches depend
on the run's seed and the epoch alone: not on the number of workers, not on which worker
loaded what, and a run resumed at an epoch boundary (the generator's state is in its
checkpoint, ``state_dict()``) sees the batches an uninterrupted run would have seen. Workers
decode and crop to uint8; the pixels are normalised on the training device.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from kdbench.errors import UserError

# torchvision's ImageNet statistics (the PyTorch ImageNet example's Normalize, mdistiller's).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision.transforms.RandomResizedCrop's defaults (Szegedy et al. 2015's "Inception" crop).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# The options a setting's [dataset_options] may give. ``root`` says where the files are, not
# what they are, so it is no part of the setting's identity (kdbench/settings.py).
OPTIONS = ("root", "train", "val", "image_size", "resize_size", "mean", "std", "num_classes")
LOCATION_OPTIONS = ("root",)


@dataclass(frozen=True)
class FolderOptions:
    root: Path
    train: str = "train"
    val: str = "val"
    image_size: int = 224  # the crop the networks see: RandomResizedCrop / CenterCrop
    resize_size: int = 256  # validation: the shorter side before the centre crop
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_classes: int | None = None  # None: the class folders found under train/

    @classmethod
    def parse(cls, options: Mapping[str, Any], default_root: Path | None) -> "FolderOptions":
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise UserError(f"dataset option {unknown[0]!r} is not one of {', '.join(OPTIONS)}")
        values = dict(options)
        if "root" not in values:
            if default_root is None:
                raise UserError("dataset option 'root' is missing (the folder holding train/ and val/)")
            values["root"] = default_root
        values["root"] = Path(values["root"])
        for key in ("train", "val"):
            if key in values and not isinstance(values[key], str):
                raise UserError(f"dataset option {key!r} must be a folder name, got {values[key]!r}")
        for key in ("image_size", "resize_size", "num_classes"):
            if key in values and (not isinstance(values[key], int) or isinstance(values[key], bool)
                                  or values[key] < 1):
                raise UserError(f"dataset option {key!r} must be a whole number >= 1, got {values[key]!r}")
        for key in ("mean", "std"):
            if key in values:
                value = values[key]
                if (not isinstance(value, (list, tuple)) or len(value) != 3
                        or not all(isinstance(v, (int, float)) for v in value)):
                    raise UserError(f"dataset option {key!r} must be 3 numbers (R, G, B), got {value!r}")
                values[key] = tuple(float(v) for v in value)
        if any(v <= 0 for v in values.get("std", IMAGENET_STD)):
            raise UserError("dataset option 'std' must be positive")
        parsed = cls(**values)
        if parsed.resize_size < parsed.image_size:
            raise UserError(f"dataset option 'resize_size' ({parsed.resize_size}) is smaller than "
                            f"'image_size' ({parsed.image_size}): the centre crop would not fit")
        return parsed

    def split(self, name: str) -> Path:
        return self.root / (self.train if name == "train" else self.val)


def class_folders(path: Path) -> list[str]:
    """The class folders of an ImageFolder split, sorted (torchvision's ``find_classes``)."""
    try:
        return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    except OSError as error:
        raise UserError(f"{path}: not readable as an ImageFolder split ({error.strerror or error})") from None


def check_folders(options: FolderOptions) -> list[str]:
    """The classes, after checking train/ and val/ exist and name the same class folders."""
    for split in ("train", "val"):
        if not options.split(split).is_dir():
            raise UserError(f"{options.split(split)} does not exist: an ImageFolder dataset needs "
                            f"{options.root}/{options.train}/<class>/<image> and "
                            f"{options.root}/{options.val}/<class>/<image>")
    train, val = class_folders(options.split("train")), class_folders(options.split("val"))
    if not train:
        raise UserError(f"{options.split('train')} holds no class folders")
    if train != val:
        missing = sorted(set(train) ^ set(val))
        raise UserError(f"{options.split('train')} and {options.split('val')} do not hold the same "
                        f"class folders (e.g. {missing[0]!r} is in one only)")
    if options.num_classes is not None and options.num_classes != len(train):
        raise UserError(f"{options.split('train')} holds {len(train)} class folders, the setting "
                        f"says num_classes = {options.num_classes}")
    return train


# --- augmentation, one sample at a time, from its own generator --------------------------------

def resized_crop_params(height: int, width: int, generator: torch.Generator,
                        scale: tuple[float, float] = CROP_SCALE,
                        ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` with an explicit generator: the same
    draws in the same order (ten tries of area and log-aspect ratio, then the offsets; else the
    central crop), so a generator seeded with s gives the crop torchvision gives after
    ``torch.manual_seed(s)`` (tests/test_imagefolder.py)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                         generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainImages(torch.utils.data.Dataset):
    """Training samples keyed by (position, seed): the position's image, cropped and flipped
    from a generator seeded with ``seed``, as uint8 (C, H, W), its label and its position."""

    def __init__(self, folder, positions: list[int], size: int, flip: bool) -> None:
        self.folder, self.positions, self.size, self.flip = folder, positions, size, flip

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int, int]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        position, seed = key
        path, label = self.folder.samples[self.positions[position]]
        image = self.folder.loader(path)
        generator = torch.Generator().manual_seed(seed)
        width, height = image.size
        i, j, h, w = resized_crop_params(height, width, generator)
        image = TF.resized_crop(image, i, j, h, w, [self.size, self.size],
                                InterpolationMode.BILINEAR, antialias=True)
        # RandomHorizontalFlip's draw, after the crop's, as torchvision's Compose makes them.
        if self.flip and torch.rand(1, generator=generator) < 0.5:
            image = TF.hflip(image)
        return TF.pil_to_tensor(image), label, position


class ValImages(torch.utils.data.Dataset):
    """Validation samples: Resize(resize_size) then CenterCrop(image_size), uint8 (C, H, W)."""

    def __init__(self, folder, resize_size: int, size: int) -> None:
        self.folder, self.resize_size, self.size = folder, resize_size, size

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        path, label = self.folder.samples[position]
        image = TF.resize(self.folder.loader(path), self.resize_size, InterpolationMode.BILINEAR,
                          antialias=True)
        return TF.pil_to_tensor(TF.center_crop(image, [self.size, self.size])), label


@dataclass
class FolderSource:
    """An opened ImageFolder dataset: what ``FolderStream`` reads (kdbench.data.open_stream)."""

    name: str
    options: FolderOptions
    train: Any  # torchvision.datasets.ImageFolder
    val: Any
    positions: list[int]  # the training samples used (all, or a class-balanced subset)
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return 3  # ImageFolder's loader converts every image to RGB

    @property
    def num_train(self) -> int:
        return len(self.positions)

    @property
    def train_labels(self) -> Tensor:
        return torch.tensor([self.train.targets[p] for p in self.positions], dtype=torch.long)

    def fingerprint(self) -> str:
        """A sha256 of which files it reads, with their labels (kdbench.data.fingerprint): the
        training samples used and the validation split, by path relative to the root. The
        files' bytes are not read (an ImageNet copy is 150 GB): a changed image under the same
        name goes unnoticed, a missing, added or moved one does not."""
        import hashlib

        digest = hashlib.sha256()
        for split, folder, samples in (
                ("train", self.train, [self.train.samples[p] for p in self.positions]),
                ("val", self.val, self.val.samples)):
            # ImageFolder's paths all start with its root: cut it off as a string (a Path
            # per sample costs about 20 s on ImageNet's 1.3M).
            cut = len(os.path.join(str(folder.root), ""))
            digest.update("".join(f"{split}\t{path[cut:]}\t{label}\n"
                                  for path, label in samples).encode())
        return digest.hexdigest()

    def stream(self, device: torch.device, batch_size: int, augmentation, seed: int,
               workers: int) -> "FolderStream":
        """Its batches (kdbench.data.open_stream). Of the recipe's augmentation only ``flip``
        applies: RandomResizedCrop takes the padded crop's place."""
        return FolderStream(self, device, batch_size, seed, flip=augmentation.flip, workers=workers)


def open_folder(name: str, options: FolderOptions, train_subset: int | None) -> FolderSource:
    from torchvision.datasets import ImageFolder

    from kdbench.data import balanced_subset

    classes = check_folders(options)
    try:
        train = ImageFolder(str(options.split("train")))
        val = ImageFolder(str(options.split("val")))
    except (OSError, RuntimeError, FileNotFoundError) as error:  # a class folder without images
        raise UserError(f"{options.root}: not an ImageFolder dataset ({error})") from None
    positions = list(range(len(train.samples)))
    if train_subset is not None and train_subset < len(positions):
        keep = balanced_subset(torch.tensor(train.targets), train_subset, len(classes))
        positions = keep.tolist()
    return FolderSource(name, options, train, val, positions, classes)


class EpochBatches:
    """The DataLoader's batch sampler: the current epoch's batches of (position, seed) keys."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FolderStream:
    """Seeded training batches and validation batches of an ImageFolder dataset, read by a
    DataLoader (``workers`` processes, pinned memory on CUDA), with the interface of
    kdbench.data.BatchStream: ``epoch()``, ``steps_per_epoch``, ``test_batches()``,
    ``normalise()``, ``state_dict()``, ``device``."""

    def __init__(self, source: FolderSource, device: torch.device, batch_size: int, seed: int,
                 flip: bool = True, workers: int = 0) -> None:
        self.source = source
        self.device = device
        self.batch_size = batch_size
        self.flip = flip
        self.workers = workers
        self.generator = torch.Generator().manual_seed(seed)
        shape = (1, 3, 1, 1)
        mean, std = torch.tensor(source.options.mean), torch.tensor(source.options.std)
        # x/255 then (x - mean)/std folded into one multiply-add per pixel, as BatchStream.
        self.scale = (1.0 / (255.0 * std)).view(shape).to(device)
        self.shift = (-mean / std).view(shape).to(device)
        self._batches = EpochBatches()
        # A run across several processes (kdbench/distributed.py): the rank whose part of each
        # global batch this stream loads (``take_shard``); None: the whole batch.
        self.ranks = None
        self._train_loader: DataLoader | None = None
        self._val_loader: DataLoader | None = None

    # The data's facts, as train.py reads them from a stream.
    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def in_channels(self) -> int:
        return self.source.in_channels

    @property
    def num_train(self) -> int:
        return self.source.num_train

    @property
    def train_labels(self) -> Tensor:
        return self.source.train_labels

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_train, self.batch_size)
        return full + (1 if rest > 1 else 0)  # a last batch of one sample: BatchNorm cannot train

    def normalise(self, images: Tensor) -> Tensor:
        return images.float() * self.scale + self.shift

    def take_shard(self, ranks) -> None:
        """From now on, load only ``ranks``' part of every global batch (distributed.shard's
        part, the same images as the whole batch's slice: each sample has its own seed), and
        skip the batches every rank skips (distributed.trains_on): a rank decodes 1/W of the
        images, not all of them."""
        self.ranks = ranks

    @property
    def sharded(self) -> bool:
        return self.ranks is not None and self.ranks.distributed

    def _loader(self, dataset, **kwargs) -> DataLoader:
        return DataLoader(dataset, num_workers=self.workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=self.workers > 0, **kwargs)

    def epoch(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(images, labels, indices) for one epoch, in a fresh seeded order."""
        n = self.num_train
        # All of the epoch's randomness, drawn up front from the run's generator.
        order = torch.randperm(n, generator=self.generator)
        seeds = torch.randint(0, 2**62, (n,), generator=self.generator)
        keys = list(zip(order.tolist(), seeds.tolist()))
        self._batches.batches = [keys[step * self.batch_size:(step + 1) * self.batch_size]
                                 for step in range(self.steps_per_epoch)]
        if self.sharded:
            from kdbench.distributed import shard, trains_on

            self._batches.batches = [
                [batch[position] for position in shard(torch.arange(len(batch)), self.ranks).tolist()]
                for batch in self._batches.batches if trains_on(len(batch), self.ranks)]
        if self._train_loader is None:
            options = self.source.options
            images = TrainImages(self.source.train, self.source.positions, options.image_size, self.flip)
            self._train_loader = self._loader(images, batch_sampler=self._batches)
        for images, labels, index in self._train_loader:
            yield (self.normalise(images.to(self.device, non_blocking=True)),
                   labels.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True))

    def test_batches(self, batch_size: int = 1000) -> Iterator[tuple[Tensor, Tensor]]:
        """The validation split in order. At most the training batch size per batch: 1000
        images of 224 px are 600 MB of floats."""
        if self._val_loader is None:
            options = self.source.options
            images = ValImages(self.source.val, options.resize_size, options.image_size)
            self._val_loader = self._loader(images, batch_size=min(batch_size, self.batch_size))
        for images, labels in self._val_loader:
            yield self.normalise(images.to(self.device, non_blocking=True)), labels.to(self.device)

    def sample(self, count: int) -> Tensor:
        """The first ``count`` validation images, normalised on the device (a dry forward pass)."""
        images = ValImages(self.source.val, self.source.options.resize_size, self.source.options.image_size)
        return self.normalise(torch.stack([images[i][0] for i in range(count)]).to(self.device))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class ImageFolderDataset:
    """The ``kdbench.datasets`` plugin of ImageFolder data. ``default_folder``: where it lives
    under the data directory when the setting gives no ``root`` (``imagenet``), or None (the
    setting must give one)."""

    def __init__(self, display_name: str, default_folder: str | None = None,
                 num_classes: int | None = None) -> None:
        self.display_name = display_name
        self.default_folder = default_folder
        self.num_classes = num_classes
        self.location_options = LOCATION_OPTIONS

    def options(self, options: Mapping[str, Any], data_dir: Path) -> FolderOptions:
        default = data_dir / self.default_folder if self.default_folder else None
        if self.num_classes is not None and "num_classes" not in options:
            options = {**options, "num_classes": self.num_classes}
        return FolderOptions.parse(options, default)

    def check_options(self, options: Mapping[str, Any]) -> None:
        self.options(options, Path("."))

    def shape(self, options: Mapping[str, Any], data_dir: Path):
        from kdbench.data import DataShape

        parsed = self.options(options, data_dir)
        num_classes = parsed.num_classes
        if num_classes is None:
            num_classes = len(check_folders(parsed))
        return DataShape(in_channels=3, num_classes=num_classes, image_size=parsed.image_size,
                         num_train=None)

    def require(self, options: Mapping[str, Any], data_dir: Path) -> None:
        check_folders(self.options(options, data_dir))

    def open(self, name: str, options: Mapping[str, Any], data_dir: Path,
             train_subset: int | None) -> FolderSource:
        return open_folder(name, self.options(options, data_dir), train_subset)


# The two registered plugins (pyproject.toml's kdbench.datasets).
IMAGENET = ImageFolderDataset("ImageNet", default_folder="imagenet", num_classes=1000)
IMAGEFOLDER = ImageFolderDataset("ImageFolder")
