"""ReviewKD, OFD and CRG trained end to end by the engine: two epochs of synthetic/tiny (its
recipe's length) after its real teacher, on a 256-image class-balanced subset of the training
set (the teacher unchanged) so that CRG's per-sample eigendecompositions stay within seconds."""

from __future__ import annotations

import math

import pytest

from kdbench.spec import RunSpec
from kdbench.store import Store
from kdbench.train import train

from tiny_subset import subset_of_tiny

SETTING = "synthetic/tiny"
SUBSET = 256


@pytest.fixture
def small_tiny(monkeypatch, results_with_teacher):
    return subset_of_tiny(monkeypatch, results_with_teacher, SUBSET)


@pytest.mark.parametrize("method, terms", [
    ("reviewkd", {"ce", "review"}),
    ("ofd", {"ce", "ofd"}),
    ("crg", {"ce", "vertex", "edge", "spectral"}),
])
def test_two_epochs_after_the_teacher(small_tiny, results_with_teacher, method: str, terms: set[str]) -> None:
    record = train(RunSpec(SETTING, method, 0, **small_tiny), Store(results_with_teacher))
    assert record["status"] == "done", record.get("error")
    main = [entry for entry in record["history"] if entry["stage"] == "main"]
    assert [entry["epoch"] for entry in main] == [1, 2]
    for entry in main:
        assert set(entry["terms"]) == terms
        assert all(math.isfinite(value) and value >= 0 for value in entry["terms"].values())
    # The transfer terms are not constant: the student (and the method's modules) learn them.
    transfer = sorted(terms - {"ce"})
    assert any(main[1]["terms"][key] != main[0]["terms"][key] for key in transfer)
    assert record["provenance"]["method_source_sha256"]
