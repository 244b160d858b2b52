"""A shorter synthetic/tiny for tests that want short epochs. A module of its own, not in
conftest.py: `from conftest import ...` finds whichever conftest was imported first, and
tests/benchmarks has one too."""


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
