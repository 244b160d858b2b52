"""Settings as TOML files (issue 18): the built-ins are files with the content the Python
definitions had, so the runs stored on them keep their ids; a user's file or directory works
through ``--setting``; its content is part of every run id and travels with the run; a bad file
is one line naming the file and the field, exit 2."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest

from kdbench import settings
from kdbench.cli import main
from kdbench.errors import UserError
from kdbench.grid import Grid
from kdbench.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]
RECORDS = REPO / "tables" / "records" / "runs"

# A user's setting: synthetic data, tiny networks, one short recipe.
MINE = """\
description = "my tiny setting"
dataset = "synthetic"
teacher = "wrn_10_2"
student = "wrn_10_1"
pretrain_scale = 0.05

[recipe]
epochs = 1
batch_size = 64
lr = 0.05
lr_decay_at = [0.5]

[recipe.augmentation]
crop_padding = 2
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def committed_records() -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(RECORDS.glob("*.json"))]


@pytest.mark.skipif(not any(RECORDS.glob("*.json")), reason="no committed records in tables/records")
def test_committed_records_keep_their_ids() -> None:
    """Every committed record's id is still the hash of its spec, and its setting is still the
    built-in's content: a setting older than setting files needs no setting_sha256 in the spec
    (LEGACY_SHA256), a newer one carries the hash its file has today. The records are found."""
    records = committed_records()
    for record in records:
        spec = RunSpec.from_json(record["spec"])
        assert spec.id == record["id"], record["id"]
        assert spec.setting_content is None  # a built-in, not a user's file
        setting = settings.for_spec(spec)
        assert spec.setting_sha256 == setting.spec_fields().get("setting_sha256"), record["id"]
        # The record's own copy of the setting says what the run computed with: the file's
        # content gives the same recipe and architectures today.
        stored = record["setting"]
        assert (setting.dataset, setting.teacher, setting.student) == (
            stored["dataset"], stored["teacher"], stored["student"])
        expected = setting.teacher_recipe if spec.role == "teacher" else setting.recipe
        recipe = {**json.loads(json.dumps(dataclasses.asdict(expected))), **spec.overrides}
        assert {key: stored["recipe"][key] for key in recipe} == recipe
        # A spec planned today on this setting holds what spec_fields() adds: the same id.
        assert dataclasses.replace(spec, **setting.spec_fields()).id == record["id"]


@pytest.mark.skipif(not any(RECORDS.glob("*.json")), reason="no committed records in tables/records")
def test_status_finds_the_committed_records(capsys) -> None:
    """`status --results tables/records --setting NAME` counts every committed student record of
    each setting (done, or stale where other code made it: found either way) and names the
    setting's committed teacher record by its id."""
    records = committed_records()
    students = Counter((r["spec"]["setting"], r["spec"]["method"]) for r in records
                       if r["spec"]["role"] == "student")
    for name in sorted({setting for setting, _ in students}):
        teachers = [r["id"] for r in records
                    if r["spec"]["role"] == "teacher" and r["spec"]["setting"] == name]
        methods = sorted(method for setting, method in students if setting == name)
        assert main(["status", "--results", str(RECORDS.parent), "--setting", name,
                     "--methods", ",".join(methods)]) == 0
        out = capsys.readouterr().out.splitlines()
        header = out[0].split()
        rows = {tuple(line.split()[:2]): dict(zip(header, line.split())) for line in out[1:]
                if line.startswith(name + " ")}
        for method in methods:
            row = rows[(name, method)]
            assert int(row["done"]) + int(row["stale"]) == students[(name, method)], row
        for teacher in teachers:
            assert any(teacher in line for line in out) or rows[(name, "teacher")]["done"] == "1"


def test_every_builtin_still_hashes_to_its_legacy_hash() -> None:
    """A built-in whose file was edited would silently get new ids (its spec would gain the
    hash): the edit must be deliberate, so this fails until legacy-sha256.json's rule is
    followed (a new entry is never added; an edited built-in has none)."""
    for name, expected in settings.LEGACY_SHA256.items():
        assert settings.get(name).sha256 == expected, name
        assert settings.get(name).spec_fields() == {}
    # A built-in added after the switch (the ImageNet ones) has its hash in every spec.
    for name in set(settings.SETTINGS) - set(settings.LEGACY_SHA256):
        assert settings.get(name).spec_fields() == {"setting_sha256": settings.get(name).sha256}


