"""Datasets as in-memory tensors, with batch-level seeded augmentation; dataset plugins.

Each split is one uint8 tensor on the training device; a batch is gathered, padded, cropped,
flipped and normalised with tensor ops (airbench's design). There are no per-sample Python
transforms and no DataLoader workers: on a GPU the pipeline costs microseconds per batch, and
all randomness of an epoch (order, crop offsets, flips) is drawn at the epoch's start from one
seeded CPU generator, so the same seed gives the same batches on any device and a run resumed
at an epoch boundary sees exactly the batches it would have seen.

Every dataset a setting names comes through the ``kdbench.datasets`` entry-point group
(kdbench/plugins.py), the built-ins as a third party's (pyproject.toml). An entry point names
an object with (``DatasetPlugin``):
- ``check_options(options)``: raise UserError for options it does not take (a setting's
  ``[dataset_options]``), before anything is loaded;
- ``shape(options, data_dir) -> DataShape``: input channels, classes and image size, known
  without loading the data (checks, estimates, the contract);
- ``require(options, data_dir)``: a one-line UserError naming what is missing or damaged;
- ``open(name, options, data_dir, train_subset)``: the data, either a ``Dataset`` (in-memory
  uint8 tensors, read by ``BatchStream``) or a source with a ``stream(device, batch_size,
  augmentation, seed, workers)`` method (the ImageFolder datasets, kdbench/imagefolder.py);
- optionally ``display_name`` and ``location_options`` (options that say where the files are,
  not what they are, such as ``root``: they are no part of a run's identity).
A stream (``open_stream``) is what train.py reads: ``epoch()``, ``steps_per_epoch``,
``test_batches()``, ``normalise()``, ``state_dict()``/``load_state_dict()``, ``device``, and the
data's ``num_classes``, ``in_channels``, ``num_train``, ``train_labels`` and ``sample(count)``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

import numpy as np
import torch
from torch import Tensor

from kdbench.errors import UserError
from kdbench.plugins import PluginGroup
from kdbench.settings import Augmentation

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "synthetic")
# (input channels, classes) of each dataset, known without loading it.
DATASET_SHAPES = {"cifar10": (3, 10), "cifar100": (3, 100), "fashion_mnist": (1, 10),
                  "synthetic": (3, 10)}
# (training images, image size), for estimates made before loading anything.
DATASET_SIZES = {"cifar10": (50000, 32), "cifar100": (50000, 32), "fashion_mnist": (60000, 28),
                 "synthetic": (1200, 16)}

# Per-channel mean/std of the training split.
NORMALISATION = {
    # RepDistiller / mdistiller CIFAR-100 constants (specs/methods.md, common recipe).
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    # CIFAR-10 training-set statistics (the often-copied (0.2023, 0.1994, 0.2010) std is not the
    # per-pixel std; these are).
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # Fashion-MNIST training-set statistics.
    "fashion_mnist": ((0.2860,), (0.3530,)),
    # The synthetic set is generated around mid-grey; see ``synthetic``.
    "synthetic": ((0.5, 0.5, 0.5), (0.33, 0.33, 0.33)),
}

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CIFAR_ARCHIVES = {
    # torchvision's sources and on-disk layout (torchvision.datasets.CIFAR10/CIFAR100).
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
                 ["train"], ["test"], b"fine_labels"),
}
OFFLINE_HINT = "offline, use --setting fashion_mnist/quick (real data from Debian's dataset-fashion-mnist)"


@dataclass
class Dataset:
    name: str
    train_images: Tensor  # uint8 (N, C, H, W)
    train_labels: Tensor  # int64 (N,)
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    # Per-channel (mean, std) of the pixels in [0, 1]; None: NORMALISATION[name] (built-ins).
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]

    @property
    def num_train(self) -> int:
        return self.train_images.shape[0]

    def to(self, device: torch.device) -> "Dataset":
        return Dataset(self.name, self.train_images.to(device), self.train_labels.to(device),
                       self.test_images.to(device), self.test_labels.to(device), self.num_classes,
                       self.normalisation)


def default_data_dir() -> Path:
    return Path(os.environ.get("KDBENCH_DATA", "data"))


def load_dataset(name: str, data_dir: Path | None = None, train_subset: int | None = None,
                 download: bool = True) -> Dataset:
    """Load a dataset onto the CPU. ``train_subset`` keeps a fixed, class-balanced subset of
    the training split (the same for every seed, so runs differ only in their seed)."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if name in CIFAR_ARCHIVES:
        dataset = load_cifar(name, data_dir, download)
    elif name == "fashion_mnist":
        dataset = load_fashion_mnist(data_dir)
    elif name == "synthetic":
        dataset = synthetic()
    else:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if train_subset is not None and train_subset < dataset.num_train:
        keep = balanced_subset(dataset.train_labels, train_subset, dataset.num_classes)
        dataset.train_images = dataset.train_images[keep].contiguous()
        dataset.train_labels = dataset.train_labels[keep].contiguous()
    return dataset


