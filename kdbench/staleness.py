"""Which stored results were made by which code: pure functions of records (no torch).

A result never outlives the code that made it silently (DESIGN.md). A record's *code version*
is the pair its provenance stores (kdbench/train.py):

- ``method_source_sha256``: one hash over the method's files (kdbench/sources.py);
- ``training_version``: the engine's version of what a run computes (``TRAINING_VERSION``).

Two records share a code version exactly when both are equal. A record without them (made
before they were recorded) has an unknown version: it shares none with a record that has
them, and is stale against every installed version — an unknown engine is not known to
compute what this one does.

``kdbench run`` compares stored records with the installed code (kdbench/grid.py) and
``kdbench table`` groups the records of a cell by version (``group_by_code_version``), so
that two versions are never pooled into one mean without saying so.

A distilled student's result also depends on its teacher's weights, which its run id does not
hold (the teacher's id names how it is trained, not the bits it ended with: a teacher retrained
on another machine or thread count can differ). A student's provenance stores
``teacher_weights_sha256``, the checksum of the weights it distilled from; a record whose
checksum is not the stored teacher's was distilled from another teacher
(``distilled_from_other_teacher``). A record without one (made before it was recorded, or a
method that uses no teacher) is not judged: nothing says which teacher it had.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

SHORT = 12  # hex digits of a hash shown in messages


@dataclass(frozen=True)
class CodeVersion:
    method_source_sha256: str | None  # None: not recorded
    training_version: int | None  # None: recorded before training_version existed

    def describe(self) -> str:
        sha = self.method_source_sha256
        code = f"sha256 {short(sha)}" if sha else "method code not recorded"
        engine = (f"training_version {self.training_version}" if self.training_version is not None
                  else "training_version not recorded")
        return f"{code}, {engine}"


def code_version(record: Mapping[str, Any]) -> CodeVersion:
    provenance = record.get("provenance") or {}
    return CodeVersion(provenance.get("method_source_sha256"), provenance.get("training_version"))


def group_by_code_version(records: Iterable[Mapping[str, Any]]) -> dict[CodeVersion, list[Mapping[str, Any]]]:
    """The records by code version, versions in the order they first appear. One key: every
    record was made by the same code; more: they must not be pooled silently."""
    groups: dict[CodeVersion, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(code_version(record), []).append(record)
    return groups


def is_stale(record: Mapping[str, Any], installed: CodeVersion) -> bool:
    """Whether ``record`` was made by other code than ``installed`` (unknown counts as other)."""
    return code_version(record) != installed


def stale_summary(method: str, stale: list[Mapping[str, Any]], installed: CodeVersion,
                  installed_files: Mapping[str, str]) -> str:
    """One line saying how ``stale`` records of ``method`` differ from the installed code, e.g.
    "kd: 5 stored results were made by another version of methods/kd.py (sha256 abc… vs
    def…)". ``installed_files``: label → sha256 of the installed method's files."""
    count = len(stale)
    reasons = []
    other_code = [r for r in stale if code_version(r).method_source_sha256 != installed.method_source_sha256]
    if other_code:
        old = sorted({code_version(r).method_source_sha256 or "" for r in other_code})
        reasons.append((len(other_code), f"another version of {changed_files(other_code, installed_files)} "
                        f"(sha256 {', '.join(short(sha) for sha in old)} vs "
                        f"{short(installed.method_source_sha256)})"))
    other_engine = [r for r in stale if code_version(r).training_version != installed.training_version]
    if other_engine:
        old = sorted({code_version(r).training_version for r in other_engine}, key=lambda v: (v is None, v))
        named = ", ".join("not recorded" if v is None else str(v) for v in old)
        reasons.append((len(other_engine), f"another engine (training_version {named} vs "
                        f"{installed.training_version})"))
    results = stored_results(count)
    if len(reasons) == 1:
        return f"{method}: {results} made by {reasons[0][1]}"
    detail = "; ".join(f"{n} by {reason}" for n, reason in reasons)
    return f"{method}: {results} made by other code ({detail})"


def changed_files(records: list[Mapping[str, Any]], installed_files: Mapping[str, str]) -> str:
    """The installed files that differ from what the records were made with, where the records
    say (``method_source_files``); all of the method's files where they do not."""
    changed: set[str] = set()
    for record in records:
        stored = (record.get("provenance") or {}).get("method_source_files")
        if not isinstance(stored, Mapping):
            changed |= set(installed_files)
            continue
        changed |= {label for label in set(stored) | set(installed_files)
                    if stored.get(label) != installed_files.get(label)}
    return " + ".join(sorted(changed or installed_files)) or "the method's code"


def stored_results(count: int) -> str:
    """How both summaries begin: "1 stored result was", "5 stored results were"."""
    return f"{count} stored result{'s' if count != 1 else ''} {'were' if count != 1 else 'was'}"


def short(sha: str | None) -> str:
    return f"{sha[:SHORT]}…" if sha else "not recorded"


def teacher_weights_of(record: Mapping[str, Any]) -> str | None:
    """The sha256 of the teacher weights a student record was distilled from (None: not
    recorded, or no teacher used)."""
    return (record.get("provenance") or {}).get("teacher_weights_sha256")


def distilled_from_other_teacher(record: Mapping[str, Any], stored_teacher: str | None) -> bool:
    """Whether ``record`` names other teacher weights than ``stored_teacher`` (the sha256 of
    the teacher now stored for it; None: no teacher stored, nothing to compare with)."""
    recorded = teacher_weights_of(record)
    return recorded is not None and stored_teacher is not None and recorded != stored_teacher


def other_teacher_summary(method: str, stale: list[Mapping[str, Any]], stored_teacher: str) -> str:
    """One line for the ``stale`` records of ``method`` that ``distilled_from_other_teacher``,
    e.g. "kd: 5 stored results were distilled from other teacher weights (sha256 abc…) than the
    stored teacher's (def…)"."""
    count = len(stale)
    old = sorted({teacher_weights_of(record) or "" for record in stale})
    results = stored_results(count)
    return (f"{method}: {results} distilled from other teacher weights (sha256 "
            f"{', '.join(short(sha) for sha in old)}) than the stored teacher's "
            f"({short(stored_teacher)}): the teacher was retrained or replaced after them")
