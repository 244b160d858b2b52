"""ImageNet-format data (kdbench/imagefolder.py) on a tiny ImageFolder the tests generate: three
classes of 64 x 48 px PNGs, 8 training and 3 validation images each.

The augmentation is torchvision's own (RandomResizedCrop + flip for training, Resize + CentreCrop
for validation), compared with torchvision's transforms on the same files; the batches are
seeded per run, independent of the DataLoader's workers and resumable at an epoch boundary; and
a user's TOML setting pointing at the folder trains end to end through the CLI (issue 18's
"done when"), with ``image_size`` shrunk so it takes seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from kdbench import settings
from kdbench.cli import main
from kdbench.data import open_stream, require_data, shape_of
from kdbench.errors import UserError
from kdbench.imagefolder import TrainImages, ValImages, open_folder, resized_crop_params
from kdbench.settings import Augmentation

CLASSES = ("cat", "dog", "owl")
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 3
SIZE, RESIZE = 32, 36  # instead of ImageNet's 224 and 256


def make_image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                # Each class its own mean colour, so a network can learn something.
                pixels = rng.integers(0, 96, (48, 64, 3)) + 64 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagefolder") / "images")


def options(root: Path) -> dict:
    return {"root": str(root), "image_size": SIZE, "resize_size": RESIZE}


def stream(root: Path, seed: int = 0, workers: int = 0, batch_size: int = 5, subset=None, flip=True):
    return open_stream("imagefolder", options(root), subset, torch.device("cpu"), batch_size,
                       Augmentation(crop_padding=0, flip=flip), seed, workers=workers)


def raw_epoch(source) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in source.epoch()]


@pytest.mark.parametrize(("height", "width"), [(48, 64), (300, 20), (20, 300), (7, 7)])
def test_crop_parameters_are_torchvisions_draws(height: int, width: int) -> None:
    """The same crop as RandomResizedCrop after torch.manual_seed(s), including the fallback to
    the central crop where ten tries fail (the extreme aspect ratios)."""
    image = Image.new("RGB", (width, height))
    for seed in range(20):
        torch.manual_seed(seed)
        expected = transforms.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
        assert resized_crop_params(height, width, torch.Generator().manual_seed(seed)) == expected


def test_samples_are_torchvisions_transforms_of_the_files(images: Path) -> None:
    source = open_folder("imagefolder", settings_options(images), None)
    train = TrainImages(source.train, source.positions, SIZE, flip=True)
    pipeline = transforms.Compose([transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip()])
    for position in (0, 9, 23):
        path, label = source.train.samples[position]
        for seed in (0, 1, 2, 3):
            torch.manual_seed(seed)
            expected = transforms.functional.pil_to_tensor(pipeline(Image.open(path).convert("RGB")))
            sample, got_label, got_position = train[(position, seed)]
            assert torch.equal(sample, expected) and (got_label, got_position) == (label, position)
            assert sample.dtype == torch.uint8 and sample.shape == (3, SIZE, SIZE)
    val = ValImages(source.val, RESIZE, SIZE)
    centre = transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(SIZE)])
    for position in range(len(val)):
        path, label = source.val.samples[position]
        expected = transforms.functional.pil_to_tensor(centre(Image.open(path).convert("RGB")))
        sample, got_label = val[position]
        assert torch.equal(sample, expected) and got_label == label


def settings_options(root: Path):
    from kdbench.imagefolder import FolderOptions

    return FolderOptions.parse(options(root), None)


def test_batches_are_seeded_and_do_not_depend_on_the_workers(images: Path) -> None:
    one = stream(images, seed=0, workers=0)
    assert (one.num_classes, one.in_channels, one.num_train) == (3, 3, 24)
    assert one.steps_per_epoch == 5  # 24 images in batches of 5, the last of 4
    first = raw_epoch(one)
    assert [len(y) for _, y, _ in first] == [5, 5, 5, 5, 4]
    # Every training image once per epoch, with its own label, normalised with ImageNet's
    # statistics (pixels of at most 255 give at most (1 - 0.406) / 0.225).
    indices = torch.cat([i for _, _, i in first])
    assert sorted(indices.tolist()) == list(range(24))
    labels = torch.cat([y for _, y, _ in first])
    assert torch.equal(labels, one.train_labels[indices])
    assert torch.cat([x for x, _, _ in first]).max() <= (1 - 0.406) / 0.225 + 1e-5
    # Two workers load the same batches; a second epoch and another seed do not.
    two = raw_epoch(stream(images, seed=0, workers=2))
    for (x0, y0, i0), (x1, y1, i1) in zip(first, two):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(i0, i1)
    second = raw_epoch(one)
    assert not torch.equal(torch.cat([i for _, _, i in second]), indices)
    other = raw_epoch(stream(images, seed=1))
    assert not torch.equal(torch.cat([x for x, _, _ in other]), torch.cat([x for x, _, _ in first]))


def test_a_stream_resumed_at_an_epoch_boundary_gives_the_same_batches(images: Path) -> None:
    uninterrupted = stream(images, seed=3)
    raw_epoch(uninterrupted)
    state = uninterrupted.state_dict()
    expected = raw_epoch(uninterrupted)
    resumed = stream(images, seed=3)
    resumed.load_state_dict(torch.load(_saved(state), weights_only=True))  # as a checkpoint holds it
    for (x0, y0, i0), (x1, y1, i1) in zip(expected, raw_epoch(resumed)):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(i0, i1)


def _saved(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_validation_batches_are_the_centre_crops_in_order(images: Path) -> None:
    source = stream(images, batch_size=4)
    batches = list(source.test_batches())
    assert [len(y) for _, y in batches] == [4, 4, 1]  # at most the training batch size
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    val = ValImages(source.source.val, RESIZE, SIZE)
    torch.testing.assert_close(batches[0][0], source.normalise(torch.stack([val[i][0] for i in range(4)])))
    torch.testing.assert_close(source.sample(2), batches[0][0][:2])


def test_a_training_subset_is_class_balanced(images: Path) -> None:
    subset = stream(images, subset=9)
    assert subset.num_train == 9
    assert torch.bincount(subset.train_labels).tolist() == [3, 3, 3]


def test_shape_and_require_name_what_is_wrong(images: Path, tmp_path: Path) -> None:
    shape = shape_of("imagefolder", options(images))
    assert (shape.in_channels, shape.num_classes, shape.image_size) == (3, 3, SIZE)
    assert shape_of("imagenet").num_classes == 1000  # without its files: ImageNet's 1000 classes
    broken = make_image_folder(tmp_path / "broken")
    (broken / "val" / "owl").rename(broken / "val" / "eagle")
    with pytest.raises(UserError, match="do not hold the same class folders"):
        require_data("imagefolder", options(broken))
    half = tmp_path / "half"
    (half / "train" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="half/val does not exist: an ImageFolder dataset needs"):
        require_data("imagefolder", options(half))
    with pytest.raises(UserError, match="'resize_size' .* is smaller than 'image_size'"):
        shape_of("imagefolder", {**options(images), "resize_size": SIZE - 1})
    with pytest.raises(UserError, match="dataset option 'size' is not one of"):
        shape_of("imagefolder", {**options(images), "size": 3})
    with pytest.raises(UserError, match=r"imagenet/train does not exist"):
        require_data("imagenet", {}, tmp_path)


SETTING = """\
description = "a tiny ImageFolder"
dataset = "imagefolder"
teacher = "wrn_10_2"
student = "wrn_10_1"
pretrain_scale = 0.05