def require(name: str, data_dir: Path | None = None, download: bool = True) -> None:
    """Fail early, with one clear line naming the file, when a dataset's files cannot be had
    or cannot be read: every file is read once here, before any run starts, so a truncated or
    damaged file is a user's error to fix (exit 2), not a failed record per run."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if name in CIFAR_ARCHIVES:
        url, md5, folder, train_files, test_files, label_key = CIFAR_ARCHIVES[name]
        needed = [data_dir / folder / file for file in train_files + test_files]
        if not all(path.exists() for path in needed) and download:
            try_download(url, md5, data_dir)
        missing = [path for path in needed if not path.exists()]
        if missing:
            raise UserError(
                f"{name} not found: missing {missing[0]}; put torchvision's {url.rsplit('/', 1)[1]} "
                f"extracted into {data_dir}, or {OFFLINE_HINT}"
            )
        for path in needed:
            read_cifar_batches([path], label_key)  # raises the one-line error naming the file
    elif name == "fashion_mnist":
        load_fashion_mnist(data_dir)  # reads every file: raises the one-line error naming it
    elif name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def balanced_subset(labels: Tensor, size: int, num_classes: int) -> Tensor:
    """Indices of ``size`` samples, as equal per class as possible, from a fixed permutation."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    per_class = -(-size // num_classes)
    ordered = labels[order]
    # Each sample's rank among its class in the permuted order, vectorised (a Python loop over
    # 60k labels took a second of every run's start): a stable sort by class keeps the
    # permuted order within each class, so a sample's rank is its place in the sorted list
    # minus where its class starts there.
    by_class = torch.sort(ordered, stable=True).indices
    counts = torch.bincount(ordered, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[by_class] = torch.arange(len(order)) - starts[ordered[by_class]]
    chosen = order[rank < per_class][:size]
    return chosen.sort().values


# --- Fashion-MNIST ---------------------------------------------------------------------------

def fashion_mnist_dirs(data_dir: Path) -> list[Path]:
    return [data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw", data_dir,
            FASHION_MNIST_SYSTEM_DIR]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format): magic, dims as big-endian int32, then bytes."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
        raise UserError(f"{path}: damaged or not gzip-compressed ({type(error).__name__}: {error}); "
                        "download it again") from None
    if len(raw) < 4:
        raise UserError(f"{path}: not an IDX file ({len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} bytes)")
    return data.reshape(dims)


