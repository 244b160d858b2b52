"""``kdbench status``: done / failed / running / pending / missing runs per setting and method.

With ``--methods`` (and the same grid arguments as ``run``) it checks that grid, so missing
runs show; without, it summarises everything the results directory holds, runs submitted to
SLURM but not stored yet included.

The store says what has finished. For the runs it has no result of, the SLURM jobs that
``run --executor slurm`` recorded under ``<results>/slurm/jobs/`` are asked about with one
``sacct`` call: queued tasks are "pending", running ones "running", and a task that ended
without storing a record (time limit, scancel, out of memory, node failure) is "failed": its
record is written then, with SLURM's state and the log paths, so the error outlives sacct's
memory and shows in the next status too.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from kdbench.grid import RunState, stale_lines, stale_runs, state_of, with_baseline
from kdbench.spec import FP32, PRECISIONS, TEACHER, RunSpec
from kdbench.store import Store

if TYPE_CHECKING:
    from kdbench.plan import Plan

# "stale": stored and done, but made by other code than the installed, or distilled from other
# teacher weights than the stored teacher's (kdbench/staleness.py);
# `run` asks whether to retrain or keep them. "done" counts the others.
STATES = ("done", "stale", "failed", "running", "pending", "missing")
LISTED = 20  # at most this many running/pending runs are listed one per line


def stored_states(store: Store) -> list[RunState]:
    states = []
    for record in store.records():
        states.append(state_of(RunSpec.from_json(record["spec"]), store))
    return states


def error_line(state: RunState) -> str:
    """The run's error, with where SLURM kept its logs when it ran there."""
    error = (state.record or {}).get("error") or {}
    slurm = error.get("slurm") if isinstance(error, dict) else None
    line = state.error or ""
    if slurm:
        line += f" [SLURM job {slurm.get('job_id')} {slurm.get('state')}; log {slurm.get('stderr')}]"
    return line


def with_slurm(states: list[RunState], store: Store, results: Path) -> tuple[list[RunState], str | None]:
    """Runs not done in the store, updated from SLURM. Returns the states and a note when
    SLURM could not be asked."""
    if not (results / "slurm" / "jobs").is_dir():
        return states, None  # nothing was sent to SLURM from here
    from kdbench.slurm import phase_of, read_submissions, slurm_states, store_slurm_failure

    submissions = read_submissions(results)
    asked = [submissions[s.spec.id] for s in states if s.state != "done" and s.spec.id in submissions]
    if not asked:
        return states, None
    slurm = slurm_states([submission.job_id for submission in asked])
    if slurm is None:
        return states, (f"SLURM could not be asked (sacct): {len(asked)} submitted run"
                        f"{'s' if len(asked) > 1 else ''} shown from the store only")
    asked_ids = {submission.run_id for submission in asked}
    updated = []
    for state in states:
        submission = submissions.get(state.spec.id)
        if submission is None or submission.run_id not in asked_ids:
            updated.append(state)
            continue
        slurm_state = slurm[submission.job_id]
        phase = phase_of(slurm_state)
        where = f"SLURM job {submission.job_id} {slurm_state}"
        if phase in ("pending", "running"):
            # SLURM's live state wins over a failed record of an earlier attempt.
            updated.append(RunState(state.spec, phase, where))
            continue
        if submission.after and not store.is_done(state.spec.teacher_spec().id):
            # Its teacher failed, so SLURM never started it (afterok): nothing of its own to
            # record, as with the local executor; re-running retries teacher and students.
            updated.append(RunState(state.spec, "missing", f"its teacher (SLURM job {submission.after}) "
                                                          "did not succeed"))
            continue
        store_slurm_failure(store, submission, slurm_state)
        updated.append(state_of(state.spec, store))
    return updated, None


def grid_states(grid, store: Store, precision_given: bool) -> list[RunState]:
    """States of the grid's runs. Without --precision, `status` cannot know where `run` trained
    (a SLURM preset's GPUs, another machine's CUDA): it shows the grid at every precision the
    store or SLURM knows runs of, and at this machine's default when there are none."""
    def states_at(precision: str) -> list[RunState]:
        chosen = dataclasses.replace(grid, precision=precision)
        return [state_of(spec, store) for spec in chosen.teachers() + chosen.students()]

    if precision_given:
        return states_at(grid.precision)
    submitted: set[str] = set()
    if (store.root / "slurm" / "jobs").is_dir():
        from kdbench.slurm import read_submissions

        submitted = set(read_submissions(store.root))
    found = {precision: states_at(precision) for precision in PRECISIONS}
    known = [precision for precision, states in found.items()
             if any(state.state != "missing" or state.spec.id in submitted
                    for state in states if state.spec.role != TEACHER)]
    states: dict[str, RunState] = {}  # one teacher serves every precision: listed once
    for precision in known or [grid.precision]:
        states.update({state.spec.id: state for state in found[precision]})
    return list(states.values())