[dataset_options]
root = "images"
image_size = 32
resize_size = 36

[recipe]
epochs = 1
batch_size = 8
lr = 0.05

[recipe.augmentation]
crop_padding = 0
"""


def test_a_users_imagefolder_setting_trains_end_to_end(images: Path, tmp_path: Path, capsys) -> None:
    """`run --methods kd,at --setting mine.toml --seeds 1` on the generated folder: the teacher,
    the baseline and both students train, and their records say what they trained on."""
    (tmp_path / "images").symlink_to(images, target_is_directory=True)
    path = tmp_path / "mine.toml"
    path.write_text(SETTING)
    results = tmp_path / "results"
    code = main(["run", "--methods", "kd,at", "--setting", str(path), "--seeds", "1",
                 "--executor", "inprocess", "--loader-workers", "1", "--results", str(results)])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out + captured.err
    records = [json.loads(p.read_text()) for p in sorted((results / "runs").glob("*.json"))]
    by_method = {(r["spec"]["role"], r["spec"]["method"]): r for r in records}
    assert set(by_method) == {("teacher", "vanilla"), ("student", "vanilla"), ("student", "kd"),
                              ("student", "at")}
    [setting] = settings.expand([str(path)])
    for record in records:
        assert record["status"] == "done", record.get("error")
        assert record["spec"]["setting"] == "mine"
        assert record["spec"]["setting_sha256"] == setting.sha256
        assert record["setting"]["num_classes"] == 3 and record["setting"]["dataset"] == "imagefolder"
        top1 = record["metrics"]["top1_last"]
        assert 0 <= top1 <= 100
    # The table of the grid names the user's setting; a second run finds everything stored.
    assert "mine" in out
    assert main(["run", "--methods", "kd,at", "--setting", str(path), "--seeds", "1",
                 "--executor", "inprocess", "--results", str(results)]) == 0
    assert "0 to train" in capsys.readouterr().out


def test_the_imagenet_grid_is_planned_without_its_data(tmp_path: Path, capsys) -> None:
    code = main(["run", "--methods", "kd,at", "--setting", "imagenet/resnet34-resnet18",
                 "--seeds", "2", "--data-dir", str(tmp_path), "--results", str(tmp_path / "r"),
                 "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    planned = [line.split()[2:6] for line in captured.out.splitlines() if line.startswith("  would run ")]
    setting = "imagenet/resnet34-resnet18"
    assert planned == [[setting, "teacher", "seed", "0"]] + [
        [setting, method, "seed", str(seed)] for method in ("vanilla", "kd", "at") for seed in (0, 1)]
    assert "6 student runs" in captured.out
    # A real run would stop at the missing data: the dry run says so, on stderr.
    assert "imagenet/train does not exist" in captured.err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("*.json"))


@pytest.mark.parametrize("workers", ["-1", "65"])
def test_loader_workers_out_of_range_is_one_line(tmp_path: Path, capsys, workers: str) -> None:
    code = main(["run", "--methods", "kd", "--setting", "synthetic/tiny", "--seeds", "1",
                 "--loader-workers", workers, "--results", str(tmp_path / "r"), "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"kdbench: error: --loader-workers: from 0 (load in the training "
                                 f"process) to 64, got {workers}"]