def load_fashion_mnist(data_dir: Path) -> Dataset:
    for directory in fashion_mnist_dirs(data_dir):
        if all((directory / file).exists() for file in FASHION_MNIST_FILES.values()):
            arrays = {key: read_idx(directory / file) for key, file in FASHION_MNIST_FILES.items()}
            for split in ("train", "test"):
                images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
                if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                    raise UserError(f"{directory / FASHION_MNIST_FILES[split + '_images']} and its "
                                    f"labels file do not match (images {images.shape}, labels "
                                    f"{labels.shape})")
            return Dataset(
                "fashion_mnist",
                torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
                torch.from_numpy(arrays["train_labels"].astype(np.int64)),
                torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
                torch.from_numpy(arrays["test_labels"].astype(np.int64)),
                num_classes=10,
            )
    missing = FASHION_MNIST_FILES["train_images"]
    raise UserError(
        f"Fashion-MNIST not found: no {missing} (and the other 3 files) in {data_dir}/fashion-mnist "
        f"or {FASHION_MNIST_SYSTEM_DIR}; install it with `apt-get install dataset-fashion-mnist`"
    )


# --- CIFAR -----------------------------------------------------------------------------------

def load_cifar(name: str, data_dir: Path, download: bool) -> Dataset:
    require(name, data_dir, download)
    _, _, folder, train_files, test_files, label_key = CIFAR_ARCHIVES[name]
    root = data_dir / folder
    train_images, train_labels = read_cifar_batches([root / f for f in train_files], label_key)
    test_images, test_labels = read_cifar_batches([root / f for f in test_files], label_key)
    return Dataset(name, train_images, train_labels, test_images, test_labels,
                   num_classes=100 if name == "cifar100" else 10)


def try_download(url: str, md5: str, data_dir: Path) -> None:
    """Download and extract where the network allows; offline, leave the error to the caller."""
    from torchvision.datasets.utils import download_and_extract_archive

    created = not data_dir.exists()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(url, str(data_dir), md5=md5)
    except Exception:  # no network here is the common case: the caller names the missing file
        if created and not any(data_dir.iterdir()):
            data_dir.rmdir()  # a failed attempt leaves nothing behind


def read_cifar_batches(paths: list[Path], label_key: bytes) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except Exception as error:  # truncated, another file, another format
            raise UserError(f"{path}: not a CIFAR batch file ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''})") from None
        if len(images[-1]) != len(labels[-1]):
            raise UserError(f"{path}: {len(images[-1])} images but {len(labels[-1])} labels")
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# --- synthetic -------------------------------------------------------------------------------

