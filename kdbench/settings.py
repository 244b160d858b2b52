"""Named settings ``dataset/teacher-student`` with the recipe every method follows on them.

A setting fixes everything that must be equal for a fair comparison: data, teacher and
student architectures, optimiser, schedule, epochs, batch size, augmentation, and the
teacher's own recipe. Methods differ only in their loss (and their declared pre-training).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

from kdbench.errors import UserError, suggest


@dataclass(frozen=True)
class Augmentation:
    crop_padding: int = 4  # RandomCrop(32, padding=4): common recipe (specs/methods.md)
    pad_mode: str = "constant"  # torchvision pads with zeros; MHGD's reference reflects
    flip: bool = True


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    # Learning-rate decay points as fractions of the epochs, so that ``--epochs`` keeps the
    # schedule's shape (the common recipe's 150/180/210 of 240).
    lr_decay_at: tuple[float, ...] = (150 / 240, 180 / 240, 210 / 240)
    lr_decay: float = 0.1
    augmentation: Augmentation = Augmentation()
    # Evaluate on the test split every this many epochs (and always after the last one).
    # Best-epoch metrics need 1; a CPU-sized teacher that is only ever read at its last epoch
    # saves its evaluation time with more.
    eval_every: int = 1

    def milestones(self) -> list[int]:
        return sorted({max(1, round(fraction * self.epochs)) for fraction in self.lr_decay_at})

    def with_overrides(self, overrides: dict) -> "Recipe":
        return dataclasses.replace(self, **overrides) if overrides else self


RECIPE_OVERRIDES = {"epochs": int, "batch_size": int, "lr": float}


@dataclass(frozen=True)
class Setting:
    name: str
    dataset: str
    teacher: str
    student: str
    recipe: Recipe
    teacher_recipe: Recipe
    description: str
    train_subset: int | None = None  # a fixed class-balanced subset (CPU-sized settings)
    # Multiplies every method's pre-training epochs (FitNets stage 1, MHGD's attention
    # network). 1 keeps the papers' numbers; short CPU settings scale them down with their
    # length, as specs/mhgd.md §4 asks, or stage 1 would dominate their run time.
    pretrain_scale: float = 1.0
    # The recipe's source, shown in table captions.
    recipe_source: str = "common recipe (RepDistiller/mdistiller)"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# The common CIFAR recipe of RepDistiller/mdistiller (specs/methods.md): SGD momentum 0.9,
# lr 0.05, batch 64, 240 epochs, ×0.1 at 150/180/210, wd 5e-4, crop 4 + flip; teachers too.
COMMON_CIFAR = Recipe(epochs=240, batch_size=64, lr=0.05)
# The same recipe at lr 0.01, which RepDistiller uses for MobileNetV2, ShuffleV1 and ShuffleV2
# whether they train alone or as students: train_teacher.py (`opt.model`) and train_student.py
# (`opt.model_s`) both set `opt.learning_rate = 0.01` when the network is one of
# ['MobileNetV2', 'ShuffleV1', 'ShuffleV2']. Their teachers (and a vgg8 student) keep 0.05.
COMMON_CIFAR_LIGHT_STUDENT = Recipe(epochs=240, batch_size=64, lr=0.01)
LIGHT_STUDENTS = ("mobilenetv2", "shufflenet_v1", "shufflenet_v2")

# The MHGD authors' recipe (specs/mhgd.md §4): batch 128, lr 0.1 Nesterov, 100 student epochs,
# ×0.1 at 30/60/80 %, reflect-padded crops.
MHGD_AUTHORS = Recipe(epochs=100, batch_size=128, lr=0.1, nesterov=True,
                      lr_decay_at=(0.3, 0.6, 0.8),
                      augmentation=Augmentation(crop_padding=4, pad_mode="reflect", flip=True))

# Fashion-MNIST at full size: the common recipe's optimiser, shortened to 60 epochs — the
# 28-px, 10-class task converges long before 240 (a GPU setting).
FASHION_FULL = Recipe(epochs=60, batch_size=128, lr=0.05)

# CPU-sized: a 2-core machine runs teacher + 2 × 5 students in about 10 minutes. The teacher
# trains longer than the students (8 vs 3 epochs) — at this budget that, more than its width,
# is what makes it the stronger network — and is evaluated only at its last epoch.
FASHION_QUICK_STUDENT = Recipe(epochs=3, batch_size=64, lr=0.05, lr_decay_at=(2 / 3,))
FASHION_QUICK_TEACHER = Recipe(epochs=8, batch_size=64, lr=0.05, lr_decay_at=(0.75,), eval_every=8)

# Seconds-sized, for tests: 16-px generated images, tiny networks.
SYNTHETIC_STUDENT = Recipe(epochs=2, batch_size=64, lr=0.05, lr_decay_at=(0.5,),
                           augmentation=Augmentation(crop_padding=2))
SYNTHETIC_TEACHER = Recipe(epochs=4, batch_size=64, lr=0.05, lr_decay_at=(0.75,),
                           augmentation=Augmentation(crop_padding=2))


def _cifar100(teacher: str, student: str) -> Setting:
    return Setting(f"cifar100/{teacher}-{student}", "cifar100", teacher, student,
                   COMMON_CIFAR, COMMON_CIFAR,
                   "CIFAR-100, common recipe: the RepDistiller/mdistiller table column")


def _cifar100_cross_family(teacher: str, student: str) -> Setting:
    """A column of RepDistiller's second table (teacher and student of different families)."""
    light = student in LIGHT_STUDENTS
    return Setting(f"cifar100/{teacher}-{student}", "cifar100", teacher, student,
                   COMMON_CIFAR_LIGHT_STUDENT if light else COMMON_CIFAR, COMMON_CIFAR,
                   "CIFAR-100, common recipe" + (" (student lr 0.01)" if light else "")
                   + ": the RepDistiller cross-family table column",
                   recipe_source="common recipe (RepDistiller)"
                   + (", student lr 0.01 as its train_student.py" if light else ""))


