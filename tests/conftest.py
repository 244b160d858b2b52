import os

import pytest
import torch

# Two cores, shared: one thread per test process keeps timings stable and runs deterministic.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def trained_tiny_teacher(tmp_path_factory):
    """A results directory holding the synthetic/tiny teacher (trained once per session)."""
    from kdbench.spec import RunSpec
    from kdbench.worker import run_job

    root = tmp_path_factory.mktemp("teacher-results")
    outcome = run_job(RunSpec("synthetic/tiny", "vanilla", 0, "teacher").to_json(), str(root))
    assert outcome["status"] == "done", outcome
    return root


@pytest.fixture
def results_with_teacher(trained_tiny_teacher, tmp_path):
    """A fresh results directory that already has the synthetic/tiny teacher."""
    import shutil

    target = tmp_path / "results"
    shutil.copytree(trained_tiny_teacher, target)
    return target
