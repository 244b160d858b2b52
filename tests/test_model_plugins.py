"""Third-party model and dataset plugins through the ``kdbench.models`` and ``kdbench.datasets``
entry-point groups, with a user's TOML setting over them (issue 18's "done when": `python -m
kdbench run --methods kd --setting my.toml --seeds 1`).

As in tests/test_plugins.py, a throw-away directory on PYTHONPATH holds "installed"
distributions (a module beside a ``*.dist-info`` with ``METADATA`` and ``entry_points.txt``):

- ``tinynets``: a factory ``tinynet`` and a family ``tinyfam_<width>`` (kdbench.models), and a
  dataset ``blobs`` of coloured squares (kdbench.datasets);
- ``badnets``: ``inplace_net``, whose forward changes a tapped tensor in place, and
  ``norolenet``, which maps no embedding: the model contract names what each breaks;
- ``brokennets``: a model whose module raises on import.

Commands run in subprocesses (entry points are read per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdbench import settings

TINYNETS = '''
import torch
from torch import nn

from kdbench.data import DataShape, Dataset
from kdbench.errors import UserError
from kdbench.method import EMBEDDING, STAGES
from kdbench.models import ModelFamily, Parsed
from kdbench.roles import TapPoint


def block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyNet(nn.Module):
    def __init__(self, num_classes, in_channels, width=8):
        super().__init__()
        self.stem = block(in_channels, width, 1)
        self.stage1 = block(width, width, 1)
        self.stage2 = block(width, 2 * width, 2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def feature_points(self):
        return {STAGES: (TapPoint("stage1"), TapPoint("stage2")), EMBEDDING: (TapPoint("head", "input"),)}

    def forward(self, x):
        return self.head(self.pool(self.stage2(self.stage1(self.stem(x)))))


def tinynet(num_classes, in_channels):
    return TinyNet(num_classes, in_channels)


def _parse(name):
    width = name[len("tinyfam_"):]
    if not width.isdigit() or int(width) < 1:
        return "a tinyfam name is tinyfam_<width>"
    return Parsed("tinyfam", lambda classes, channels: TinyNet(classes, channels, int(width)))


TINYFAM = ModelFamily("tinyfam_<width>", _parse)


class Blobs:
    """Coloured squares on noise, one colour per class: 3 classes, 12 px, 2 channels."""

    def check_options(self, options):
        if set(options) - {"count"}:
            raise UserError(f"blobs takes only 'count', got {sorted(options)}")

    def shape(self, options, data_dir):
        return DataShape(in_channels=2, num_classes=3, image_size=12, num_train=options.get("count", 96))

    def require(self, options, data_dir):
        pass

    def open(self, name, options, data_dir, train_subset):
        generator = torch.Generator().manual_seed(0)

        def split(count):
            labels = torch.arange(count) % 3
            images = torch.randint(0, 60, (count, 2, 12, 12), generator=generator)
            images[:, :, 3:9, 3:9] += (60 * (labels + 1)).view(-1, 1, 1, 1)
            return images.to(torch.uint8), labels

        train, test = split(options.get("count", 96)), split(30)
        return Dataset(name, train[0], train[1], test[0], test[1], 3,
                       normalisation=((0.3, 0.3), (0.25, 0.25)))


BLOBS = Blobs()
'''

BADNETS = '''
from torch import nn

from kdbench.method import EMBEDDING, STAGES
from kdbench.roles import TapPoint


class InPlace(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.stage1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.head = nn.Linear(4, num_classes)

    def feature_points(self):
        return {STAGES: (TapPoint("stage1"),), EMBEDDING: (TapPoint("head", "input"),)}

    def forward(self, x):
        x = self.stage1(x)
        x.relu_()  # changes the tapped stage output after its hook saw it
        return self.head(x.mean((2, 3)))


class NoRoles(InPlace):
    def feature_points(self):
        return {STAGES: (TapPoint("stage1"),)}

    def forward(self, x):
        return self.head(self.stage1(x).relu().mean((2, 3)))


def inplace_net(num_classes, in_channels):
    return InPlace(num_classes, in_channels)


def norolenet(num_classes, in_channels):
    return NoRoles(num_classes, in_channels)
'''

MY_SETTING = """\
description = "blobs, plugin networks"
dataset = "blobs"
teacher = "tinyfam_12"
student = "tinynet"

[recipe]
epochs = 1
batch_size = 32
lr = 0.05

[recipe.augmentation]
crop_padding = 1

