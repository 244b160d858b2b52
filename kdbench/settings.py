"""Settings ``dataset/teacher-student`` with the recipe every method follows on them, as data.

A setting fixes everything that must be equal for a fair comparison: data, teacher and
student architectures, optimiser, schedule, epochs, batch size, augmentation, and the
teacher's own recipe. Methods differ only in their loss (and their declared pre-training).

Each setting is a small TOML file. The built-ins are files inside the package,
``kdbench/settings/<dataset>/<pair>.toml``, named by their path (``cifar100/wrn_40_2-wrn_16_2``);
a user's file or directory of files works the same (``--setting path/to/mine.toml``,
``--setting my_settings/``), named by its ``name`` field, else by its path (the file's stem,
or its path under the directory). The fields::

    description = "CIFAR-100, common recipe"      # shown by `kdbench list` and in captions
    dataset = "cifar100"                          # a kdbench.datasets plugin (kdbench/data.py)
    teacher = "wrn_40_2"                          # kdbench.models architectures
    student = "wrn_16_2"
    train_subset = 10000                          # optional: a fixed class-balanced subset
    pretrain_scale = 1.0                          # optional: scales pre-training stages' epochs
    recipe_source = "common recipe (RepDistiller)"  # optional: the recipe's source, for captions
    [dataset_options]                             # optional: the dataset plugin's options
    root = "my_images"                            #   (a relative root is the file's directory's)
    [recipe]                                      # Recipe's fields: epochs, batch_size, lr, ...
    epochs = 240
    [recipe.augmentation]                         # Augmentation's fields
    [teacher_recipe]                              # optional: else the teacher trains on recipe
    [published]                                   # optional: published numbers, in
    source = "mypaper"                            #   published.json's entry format, plus the
    citation = "..."                              #   source's citation and epoch ("last"/"best")
    [published.top1]
    kd = 74.9

A setting's content is part of every run id (``Setting.sha256``: a hash of the canonical
parsed content of the fields that change what a run computes: dataset, its options but
``root``, architectures, recipes, train_subset, pretrain_scale; not the description, the
recipe's source, the published numbers, nor where the files are), so editing a file never
mixes results. The runs of a built-in whose content is what it was when settings became files
keep the ids they had before (``LEGACY_SHA256``, kdbench/settings/legacy-sha256.json): their
specs leave the hash out. A setting read from a user's file travels with its runs
(``RunSpec.setting_content``), so a SLURM node or a spawned worker runs it without the file.

Bad files are one line naming the file and the field (a UserError: exit 2).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is the same parser (a dependency there)
    import tomli as tomllib  # type: ignore[no-redef]

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
BUILTIN = "built in"
# Dataset options that say where the files are, not what they are: no part of a run's identity.
LOCATION_OPTIONS = ("root",)


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
    dataset_options: dict[str, Any] = field(default_factory=dict)  # the dataset plugin's
    published: dict[str, Any] | None = None  # published.json's entry format, plus its source's
    origin: str = BUILTIN  # "built in", or the file it was read from

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        del data["origin"]  # where it was read, not what it is
        return data

    def content(self) -> dict[str, Any]:
        """The file's content as parsed, every default filled in (what a run carries)."""
        data = self.to_json()
        del data["name"]
        return json.loads(json.dumps(data))  # tuples as lists: as JSON (a spec) holds it

    def identity(self) -> dict[str, Any]:
        """The part of the content that changes what a run computes."""
        content = self.content()
        return {
            "dataset": content["dataset"],
            "dataset_options": {key: value for key, value in content["dataset_options"].items()
                                if key not in LOCATION_OPTIONS},
            "teacher": content["teacher"], "student": content["student"],
            "recipe": content["recipe"], "teacher_recipe": content["teacher_recipe"],
            "train_subset": content["train_subset"], "pretrain_scale": content["pretrain_scale"],
        }

    @property
    def sha256(self) -> str:
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def is_builtin(self) -> bool:
        return self.origin == BUILTIN

    def spec_fields(self) -> dict[str, Any]:
        """What a RunSpec of this setting holds besides its name (kdbench.spec): the content's
        hash, except for a built-in unchanged since settings became files (its runs keep their
        ids), and the content itself for a setting from a user's file."""
        sha = self.sha256
        if self.is_builtin:
            return {} if LEGACY_SHA256.get(self.name) == sha else {"setting_sha256": sha}
        return {"setting_sha256": sha, "setting_content": self.content()}


# --- the reference recipes the built-in files spell out ---------------------------------------
# (tests/test_settings.py checks each file against them; benchmarks and tests use them by name)

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