def synthetic(num_classes: int = 10, train_per_class: int = 120, test_per_class: int = 40,
              size: int = 16, seed: int = 1234) -> Dataset:
    """A small generated image set with real class structure, for tests.

    Each class is a smooth random 3-channel prototype; a sample is its prototype at a random
    contrast and circular shift, plus pixel noise. A small CNN separates the classes well
    above chance within a few epochs, but not perfectly (the noise and shifts see to that),
    so a bigger teacher still has something to teach.
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=generator)
    prototypes = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                                 align_corners=False)

    def draw(per_class: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        contrast = 0.5 + torch.rand(len(labels), 1, 1, 1, generator=generator)
        images = 0.5 + contrast * (prototypes[labels] - 0.5)
        shifts = torch.randint(-3, 4, (len(labels), 2), generator=generator)
        images = torch.stack([torch.roll(image, tuple(shift.tolist()), dims=(1, 2))
                              for image, shift in zip(images, shifts)])
        images = images + 0.35 * torch.randn(images.shape, generator=generator)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels

    train_images, train_labels = draw(train_per_class)
    test_images, test_labels = draw(test_per_class)
    return Dataset("synthetic", train_images, train_labels, test_images, test_labels, num_classes)


# --- batches ---------------------------------------------------------------------------------

class BatchStream:
    """Seeded, device-resident training batches and test batches for one dataset."""

    def __init__(self, dataset: Dataset, device: torch.device, batch_size: int,
                 augmentation: Augmentation, seed: int) -> None:
        self.data = dataset.to(device)
        self.device = device
        self.batch_size = batch_size
        self.augmentation = augmentation
        self.generator = torch.Generator().manual_seed(seed)
        mean, std = dataset.normalisation or NORMALISATION[dataset.name]
        shape = (1, len(mean), 1, 1)
        # x/255 then (x - mean)/std folded into one multiply-add per pixel.
        self.scale = (1.0 / (255.0 * torch.tensor(std))).view(shape).to(device)
        self.shift = (-torch.tensor(mean) / torch.tensor(std)).view(shape).to(device)

    # The data's facts, as train.py reads them from a stream.
    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def in_channels(self) -> int:
        return self.data.in_channels

    @property
    def num_train(self) -> int:
        return self.data.num_train

    @property
    def train_labels(self) -> Tensor:
        return self.data.train_labels

    def sample(self, count: int) -> Tensor:
        """The first ``count`` test images, normalised (a dry forward pass)."""
        return self.normalise(self.data.test_images[:count])

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.data.num_train, self.batch_size)
        # A last batch of one sample is dropped: BatchNorm cannot train on it.
        return full + (1 if rest > 1 else 0)

    def normalise(self, images: Tensor) -> Tensor:
        return images.float() * self.scale + self.shift

    def epoch(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(images, labels, indices) for one epoch, in a fresh seeded order."""
        n = self.data.num_train
        padding = self.augmentation.crop_padding
        # All of the epoch's randomness, drawn up front from the CPU generator.
        order = torch.randperm(n, generator=self.generator)
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=self.generator)
        flips = torch.rand(n, generator=self.generator) < 0.5
        order, offsets, flips = (x.to(self.device, non_blocking=True) for x in (order, offsets, flips))
        for step in range(self.steps_per_epoch):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            images = self.data.train_images[index].float()
            if padding:
                images = random_crop(images, offsets[index], padding, self.augmentation.pad_mode)
            if self.augmentation.flip:
                images = torch.where(flips[index].view(-1, 1, 1, 1), images.flip(3), images)
            yield self.normalise(images), self.data.train_labels[index], index

    def test_batches(self, batch_size: int = 1000) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self.data.test_labels), batch_size):
            images = self.data.test_images[start:start + batch_size]
            yield self.normalise(images), self.data.test_labels[start:start + batch_size]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def random_crop(images: Tensor, offsets: Tensor, padding: int, mode: str) -> Tensor:
    """Crop each image at its own offset from a padded copy, all at once by gathering."""
    batch, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4, mode=mode)
    rows = (offsets[:, 0:1] + torch.arange(height, device=images.device)).view(batch, 1, height, 1)
    cols = (offsets[:, 1:2] + torch.arange(width, device=images.device)).view(batch, 1, 1, width)
    flat = padded.flatten(2)  # (B, C, Hp*Wp)
    index = (rows * padded.shape[-1] + cols).view(batch, 1, height * width).expand(-1, channels, -1)
    return flat.gather(2, index).view(batch, channels, height, width)


# --- dataset plugins -------------------------------------------------------------------------

@dataclass(frozen=True)
class DataShape:
    """What the networks see of a dataset, known without loading it."""

    in_channels: int
    num_classes: int
    image_size: int  # the side of the (square) images the networks get at test time
    num_train: int | None = None  # training images, where known without loading (estimates)


class DatasetPlugin(Protocol):
    def check_options(self, options: Mapping[str, Any]) -> None: ...
    def shape(self, options: Mapping[str, Any], data_dir: Path) -> DataShape: ...
    def require(self, options: Mapping[str, Any], data_dir: Path) -> None: ...
    def open(self, name: str, options: Mapping[str, Any], data_dir: Path,
             train_subset: int | None) -> Any: ...


DATASET_PLUGINS = PluginGroup("kdbench.datasets", "dataset")


class InMemoryDataset:
    """The built-in datasets held as tensors (CIFAR-10/100, Fashion-MNIST, synthetic)."""

    location_options: tuple[str, ...] = ()

    def __init__(self, name: str) -> None:
        self.name = name

    def check_options(self, options: Mapping[str, Any]) -> None:
        if options:
            raise UserError(f"dataset {self.name!r} takes no dataset options, got "
                            f"{', '.join(sorted(options))}")

    def shape(self, options: Mapping[str, Any], data_dir: Path) -> DataShape:
        channels, classes = DATASET_SHAPES[self.name]
        train, size = DATASET_SIZES[self.name]
        return DataShape(channels, classes, size, train)

    def require(self, options: Mapping[str, Any], data_dir: Path) -> None:
        require(self.name, data_dir)

    def open(self, name: str, options: Mapping[str, Any], data_dir: Path,
             train_subset: int | None) -> Dataset:
        return load_dataset(self.name, data_dir, train_subset)


