"""One run across several processes (DistributedDataParallel), with real torch.distributed on
the CPU (gloo): the step's arithmetic, the run's identity, a 2-process run through the CLI and
the local executor, its restart after SIGKILL of one rank, and the one-line errors.

SyncBatchNorm runs on CUDA only (torch raises for CPU input), so it is not tested here."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench import distributed, settings
from kdbench.cli import main
from kdbench.grid import Grid
from kdbench.grid import running_marker
from kdbench.ranks import free_port
from kdbench.spec import RunSpec
from kdbench.store import Store

REPO = Path(__file__).resolve().parent.parent
COMMITTED_RECORDS = REPO / "tables" / "records" / "runs"
PYTHON = [sys.executable, "-m", "kdbench"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
EPOCHS = 2  # synthetic/tiny's recipe
GRID_ARGS = ["--methods", "vanilla", "--seeds", "1", "--setting", "synthetic/tiny", "--gpus-per-run", "2"]
RUN_ARGS = ["run", *GRID_ARGS, "--device", "cpu", "--no-table"]
DDP_SPEC = RunSpec("synthetic/tiny", "vanilla", 0, processes=2)


# --- identity ---------------------------------------------------------------------------------

@pytest.mark.skipif(not any(COMMITTED_RECORDS.glob("*.json")), reason="no committed records")
def test_one_process_keeps_every_stored_id_and_two_change_it():
    """The committed records (made before world size existed) keep their ids and their spec
    JSON at processes = 1, planned through the grid as `run` plans them; 2 is another run."""
    for path in sorted(COMMITTED_RECORDS.glob("*.json")):
        record = json.loads(path.read_text())
        spec = RunSpec.from_json(record["spec"])
        assert spec.to_json() == record["spec"]  # no new field at 1
        assert spec.id == record["id"]
        # As kdbench.plan plans them: a setting newer than setting files adds its hash.
        fields = {spec.setting: settings.for_spec(spec).spec_fields()}
        planned = Grid((spec.setting,), (spec.method,), (spec.seed,), teacher_seed=spec.teacher_seed,
                       precision=spec.precision, setting_fields=fields, processes=1)
        if spec.role == "student" and not spec.config and not spec.overrides:
            assert record["id"] in {s.id for s in planned.students()}
        two = RunSpec.from_json({**record["spec"], "processes": 2})
        assert two.id != record["id"] and two.to_json()["processes"] == 2
        assert two.teacher_spec() == spec.teacher_spec()  # teachers train in one process


# --- one step: 2 processes of b/2 = 1 process of b ----------------------------------------------

def tiny_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def connector() -> nn.Module:
    torch.manual_seed(4)
    return nn.Linear(3, 3)  # a method's trainable module (a regressor), averaged by hand


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(8, 6, generator=generator)
    labels = torch.randint(0, 3, (8,), generator=generator)
    targets = torch.randn(8, 3, generator=generator)
    return images, labels, targets


def two_steps(student_forward, student: nn.Module, regressor: nn.Module, ranks, no_sync) -> None:
    """Step 1 as train.py's default backward (DDP averages the student, average_gradients the
    regressor); step 2 as under a method's own gradient rule (no_sync, then everything by
    average_gradients). Each rank's loss is a mean over its shard, as train.py's."""
    optimizer = torch.optim.SGD([*student.parameters(), *regressor.parameters()], lr=0.1, momentum=0.9)
    images, labels, targets = (distributed.shard(x, ranks) for x in global_batch())
    for step in range(2):
        with no_sync() if step == 1 else torch.enable_grad():
            logits = student_forward(images)
            loss = F.cross_entropy(logits, labels) + F.mse_loss(regressor(logits), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        averaged = list(regressor.parameters()) + (list(student.parameters()) if step == 1 else [])
        distributed.average_gradients(averaged, ranks)
        optimizer.step()


def _ddp_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with distributed.process_group("cpu") as ranks:
        student, regressor = tiny_model(), connector()
        ddp = distributed.wrap(student, torch.device("cpu"), ranks)
        two_steps(ddp, student, regressor, ranks, ddp.no_sync)
        torch.save({"student": student.state_dict(), "regressor": regressor.state_dict()},
                   f"{out}.{rank}")


def test_two_processes_of_half_the_batch_step_as_one_process_of_all():
    import tempfile

    import torch.multiprocessing as mp

    student, regressor = tiny_model(), connector()
    two_steps(student, student, regressor, distributed.SOLO, contextlib.nullcontext)
    expected = {"student": student.state_dict(), "regressor": regressor.state_dict()}
    before = tiny_model().state_dict()
    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/params"
        # fork: the children start with torch imported (spawn costs seconds of imports each).
        mp.start_processes(_ddp_rank, args=(free_port(), out), nprocs=2, join=True, start_method="fork")
        for rank in range(2):
            got = torch.load(f"{out}.{rank}")
            for part in expected:
                for name, value in expected[part].items():
                    torch.testing.assert_close(got[part][name], value, rtol=0, atol=1e-6)
    # The steps moved the weights (a test that compares two untrained models proves nothing).
    assert (expected["student"]["0.weight"] - before["0.weight"]).abs().max() > 1e-3


def test_shards_are_disjoint_ordered_and_cover_the_batch():
    batch = torch.arange(11)
    shards = [distributed.shard(batch, distributed.Ranks(rank, 3)) for rank in range(3)]
    assert torch.equal(torch.cat(shards), batch)
    assert [len(shard) for shard in shards] == [4, 4, 3]
    assert distributed.trains_on(4, distributed.Ranks(0, 2))
    assert not distributed.trains_on(3, distributed.Ranks(1, 2))  # a shard of one: skipped by all


# --- a run of 2 processes through the CLI -------------------------------------------------------

def history_without_times(record):
    return [{k: v for k, v in entry.items() if k not in ("seconds", "attempt")}
            for entry in record["history"]]


# MHGD besides the baseline: a pre-training stage (part of the student, the attention network),
# a custom gradient rule, and trainable modules, each a path where train.py averages gradients
# itself (and checks every epoch that the ranks' parameters agree).
MHGD = RunSpec("synthetic/tiny", "mhgd", 0, processes=2)


@pytest.fixture(scope="module")
def uninterrupted(trained_tiny_teacher, tmp_path_factory):
    """2-process runs of synthetic/tiny through `kdbench run` (local executor), to the end."""
    results = tmp_path_factory.mktemp("ddp") / "results"
    shutil.copytree(trained_tiny_teacher, results)
    args = [arg if arg != "vanilla" else "mhgd" for arg in RUN_ARGS]
    assert main(args + ["--results", str(results)]) == 0
    return results


def test_a_two_process_run_finishes_with_its_record(uninterrupted, capsys):
    store = Store(uninterrupted)
    record = store.read(DDP_SPEC.id)
    assert record["status"] == "done" and record["spec"]["processes"] == 2
    assert record["provenance"]["distributed"] == {"world_size": 2, "backend": "gloo",
                                                   "sync_bn": False, "attempt": 1}
    assert [entry["epoch"] for entry in record["history"]] == list(range(1, EPOCHS + 1))
    assert all(entry["attempt"] == 1 for entry in record["history"])
    # Every epoch trained on all 1200 synthetic images (both shards of every batch; the last
    # batch, 48, gives each rank 24), as a run of one process does.
    assert record["images_per_second"] * record["train_seconds"] == pytest.approx(EPOCHS * 1200)
    assert not store.checkpoint_path(DDP_SPEC.id).exists()
    assert (uninterrupted / record["student_weights"]["last"]["path"]).is_file()
    mhgd = store.read(MHGD.id)
    assert mhgd["status"] == "done", mhgd.get("error")
    assert [entry["stage"] for entry in mhgd["history"]][-EPOCHS:] == ["main"] * EPOCHS
    assert len(mhgd["history"]) > EPOCHS  # its attention-network stage came first
    capsys.readouterr()
    assert main(["status", "--results", str(uninterrupted), *GRID_ARGS]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any(row.split()[:3] == ["synthetic/tiny", "vanilla", "1"] for row in rows), rows


def parent_of(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def other_rank(store: Store, run_id: str) -> int:
    """The pid of rank 1 of a run of 2: rank 0 is the process its running marker names (it
    holds the claim, kdbench.worker.run_job), rank 1 the supervisor's other child."""
    rank0 = int(running_marker(store, run_id).read_text().split()[1])
    supervisor = parent_of(rank0)
    children = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
                and int(entry.name) != rank0 and _parent_or_none(int(entry.name)) == supervisor]
    [rank1] = children
    return rank1