SETTINGS: dict[str, Setting] = {
    setting.name: setting
    for setting in [
        # The standard CIFAR-100 pairs of RepDistiller's table (specs/methods.md); the first is
        # the field's default.
        _cifar100("wrn_40_2", "wrn_16_2"),
        _cifar100("wrn_40_2", "wrn_40_1"),
        _cifar100("resnet56", "resnet20"),
        _cifar100("resnet110", "resnet20"),
        _cifar100("resnet110", "resnet32"),
        _cifar100("resnet32x4", "resnet8x4"),
        _cifar100("vgg13", "vgg8"),
        # RepDistiller's second table: teacher and student of different families.
        _cifar100_cross_family("vgg13", "mobilenetv2"),
        _cifar100_cross_family("resnet50", "mobilenetv2"),
        _cifar100_cross_family("resnet50", "vgg8"),
        _cifar100_cross_family("resnet32x4", "shufflenet_v1"),
        _cifar100_cross_family("resnet32x4", "shufflenet_v2"),
        _cifar100_cross_family("wrn_40_2", "shufflenet_v1"),
        # MHGD paper Table 1's WResNet pair, in the authors' recipe (specs/mhgd.md §4).
        Setting("cifar100/wrn_22_4-wrn_10_4", "cifar100", "wrn_22_4", "wrn_10_4",
                MHGD_AUTHORS, MHGD_AUTHORS,
                "CIFAR-100, the MHGD authors' recipe (Lee & Song 2019, Table 1 pair)",
                recipe_source="MHGD authors' recipe (KD_methods_with_TF)"),
        Setting("cifar10/wrn_40_2-wrn_16_2", "cifar10", "wrn_40_2", "wrn_16_2",
                COMMON_CIFAR, COMMON_CIFAR, "CIFAR-10, common recipe"),
        Setting("fashion_mnist/wrn_40_2-wrn_16_2", "fashion_mnist", "wrn_40_2", "wrn_16_2",
                FASHION_FULL, FASHION_FULL, "Fashion-MNIST, full data, 60 epochs (GPU)",
                recipe_source="common recipe optimiser, 60 epochs"),
        Setting("fashion_mnist/resnet32x4-resnet8x4", "fashion_mnist", "resnet32x4", "resnet8x4",
                FASHION_FULL, FASHION_FULL, "Fashion-MNIST, full data, 60 epochs (GPU)",
                recipe_source="common recipe optimiser, 60 epochs"),
        Setting("fashion_mnist/quick", "fashion_mnist", "wrn_16_1", "resnet8",
                FASHION_QUICK_STUDENT, FASHION_QUICK_TEACHER,
                "Fashion-MNIST, 10k-image training subset, 3 epochs: a CPU-sized check",
                train_subset=10000, pretrain_scale=0.05,
                recipe_source="common recipe optimiser, shortened for a CPU"),
        Setting("synthetic/tiny", "synthetic", "wrn_10_2", "wrn_10_1",
                SYNTHETIC_STUDENT, SYNTHETIC_TEACHER,
                "generated 16-px images, tiny networks: for tests", pretrain_scale=0.05,
                recipe_source="test recipe"),
    ]
}

DEFAULT_SETTING = "cifar100/wrn_40_2-wrn_16_2"
QUICK_SETTING = "fashion_mnist/quick"


def get(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise UserError(f"unknown setting {name!r}; {suggest(name, sorted(SETTINGS))}") from None


def expand(patterns: list[str]) -> list[Setting]:
    """Settings named by exact names or glob patterns (``cifar100/*``), in the order given."""
    chosen: dict[str, Setting] = {}
    for pattern in patterns:
        matches = [name for name in SETTINGS if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            get(pattern)  # raises with the nearest names
        for name in matches:
            chosen.setdefault(name, SETTINGS[name])
    return list(chosen.values())
