"""``kdbench status`` lists its rows and runs in a stable, meaningful order: by setting, teacher
first, then the baseline and the methods in the order given (else the registry's), then by
precision and seed — not in the order the store's files (named by run id) happen to come."""

from __future__ import annotations

from kdbench.cli import main
from kdbench.spec import TEACHER, RunSpec
from kdbench.store import Store

TINY, QUICK = "synthetic/tiny", "fashion_mnist/quick"  # the built-in settings' order: quick first


def failed(spec: RunSpec) -> dict:
    return {"id": spec.id, "status": "failed", "spec": spec.to_json(),
            "error": {"type": "RuntimeError", "message": f"{spec.method} {spec.seed} failed"}}


def store_failures(results, specs: list[RunSpec]) -> None:
    # Failed records: no metrics or weights to fake, and each gets its own listed line.
    store = Store(results)
    for spec in specs:
        store.write(failed(spec))


def status(results, capsys, *args: str) -> tuple[list[tuple[str, str]], list[str]]:
    capsys.readouterr()
    assert main(["status", "--results", str(results), *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [tuple(line.split()[:2]) for line in lines[1:] if not line.startswith(("failed:", "missing:"))]
    failures = [line.split(" (")[0].removeprefix("failed: ") for line in lines if line.startswith("failed:")]
    return rows, failures


def test_status_of_a_directory_orders_by_setting_teacher_baseline_registry_seed(tmp_path, capsys):
    results = tmp_path / "results"
    specs = [RunSpec(setting, method, seed) for setting in (TINY, QUICK)
             for method in ("rkd", "kd", "vanilla", "at") for seed in (2, 0, 1)]
    specs += [RunSpec(TINY, "vanilla", 0, role=TEACHER), RunSpec(QUICK, "vanilla", 0, role=TEACHER)]
    store_failures(results, specs)
    stored = [spec.label() for spec in (RunSpec.from_json(r["spec"]) for r in Store(results).records())]
    rows, failures = status(results, capsys)
    expected_rows = [(setting, row) for setting in (QUICK, TINY)
                     for row in ("teacher", "vanilla", "at", "kd", "rkd")]
    assert rows == expected_rows
    expected = [f"{setting} {row} seed {seed}" for setting, row in expected_rows
                for seed in ((0,) if row == "teacher" else (0, 1, 2))]
    assert failures == expected
    assert stored != expected  # the store's own order is another: the sorting is status's


def test_status_of_a_grid_keeps_the_methods_in_the_order_given(tmp_path, capsys):
    results = tmp_path / "results"
    store_failures(results, [RunSpec(TINY, method, seed) for method in ("kd", "rkd", "vanilla", "at")
                             for seed in (1, 0)])
    rows, failures = status(results, capsys, "--setting", TINY, "--methods", "rkd,at,kd", "--seeds", "2")
    # vanilla (the baseline every table needs) first, then the methods as the command names them
    assert rows == [(TINY, "teacher"), (TINY, "vanilla"), (TINY, "rkd"), (TINY, "at"), (TINY, "kd")]
    assert failures == [f"{TINY} {method} seed {seed}" for method in ("vanilla", "rkd", "at", "kd")
                        for seed in (0, 1)]
