"""A run across 2 processes on the project's local SLURM cluster: one job of 2 tasks, the
process group from submitit's TorchDistributedEnvironment, gloo on the CPU node.

Needs the test cluster (``bash slurm/start-cluster.sh``); run with
``python -m pytest -m slurm -k ddp``. Without it, it skips and says why."""

from __future__ import annotations

import shutil

import pytest

from kdbench import cli
from kdbench.launch import LocalExecutor
from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.train import TrainOptions
from test_slurm import SETTING, cluster, grid_args, settled, submissions


def comparable(record: dict) -> dict:
    """What must not depend on the launcher: metrics and history (minus timings, attempts)."""
    history = [{key: value for key, value in entry.items() if key not in ("seconds", "attempt")}
               for entry in record["history"]]
    return {"id": record["id"], "status": record["status"], "metrics": record["metrics"], "history": history}


@pytest.mark.slurm
@cluster
def test_ddp_run_is_one_job_of_two_tasks_with_the_local_launchers_numbers(
        trained_tiny_teacher, tmp_path, capsys):
    spec = RunSpec(SETTING, "vanilla", 0, processes=2)
    results = tmp_path / "slurm-results"
    shutil.copytree(trained_tiny_teacher, results)  # the teacher is stored: one job, the run's
    # Two torch processes in one job: more than the test preset's 1 GB.
    code = cli.main(["run", *grid_args(results, "--methods", "vanilla", "--seeds", "1"),
                     "--gpus-per-run", "2", "--executor", "slurm", "--slurm", "test",
                     "--slurm-set", "mem_gb=3", "--no-table"])
    out = capsys.readouterr().out
    assert code == 0, out

    [job] = [job for job in submissions(results).values() if job["run_id"] == spec.id]
    script = (results / "slurm" / "logs" / f"{job['job_id']}_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --nodes=1" in script, script
    [row] = settled(job["job_id"])
    assert row["State"] == "COMPLETED", row
    # One task per rank, each with its own log (submitit's <job>_<task>_log.out).
    for rank in range(2):
        log = (results / "slurm" / "logs" / f"{job['job_id']}_{rank}_log.out").read_text()
        assert f"rank {rank} of 2" in log, log

    store = Store(results)
    record = store.read(spec.id)
    assert record["status"] == "done"
    assert record["provenance"]["distributed"] == {"world_size": 2, "backend": "gloo",
                                                   "sync_bn": False, "attempt": 1}
    assert record["provenance"]["slurm_job_id"] == job["job_id"]
    assert not store.checkpoint_path(spec.id).exists()

    # The same run from the local launcher: one thread per rank in both (the test preset's
    # cpus_per_task = 1; 2 threads for the run here, split between its 2 ranks).
    local = tmp_path / "local"
    shutil.copytree(trained_tiny_teacher, local)
    [result] = LocalExecutor().run([], [spec], local, TrainOptions(device="cpu", threads=2))
    assert result.status == "done", result.error
    assert comparable(record) == comparable(Store(local).read(spec.id))
