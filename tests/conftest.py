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


def subset_of_tiny(monkeypatch, results, subset: int) -> dict:
    """synthetic/tiny with a ``subset``-image training subset, for tests that want shorter
    epochs: the setting replaced in this process, and the session's teacher (trained on the
    whole set) registered in ``results`` as the subset setting's teacher, a shortcut only tests
    take (the setting's content is in every run id, the teacher's included). Returns the spec
    fields of the subset setting (``RunSpec(..., **fields)``)."""
    import dataclasses
    import json

    from kdbench import settings
    from kdbench.spec import TEACHER, RunSpec
    from kdbench.store import Store, write_atomically

    name = "synthetic/tiny"
    smaller = dataclasses.replace(settings.get(name), train_subset=subset)
    monkeypatch.setitem(settings.SETTINGS, name, smaller)
    fields = smaller.spec_fields()
    if results is not None:
        store = Store(results)
        old = RunSpec(name, "vanilla", 0, TEACHER)
        new = RunSpec(name, "vanilla", 0, TEACHER, **fields)
        if store.read(new.id) is None:
            weights = store.teacher_path(new.id)
            write_atomically(weights, store.teacher_path(old.id).read_bytes())
            record = json.loads(store.record_path(old.id).read_text())
            record.update(id=new.id, spec=new.to_json())
            record["teacher_weights"]["path"] = str(weights.relative_to(store.root))
            store.write(record)
    return fields