def _parent_or_none(pid: int) -> int | None:
    try:
        return parent_of(pid)
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc")
def test_sigkill_of_one_rank_restarts_the_group_from_its_checkpoint(uninterrupted, trained_tiny_teacher,
                                                                    tmp_path, capfd):
    results = tmp_path / "results"
    shutil.copytree(trained_tiny_teacher, results)
    store = Store(results)
    killed = []

    def kill_rank_1_after_the_first_checkpoint() -> None:
        deadline = time.time() + 300
        while not store.checkpoint_path(DDP_SPEC.id).exists() and time.time() < deadline:
            time.sleep(0.02)
        if store.read(DDP_SPEC.id) is None:  # still in its second (last) epoch
            os.kill(other_rank(store, DDP_SPEC.id), signal.SIGKILL)
            killed.append(True)

    killer = threading.Thread(target=kill_rank_1_after_the_first_checkpoint)
    killer.start()
    code = main(RUN_ARGS + ["--results", str(results)])  # the launch, here in the main thread
    killer.join()
    output = capfd.readouterr().out
    assert killed and code == 0, output
    assert "rank 1: worker process killed by SIGKILL" in output
    record = store.read(DDP_SPEC.id)
    attempts = [entry["attempt"] for entry in record["history"]]
    assert attempts[0] == 1 and attempts[-1] == 2, attempts  # resumed: later epochs by attempt 2
    assert record["provenance"]["distributed"]["attempt"] == 2
    # Resumed from rank 0's checkpoint, every rank ends as the uninterrupted run did.
    expected = Store(uninterrupted).read(DDP_SPEC.id)
    assert history_without_times(record) == history_without_times(expected)
    assert record["metrics"] == expected["metrics"]
    assert not store.checkpoint_path(DDP_SPEC.id).exists()


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--gpus-per-run", "2", "--device", "cuda"], "--device cuda: no CUDA device here"),
    (["--sync-bn"], "--sync-bn synchronises BatchNorm across the processes of a run: it needs"),
    (["--gpus-per-run", "2", "--sync-bn", "--device", "cpu"], "--sync-bn: torch's SyncBatchNorm runs on CUDA only"),
    (["--gpus-per-run", "2", "--executor", "inprocess"], "the inprocess executor trains in this one process"),
    (["--gpus-per-run", "0"], "--gpus-per-run: must be at least 1"),
], ids=["cuda-missing", "sync-bn-alone", "sync-bn-cpu", "inprocess", "zero"])
def test_bad_process_requests_are_one_line_exit_2(extra, message, tmp_path, capsys):
    if torch.cuda.is_available() and "cuda" in extra:
        pytest.skip("this machine has a GPU")
    results = tmp_path / "results"
    code = main(["run", "--setting", "synthetic/tiny", "--seeds", "1", "--results", str(results),
                 "--no-table", *extra])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and len(error.splitlines()) == 1, error
    assert not results.exists() or not any((results / "runs").glob("*.json"))


