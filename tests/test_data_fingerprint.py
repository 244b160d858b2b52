"""Which data made a record: ``provenance.data_sha256`` (kdbench.data.fingerprint).

A run id names the dataset and its subset, not the bytes: another copy of the data (a user's
re-encoded ImageNet, a different download) trains other numbers under the same id. Every record
names the sha256 of the data it trained and was tested on, and `table` refuses a column whose
records name two. In-memory data hashes its pixels and labels; an ImageFolder its file list
and labels (not the 150 GB of bytes: said so in its docstring and checked below).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kdbench.cli import main
from kdbench.data import fingerprint, load_dataset, open_source
from kdbench.spec import RunSpec
from kdbench.store import Store
from test_imagefolder import make_image_folder

SETTING = "synthetic/tiny"


def test_in_memory_data_is_named_by_every_pixel_and_label() -> None:
    base = load_dataset("synthetic")
    same = load_dataset("synthetic")
    assert fingerprint(base) == fingerprint(same) and len(fingerprint(base)) == 64
    changed = []
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        other = load_dataset("synthetic")
        tensor = getattr(other, field)
        flat = tensor.view(-1)
        flat[7] = (int(flat[7]) + 1) % (256 if tensor.dtype == torch.uint8 else other.num_classes)
        changed.append(fingerprint(other))
    assert len(set(changed) | {fingerprint(base)}) == 5  # each field's one change is seen
    # The same bytes in another shape are other data (shapes are part of the hash).
    reshaped = load_dataset("synthetic")
    n, c, h, w = reshaped.train_images.shape
    reshaped.train_images = reshaped.train_images.reshape(n, c, h * w, 1)
    assert fingerprint(reshaped) != fingerprint(base)
    assert fingerprint(load_dataset("synthetic", train_subset=600)) != fingerprint(base)


def test_an_imagefolder_is_named_by_its_files_and_labels_not_their_place(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "a" / "images")
    def named(path: Path) -> str:
        return fingerprint(open_source("imagefolder", {"root": str(path), "image_size": 32,
                                                       "resize_size": 36}, None))

    first = named(root)
    copy = tmp_path / "b" / "images"
    shutil.copytree(root, copy)
    assert named(copy) == first  # another place, the same files
    (copy / "train" / "cat" / "0.png").rename(copy / "train" / "cat" / "99.png")
    assert named(copy) != first  # a renamed (or moved, added, removed) image is seen
    shutil.copy(root / "train" / "dog" / "1.png", root / "train" / "dog" / "0.png")
    assert named(root) == first  # documented: a file's bytes are not read


@pytest.mark.slow
def test_records_name_their_data_and_a_column_of_two_copies_is_refused(results_with_teacher, capsys) -> None:
    args = ["run", "--methods", "kd", "--seeds", "1", "--setting", SETTING, "--epochs", "1",
            "--executor", "inprocess", "--no-table", "--results", str(results_with_teacher)]
    assert main(args) == 0
    store = Store(results_with_teacher)
    expected = fingerprint(load_dataset("synthetic"))  # synthetic/tiny uses the whole set
    kd = RunSpec(SETTING, "kd", 0, overrides={"epochs": 1})
    teacher = RunSpec(SETTING, "vanilla", 0, role="teacher")
    assert store.read(kd.id)["provenance"]["data_sha256"] == expected
    assert store.read(teacher.id)["provenance"]["data_sha256"] == expected
    table = ["table", "--results", str(results_with_teacher)]
    assert main(table) == 0
    capsys.readouterr()

    # The KD record as another copy of the data would have made it.
    path = store.record_path(kd.id)
    record = json.loads(path.read_text())
    record["provenance"]["data_sha256"] = "f" * 64
    path.write_text(json.dumps(record))
    assert main(table) == 2
    err = capsys.readouterr().err
    assert (f"{SETTING}: its records were trained on 2 different copies of the data "
            f"({expected[:12]}…: 2 records (Teacher, Student); ffffffffffff…: 1 record (KD))") in err, err
    assert main([*table, "--pool-versions"]) == 0
    assert "its records were trained on different data (--pool-versions)" in capsys.readouterr().out
