"""Third-party methods through the entry-point group, exactly as a user installs them.

A throw-away directory on PYTHONPATH holds three "installed" distributions — a module next to a
``*.dist-info`` directory with ``METADATA`` and ``entry_points.txt`` is all importlib.metadata
needs, no pip:

- ``throwaway-kd``: a working method, ``throwaway``;
- ``broken-kd``: a method whose module raises on import, ``broken``;
- ``mykd``: the README's "add a method" example (examples/add_a_method), its entry point read
  from the example's own pyproject.toml.

Each CLI command runs once, in a subprocess (entry points are read per process), and the tests
check its output. The runs use a random-initialised teacher checkpoint and one epoch, so the
whole file takes well under half a minute on two cores.
"""

from __future__ import annotations

import os
import shutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdbench.models import build_model
from kdbench.settings import get as get_setting

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (reading the example's pyproject)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "add_a_method"
SETTING = "synthetic/tiny"

THROWAWAY = '''
from dataclasses import dataclass

import torch.nn.functional as F

from kdbench.method import FIDELITY_READING, Method, MethodConfig


@dataclass(frozen=True)
class ThrowawayConfig(MethodConfig):
    weight: float = 0.5


class Throwaway(Method):
    """Logit matching with squared error, the smallest possible method."""

    name = "throwaway"
    paper = "Throwaway et al. A plugin made by the test suite. 2024"
    display_name = "Throwaway"
    fidelity = FIDELITY_READING
    fidelity_note = "a plugin the test suite writes"
    Config = ThrowawayConfig

    def loss(self, s, t, batch, progress):
        return {"logit_mse": self.config.weight * F.mse_loss(s.logits.float(), t.logits.float())}
'''

BROKEN = '''
raise ImportError("this plugin is deliberately broken")
'''


def install(site: Path, distribution: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
    """Write ``modules`` (name → source) and a dist-info registering ``entry_points``."""
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    info = site / f"{distribution.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[kdbench.methods]\n{lines}")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    install(site, "throwaway-kd", {"throwaway_kd": THROWAWAY}, {"throwaway": "throwaway_kd:Throwaway"})
    install(site, "broken-kd", {"broken_kd": BROKEN}, {"broken": "broken_kd:Broken"})
    # The example, installed from its own files: its module and the entry point its pyproject
    # declares (what `pip install examples/add_a_method` would register).
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    shutil.copy(EXAMPLE / "mykd.py", site / "mykd.py")
    install(site, project["name"], {}, project["entry-points"]["kdbench.methods"])
    return site


def kdbench(site: Path, cwd: Path, *args: str, module: str = "kdbench") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # tiny networks on a shared 2-core machine
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def listing(site: Path, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    return kdbench(site, tmp_path_factory.mktemp("list"), "list")


@pytest.fixture(scope="module")
def contract(site: Path, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    # The one command README tells plugin authors to run, on the two good plugins and the broken one.
    return kdbench(site, tmp_path_factory.mktemp("contract"), "throwaway", "mykd", "broken",
                   module="kdbench.testing")


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained teacher: the runs below test plumbing, not accuracy, and skip its training."""
    setting = get_setting(SETTING)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    torch.save(build_model(setting.teacher, 10, 3).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def run(site: Path, teacher_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("run")
    result = kdbench(site, work, "run", "--methods", "throwaway,mykd", "--setting", SETTING, "--seeds", "1",
                     "--epochs", "1", "--executor", "inprocess", "--teacher-checkpoint",
                     str(teacher_checkpoint), "--results", str(work / "results"))
    return result, work / "results"


def test_list_shows_plugins_and_the_broken_one_with_its_error(listing: subprocess.CompletedProcess) -> None:
    assert listing.returncode == 0, listing.stderr
    out = listing.stdout
    assert "throwaway" in out and "Throwaway et al. A plugin made by the test suite. 2024" in out
    assert "[throwaway-kd: throwaway_kd:Throwaway]" in out
    assert 'row "Throwaway" · fidelity: reading of the paper · a plugin the test suite writes' in out
    assert "mykd" in out and "Ba & Caruana. Do Deep Nets Really Need to be Deep? NeurIPS 2014" in out
    assert 'row "Logit regression" · fidelity: paper' in out
    broken = next(line for line in out.splitlines() if line.strip().startswith("broken "))
    assert "BROKEN:" in broken and "this plugin is deliberately broken" in broken
    assert "kd " in out and "vanilla" in out  # the built-ins are still there


def test_contract_command_passes_for_the_plugins(contract: subprocess.CompletedProcess) -> None:
    assert "ok   throwaway" in contract.stdout, contract.stdout + contract.stderr
    assert "ok   mykd" in contract.stdout, contract.stdout + contract.stderr


def test_contract_command_fails_for_the_broken_plugin(contract: subprocess.CompletedProcess) -> None:
    assert contract.returncode == 1  # one method failed
    assert "FAIL broken" in contract.stdout and "this plugin is deliberately broken" in contract.stdout


def test_run_trains_plugins_while_a_broken_plugin_is_installed(run) -> None:
    result, results = run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for method in ("throwaway", "mykd", "vanilla"):
        # The label names the recipe override a run was made with ("[epochs=1]").
        assert re.search(rf"{SETTING} {method} seed 0( \[[^]]*\])?: done", result.stdout + result.stderr)
    from kdbench.store import load_records

    done = {record["spec"]["method"] for record in load_records(results) if record["status"] == "done"}
    assert {"throwaway", "mykd", "vanilla"} <= done


def test_run_prints_the_table_with_the_plugin_rows(run) -> None:
    result, _ = run
    table = result.stdout[result.stdout.index("| Method"):]
    # Rows are titled by the methods' display names (the example's is "Logit regression").
    for row in ("| Teacher", "| Student", "| Throwaway", "| Logit regression"):
        assert row in table


def test_running_the_broken_plugin_is_one_clear_line(site: Path, tmp_path: Path) -> None:
    result = kdbench(site, tmp_path, "run", "--methods", "broken", "--setting", SETTING, "--seeds", "1",
                     "--executor", "inprocess", "--results", str(tmp_path / "results"), "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "broken" in result.stderr and "this plugin is deliberately broken" in result.stderr
