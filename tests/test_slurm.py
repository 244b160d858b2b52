"""The SLURM executor: presets (anywhere), and grids on a real SLURM cluster (marked ``slurm``).

The cluster tests need the single-node test cluster (``bash slurm/start-cluster.sh``; .ci/run
starts it) and are skipped, with the reason, when no SLURM controller answers. They run the
``test`` preset (partition debug, no GPU, 1 CPU, 1 GB) on the seconds-sized synthetic/tiny
setting; most reuse the session's trained teacher so that only the runs under test queue.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kdbench import cli, slurm_presets
from kdbench.claims import held_elsewhere
from kdbench.errors import UserError
from kdbench.slurm_presets import SlurmPreset, load_preset, resolve_preset
from kdbench.store import Store

pytestmark = pytest.mark.skipif(slurm_presets.tomllib is None,
                                reason="SLURM presets need Python >= 3.11 (tomllib) or tomli")

REPO = Path(__file__).resolve().parent.parent
SETTING = "synthetic/tiny"


# --- presets: no cluster needed ---------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bundled_presets_parse():
    default = load_preset("default")
    assert default.gpus_per_task == 1 and default.time_min * 60 > default.signal_delay_s
    # A preset that leaves a field out gets default.toml's value (as slurm/README.md says).
    assert replace(default, source="") == SlurmPreset(source="")
    test = load_preset("test")
    assert (test.partition, test.gpus_per_task, test.cpus_per_task, test.mem_gb) == ("debug", 0, 1, 1.0)
    assert test.array_parallelism >= 2


@pytest.mark.parametrize("text, problem", [
    ("partition = \n", "not valid TOML"),
    ("partitoin = 'gpu'\n", "unknown field partitoin"),
    ("cpus_per_task = '4'\n", "cpus_per_task must be a whole number"),
    ("gpus_per_task = true\n", "gpus_per_task must be a whole number"),
    ("mem_gb = -1\n", "mem_gb must be at least"),
    ("runs_per_task = 0\n", "runs_per_task must be at least 1"),
    ("runs_per_task = 1.5\n", "runs_per_task must be a whole number"),
    ("setup = ['module load cuda', 3]\n", "setup must be a list of strings"),
    ("[sbatch]\nmail = { a = 1 }\n", "sbatch.mail must be"),
    ("time_min = 1\nsignal_delay_s = 90\n", "signal_delay_s (90 s) must be shorter"),
])
def test_a_bad_preset_is_one_line_naming_the_file(tmp_path, text, problem):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(UserError) as error:
        resolve_preset(str(path))
    message = str(error.value)
    assert problem in message and str(path) in message and "\n" not in message


def test_overrides_are_typed_by_the_field():
    preset = resolve_preset("test", ["partition=gpu", "time_min=30", "mem_gb=2.5", "sbatch.mail-type=END",
                                     'setup=["module load cuda"]', "account=proj", "account=",
                                     "runs_per_task=3"])
    assert preset == SlurmPreset(**{**preset.__dict__, "partition": "gpu", "time_min": 30, "mem_gb": 2.5,
                                    "sbatch": {"mail-type": "END"}, "setup": ("module load cuda",),
                                    "account": None, "runs_per_task": 3})
    assert "3 runs per task" in preset.describe() and "1 run per task" in load_preset("test").describe()
    for bad, problem in [("time_min=soon", "time_min must be"), ("nodes=2", "unknown field 'nodes'"),
                         ("partition", "expected FIELD=VALUE")]:
        with pytest.raises(UserError, match=problem):
            resolve_preset("test", [bad])
    with pytest.raises(UserError, match="no preset of that name.*known: .*default"):
        resolve_preset("nosuchpreset")


def test_cli_exits_2_on_a_bad_preset_and_submits_nothing(tmp_path, capsys):
    bad = write(tmp_path / "bad.toml", "cpus_per_task = 'many'\n")
    results = tmp_path / "results"
    for preset_args, problem in [
            (["--slurm", str(bad)], f"{bad}: cpus_per_task must be"),
            (["--slurm", "test", "--slurm-set", "time_min=0"], "time_min must be at least"),
            (["--slurm", "test", "--slurm-set", "runs_per_task=0"], "runs_per_task must be at least 1, got 0"),
            # The test preset's tasks get no GPU: --runs-per-gpu is refused, naming the way out.
            (["--slurm", "test", "--runs-per-gpu", "2"], "gpus_per_task = 0; to share a CPU task, use "
                                                         "--slurm-set runs_per_task=2"),
            (["--slurm", "default", "--runs-per-gpu", "2", "--slurm-set", "runs_per_task=3"],
             "--runs-per-gpu and --slurm-set runs_per_task both set"),
            (["--slurm", "default", "--runs-per-gpu", "0"], "--runs-per-gpu: must be at least 1")]:
        code = cli.main(["run", "--setting", SETTING, "--methods", "kd", "--seeds", "1",
                         "--results", str(results), "--executor", "slurm", "--no-table", *preset_args])
        assert code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("kdbench: error:") and problem in error[0], error
    assert not (results / "slurm").exists()


def test_runs_per_gpu_sets_runs_per_task_of_a_gpu_preset():
    args = cli.build_parser().parse_args(["run", "--executor", "slurm", "--slurm", "default",
                                          "--runs-per-gpu", "3", "--slurm-set", "partition=gpu"])
    cli.check_runs_per_gpu(args)  # default.toml gives each task a GPU: accepted without one here
    preset = resolve_preset(args.slurm, cli.slurm_overrides(args))
    assert (preset.runs_per_task, preset.gpus_per_task, preset.partition) == (3, 1, "gpu")
    local = cli.build_parser().parse_args(["run", "--runs-per-gpu", "3", "--slurm-set", "runs_per_task=2"])
    assert cli.slurm_overrides(local) == ["runs_per_task=2"]  # not a SLURM run: left alone


def test_a_requeued_task_resubmits_its_whole_group():
    from kdbench.slurm import SlurmTask

    group = [{"seed": 0}, {"seed": 1}]
    options = {"threads": 2}
    task = SlurmTask()
    again = task.checkpoint(group, "/results", options)
    assert again.function is task and again.args == (group, "/results", options)


# --- the real cluster -----------------------------------------------------------------------

def why_no_cluster() -> str | None:
    """None when a SLURM controller answers here; else the reason the cluster tests skip."""
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return "no SLURM client tools (sinfo/scontrol): start the test cluster with `bash slurm/start-cluster.sh`"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"`scontrol ping` failed ({error}): start the test cluster with `bash slurm/start-cluster.sh`"
    if "UP" not in ping.stdout:
        said = (ping.stdout.strip() or ping.stderr.strip() or "no answer").splitlines()[0]
        return (f"no SLURM controller is UP (`scontrol ping`: {said}): "
                "start the test cluster with `bash slurm/start-cluster.sh`")
    return None


NO_CLUSTER = why_no_cluster()
cluster = pytest.mark.skipif(NO_CLUSTER is not None, reason=NO_CLUSTER or "")


def wait_for(condition, timeout: float, what: str, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def sacct(job_id: str, *fields: str, duplicates: bool = False) -> list[dict[str, str]]:
    answer = subprocess.run(["sacct", "-X", "--parsable2", "-o", ",".join(("JobID",) + fields), "-j", job_id]
                            + (["-D"] if duplicates else []), capture_output=True, text=True, check=True)
    names, *lines = answer.stdout.strip().splitlines()
    return [dict(zip(names.split("|"), line.split("|"))) for line in lines]


def settled(job_id: str, *fields: str, duplicates: bool = False) -> list[dict[str, str]]:
    """sacct's rows once no task of the job is running any more: a task's record is stored
    before its process exits, so the CLI can be back before SLURM marks the job COMPLETED."""
    def ended():
        rows = sacct(job_id, "State", *fields, duplicates=duplicates)
        return rows if rows and not {"RUNNING", "COMPLETING"} & {row["State"] for row in rows} else None
    return wait_for(ended, 30, f"SLURM job {job_id} to end")


def submissions(results: Path) -> dict[str, dict]:
    """run id -> what the executor kept of its SLURM job (<results>/slurm/jobs/)."""
    return {path.stem: json.loads(path.read_text()) for path in (results / "slurm" / "jobs").glob("*.json")}


def kdbench(*args: str, env: dict[str, str] | None = None, timeout: float = 200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdbench", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)


def grid_args(results: Path, *extra: str) -> list[str]:
    return ["--setting", SETTING, "--results", str(results), *extra]


def comparable(record: dict) -> dict:
    """What must not depend on where a run ran: metrics and history (minus timings)."""
    history = [{key: value for key, value in entry.items() if key != "seconds"} for entry in record["history"]]
    return {"id": record["id"], "status": record["status"], "metrics": record["metrics"], "history": history}


@pytest.fixture(scope="module")
def in_process_grid(trained_tiny_teacher, tmp_path_factory) -> Path:
    """The kd × 2 seeds grid run in this process: the numbers every executor must reproduce."""
    local = tmp_path_factory.mktemp("in-process") / "results"
    shutil.copytree(trained_tiny_teacher, local)
    assert cli.main(["run", *grid_args(local, "--methods", "kd", "--seeds", "2"),
                     "--executor", "inprocess", "--no-table"]) == 0
    return local


@pytest.mark.slurm
@cluster
@pytest.mark.parametrize("grouped", [False, True], ids=["no-group", "grouped"])
def test_grid_runs_as_teacher_job_then_one_dependent_array_with_the_local_numbers(
        tmp_path, in_process_grid, capsys, grouped):
    results = tmp_path / "slurm-results"
    code = cli.main(["run", *grid_args(results, "--methods", "kd", "--seeds", "2"),
                     "--executor", "slurm", "--slurm", "test", *([] if grouped else ["--no-group"])])
    out = capsys.readouterr().out
    assert code == 0, out

    # One teacher job, then one array of the 2 methods × 2 seeds that waited for it: a task per
    # run with --no-group; by default a task per seed, whose 2 runs train together.
    tasks_wanted = 2 if grouped else 4
    jobs = submissions(results)
    teacher = [job for job in jobs.values() if job["spec"]["role"] == "teacher"]
    students = [job for job in jobs.values() if job["spec"]["role"] == "student"]
    assert len(teacher) == 1 and "_" not in teacher[0]["job_id"] and len(students) == 4
    array = {job["job_id"].split("_")[0] for job in students}
    assert len(array) == 1
    [array_id] = array
    assert sorted({job["job_id"] for job in students}) == [f"{array_id}_{task}" for task in range(tasks_wanted)]
    if grouped:
        for task in {job["job_id"] for job in students}:
            assert sorted(job["spec"]["method"] for job in students if job["job_id"] == task) == ["kd", "vanilla"]
            assert len({job["spec"]["seed"] for job in students if job["job_id"] == task}) == 1
    assert {job["after"] for job in students} == {teacher[0]["job_id"]}
    script = (results / "slurm" / "logs" / f"{array_id}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{teacher[0]['job_id']}" in script
    assert f"#SBATCH --array=0-{tasks_wanted - 1}%" in script
    tasks = settled(array_id, "Start")
    [teacher_job] = settled(teacher[0]["job_id"], "End")
    assert sorted(task["JobID"] for task in tasks) == [f"{array_id}_{task}" for task in range(tasks_wanted)]
    assert {task["State"] for task in tasks} | {teacher_job["State"]} == {"COMPLETED"}
    assert all(task["Start"] >= teacher_job["End"] for task in tasks)  # afterok: only after it

    # All five records stored, identical to the same grid run in this process.
    local = in_process_grid
    on_slurm = {record["id"]: record for record in Store(results).records()}
    in_process = {record["id"]: record for record in Store(local).records()}
    assert len(on_slurm) == 5 and on_slurm.keys() == in_process.keys()
    for run_id, record in on_slurm.items():
        assert comparable(record) == comparable(in_process[run_id])
        assert record["provenance"]["slurm_job_id"] and record["provenance"]["threads"] == 1
        if record["spec"]["role"] == "student":
            group = record["provenance"]["group"]
            assert group["size"] == (2 if grouped else 1) and run_id in group["members"]
    capsys.readouterr()
    tables = []
    for directory in (results, local):
        assert cli.main(["table", "--results", str(directory)]) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1] and "| KD " in tables[0]


@pytest.mark.slurm
@cluster
def test_runs_per_task_trains_two_runs_in_one_task_with_the_local_numbers(
        results_with_teacher, in_process_grid, capsys):
    results = results_with_teacher  # the teacher is trained: no teacher job
    # Seed 0 of the in-process grid: the vanilla and kd runs, one task of 2 runs on 2 CPUs.
    # --no-group: the runs of one seed would otherwise train together in one process.
    code = cli.main(["run", *grid_args(results, "--methods", "kd", "--seed-list", "0"), "--executor", "slurm",
                     "--slurm", "test", "--slurm-set", "runs_per_task=2", "--slurm-set", "cpus_per_task=2",
                     "--no-group"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 runs in one task" in out and "2 runs per task" in out, out

    # 2 runs, 1 task: both runs were sent to the same job.
    jobs = submissions(results)
    assert sorted((job["spec"]["method"], job["spec"]["seed"]) for job in jobs.values()) == [
        ("kd", 0), ("vanilla", 0)]
    [job_id] = {job["job_id"] for job in jobs.values()}
    script = (results / "slurm" / "logs" / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --array" not in script and "#SBATCH --cpus-per-task=2" in script
    [task] = settled(job_id)
    assert (task["JobID"], task["State"]) == (job_id, "COMPLETED")

    # Each run in its own process, both at once, sharing the task's 2 CPUs: 1 thread each.
    log = (results / "slurm" / "logs" / f"{job_id}_0_log.out").read_text()
    processes = set(re.findall(r"^kdbench: .*: process (\d+)$", log, re.MULTILINE))
    assert len(processes) == 2 and str(os.getpid()) not in processes, log
    assert all(f"{SETTING} {method} seed 0: epoch 1/" in log for method in ("vanilla", "kd")), log

    # The same records and numbers as the same seed trained alone in this process.
    in_process = {record["id"]: record for record in Store(in_process_grid).records()}
    for run_id in jobs:
        record = Store(results).read(run_id)
        assert comparable(record) == comparable(in_process[run_id])
        provenance = record["provenance"]
        assert provenance["threads"] == 1 and provenance["slurm_job_id"] == job_id
        assert provenance["slurm_restart_count"] == 0


FLAKY_PLUGIN = '''\
"""A throw-away kdbench method for tests: plain CE, except that seed 1 raises while the file
named by $KDBENCH_TEST_FLAKY_FILE exists (the SLURM tasks inherit the environment)."""
import os
from pathlib import Path

import torch

from kdbench.method import Method


class Flaky(Method):
    name = "flaky"
    paper = "none: a test plugin"

    def build(self, student_shapes, teacher_shapes, num_train):
        # seed_everything(spec.seed) seeded torch's default generator with the run's seed.
        if torch.initial_seed() == 1 and Path(os.environ["KDBENCH_TEST_FLAKY_FILE"]).exists():
            raise RuntimeError("flaky fails seed 1 on purpose")
'''


@pytest.fixture
def flaky_plugin(tmp_path) -> dict[str, str]:
    """The plugin, registered like any third-party method (a dist-info on PYTHONPATH)."""
    root = tmp_path / "plugin"
    info = root / "kdbench_flaky-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdbench-flaky\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kdbench.methods]\nflaky = kdbench_flaky:Flaky\n")
    (root / "kdbench_flaky.py").write_text(FLAKY_PLUGIN)
    switch = tmp_path / "fail-seed-1"
    switch.touch()
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path, "KDBENCH_TEST_FLAKY_FILE": str(switch)}


@pytest.mark.slurm
@cluster
def test_a_raising_task_is_recorded_failed_and_a_rerun_retries_only_it(results_with_teacher, flaky_plugin):
    results = results_with_teacher
    args = ["run", *grid_args(results, "--methods", "flaky", "--seeds", "2", "--epochs", "1"),
            "--executor", "slurm", "--slurm", "test", "--no-table"]
    first = kdbench(*args, env=flaky_plugin)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "1 run failed" in first.stderr and "flaky fails seed 1 on purpose" in first.stderr

    store = Store(results)
    jobs = submissions(results)
    assert len(jobs) == 4 and len({job["job_id"].split("_")[0] for job in jobs.values()}) == 1
    states = {(job["spec"]["method"], job["spec"]["seed"]): store.read(run_id) for run_id, job in jobs.items()}
    assert {key for key, record in states.items() if record["status"] == "done"} == {
        ("vanilla", 0), ("vanilla", 1), ("flaky", 0)}
    # Each seed's runs trained together in one task: flaky seed 1 failed, vanilla seed 1 went on.
    task_of = {(job["spec"]["method"], job["spec"]["seed"]): job["job_id"] for job in jobs.values()}
    assert task_of["flaky", 1] == task_of["vanilla", 1] != task_of["flaky", 0] == task_of["vanilla", 0]
    assert states[("vanilla", 1)]["provenance"]["group"]["size"] == 2
    failed = states[("flaky", 1)]
    assert failed["status"] == "failed" and failed["error"]["type"] == "RuntimeError"
    assert "flaky fails seed 1 on purpose" in failed["error"]["message"]
    slurm = failed["error"]["slurm"]  # added from submitit's FailedJobError
    assert slurm["state"] == "FAILED" and Path(slurm["stderr"]).is_file()
    assert "flaky fails seed 1 on purpose" in slurm["submitit_error"]

    status = kdbench("status", *grid_args(results, "--methods", "flaky", "--seeds", "2", "--epochs", "1"),
                     env=flaky_plugin)
    assert status.returncode == 0, status.stderr
    assert "flaky fails seed 1 on purpose" in status.stdout and slurm["stderr"] in status.stdout

    # The re-run submits exactly the failed run, and it succeeds now.
    Path(flaky_plugin["KDBENCH_TEST_FLAKY_FILE"]).unlink()
    done_before = {run_id: store.record_path(run_id).stat().st_mtime_ns
                   for run_id, job in jobs.items() if states[(job["spec"]["method"], job["spec"]["seed"])]["status"] == "done"}
    second = kdbench(*args, env=flaky_plugin)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "3 already stored, 1 to train" in second.stdout
    rerun = submissions(results)
    changed = [run_id for run_id in jobs if rerun[run_id]["job_id"] != jobs[run_id]["job_id"]]
    assert [(rerun[run_id]["spec"]["method"], rerun[run_id]["spec"]["seed"]) for run_id in changed] == [("flaky", 1)]
    assert "_" not in rerun[changed[0]]["job_id"]  # one run: a single job, not an array
    assert store.read(changed[0])["status"] == "done"
    assert all(store.record_path(run_id).stat().st_mtime_ns == mtime for run_id, mtime in done_before.items())


@pytest.mark.slurm
@cluster
def test_a_run_that_raises_fails_alone_in_a_task_it_shares(results_with_teacher, flaky_plugin):
    results = results_with_teacher
    grid = grid_args(results, "--methods", "flaky", "--seeds", "2", "--epochs", "1")
    run = kdbench("run", *grid, "--executor", "slurm", "--slurm", "test", "--slurm-set", "runs_per_task=2",
                  "--no-table", "--no-group", env=flaky_plugin)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 run failed" in run.stderr and "flaky fails seed 1 on purpose" in run.stderr, run.stderr

    # flaky seeds 0 and 1 share a task; seed 1 raised, seed 0 trained on beside it and is done.
    store = Store(results)
    jobs = submissions(results)
    task_of = {(job["spec"]["method"], job["spec"]["seed"]): job["job_id"] for job in jobs.values()}
    assert len(jobs) == 4 and len(set(task_of.values())) == 2
    assert task_of["flaky", 0] == task_of["flaky", 1] != task_of["vanilla", 0] == task_of["vanilla", 1]
    records = {(job["spec"]["method"], job["spec"]["seed"]): store.read(run_id) for run_id, job in jobs.items()}
    assert {key for key, record in records.items() if record["status"] == "done"} == {
        ("vanilla", 0), ("vanilla", 1), ("flaky", 0)}
    failed = records["flaky", 1]
    assert failed["status"] == "failed" and failed["error"]["type"] == "RuntimeError"
    assert "flaky fails seed 1 on purpose" in failed["error"]["message"]
    slurm = failed["error"]["slurm"]  # the task's error, state and log, added by the follower
    assert slurm["job_id"] == task_of["flaky", 1] and slurm["state"] == "FAILED"
    assert "1 of the 2 runs of this task failed" in slurm["submitit_error"]
    assert "flaky seed 1" in slurm["submitit_error"] and "flaky seed 0" not in slurm["submitit_error"]
    assert records["flaky", 0].get("error") is None and records["flaky", 0]["metrics"]
    # SLURM marked the shared task FAILED (so the run's failure is visible there too).
    array_id = task_of["flaky", 0].split("_")[0]
    states = {task["JobID"]: task["State"] for task in settled(array_id)}
    assert states == {task_of["vanilla", 0]: "COMPLETED", task_of["flaky", 0]: "FAILED"}

    # status agrees, per run: the shared task's failure is seed 1's alone.
    status = kdbench("status", *grid, env=flaky_plugin)
    assert status.returncode == 0, status.stderr
    header, *rows = status.stdout.splitlines()
    flaky_row = next(row for row in rows if row.split()[1:2] == ["flaky"])
    counts = dict(zip(header.split()[2:], map(int, flaky_row.split()[2:])))
    assert (counts["done"], counts["failed"]) == (1, 1), status.stdout
    assert f"failed: {SETTING} flaky seed 1" in status.stdout and f"failed: {SETTING} flaky seed 0" not in status.stdout


@pytest.mark.slurm
@cluster
def test_a_preempted_task_is_requeued_and_resumes_from_its_checkpoint(results_with_teacher):
    results = results_with_teacher
    epochs = 5
    run = subprocess.Popen(
        [sys.executable, "-m", "kdbench", "run", *grid_args(results, "--methods", "vanilla", "--seeds", "2",
                                                             "--epochs", str(epochs)),
         "--executor", "slurm", "--slurm", "test", "--no-table"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        jobs = wait_for(lambda: len(submissions(results)) == 2 and submissions(results), 60, "the submission")
        run_id, job = next((run_id, job) for run_id, job in jobs.items() if job["spec"]["seed"] == 0)
        checkpoint = Store(results).checkpoint_path(run_id)
        wait_for(checkpoint.exists, 90, "the first epoch checkpoint")
        # What SLURM sends before a time limit (--signal=USR2@signal_delay_s) and on preemption:
        # submitit calls SlurmTask.checkpoint and requeues the task.
        subprocess.run(["scancel", "--signal=USR2", job["job_id"]], check=True)
        output, _ = run.communicate(timeout=180)
    finally:
        run.kill()
    assert run.returncode == 0, output

    record = Store(results).read(run_id)
    assert record["status"] == "done"
    assert [(entry["stage"], entry["epoch"]) for entry in record["history"]] == [
        ("main", epoch) for epoch in range(1, epochs + 1)]  # every epoch once
    assert record["provenance"]["slurm_restart_count"] == 1
    attempts = [attempt["State"] for attempt in settled(job["job_id"], duplicates=True)]
    assert sorted(attempts) == ["COMPLETED", "REQUEUED"], attempts  # two attempts in accounting

    # The log shows both attempts, and the second trained only the epochs after the checkpoint.
    log = (results / "slurm" / "logs" / f"{job['job_id']}_0_log.out").read_text()
    first, second = log.split("attempt 2")
    assert "attempt 1" in first and "Calling checkpoint method" in first, log
    trained = lambda text: [int(epoch) for epoch in re.findall(r"^kdbench: epoch (\d+)/", text, re.MULTILINE)]
    before, after = trained(first), trained(second)
    # The signal came after the first checkpoint, so the second attempt must not start at 1.
    assert after and after[0] > 1 and after == list(range(after[0], epochs + 1)), log
    assert not set(before) & set(after), log  # no epoch trained twice


@pytest.mark.slurm
@cluster
def test_no_wait_then_status_then_table_with_tasks_that_died_without_a_record(results_with_teacher, capsys):
    results = results_with_teacher
    grid = grid_args(results, "--methods", "kd", "--seeds", "2")
    # With rsync, from a code snapshot (--snapshot is optional; CI's machine may lack rsync).
    snapshot = ["--snapshot"] if shutil.which("rsync") else []
    # Two tasks at a time: the vanilla runs start, the kd runs wait in the queue.
    code = cli.main(["run", *grid, "--executor", "slurm", "--slurm", "test",
                     "--slurm-set", "array_parallelism=2", "--no-wait", "--no-group", *snapshot])
    out = capsys.readouterr().out
    assert code == 0 and "4 runs submitted to SLURM" in out, out
    run = {(job["spec"]["method"], job["spec"]["seed"]): (run_id, job["job_id"])
           for run_id, job in submissions(results).items()}

    assert cli.main(["status", *grid]) == 0
    status = capsys.readouterr().out
    header, teacher, vanilla, kd = status.splitlines()[:4]
    counts = lambda line: dict(zip(header.split()[2:], map(int, line.split()[2:])))
    assert counts(teacher)["done"] == 1
    assert counts(vanilla)["running"] + counts(vanilla)["pending"] == 2 and counts(kd)["pending"] == 2, status
    assert f"pending: {SETTING} kd seed 1 ({run['kd', 1][0]}) [SLURM job {run['kd', 1][1]}" in status

    # Cancelled while queued: SLURM forgets such an array task entirely.
    subprocess.run(["scancel", run["kd", 1][1]], check=True)
    # Killed while training (as the out-of-memory killer would): no record, no result file.
    store = Store(results)
    wait_for(lambda: (results / "running" / f"{run['kd', 0][0]}.json").exists(), 120, "kd seed 0 to start")
    subprocess.run(["scancel", "--signal=KILL", run["kd", 0][1]], check=True)
    wait_for(lambda: all(store.is_done(run["vanilla", seed][0]) for seed in (0, 1)), 120, "the vanilla runs")
    settled(run["kd", 0][1])
    # SLURM's accounting says CANCELLED as soon as the signal is sent; the task's processes may
    # take a while longer to go, and until then they hold the run's claim (status: "running").
    wait_for(lambda: not held_elsewhere(store, run["kd", 0][0]), 120, "kd seed 0's processes to end")

    assert cli.main(["status", "--results", str(results)]) == 0  # the whole results directory
    status = capsys.readouterr().out
    # SIGKILLed by scancel: CANCELLED (SLURM 22.05); by the kernel: FAILED or OUT_OF_MEMORY.
    for seed, states, said in [(0, ("CANCELLED", "FAILED"), "SLURM job ended"),
                               (1, ("GONE",), "cancelled before it started")]:
        run_id = run["kd", seed][0]
        record = store.read(run_id)  # written by status: the job stored none
        assert record["status"] == "failed" and record["error"]["type"] == "SlurmJobDied", record
        assert record["error"]["slurm"]["state"] in states and said in record["error"]["message"]
        assert f"failed: {SETTING} kd seed {seed} ({run_id}): SlurmJobDied" in status
        assert record["error"]["slurm"]["stderr"] in status

    if snapshot:  # the jobs ran the copy, which has the code as it was at submission
        [copy] = (results / "slurm" / "snapshots").iterdir()
        for module in ("launch.py", "slurm.py"):
            assert (copy / "kdbench" / module).read_text() == (REPO / "kdbench" / module).read_text()
        log = (results / "slurm" / "logs" / f"{run['vanilla', 0][1]}_0_log.out").read_text()
        assert f"code from {copy / 'kdbench'}" in log, log

    assert cli.main(["table", "--results", str(results)]) == 0
    table = capsys.readouterr().out
    rows = {cells[1].strip(): cells[2].strip() for cells in
            (line.split("|") for line in table.splitlines() if line.startswith("|"))}
    assert "±" in rows["Student"] and rows["Teacher"], table  # what finished is tabulated
    assert "±" not in rows.get("kd", ""), table  # and only that


@pytest.mark.slurm
@cluster
def test_a_preset_the_cluster_refuses_is_one_line_and_leaves_nothing_queued(tmp_path, capsys):
    results = tmp_path / "results"
    before = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True).stdout.split()
    code = cli.main(["run", *grid_args(results, "--methods", "kd", "--seeds", "1"), "--executor", "slurm",
                     "--slurm", "test", "--slurm-set", "partition=nosuchpartition", "--no-table"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "sbatch refused the job" in error[0], error
    after = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before)


def test_runs_of_a_task_share_its_gpus_in_turn():
    from kdbench.slurm import member_devices

    assert member_devices(4, None, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert member_devices(3, None, 1) == [None, None, None]  # one GPU (or none): the default
    assert member_devices(2, "cuda:1", 4) == ["cuda:1", "cuda:1"]  # --device wins