# The ImageNet recipe of the KD papers' ImageNet tables (CRD, ReviewKD, DKD), as issue 18
# states it: SGD momentum 0.9, lr 0.1, batch 256, weight decay 1e-4, 100 epochs, ×0.1 at
# 30/60/90; RandomResizedCrop 224 + flip (kdbench/imagefolder.py). mdistiller's
# configs/imagenet/{r34_r18,r50_mv1}/*.yaml (checked) have the same epochs, decay points, decay,
# momentum and weight decay at batch 512 and lr 0.2, the same lr per image: that is
# ``--batch-size 512 --lr 0.2``. The papers' text was not at hand to check the batch of 256.
IMAGENET = Recipe(epochs=100, batch_size=256, lr=0.1, weight_decay=1e-4,
                  lr_decay_at=(0.3, 0.6, 0.9),
                  augmentation=Augmentation(crop_padding=0, flip=True))


# --- reading TOML -----------------------------------------------------------------------------

SETTING_FIELDS = ("name", "description", "dataset", "dataset_options", "teacher", "student",
                  "train_subset", "pretrain_scale", "recipe_source", "recipe", "teacher_recipe",
                  "published")
PAD_MODES = ("constant", "reflect", "replicate", "circular")  # torch.nn.functional.pad's
NAME = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")
PUBLISHED_EPOCHS = ("last", "best")


class SettingError(UserError):
    pass