def test_builtin_files_spell_out_the_reference_recipes() -> None:
    assert settings.get("cifar100/wrn_40_2-wrn_16_2").recipe == settings.COMMON_CIFAR
    assert settings.get("cifar100/wrn_22_4-wrn_10_4").recipe == settings.MHGD_AUTHORS
    assert settings.get("synthetic/tiny").recipe == settings.SYNTHETIC_STUDENT
    assert settings.get("synthetic/tiny").teacher_recipe == settings.SYNTHETIC_TEACHER
    quick = settings.get("fashion_mnist/quick")
    assert (quick.recipe, quick.teacher_recipe, quick.train_subset) == (
        settings.FASHION_QUICK_STUDENT, settings.FASHION_QUICK_TEACHER, 10000)
    for name in ("imagenet/resnet34-resnet18", "imagenet/resnet50-mobilenet_v1"):
        setting = settings.get(name)
        assert setting.recipe == setting.teacher_recipe == settings.IMAGENET
    # The papers' recipe, spelled out (issue 18): 100 epochs, SGD lr 0.1 momentum 0.9, batch
    # 256, weight decay 1e-4, x0.1 at epochs 30, 60 and 90.
    recipe = settings.IMAGENET
    assert (recipe.epochs, recipe.lr, recipe.momentum, recipe.batch_size, recipe.weight_decay) == (
        100, 0.1, 0.9, 256, 1e-4)
    assert [round(f * recipe.epochs) for f in recipe.lr_decay_at] == [30, 60, 90]
    assert recipe.lr_decay == 0.1


def test_a_users_file_is_named_by_its_stem_and_hashed_by_what_it_computes(tmp_path: Path) -> None:
    path = write(tmp_path / "mine.toml", MINE)
    [setting] = settings.expand([str(path)])
    assert setting.name == "mine" and setting.origin == str(path)
    assert setting.recipe.epochs == 1 and setting.teacher_recipe == setting.recipe
    fields = setting.spec_fields()
    assert fields["setting_sha256"] == setting.sha256
    assert settings.from_content("mine", fields["setting_content"], "x") == dataclasses.replace(
        setting, origin="x")

    def run_id(text: str) -> str:
        [edited] = settings.expand([str(write(tmp_path / "mine.toml", text))])
        return Grid((edited.name,), ("kd",), (0,), setting_fields={edited.name: edited.spec_fields()}
                    ).students()[0].id

    base = run_id(MINE)
    # What a run computes changes its id; the description (and where files are) does not.
    assert run_id(MINE.replace("lr = 0.05", "lr = 0.1")) != base
    assert run_id(MINE.replace('student = "wrn_10_1"', 'student = "wrn_16_1"')) != base
    assert run_id(MINE.replace("crop_padding = 2", "crop_padding = 4")) != base
    assert run_id(MINE.replace("my tiny setting", "renamed")) == base
    # A name field names it; a built-in's name is refused.
    assert settings.expand([str(write(tmp_path / "mine.toml", 'name = "lab/tiny"\n' + MINE))]
                           )[0].name == "lab/tiny"
    write(tmp_path / "mine.toml", 'name = "synthetic/tiny"\n' + MINE)
    with pytest.raises(UserError, match=r"mine\.toml: name: 'synthetic/tiny' is a built-in"):
        settings.expand([str(tmp_path / "mine.toml")])


def test_a_directory_of_files_names_each_by_its_path(tmp_path: Path) -> None:
    write(tmp_path / "lab" / "a.toml", MINE)
    write(tmp_path / "lab" / "deeper" / "b.toml", MINE.replace("wrn_10_1", "resnet8"))
    chosen = settings.expand([str(tmp_path / "lab")])
    assert [s.name for s in chosen] == ["a", "deeper/b"]
    assert chosen[1].student == "resnet8"