# --- ImageFolder data: each rank loads its part only -------------------------------------------

@pytest.mark.parametrize("world_size, batch_size", [(2, 5), (3, 7)])
def test_an_imagefolder_rank_loads_exactly_its_shard_of_every_batch(tmp_path, world_size, batch_size):
    """24 images: batches of 5 (the last 4) give 2 ranks parts of 3 and 2; batches of 7 (the
    last 3) give 3 ranks parts of 3, 2, 2 and a last batch of 1 each, which all skip."""
    from test_imagefolder import make_image_folder, raw_epoch, stream

    root = make_image_folder(tmp_path / "images")
    whole = raw_epoch(stream(root, seed=3, batch_size=batch_size))
    for rank in range(world_size):
        ranks = distributed.Ranks(rank, world_size)
        sharded = stream(root, seed=3, batch_size=batch_size)
        sharded.take_shard(ranks)
        got = raw_epoch(sharded)
        expected = [[distributed.shard(x, ranks) for x in batch] for batch in whole
                    if distributed.trains_on(len(batch[1]), ranks)]
        assert len(got) == len(expected) == (len(whole) - (1 if world_size == 3 else 0))
        for (images, labels, index), (want_images, want_labels, want_index) in zip(got, expected):
            assert torch.equal(index, want_index) and torch.equal(labels, want_labels)
            assert torch.equal(images, want_images)
