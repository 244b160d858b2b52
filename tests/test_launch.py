"""Local runs need no submitit: only ``--executor slurm`` imports it (kdbench/slurm.py)."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GRID = ["--setting", "synthetic/tiny", "--methods", "kd", "--seeds", "1", "--no-table"]


def without_submitit(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import submitit` fails as if it were not installed: a module of
    that name first on PYTHONPATH that raises, in this process's children and theirs (the local
    executor's spawned workers) alike."""
    shadow = tmp_path / "no-submitit"
    shadow.mkdir()
    (shadow / "submitit.py").write_text(
        'raise ModuleNotFoundError("No module named \'submitit\'", name="submitit")\n')
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(shadow) + (os.pathsep + path if path else ""),
            "OMP_NUM_THREADS": "1"}


def kdbench(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdbench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_local_runs_need_no_submitit(tmp_path):
    env = without_submitit(tmp_path)
    shadowed = subprocess.run([sys.executable, "-c", "import submitit"], env=env, capture_output=True,
                              text=True)
    assert shadowed.returncode != 0 and "No module named 'submitit'" in shadowed.stderr

    results = tmp_path / "results"
    local = kdbench(["run", *GRID, "--executor", "local", "--jobs", "1", "--results", str(results)], env)
    assert local.returncode == 0, local.stdout + local.stderr
    assert len(list((results / "runs").glob("*.json"))) == 3  # teacher, vanilla and kd students

    slurm = kdbench(["run", *GRID, "--executor", "slurm", "--results", str(tmp_path / "slurm")], env)
    assert slurm.returncode == 2, slurm.stdout + slurm.stderr
    error = slurm.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("kdbench: error:"), error
    assert "--executor slurm needs submitit" in error[0] and "pip install submitit" in error[0], error


def test_importing_launch_leaves_slurm_alone():
    code = "import sys, kdbench.launch; print('kdbench.slurm' in sys.modules, 'submitit' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              check=True)
    assert imported.stdout.split() == ["False", "False"]


def test_slurm_names_still_found_in_launch():
    """Jobs queued before kdbench.slurm existed name kdbench.launch.SlurmTask in their pickled
    call; they, and old imports, still find it (imported on first use)."""
    pytest.importorskip("submitit")
    from kdbench import launch, slurm

    assert launch.SlurmTask is slurm.SlurmTask and launch.read_submissions is slurm.read_submissions
    old_call = b"ckdbench.launch\nSlurmTask\n)\x81."  # protocol 0: an instance of the old path
    assert type(pickle.loads(old_call)) is slurm.SlurmTask
    with pytest.raises(AttributeError):
        launch.no_such_name  # noqa: B018