class _Fields:
    """Typed reads of one TOML table, each failure one line naming the file and the field."""

    def __init__(self, where: str, table: Mapping[str, Any], prefix: str = "") -> None:
        self.where, self.table, self.prefix = where, table, prefix

    def fail(self, key: str, problem: str) -> SettingError:
        return SettingError(f"{self.where}: {self.prefix}{key}: {problem}")

    def known(self, keys) -> None:
        for key in self.table:
            if key not in keys:
                raise self.fail(key, f"not a setting field (fields: {', '.join(keys)})")

    def has(self, key: str) -> bool:
        return key in self.table

    def text(self, key: str, default: str | None = None) -> str:
        if key not in self.table:
            if default is None:
                raise self.fail(key, "missing")
            return default
        value = self.table[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        return value

    def whole(self, key: str, default: int | None = None, minimum: int = 1, required: bool = False) -> int | None:
        if key not in self.table:
            if required:
                raise self.fail(key, "missing")
            return default
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected a whole number, got {value!r}")
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: float | None = None, positive: bool = False,
               non_negative: bool = False, below_one: bool = False, required: bool = False) -> float | None:
        if key not in self.table:
            if required:
                raise self.fail(key, "missing")
            return default
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, f"expected a finite number, got {value!r}")
        value = float(value)
        if positive and not value > 0:
            raise self.fail(key, f"must be positive, got {value:g}")
        if non_negative and value < 0:
            raise self.fail(key, f"must not be negative, got {value:g}")
        if below_one and not value < 1:
            raise self.fail(key, f"must be below 1, got {value:g}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def subtable(self, key: str, required: bool = False) -> "_Fields | None":
        if key not in self.table:
            if required:
                raise self.fail(key, "missing (a table: [" + self.prefix + key + "])")
            return None
        value = self.table[key]
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a table ([{self.prefix}{key}]), got {value!r}")
        return _Fields(self.where, value, f"{self.prefix}{key}.")


def _augmentation(fields: _Fields | None) -> Augmentation:
    if fields is None:
        return Augmentation()
    fields.known([f.name for f in dataclasses.fields(Augmentation)])
    pad_mode = fields.text("pad_mode", Augmentation.pad_mode)
    if pad_mode not in PAD_MODES:
        raise fields.fail("pad_mode", f"must be one of {', '.join(PAD_MODES)}, got {pad_mode!r}")
    return Augmentation(crop_padding=fields.whole("crop_padding", Augmentation.crop_padding, minimum=0),
                        pad_mode=pad_mode, flip=fields.flag("flip", Augmentation.flip))


def _recipe(fields: _Fields) -> Recipe:
    fields.known([f.name for f in dataclasses.fields(Recipe)])
    decay_at = fields.table.get("lr_decay_at", list(Recipe.__dataclass_fields__["lr_decay_at"].default))
    if (not isinstance(decay_at, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in decay_at)):
        raise fields.fail("lr_decay_at", f"expected a list of fractions of the epochs in (0, 1], got {decay_at!r}")
    return Recipe(
        epochs=fields.whole("epochs", required=True),
        batch_size=fields.whole("batch_size", required=True),
        lr=fields.number("lr", required=True, positive=True),
        momentum=fields.number("momentum", Recipe.momentum, non_negative=True, below_one=True),
        nesterov=fields.flag("nesterov", Recipe.nesterov),
        weight_decay=fields.number("weight_decay", Recipe.weight_decay, non_negative=True),
        lr_decay_at=tuple(float(v) for v in decay_at),
        lr_decay=fields.number("lr_decay", Recipe.lr_decay, positive=True),
        augmentation=_augmentation(fields.subtable("augmentation")),
        eval_every=fields.whole("eval_every", Recipe.eval_every),
    )


def _published(fields: _Fields | None) -> dict[str, Any] | None:
    if fields is None:
        return None
    fields.known(["source", "citation", "epoch", "top1", "also"])
    entry: dict[str, Any] = {"source": fields.text("source")}
    if fields.has("citation"):
        entry["citation"] = fields.text("citation")
    epoch = fields.text("epoch", "last")
    if epoch not in PUBLISHED_EPOCHS:
        raise fields.fail("epoch", f"must be one of {', '.join(PUBLISHED_EPOCHS)}, got {epoch!r}")
    entry["epoch"] = epoch
    top1 = fields.subtable("top1", required=True)
    for row in top1.table:
        top1.number(row, required=True)
    entry["top1"] = {row: float(value) for row, value in top1.table.items()}
    return entry


def _dataset_options(fields: _Fields | None, base: Path | None) -> dict[str, Any]:
    if fields is None:
        return {}
    options = dict(fields.table)
    root = options.get("root")
    if root is not None:
        if not isinstance(root, str) or not root:
            raise fields.fail("root", f"expected a path, got {root!r}")
        if base is not None and not Path(root).is_absolute():
            # Relative to the file, and carried resolved: the run may happen elsewhere.
            options["root"] = str((base / root).resolve())
    return options


def parse_setting(data: Mapping[str, Any], name: str, where: str, origin: str = BUILTIN,
                  base: Path | None = None, check_plugins: bool = True) -> Setting:
    """A Setting from a TOML file's parsed content. ``where`` names the file in errors;
    ``base`` resolves a relative dataset root; ``check_plugins`` asks the dataset and model
    plugins whether they know the names (user files; the built-ins' are tested)."""
    fields = _Fields(where, data)
    fields.known(SETTING_FIELDS)
    recipe = _recipe(fields.subtable("recipe", required=True))
    teacher_table = fields.subtable("teacher_recipe")
    setting = Setting(
        name=name,
        dataset=fields.text("dataset"),
        teacher=fields.text("teacher"),
        student=fields.text("student"),
        recipe=recipe,
        teacher_recipe=_recipe(teacher_table) if teacher_table is not None else recipe,
        description=fields.text("description", ""),
        train_subset=fields.whole("train_subset"),
        pretrain_scale=fields.number("pretrain_scale", 1.0, positive=True),
        recipe_source=fields.text("recipe_source", "the setting's own recipe (" + name + ")"),
        dataset_options=_dataset_options(fields.subtable("dataset_options"), base),
        published=_published(fields.subtable("published")),
        origin=origin,
    )
    if check_plugins:
        check_setting_plugins(setting, fields)
    return setting


def check_setting_plugins(setting: Setting, fields: _Fields | None = None) -> None:
    """The dataset plugin knows the dataset and takes its options; the architectures exist."""
    from kdbench.data import dataset_plugin
    from kdbench.models import resolve

    fields = fields or _Fields(setting.origin, {})
    try:
        dataset_plugin(setting.dataset).check_options(setting.dataset_options)
    except UserError as error:
        raise fields.fail("dataset", str(error)) from None
    for key in ("teacher", "student"):
        try:
            resolve(getattr(setting, key))
        except UserError as error:
            raise fields.fail(key, str(error)) from None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise SettingError(f"{path}: not valid TOML: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SettingError(f"{path}: cannot be read: {getattr(error, 'strerror', None) or error}") from None


def load_file(path: Path, default_name: str) -> Setting:
    """A user's setting file; its name is its ``name`` field, else ``default_name``."""
    data = read_toml(path)
    name = data.get("name", default_name)
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SettingError(f"{path}: name: {name!r} is not a setting name (letters, digits, "
                           "'_', '-', '.', parts joined by '/')")
    if name in SETTINGS:
        raise SettingError(f"{path}: name: {name!r} is a built-in setting's; give yours another "
                           "(a name field, or rename the file)")
    data = {key: value for key, value in data.items() if key != "name"}
    return parse_setting(data, name, str(path), origin=str(path), base=path.resolve().parent)


def load_path(path: Path) -> list[Setting]:
    """The settings of a TOML file, or of every ``*.toml`` under a directory (sorted; each
    named by its path under the directory unless it names itself)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.toml"))
        if not files:
            raise SettingError(f"--setting {path}: the directory holds no .toml files")
        found = [load_file(file, file.relative_to(path).with_suffix("").as_posix()) for file in files]
    elif path.is_file():
        found = [load_file(path, path.stem)]
    else:
        raise SettingError(f"--setting {path}: no such file or directory")
    seen: dict[str, str] = {}
    for setting in found:
        if setting.name in seen:
            raise SettingError(f"{setting.origin}: name: {setting.name!r} is also the name of "
                               f"{seen[setting.name]}")
        seen[setting.name] = setting.origin
    return found


def from_content(name: str, content: Mapping[str, Any], where: str) -> Setting:
    """The setting a run carries (``RunSpec.setting_content``, a ``Setting.content()``)."""
    data = {key: value for key, value in content.items() if value is not None}
    return parse_setting(data, name, where, origin=where, check_plugins=False)


# --- the built-ins ----------------------------------------------------------------------------

def _builtin_files() -> list[tuple[str, str]]:
    """(name, TOML text) of every built-in setting file, sorted by name."""
    root = resources.files("kdbench").joinpath("settings")
    found: list[tuple[str, str]] = []

    def walk(directory, prefix: str) -> None:
        for entry in directory.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".toml"):
                found.append((prefix + entry.name[:-len(".toml")], entry.read_text(encoding="utf-8")))

    walk(root, "")
    return sorted(found)


def _load_builtins() -> dict[str, Setting]:
    loaded = {}
    for name, text in _builtin_files():
        data = tomllib.loads(text)
        loaded[name] = parse_setting(data, name, f"kdbench/settings/{name}.toml", check_plugins=False)
    # The field's default first (DEFAULT_SETTING), then in name order.
    return dict(sorted(loaded.items(), key=lambda item: (item[0] != DEFAULT_SETTING, item[0])))


def _legacy_hashes() -> dict[str, str]:
    text = resources.files("kdbench").joinpath("settings", "legacy-sha256.json").read_text()
    return json.loads(text)["sha256"]


DEFAULT_SETTING = "cifar100/wrn_40_2-wrn_16_2"
QUICK_SETTING = "fashion_mnist/quick"
SETTINGS: dict[str, Setting] = _load_builtins()
# The content hash each built-in had when settings became files: a spec whose setting still
# hashes to it leaves the hash out, so runs made before keep their ids (kdbench.spec).
LEGACY_SHA256: dict[str, str] = _legacy_hashes()


def get(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise UserError(f"unknown setting {name!r}; {suggest(name, sorted(SETTINGS))}") from None


def is_path(pattern: str) -> bool:
    """Whether ``--setting`` names a file or directory rather than a built-in name or pattern."""
    return pattern.endswith(".toml") or (pattern not in SETTINGS and Path(pattern).exists()
                                         and not any(ch in pattern for ch in "*?["))


def expand(patterns: list[str]) -> list[Setting]:
    """Settings named by exact names, glob patterns (``cifar100/*``), TOML files or directories
    of them, in the order given."""
    chosen: dict[str, Setting] = {}
    for pattern in patterns:
        if is_path(pattern):
            for setting in load_path(Path(pattern)):
                if setting.name in chosen and chosen[setting.name] != setting:
                    raise SettingError(f"{setting.origin}: name: {setting.name!r} is given twice "
                                       "with different content")
                chosen.setdefault(setting.name, setting)
            continue
        matches = [name for name in SETTINGS if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            get(pattern)  # raises with the nearest names
        for name in matches:
            chosen.setdefault(name, SETTINGS[name])
    return list(chosen.values())


def for_spec(spec) -> Setting:
    """The setting a RunSpec was made for: the one it carries, else the built-in of its name,
    checked against the content hash its id was made with. UserError when that built-in has
    changed since (a job queued by another version): it would compute another experiment
    under the same id."""
    if spec.setting_content is not None:
        setting = from_content(spec.setting, spec.setting_content, f"the setting {spec.setting!r} of run {spec.id}")
    else:
        setting = get(spec.setting)
    expected = spec.setting_sha256 or LEGACY_SHA256.get(spec.setting)
    if expected is None:
        raise UserError(f"run {spec.id} names setting {spec.setting!r} without its content hash")
    if setting.sha256 != expected:
        raise UserError(f"setting {spec.setting!r} is not the one run {spec.id} was planned with "
                        f"(content sha256 {setting.sha256[:12]}, the run's {expected[:12]}): it "
                        "was edited since; plan the grid again")
    return setting
