"""The training loop: determinism, exact resume, idempotence, failure isolation."""

import json
import math

import pytest

from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.train import TrainOptions, train
from kdbench.worker import run_job


class Interrupt(BaseException):
    """Escapes the worker's error handling, like a kill between two epochs."""


def student(method="kd", seed=0, **overrides):
    return RunSpec("synthetic/tiny", method, seed, overrides=overrides)


def test_same_seed_same_history_on_cpu(results_with_teacher, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(results_with_teacher, other)
    spec = student(epochs=2)
    a = train(spec, Store(results_with_teacher))
    b = train(spec, Store(other))
    assert [e["loss"] for e in a["history"]] == [e["loss"] for e in b["history"]]
    assert a["metrics"] == b["metrics"]
    c = train(student(seed=1, epochs=2), Store(other))
    assert [e["loss"] for e in c["history"]] != [e["loss"] for e in a["history"]]


def test_interrupted_run_resumes_to_the_identical_history(results_with_teacher, tmp_path):
    import shutil

    fresh = tmp_path / "fresh"
    shutil.copytree(results_with_teacher, fresh)
    spec = student(epochs=3)
    uninterrupted = train(spec, Store(fresh))

    def stop_after_first_epoch(event):
        if event["event"] == "epoch" and event["epoch"] == 1:
            raise Interrupt

    store = Store(results_with_teacher)
    with pytest.raises(Interrupt):
        run_job(spec.to_json(), str(results_with_teacher), on_progress=stop_after_first_epoch)
    assert store.checkpoint_path(spec.id).exists() and store.read(spec.id) is None
    epochs_trained = []
    outcome = run_job(spec.to_json(), str(results_with_teacher),
                      on_progress=lambda e: e["event"] == "epoch" and epochs_trained.append(e["epoch"]))
    assert outcome["status"] == "done"
    assert epochs_trained == [2, 3]  # resumed, not restarted
    resumed = store.read(spec.id)
    assert json.dumps(resumed["history"][0]) != ""  # history carries over from the checkpoint
    strip = lambda history: [{k: v for k, v in e.items() if k != "seconds"} for e in history]
    assert strip(resumed["history"]) == strip(uninterrupted["history"])
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert not store.checkpoint_path(spec.id).exists()  # removed once the record is stored


def test_a_stored_run_is_not_trained_again(results_with_teacher):
    spec = student(method="vanilla")
    assert run_job(spec.to_json(), str(results_with_teacher))["status"] == "done"
    path = Store(results_with_teacher).record_path(spec.id)
    before = path.stat().st_mtime_ns
    again = run_job(spec.to_json(), str(results_with_teacher))
    assert again.get("skipped") and path.stat().st_mtime_ns == before


def test_non_finite_loss_is_a_failed_record_naming_the_step(results_with_teacher):
    spec = student(method="vanilla", lr=1e30)
    outcome = run_job(spec.to_json(), str(results_with_teacher))
    assert outcome["status"] == "failed"
    record = Store(results_with_teacher).read(spec.id)
    assert record["status"] == "failed"
    assert record["error"]["type"] == "NonFiniteLoss"
    assert "step" in record["error"]["message"] and "Traceback" in record["error"]["traceback"]


def test_record_has_metrics_history_and_provenance(results_with_teacher):
    spec = student(epochs=2)
    record = train(spec, Store(results_with_teacher))
    assert record["id"] == spec.id and record["status"] == "done"
    main = [e for e in record["history"] if e["stage"] == "main"]
    assert [e["epoch"] for e in main] == [1, 2]
    assert record["metrics"]["top1_last"] == main[-1]["top1"]
    assert record["metrics"]["top1_best"] == max(e["top1"] for e in main)
    assert 0 <= record["metrics"]["top1_last"] <= record["metrics"]["top5_last"] <= 100
    assert set(main[0]["terms"]) == {"ce", "kd"}
    provenance = record["provenance"]
    assert provenance["precision"] == "fp32" and provenance["device"].startswith("cpu")
    assert len(provenance["method_source_sha256"]) == 64
    # The method's metadata and the code that made the record, computed independently here.
    from importlib.metadata import version
    from pathlib import Path

    import kdbench.methods.kd
    from kdbench.store import sha256_file
    from kdbench.train import TRAINING_VERSION

    assert record["method_display_name"] == "KD"
    assert provenance["fidelity"] == "paper" and provenance["fidelity_note"] == kdbench.methods.kd.KD.fidelity_note
    assert provenance["method_distribution"] == "kdbench"
    assert provenance["method_distribution_version"] == version("kdbench")
    assert provenance["training_version"] == TRAINING_VERSION
    kd_file = sha256_file(Path(kdbench.methods.kd.__file__))
    assert provenance["method_source_files"] == {"methods/kd.py": kd_file}
    assert provenance["method_source_sha256"] == kd_file  # one file: its own hash, as before
    assert record["setting"]["recipe"]["epochs"] == 2
    assert record["images_per_second"] > 0 and math.isfinite(record["wall_seconds"])
