"""The store: atomic JSON records, unreadable files reported and never fatal."""

import json

import pytest

from kdbench.spec import RunSpec
from kdbench.store import CorruptRecord, Store, load_records


def record(spec: RunSpec, status="done"):
    return {"id": spec.id, "status": status, "spec": spec.to_json(), "metrics": {"top1_last": 50.0}}


def test_write_read_round_trip(tmp_path):
    store = Store(tmp_path)
    spec = RunSpec("synthetic/tiny", "kd", 0)
    store.write(record(spec))
    assert store.read(spec.id)["metrics"]["top1_last"] == 50.0
    assert store.is_done(spec.id)
    assert [r["id"] for r in load_records(tmp_path)] == [spec.id]
    assert not list(store.runs_dir.glob(".*.tmp"))  # no temporary file left behind


def test_truncated_record_is_reported_skipped_and_redone(tmp_path):
    store = Store(tmp_path)
    good, bad = RunSpec("synthetic/tiny", "kd", 0), RunSpec("synthetic/tiny", "kd", 1)
    store.write(record(good))
    store.write(record(bad))
    path = store.record_path(bad.id)
    path.write_text(path.read_text()[:40])  # a half-written file from a crashed copy
    with pytest.raises(CorruptRecord, match=bad.id):
        store.read(bad.id)
    assert not store.is_done(bad.id)  # so the run is redone
    assert [r["id"] for r in store.records()] == [good.id]
    assert store.corrupt_files() == [path]


def test_spec_id_is_stable_and_changes_with_any_override():
    a = RunSpec("synthetic/tiny", "kd", 0, config={"temperature": 2.0})
    assert a.id == RunSpec.from_json(json.loads(json.dumps(a.to_json()))).id
    assert a.id != RunSpec("synthetic/tiny", "kd", 0, config={"temperature": 3.0}).id
    assert a.id != RunSpec("synthetic/tiny", "kd", 0, config={"temperature": 2.0},
                           overrides={"epochs": 1}).id
    assert a.teacher_spec().role == "teacher" and a.teacher_spec().seed == 0


def test_precision_is_part_of_the_id_and_fp32_ids_are_unchanged():
    """fp32 (the default) is left out of the JSON, so every id made before precision existed
    still finds its record; bf16 is another run, distilled from the same fp32 teacher."""
    import hashlib
    import json

    fp32 = RunSpec("synthetic/tiny", "kd", 0)
    legacy = {"setting": "synthetic/tiny", "method": "kd", "seed": 0, "role": "student", "config": {},
              "overrides": {}, "teacher_seed": 0, "teacher_checkpoint": None}
    canonical = json.dumps(legacy, sort_keys=True, separators=(",", ":"))
    assert fp32.to_json() == legacy
    assert fp32.id == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    bf16 = RunSpec("synthetic/tiny", "kd", 0, precision="bf16")
    assert bf16.id != fp32.id and RunSpec.from_json(bf16.to_json()) == bf16
    assert bf16.teacher_spec() == fp32.teacher_spec() and bf16.teacher_spec().precision == "fp32"
    assert "(bf16)" in bf16.label() and "bf16" not in fp32.label()
    with pytest.raises(ValueError, match="precision"):
        RunSpec("synthetic/tiny", "kd", 0, precision="fp16")


def test_a_record_whose_provenance_says_bf16_is_not_an_fp32_result(tmp_path):
    """Before precision entered the spec, a CUDA run was bf16 under an fp32-looking spec: the
    fp32 grid must train its own run, and tables must count that record as bf16."""
    from kdbench.grid import state_of
    from kdbench.spec import record_precision

    store = Store(tmp_path)
    spec = RunSpec("synthetic/tiny", "kd", 0)
    old_gpu_run = {**record(spec), "provenance": {"precision": "bf16", "device": "cuda:0"}}
    store.write(old_gpu_run)
    assert record_precision(old_gpu_run) == "bf16"
    state = state_of(spec, store)
    assert state.state == "missing" and "bf16" in state.error
    store.write({**record(spec), "provenance": {"precision": "fp32", "device": "cpu"}})
    assert state_of(spec, store).state == "done"