[teacher_recipe]
epochs = 2
batch_size = 32
lr = 0.05
"""


def install(site: Path, distribution: str, modules: dict[str, str], groups: dict[str, dict[str, str]]) -> None:
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    info = site / f"{distribution}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in entries.items())
        for group, entries in groups.items()))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    install(site, "tinynets", {"tinynets": TINYNETS}, {
        "kdbench.models": {"tinynet": "tinynets:tinynet", "tinyfam_": "tinynets:TINYFAM"},
        "kdbench.datasets": {"blobs": "tinynets:BLOBS"}})
    install(site, "badnets", {"badnets": BADNETS}, {
        "kdbench.models": {"inplace_net": "badnets:inplace_net", "norolenet": "badnets:norolenet"}})
    install(site, "brokennets", {"brokennets": "raise ImportError('deliberately broken')\n"},
            {"kdbench.models": {"brokennet": "brokennets:net"}})
    return site


def kdbench(site: Path, cwd: Path, *args: str, module: str = "kdbench") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # the literal command: a subprocess that spawns a worker per run (3)
def test_a_users_setting_over_plugin_models_and_data_trains(site: Path, tmp_path: Path) -> None:
    """The default (local) executor: each run happens in a spawned worker, which gets the
    setting from its spec, not from my.toml."""
    (tmp_path / "my.toml").write_text(MY_SETTING)
    result = kdbench(site, tmp_path, "run", "--methods", "kd", "--setting", "my.toml", "--seeds", "1",
                     "--results", "results")
    assert result.returncode == 0, result.stderr
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "runs").glob("*.json"))]
    roles = sorted((r["spec"]["role"], r["spec"]["method"]) for r in records)
    assert roles == [("student", "kd"), ("student", "vanilla"), ("teacher", "vanilla")]
    for record in records:
        assert record["status"] == "done", record.get("error")
        assert record["spec"]["setting"] == "my"
        assert record["setting"]["in_channels"] == 2 and record["setting"]["num_classes"] == 3
        # The run carried its setting: what the record says it trained is the file's content.
        assert record["spec"]["setting_content"]["teacher"] == "tinyfam_12"
    teacher = next(r for r in records if r["spec"]["role"] == "teacher")
    assert [e["epoch"] for e in teacher["history"]] == [1, 2]  # its own recipe: 2 epochs
    # The student distilled from that teacher: its spec's teacher is the stored one.
    from kdbench.spec import RunSpec

    kd = next(r for r in records if r["spec"]["method"] == "kd")
    assert RunSpec.from_json(kd["spec"]).teacher_spec().id == teacher["id"]
    assert (tmp_path / "results" / "teachers" / f"{teacher['id']}.pt").is_file()


def test_the_model_contract_checks_a_plugins_map(site: Path, tmp_path: Path) -> None:
    good = kdbench(site, tmp_path, "--model", "tinynet", "--model", "tinyfam_4", module="kdbench.testing")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = kdbench(site, tmp_path, "--model", "inplace_net", "--model", "norolenet", "--model", "brokennet",
                  "--model", "tinyfam_x", module="kdbench.testing")
    assert bad.returncode != 0
    lines = {line.split(":")[0]: line for line in bad.stdout.splitlines() if line.startswith("FAIL")}
    assert "stages[0] (output of 'stage1') (train mode) was changed in place" in lines["FAIL inplace_net"]
    assert "maps no embedding" in lines["FAIL norolenet"]
    assert "failed to import: ImportError: deliberately broken" in lines["FAIL brokennet"]
    assert "brokennets" in lines["FAIL brokennet"]  # the distribution, named
    assert "a tinyfam name is tinyfam_<width>" in lines["FAIL tinyfam_x"]


def test_a_setting_over_a_broken_model_plugin_is_one_line(site: Path, tmp_path: Path) -> None:
    (tmp_path / "my.toml").write_text(MY_SETTING.replace('"tinynet"', '"brokennet"'))
    result = kdbench(site, tmp_path, "run", "--methods", "kd", "--setting", "my.toml", "--dry-run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("kdbench: error: my.toml: student: model 'brokennet'")
    assert "deliberately broken" in lines[0]
    # A setting that does not use it runs its plan: one plugin's failure is its own.
    (tmp_path / "ok.toml").write_text(MY_SETTING)
    assert kdbench(site, tmp_path, "run", "--methods", "kd", "--setting", "ok.toml", "--dry-run").returncode == 0


def test_builtin_architectures_and_datasets_come_through_the_groups() -> None:
    from importlib.metadata import entry_points

    from kdbench.data import DATASET_PLUGINS
    from kdbench.models import MODELS, resolve

    models = {entry.name: entry.value for entry in entry_points(group="kdbench.models")}
    assert models["wrn"] == "kdbench.models.cifar_families:WRN"
    assert resolve("wrn_40_2").entry == "wrn" and resolve("resnet8x4").entry == "resnet"
    assert resolve("resnet50").entry == "resnet50"  # an exact name before the resnet family
    assert resolve("torchvision.resnet18").entry == "torchvision"
    for setting in settings.SETTINGS.values():
        assert setting.dataset in DATASET_PLUGINS
        resolve(setting.teacher), resolve(setting.student)
    assert set(MODELS.names()) >= {"wrn", "resnet", "vgg", "mobilenet_v1", "torchvision", "timm"}
