"""Settings: RepDistiller's cross-family table and the resnet110 -> resnet20 column, their
recipes, and a dry run of one of them through the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kdbench import settings
from kdbench.cli import main
from kdbench.models import architecture_family
from test_data import write_cifar100

# RepDistiller README, "Benchmark Results on CIFAR-100", table 2 (teacher, student), and the
# resnet110 -> resnet20 column of its table 1.
CROSS_FAMILY = [
    ("vgg13", "mobilenetv2"),
    ("resnet50", "mobilenetv2"),
    ("resnet50", "vgg8"),
    ("resnet32x4", "shufflenet_v1"),
    ("resnet32x4", "shufflenet_v2"),
    ("wrn_40_2", "shufflenet_v1"),
]
# train_student.py and train_teacher.py: `if opt.model_s in ['MobileNetV2', 'ShuffleV1',
# 'ShuffleV2']: opt.learning_rate = 0.01`.
LR_001 = {"mobilenetv2", "shufflenet_v1", "shufflenet_v2"}


@pytest.mark.parametrize(("teacher", "student"), CROSS_FAMILY + [("resnet110", "resnet20")])
def test_repdistiller_settings_and_their_recipes(teacher: str, student: str) -> None:
    setting = settings.get(f"cifar100/{teacher}-{student}")
    assert (setting.dataset, setting.teacher, setting.student) == ("cifar100", teacher, student)
    if (teacher, student) in CROSS_FAMILY:
        assert architecture_family(teacher) != architecture_family(student)
    # The common recipe, but the student's learning rate where RepDistiller changes it; the
    # teacher (resnet50, vgg13, resnet32x4, wrn_40_2) always keeps 0.05.
    expected_lr = 0.01 if student in LR_001 else 0.05
    assert setting.recipe == dataclasses.replace(settings.COMMON_CIFAR, lr=expected_lr)
    assert setting.teacher_recipe == settings.COMMON_CIFAR
    assert ("0.01" in setting.recipe_source) == (student in LR_001)


def test_dry_run_lists_the_runs_of_a_cross_family_setting(tmp_path: Path, capsys) -> None:
    # The dry run checks that CIFAR-100's files are there and readable (kdbench.data.require):
    # a tiny archive in torchvision's format stands in for the real one.
    write_cifar100(tmp_path / "data")
    setting = "cifar100/resnet32x4-shufflenet_v1"
    code = main(["run", "--methods", "kd,at", "--setting", setting, "--seeds", "1",
                 "--data-dir", str(tmp_path / "data"), "--results", str(tmp_path / "results"),
                 "--dry-run"])
    assert code == 0
    out = capsys.readouterr().out
    # The baseline (vanilla) joins every grid; the teacher trains first.
    assert "3 student runs (3 methods × 1 seeds × 1 setting); 0 already stored, 3 to train" in out
    planned = [line.split()[2:4] for line in out.splitlines() if line.startswith("  would run ")]
    assert planned == [[setting, "teacher"], [setting, "vanilla"], [setting, "kd"], [setting, "at"]]
    assert not (tmp_path / "results" / "runs").exists() or not any((tmp_path / "results" / "runs").iterdir())