CIFAR10, CIFAR100 = InMemoryDataset("cifar10"), InMemoryDataset("cifar100")
FASHION_MNIST, SYNTHETIC = InMemoryDataset("fashion_mnist"), InMemoryDataset("synthetic")


def _not_a_dataset(loaded: object) -> str | None:
    missing = [name for name in ("check_options", "shape", "require", "open")
               if not callable(getattr(loaded, name, None))]
    return f"is not a dataset plugin (it lacks {', '.join(missing)})" if missing else None


def dataset_plugin(name: str) -> DatasetPlugin:
    """The ``kdbench.datasets`` plugin registered as ``name`` (UserError if none or broken)."""
    DATASET_PLUGINS.registration(name)
    return DATASET_PLUGINS.load_checked(name, _not_a_dataset)


def location_options(name: str) -> tuple[str, ...]:
    return tuple(getattr(dataset_plugin(name), "location_options", ()))


def _data_dir(data_dir: Path | None) -> Path:
    return Path(data_dir) if data_dir is not None else default_data_dir()


def shape_of(dataset: str, options: Mapping[str, Any] | None = None,
             data_dir: Path | None = None) -> DataShape:
    return dataset_plugin(dataset).shape(dict(options or {}), _data_dir(data_dir))


def require_data(dataset: str, options: Mapping[str, Any] | None = None,
                 data_dir: Path | None = None) -> None:
    """Fail early, with one clear line, when a setting's data cannot be had."""
    dataset_plugin(dataset).require(dict(options or {}), _data_dir(data_dir))


def open_source(dataset: str, options: Mapping[str, Any] | None, train_subset: int | None,
                data_dir: Path | None = None):
    """A setting's data as its plugin opens it: a ``Dataset`` (in-memory tensors) or a source
    with a ``stream(...)`` method (see the module docstring)."""
    return dataset_plugin(dataset).open(dataset, dict(options or {}), _data_dir(data_dir), train_subset)


def fingerprint(source) -> str | None:
    """A sha256 of the data a run trains and tests on, as opened (after ``train_subset``), so a
    record says which data made it: in-memory data hashes its tensors (pixels and labels of
    both splits); another source, its ``fingerprint()`` if it has one (an ImageFolder: its
    file list and labels). None where the source cannot say."""
    if isinstance(source, Dataset):
        digest = hashlib.sha256()
        for tensor in (source.train_images, source.train_labels, source.test_images, source.test_labels):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype} {tuple(tensor.shape)};".encode())
            digest.update(tensor.numpy())  # the buffer itself, not a copy of it
        return digest.hexdigest()
    own = getattr(source, "fingerprint", None)
    return own() if callable(own) else None


def stream_of(source, device: torch.device, batch_size: int, augmentation: Augmentation, seed: int,
              workers: int | None = None):
    """The seeded batch stream of an opened source (``open_source``)."""
    if isinstance(source, Dataset):
        return BatchStream(source, device, batch_size, augmentation, seed)
    if workers is None:
        workers = default_workers()
    return source.stream(device, batch_size, augmentation, seed, workers)


def open_stream(dataset: str, options: Mapping[str, Any] | None, train_subset: int | None,
                device: torch.device, batch_size: int, augmentation: Augmentation, seed: int,
                data_dir: Path | None = None, workers: int | None = None):
    """The seeded batch stream of a setting's data (see the module docstring)."""
    return stream_of(open_source(dataset, options, train_subset, data_dir), device, batch_size,
                     augmentation, seed, workers)


def default_workers() -> int:
    """DataLoader workers when a run names none: one per usable core, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))
