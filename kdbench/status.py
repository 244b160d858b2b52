"""``kdbench status``: done / failed / running / missing runs per setting and method.

With ``--methods`` (and the same grid arguments as ``run``) it checks that grid, so missing
runs show; without, it summarises everything the results directory holds.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

from kdbench.grid import RunState, state_of
from kdbench.spec import TEACHER, RunSpec
from kdbench.store import Store

STATES = ("done", "failed", "running", "missing")


def stored_states(store: Store) -> list[RunState]:
    states = []
    for record in store.records():
        states.append(state_of(RunSpec.from_json(record["spec"]), store))
    return states


def print_status(args: argparse.Namespace) -> int:
    from kdbench.cli import grid_from_args
    from kdbench.errors import UserError

    store = Store(args.results)
    if args.methods or args.setting or args.seeds:
        grid, _ = grid_from_args(args, creating=False)
        states = [state_of(spec, store) for spec in grid.teachers() + grid.students()]
    else:
        if not store.runs_dir.is_dir():
            raise UserError(f"no results in {args.results} (no runs/ directory)")
        states = stored_states(store)
    table: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for state in states:
        row = "teacher" if state.spec.role == TEACHER else state.spec.method
        table[(state.spec.setting, row)][state.state] += 1
    width = max([len(setting) for setting, _ in table] + [7])
    print(f"{'setting':<{width}}  {'method':<10} " + " ".join(f"{s:>8}" for s in STATES))
    for (setting, row), counts in table.items():
        print(f"{setting:<{width}}  {row:<10} " + " ".join(f"{counts[s]:>8}" for s in STATES))
    failed = [state for state in states if state.state == "failed"]
    for state in failed:
        print(f"failed: {state.spec.label()} ({state.spec.id}): {state.error}")
    for path in store.corrupt_files():
        print(f"unreadable record (will be redone): {path}")
    return 0