def listing_order(states: list[RunState], settings_order: Sequence[str] = (),
                  methods_order: Sequence[str] = ()) -> list[RunState]:
    """The states as `status` lists them, whatever order the store or SLURM gave: by setting
    (in the order given, then the built-in settings' order, then by name), teacher first, then
    by method (the baseline, then the order given, then the registry's, then by name), by
    precision (fp32 first) and by seed."""
    from kdbench import registry
    from kdbench.settings import SETTINGS

    settings_rank = {name: rank for rank, name in enumerate(dict.fromkeys([*settings_order, *SETTINGS]))}
    methods_rank = {name: rank for rank, name in
                    enumerate(dict.fromkeys(with_baseline([*methods_order, *registry.names()])))}

    def key(state: RunState) -> tuple:
        spec = state.spec
        method = (-1, "") if spec.role == TEACHER else (methods_rank.get(spec.method, len(methods_rank)), spec.method)
        precision = PRECISIONS.index(spec.precision) if spec.precision in PRECISIONS else len(PRECISIONS)
        return (settings_rank.get(spec.setting, len(settings_rank)), spec.setting, method, precision,
                spec.precision, spec.seed, spec.label(), spec.id)

    return sorted(states, key=key)


def print_status(plan: Plan) -> int:
    """The status of the plan's grid, or of everything its results directory holds when the
    plan has no grid (`status` without grid arguments)."""
    from kdbench.errors import UserError

    results = plan.results
    store = Store(results)
    if plan.grid is not None:
        states = grid_states(plan.grid, store, precision_given=plan.precision_given)
        order: tuple[Sequence[str], Sequence[str]] = (plan.grid.settings, plan.grid.methods)
    else:
        jobs_dir = results / "slurm" / "jobs"
        if not store.runs_dir.is_dir() and not jobs_dir.is_dir():
            raise UserError(f"no results in {results} (no runs/ directory, nothing submitted)")
        states = stored_states(store) if store.runs_dir.is_dir() else []
        known = {state.spec.id for state in states}
        order = ((), ())
        if jobs_dir.is_dir():
            from kdbench.slurm import read_submissions

            for submission in read_submissions(results).values():
                if submission.run_id not in known:
                    states.append(state_of(RunSpec.from_json(submission.spec), store))
    states, note = with_slurm(states, store, results)
    stale = stale_runs(states, store)
    stale_ids = {state.spec.id for runs in stale.values() for state in runs}
    states = [dataclasses.replace(state, state="stale") if state.spec.id in stale_ids else state
              for state in states]
    states = listing_order(states, *order)

    table: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for state in states:
        row = "teacher" if state.spec.role == TEACHER else state.spec.method
        if state.spec.precision != FP32:
            row += f" ({state.spec.precision})"
        table[(state.spec.setting, row)][state.state] += 1
    width = max([len(setting) for setting, _ in table] + [7])
    row_width = max([len(row) for _, row in table] + [10])
    print(f"{'setting':<{width}}  {'method':<{row_width}} " + " ".join(f"{s:>8}" for s in STATES))
    for (setting, row), counts in table.items():
        print(f"{setting:<{width}}  {row:<{row_width}} " + " ".join(f"{counts[s]:>8}" for s in STATES))
    for kind in ("running", "pending"):
        listed = [state for state in states if state.state == kind]
        for state in listed[:LISTED]:
            where = f" [{state.error}]" if state.error else ""
            print(f"{kind}: {state.spec.label()} ({state.spec.id}){where}")
        if len(listed) > LISTED:
            print(f"{kind}: ... and {len(listed) - LISTED} more")
    for state in states:
        if state.state == "failed":
            print(f"failed: {state.spec.label()} ({state.spec.id}): {error_line(state)}")
        elif state.state == "missing" and state.error:  # e.g. a teacher whose weights went missing
            print(f"missing: {state.spec.label()} ({state.spec.id}): {state.error}")
    for line in stale_lines(stale, store):
        print(f"stale: {line}; `kdbench run` retrains them with --retrain-stale, keeps them with --keep-stale")
    for path, reason in store.corrupt_records():
        if reason.startswith(f"{path}: not a readable"):
            print(f"unreadable record (will be redone): {path}")
        else:  # the message names the file
            print(f"skipped: {reason}")
    if note:
        print(f"note: {note}")
    return 0
