"""Nothing lost: a SIGKILLed run resumes to the identical result, concurrent launches share
one teacher, unreadable files are named and redone, and bad input changes nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdbench.cli import main
from kdbench.spec import RunSpec
from kdbench.store import Store

PYTHON = [sys.executable, "-m", "kdbench"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def kdbench(*args, **kwargs):
    return subprocess.run(PYTHON + list(args), capture_output=True, text=True, env=ENV,
                          timeout=600, **kwargs)


def snapshot(root: Path) -> dict[str, int]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def history_without_times(record):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in record["history"]]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(results_with_teacher, tmp_path):
    args = ["run", "--methods", "vanilla", "--seeds", "1", "--setting", "synthetic/tiny",
            "--epochs", "5", "--executor", "inprocess", "--no-table"]
    reference = tmp_path / "reference"
    shutil.copytree(results_with_teacher, reference)
    assert kdbench(*args, "--results", str(reference)).returncode == 0

    spec = RunSpec("synthetic/tiny", "vanilla", 0, overrides={"epochs": 5})
    store = Store(results_with_teacher)
    process = subprocess.Popen(PYTHON + args + ["--results", str(results_with_teacher)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while not store.checkpoint_path(spec.id).exists():  # the first epoch is checkpointed
        assert process.poll() is None and time.time() < deadline, "run ended before a checkpoint"
        time.sleep(0.02)
    time.sleep(0.3)  # into the next epoch
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert store.read(spec.id) is None, "killed too late: the run had finished"
    epochs_done = torch.load(store.checkpoint_path(spec.id), weights_only=False)["epoch"]
    assert 1 <= epochs_done < 5

    resumed = kdbench(*args, "--results", str(results_with_teacher))
    assert resumed.returncode == 0, resumed.stderr
    expected = Store(reference).read(spec.id)
    got = store.read(spec.id)
    assert history_without_times(got) == history_without_times(expected)
    assert got["metrics"] == expected["metrics"]


def test_two_launches_at_once_train_the_teacher_once(tmp_path):
    results = tmp_path / "results"
    args = ["run", "--methods", "kd", "--setting", "synthetic/tiny", "--executor", "inprocess",
            "--no-table", "--results", str(results)]
    first = subprocess.Popen(PYTHON + args + ["--seed-list", "0"], env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    second = subprocess.Popen(PYTHON + args + ["--seed-list", "1"], env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outputs = [process.communicate(timeout=600) for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    teacher_lines = [line for _, err in outputs for line in err.splitlines() if "teacher seed 0:" in line
                     and line.startswith("[")]
    assert len(teacher_lines) == 2
    assert sum("trained by another launch" in line for line in teacher_lines) == 1, teacher_lines
    records = [json.loads(p.read_text()) for p in (results / "runs").glob("*.json")]
    assert len(records) == 5 and all(r["status"] == "done" for r in records)
    assert not list((results / "runs").glob(".*"))  # no half-written temporary files


def test_truncated_record_is_named_and_redone(results_with_teacher, capsys):
    args = ["run", "--methods", "vanilla", "--seeds", "1", "--setting", "synthetic/tiny",
            "--executor", "inprocess", "--no-table", "--results", str(results_with_teacher)]
    assert main(args) == 0
    spec = RunSpec("synthetic/tiny", "vanilla", 0)
    path = Store(results_with_teacher).record_path(spec.id)
    path.write_text(path.read_text()[:50])
    capsys.readouterr()
    assert main(["status", "--results", str(results_with_teacher)]) == 0
    assert f"unreadable record (will be redone): {path}" in capsys.readouterr().out
    assert main(args) == 0
    assert json.loads(path.read_text())["status"] == "done"


def test_checkpoint_of_another_run_is_ignored_with_a_warning(results_with_teacher, capsys):
    store = Store(results_with_teacher)
    spec = RunSpec("synthetic/tiny", "vanilla", 0)
    store.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"run_id": "someone-else", "epoch": 1}, store.checkpoint_path(spec.id))
    assert main(["run", "--methods", "vanilla", "--seeds", "1", "--setting", "synthetic/tiny",
                 "--executor", "inprocess", "--no-table", "--results", str(results_with_teacher)]) == 0
    assert "belongs to another run" in capsys.readouterr().out
    assert store.read(spec.id)["status"] == "done"


def test_a_failed_run_does_not_stop_the_grid_and_is_retried_alone(results_with_teacher, capsys):
    store = Store(results_with_teacher)
    base = ["run", "--setting", "synthetic/tiny", "--executor", "inprocess", "--no-table",
            "--results", str(results_with_teacher), "--methods", "kd", "--seeds", "1"]
    # lr 1e30 makes every student diverge: each is stored as failed and the command says so.
    assert main(base + ["--lr", "1e30"]) == 1
    err = capsys.readouterr().err
    assert "2 runs failed" in err and "NonFiniteLoss" in err
    assert main(["status", "--results", str(results_with_teacher)]) == 0
    out = capsys.readouterr().out
    assert "failed: synthetic/tiny kd seed 0" in out
    # The same command retries exactly the failed runs.
    failed = [p for p in store.runs_dir.glob("*.json") if json.loads(p.read_text())["status"] == "failed"]
    assert len(failed) == 2
    assert main(base + ["--lr", "1e30", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("would run") == 2


BAD_INPUTS = [
    (["--methods", "kdd"], "did you mean kd"),
    (["--setting", "fashion_mnist/quik"], "did you mean fashion_mnist/quick"),
    (["--seeds", "0"], "at least 1"),
    (["--seeds", "-3"], "at least 1"),
    (["--seeds", "two"], "whole number"),
    (["--set", "kd.temprature=2"], "has no field 'temprature'"),
    (["--set", "kd.temperature=warm"], "expected a float, got 'warm'"),
    (["--set", "temperature=2"], "METHOD.FIELD=VALUE"),
    (["--data-dir", "/nonexistent/data"], "does not exist"),
    (["--setting", "cifar100/wrn_40_2-wrn_16_2", "--data-dir", "EMPTY"], "cifar-100-python"),
    (["--results", "FILE/results"], "not writable"),
    (["--teacher-checkpoint", "GARBAGE"], "does not load"),
    (["--teacher-checkpoint", "WRONG_ARCH"], "does not fit"),
    (["--executor", "nowhere"], "invalid choice"),
    # Issue 14, case 9: each exited 1 after writing failed records, or printed a traceback.
    (["--seed-list", "-1"], "--seed-list: seeds are whole numbers from 0 to 4294967295, got -1"),
    (["--seed-list", "4294967296"], "from 0 to 4294967295, got 4294967296"),
    (["--teacher-seed", "-1"], "--teacher-seed: seeds are whole numbers from 0 to 4294967295"),
    (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--set", "kd.temperature=nan"], "kd.temperature must be a finite number"),
    (["--set", "kd.temperature=0"], "kd.temperature must be > 0, got 0.0"),
    (["--set", "kd.temperature=-2"], "kd.temperature must be > 0, got -2.0"),
    (["--device", "banana"], "--device banana: not a device"),
    pytest.param(["--device", "cuda"], "no CUDA device", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a GPU")),
    (["--device", "cuda:99"], "cuda:99"),
    (["--seeds", "100000000000"], "--seeds 100000000000"),
    (["--batch-size", "1000000000"], "larger than the 1200 training images of synthetic/tiny"),
    (["--teacher-checkpoint", "MISSING"], "does not exist"),
    (["--teacher-checkpoint", "EMPTY"], "is a directory"),
    (["--methods", "kd,kd"], "--methods: kd is listed twice"),
    (["--methods", ""], "--methods: empty list"),
    (["--seed-list", ","], "--seed-list: empty list"),
    (["--setting", " "], "--setting: empty list"),
]


def bad_input_id(case) -> str:
    args = case.values[0] if hasattr(case, "values") else case[0]
    return " ".join(arg or "''" for arg in args)


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[bad_input_id(case) for case in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(extra, message, tmp_path, capsys):
    from kdbench.models import build_model

    results = tmp_path / "results"
    Store(results).write({"id": "keep", "status": "done", "spec": {}})
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "FILE").write_text("a file, not a directory")
    (tmp_path / "GARBAGE").write_bytes(b"not a checkpoint")
    torch.save(build_model("resnet8", 10, 3).state_dict(), tmp_path / "WRONG_ARCH")
    extra = [str(tmp_path / a) if a in {"EMPTY", "FILE/results", "GARBAGE", "WRONG_ARCH", "MISSING"}
             else a for a in extra]
    args = {"--methods": "kd", "--seeds": "1", "--setting": "synthetic/tiny",
            "--results": str(results), "--executor": "inprocess"}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    argv = ["run"] + [x for flag, value in args.items() for x in (flag, value)]
    before = snapshot(results)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err
    assert snapshot(results) == before


def test_a_broken_plugin_does_not_break_list_or_other_methods(tmp_path):
    package = tmp_path / "site"
    (package / "brokenkd").mkdir(parents=True)
    (package / "brokenkd" / "__init__.py").write_text("raise ImportError('missing dependency xyz')\n")
    info = package / "brokenkd-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenkd\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kdbench.methods]\nbroken = brokenkd:Broken\n")
    env = {**ENV, "PYTHONPATH": str(package)}
    listing = subprocess.run(PYTHON + ["list"], env=env, capture_output=True, text=True)
    assert listing.returncode == 0
    assert "broken" in listing.stdout and "BROKEN" in listing.stdout and "xyz" in listing.stdout
    asked = subprocess.run(PYTHON + ["run", "--methods", "broken", "--setting", "synthetic/tiny",
                                     "--results", str(tmp_path / "r")], env=env, capture_output=True, text=True)
    assert asked.returncode == 2 and "failed to import" in asked.stderr
    assert not (tmp_path / "r").exists()


# --- 4. a missing teacher weights file ----------------------------------------------------------

def test_a_missing_teacher_weights_file_is_detected_and_the_teacher_retrained(results_with_teacher, capsys):
    store = Store(results_with_teacher)
    teacher = RunSpec("synthetic/tiny", "vanilla", 0, role="teacher")
    weights = store.teacher_path(teacher.id)
    trained = store.read(teacher.id)["teacher_weights"]["sha256"]
    weights.unlink()
    capsys.readouterr()
    assert main(["status", "--results", str(results_with_teacher)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    row = next(line.split() for line in out.splitlines() if line.split()[1:2] == ["teacher"])
    counts = dict(zip(header[2:], row[2:]))
    assert counts["done"] == "0" and counts["missing"] == "1", out  # missing, not done
    assert str(weights) in out, out
    args = ["run", "--methods", "kd", "--seeds", "1", "--setting", "synthetic/tiny",
            "--executor", "inprocess", "--no-table", "--results", str(results_with_teacher)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert str(weights) in captured.out and "retrain" in captured.out, captured.out
    assert "plus 1 teacher" in captured.out
    assert store.read(RunSpec("synthetic/tiny", "kd", 0).id)["status"] == "done"
    # Retrained from its seed on the CPU with the same threads: the very same weights.
    assert weights.exists() and store.read(teacher.id)["teacher_weights"]["sha256"] == trained


# --- 5. records of the wrong schema, or of another run ------------------------------------------

VANILLA_RUN = ["run", "--methods", "vanilla", "--seeds", "1", "--setting", "synthetic/tiny",
               "--executor", "inprocess"]


def test_a_record_of_the_wrong_schema_is_named_and_skipped_everywhere(results_with_teacher, capsys):
    results = str(results_with_teacher)
    assert main([*VANILLA_RUN, "--results", results, "--no-table"]) == 0
    bad = Store(results_with_teacher).runs_dir / "x.json"
    bad.write_text(json.dumps({"id": "x", "status": "done", "spec": "nonsense"}))
    capsys.readouterr()
    assert main(["status", "--results", results]) == 0
    out = capsys.readouterr().out
    assert str(bad) in out and "vanilla" in out
    assert main(["table", "--results", results]) == 0
    captured = capsys.readouterr()
    assert "Student" in captured.out and str(bad) in captured.err
    assert main([*VANILLA_RUN, "--results", results]) == 0  # nothing to train, then the table
    captured = capsys.readouterr()
    assert "Student" in captured.out and "Traceback" not in captured.err


def test_a_record_copied_under_another_name_is_flagged_not_counted(results_with_teacher, capsys):
    results = str(results_with_teacher)
    assert main([*VANILLA_RUN, "--results", results, "--no-table"]) == 0
    store = Store(results_with_teacher)
    original = store.record_path(RunSpec("synthetic/tiny", "vanilla", 0).id)
    copy = store.runs_dir / "0123456789abcdef.json"
    shutil.copy(original, copy)
    capsys.readouterr()
    assert main(["table", "--results", results, "--format", "csv"]) == 0
    captured = capsys.readouterr()
    student = next(line for line in captured.out.splitlines() if ",vanilla," in line)
    assert ",1," in student  # n = 1: the copy is not a second seed
    assert str(copy) in captured.err and original.stem in captured.err
    assert main(["status", "--results", results]) == 0
    out = capsys.readouterr().out
    assert str(copy) in out and original.stem in out


# --- 6. a checkpoint missing keys; temporary files of a killed write ----------------------------

def test_a_checkpoint_missing_keys_is_ignored_with_a_warning(results_with_teacher, capsys):
    store = Store(results_with_teacher)
    spec = RunSpec("synthetic/tiny", "vanilla", 0)
    store.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"run_id": spec.id, "epoch": 1}, store.checkpoint_path(spec.id))
    assert main([*VANILLA_RUN, "--results", str(results_with_teacher), "--no-table"]) == 0
    out = capsys.readouterr().out
    assert str(store.checkpoint_path(spec.id)) in out and "starting over" in out
    assert store.read(spec.id)["status"] == "done"


def test_temporary_files_left_by_a_killed_write_are_cleaned_up(results_with_teacher):
    store = Store(results_with_teacher)
    spec = RunSpec("synthetic/tiny", "vanilla", 0)
    # What write_atomically's mkstemp leaves when the process dies between write and rename,
    # for every file a run writes: checkpoint, record, per-epoch CSV, kept students (last and
    # best) and running marker (only the first two were removed before).
    leftovers = [store.checkpoints_dir / f".{spec.id}.pt.k1ll3d0.tmp",
                 store.runs_dir / f".{spec.id}.json.k1ll3d0.tmp",
                 store.runs_dir / f".{spec.id}.csv.k1ll3d0.tmp",
                 store.root / "students" / f".{spec.id}.pt.k1ll3d0.tmp",
                 store.root / "students" / f".{spec.id}.best.pt.k1ll3d0.tmp",
                 store.root / "running" / f".{spec.id}.json.k1ll3d0.tmp"]
    # Another run's half file is not this run's to remove: its own claim holder may be writing it.
    other = store.runs_dir / f".{RunSpec('synthetic/tiny', 'vanilla', 1).id}.csv.k1ll3d0.tmp"
    for path in [*leftovers, other]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    assert main([*VANILLA_RUN, "--results", str(results_with_teacher), "--no-table"]) == 0
    assert [path for path in leftovers if path.exists()] == []
    assert other.exists()
    assert store.read(spec.id)["status"] == "done"


# --- 7. corrupt data files ------------------------------------------------------------------------

def write_idx(path: Path, array) -> None:
    """An IDX file (LeCun's MNIST format), gzipped, as torchvision ships Fashion-MNIST."""
    import gzip
    import struct

    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_a_corrupt_data_file_is_named_before_anything_is_written(damage, tmp_path, capsys):
    import numpy as np

    from kdbench.data import FASHION_MNIST_FILES

    folder = tmp_path / "data" / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for key, name in FASHION_MNIST_FILES.items():
        n = 60 if key.startswith("train") else 20
        shape = (n, 28, 28) if key.endswith("images") else (n,)
        write_idx(folder / name, rng.integers(0, 10 if len(shape) == 1 else 256, shape, dtype=np.uint8))
    broken = folder / FASHION_MNIST_FILES["train_images"]
    broken.write_bytes(broken.read_bytes()[:200] if damage == "truncated" else b"not a gzip file")
    results = tmp_path / "results"
    capsys.readouterr()
    assert main(["run", "--setting", "fashion_mnist/quick", "--methods", "kd", "--seeds", "1",
                 "--data-dir", str(tmp_path / "data"), "--executor", "inprocess",
                 "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(broken) in err and "Traceback" not in err, err
    assert not results.exists()


# --- 10. mixed experiments in one results directory ------------------------------------------------

def test_run_prints_the_table_of_the_grid_it_ran_among_other_experiments(results_with_teacher, capsys):
    results = str(results_with_teacher)
    assert main([*VANILLA_RUN, "--results", results, "--no-table"]) == 0
    capsys.readouterr()
    assert main([*VANILLA_RUN, "--results", results, "--epochs", "1"]) == 0
    captured = capsys.readouterr()
    assert "no table" not in captured.err, captured.err
    one_epoch = Store(results_with_teacher).read(RunSpec("synthetic/tiny", "vanilla", 0,
                                                          overrides={"epochs": 1}).id)
    student = next(line for line in captured.out.splitlines() if line.startswith("| Student"))
    assert f"{one_epoch['metrics']['top1_last']:.2f}" in student, captured.out


def fake_record(spec: RunSpec, top1: float, precision: str = "fp32") -> dict:
    return {"id": spec.id, "status": "done", "spec": spec.to_json(),
            "setting": {"name": spec.setting, "dataset": "synthetic", "teacher": "wrn_10_2",
                        "student": "wrn_10_1", "recipe": {"epochs": 2}},
            "metrics": {"top1_last": top1, "top1_best": top1, "top5_last": 90.0, "top5_best": 90.0},
            "history": [], "provenance": {"precision": precision}}


@pytest.mark.parametrize("difference, flag", [("precision", "--precision"), ("epochs", "--methods")])
def test_table_names_the_flag_that_separates_mixed_experiments(difference, flag, tmp_path, capsys):
    store = Store(tmp_path)
    for seed in range(2):
        store.write(fake_record(RunSpec("synthetic/tiny", "vanilla", seed), 50.0 + seed))
        other = (RunSpec("synthetic/tiny", "vanilla", seed, precision="bf16") if difference == "precision"
                 else RunSpec("synthetic/tiny", "vanilla", seed, overrides={"epochs": 1}))
        store.write(fake_record(other, 40.0 + seed, other.precision))
    capsys.readouterr()
    assert main(["table", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"choose one with {flag}" in err, err
    if difference == "epochs":
        assert "vanilla[epochs=1]" in err


# --- 9. more user mistakes: one line, exit 2, nothing written -------------------------------------

def test_table_out_to_an_unwritable_place_is_one_line_and_writes_nothing(results_with_teacher, tmp_path, capsys):
    (tmp_path / "FILE").write_text("a file, not a directory")
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(["table", "--results", str(results_with_teacher), "--out",
                 str(tmp_path / "FILE" / "tables" / "x.tex")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "FILE" in err and "not writable" in err, err
    assert snapshot(tmp_path) == before


def test_a_plugin_that_exits_at_import_is_listed_as_broken(tmp_path):
    package = tmp_path / "site"
    (package / "exitkd").mkdir(parents=True)
    (package / "exitkd" / "__init__.py").write_text("import sys\nsys.exit('exitkd: no licence')\n")
    info = package / "exitkd-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: exitkd\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kdbench.methods]\nexiting = exitkd:Exiting\n")
    env = {**ENV, "PYTHONPATH": str(package)}
    listing = subprocess.run(PYTHON + ["list"], env=env, capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert "exiting" in listing.stdout and "BROKEN" in listing.stdout and "no licence" in listing.stdout
    assert "kd " in listing.stdout  # the methods after it are still listed
    asked = subprocess.run(PYTHON + ["run", "--methods", "exiting", "--setting", "synthetic/tiny",
                                     "--results", str(tmp_path / "r")], env=env, capture_output=True,
                           text=True)
    assert asked.returncode == 2 and "failed to import" in asked.stderr, asked.stderr
    assert not (tmp_path / "r").exists()


def test_a_non_utf8_locale_gets_ascii_output(results_with_teacher, tmp_path):
    env = {**ENV, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    run = subprocess.run(PYTHON + [*VANILLA_RUN, "--results", str(results_with_teacher)], env=env,
                         capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    out = run.stdout.decode("ascii")  # ASCII only: raises otherwise
    assert "1 methods x 1 seeds" in out and "| Student" in out
    run.stderr.decode("ascii")
    tables = subprocess.run(PYTHON + ["table", "--results", str(results_with_teacher), "--out",
                                      str(tmp_path / "t.tex")], env=env, capture_output=True, timeout=600)
    assert tables.returncode == 0, tables.stderr.decode(errors="replace")
    # Files are UTF-8 whatever the locale (a LaTeX source with an arrow, a Markdown table).
    assert "→" in (tmp_path / "t.md").read_text(encoding="utf-8")
    assert "Student" in (tmp_path / "t.tex").read_text(encoding="utf-8")


def test_dry_run_writes_nothing(tmp_path, capsys):
    from kdbench.models import build_model
    from kdbench.settings import get as get_setting

    setting = get_setting("synthetic/tiny")
    checkpoint = tmp_path / "teacher.pt"
    torch.save(build_model(setting.teacher, 10, 3).state_dict(), checkpoint)
    for extra in ([], ["--teacher-checkpoint", str(checkpoint)]):
        results = tmp_path / "results" / "deeper"
        assert main(["run", "--methods", "kd", "--seeds", "1", "--setting", "synthetic/tiny",
                     "--results", str(results), "--dry-run", *extra]) == 0
        assert "would run" in capsys.readouterr().out
        assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_records_follow_the_umask(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        path = Store(tmp_path).write({"id": "a", "status": "done", "spec": {}})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_table_to_stdout_warns_about_an_unreadable_record(results_with_teacher, capsys):
    results = str(results_with_teacher)
    assert main([*VANILLA_RUN, "--results", results, "--no-table"]) == 0
    bad = Store(results_with_teacher).runs_dir / "truncated.json"
    bad.write_text('{"id": "trunc')
    capsys.readouterr()
    assert main(["table", "--results", results]) == 0
    captured = capsys.readouterr()
    assert "Student" in captured.out and str(bad) in captured.err