def test_a_relative_dataset_root_is_the_files_and_no_part_of_the_id(tmp_path: Path) -> None:
    text = MINE.replace('dataset = "synthetic"', 'dataset = "imagefolder"') + (
        '\n[dataset_options]\nroot = "images"\nimage_size = 32\nresize_size = 36\n')
    first = settings.load_file(write(tmp_path / "one" / "s.toml", text), "s")
    second = settings.load_file(write(tmp_path / "two" / "s.toml", text), "s")
    assert first.dataset_options["root"] == str((tmp_path / "one" / "images").resolve())
    assert first.sha256 == second.sha256  # the same experiment on a copy of the data
    moved = text.replace("image_size = 32", "image_size = 40").replace("36", "44")
    assert settings.load_file(write(tmp_path / "s.toml", moved), "s").sha256 != first.sha256


def test_a_run_carries_a_users_setting_and_refuses_an_edited_one(tmp_path: Path) -> None:
    path = write(tmp_path / "mine.toml", MINE)
    [setting] = settings.expand([str(path)])
    spec = Grid(("mine",), ("kd",), (0,), setting_fields={"mine": setting.spec_fields()}).students()[0]
    path.unlink()  # a SLURM node or a spawned worker has no such file: the spec is enough
    again = RunSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again.id == spec.id
    assert settings.for_spec(again).recipe == setting.recipe
    assert settings.for_spec(again.teacher_spec()).teacher == "wrn_10_2"
    # Content that does not hash to the id's hash (a spec tampered with, or built by other code).
    content = {**spec.setting_content, "train_subset": 128}
    with pytest.raises(UserError, match="not the one run .* was planned with"):
        settings.for_spec(dataclasses.replace(spec, setting_content=content))
    # A built-in edited since a job was queued: the id's hash no longer matches.
    queued = dataclasses.replace(spec, setting="synthetic/tiny", setting_content=None)
    with pytest.raises(UserError, match="it was edited since"):
        settings.for_spec(queued)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda t: t.replace('dataset = "synthetic"\n', ""), "dataset: missing"),
    (lambda t: t.replace("epochs = 1", 'epochs = "one"'), "recipe.epochs: expected a whole number"),
    (lambda t: t.replace("lr = 0.05", "lr = -1.0"), "recipe.lr: must be positive"),
    (lambda t: t.replace("lr_decay_at = [0.5]", "lr_decay_at = [1.5]"), "recipe.lr_decay_at"),
    (lambda t: t + "colour = 'blue'\n", "recipe.augmentation.colour: not a setting field"),
    (lambda t: "epoch = 3\n" + t, "epoch: not a setting field"),
    (lambda t: t.replace('"wrn_10_1"', '"wrn_11_1"'), "student: unknown architecture 'wrn_11_1'"),
    (lambda t: t.replace('"synthetic"', '"imagenet22k"'), "dataset: unknown dataset 'imagenet22k'"),
    (lambda t: t + "\n[dataset_options]\nroot = 'x'\n", "dataset: dataset 'synthetic' takes no"),
    (lambda t: t.replace("[recipe]", "[recipe"), "not valid TOML"),
    (lambda t: t.replace("pretrain_scale = 0.05", "pretrain_scale = inf"), "pretrain_scale"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_the_field(tmp_path: Path, capsys, edit, field) -> None:
    path = write(tmp_path / "bad.toml", edit(MINE))
    code = main(["run", "--methods", "kd", "--setting", str(path), "--seeds", "1",
                 "--results", str(tmp_path / "results"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kdbench: error: {path}: ")
    assert field in lines[0]
    assert not (tmp_path / "results").exists()


def test_a_missing_path_and_an_empty_directory_are_one_line(tmp_path: Path, capsys) -> None:
    for given, problem in ((tmp_path / "nope.toml", "no such file or directory"),
                           (tmp_path, "the directory holds no .toml files")):
        assert main(["run", "--methods", "kd", "--setting", str(given), "--dry-run",
                     "--results", str(tmp_path / "results")]) == 2
        assert problem in capsys.readouterr().err


def test_list_shows_the_builtin_settings_from_their_files(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in settings.SETTINGS:
        assert name in out
    assert "ImageNet, the KD papers' recipe: ResNet34 -> ResNet18" in out
