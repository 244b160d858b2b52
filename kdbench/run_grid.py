"""``kdbench run``: a resolved plan's grid trained — what the store has is skipped, stored
results made by other code are the user's choice, teachers go first, the rest goes to the
plan's executor, and the grid's table is printed at the end.

The plan (kdbench.plan) has checked the arguments; what can still stop a run here comes from
what is stored (results made by other code) or from the files themselves (a teacher
checkpoint that does not load, a results directory the disk refuses).
"""

from __future__ import annotations

import sys

from kdbench.errors import UserError
from kdbench.plan import Launch, Plan


def run_plan(plan: Plan) -> int:
    """Train the plan's grid. Returns the exit code: 0, or 1 when a run failed."""
    from kdbench.grid import retrained_teacher_notes, state_of
    from kdbench.store import Store

    launch = plan.launch
    grid = plan.grid
    if not launch.dry_run:
        from kdbench.writable import check_results_dir

        check_results_dir(plan.results)
        if plan.teacher_checkpoint is not None:
            from kdbench.teachers import register_checkpoint

            # The checksum it returns is the one the plan's run ids carry (kdbench.plan).
            register_checkpoint(plan.teacher_checkpoint, plan.settings[0], Store(plan.results),
                                grid.teacher_seed, launch.options.data_dir)
    store = Store(plan.results)
    for path, reason in store.corrupt_records():
        print(f"kdbench: warning: skipped {reason}", file=sys.stderr)
    students = grid.students()
    # Teachers are trained (or a given checkpoint evaluated) even when only the baseline runs:
    # the teacher row belongs in every table.
    teachers = grid.teachers()
    teacher_states = [state_of(spec, store) for spec in teachers]
    todo_teachers = [state.spec for state in teacher_states if state.state != "done"]
    student_states = [state_of(spec, store) for spec in students]
    retrain = check_stale(launch, student_states, store)
    todo_students = [state.spec for state in student_states
                     if state.state != "done" or state.spec.id in retrain]
    stored = len(students) - len(todo_students)
    total = len(students)
    variants = grid.variant_count()
    of_methods = (f"{len(grid.methods)} methods" if variants == len(grid.methods)
                  else f"{variants} variants of {len(grid.methods)} methods")
    print(f"kdbench: {total} student runs ({of_methods} × {len(grid.seeds)} seeds × "
          f"{len(grid.settings)} setting{'s' if len(grid.settings) > 1 else ''}); "
          f"{stored} already stored, {len(todo_students)} to train"
          + (f", plus {len(todo_teachers)} teacher{'s' if len(todo_teachers) > 1 else ''}" if todo_teachers else "")
          + f"; results in {plan.results}/", flush=True)
    for state in teacher_states:
        if state.state == "missing" and state.error:  # e.g. its weights file went missing
            print(f"kdbench: {state.spec.label()}: {state.error}", flush=True)
    for line in retrained_teacher_notes(teacher_states, student_states, store):
        print(f"kdbench: note: {line}", flush=True)
    failed = []
    submitted = []
    if not todo_students and not todo_teachers:
        print("kdbench: nothing to train: every result is stored", flush=True)
    elif launch.dry_run:
        for spec in todo_teachers + todo_students:
            print(f"  would run {spec.label()} ({spec.id})")
        for line in launch.missing_data:
            print(f"kdbench: note: a real run would stop here: {line}", file=sys.stderr)
        return 0
    else:
        results = launch_grid(plan, todo_teachers, todo_students)
        # "submitted": queued on SLURM with --no-wait; not a failure, not a result yet.
        submitted = [result for result in results if result.status == "submitted"]
        failed = [result for result in results if result.status not in ("done", "submitted")]
        if submitted:
            flags = f"--results {plan.results}"
            print(f"kdbench: {len(submitted)} run{'s' if len(submitted) > 1 else ''} submitted to SLURM; "
                  f"follow with `python -m kdbench status {flags}`, tabulate what has finished with "
                  f"`python -m kdbench table {flags}`", flush=True)
        if failed:
            print(f"kdbench: {len(failed)} run{'s' if len(failed) > 1 else ''} failed "
                  "(`kdbench status` shows them with their errors; re-running retries them):",
                  file=sys.stderr)
            for result in failed:
                print(f"  {result.spec.label()} ({result.spec.id}): {result.error}", file=sys.stderr)
    if launch.table and not submitted:
        print()
        try:
            print_grid_table(grid, store, plan.select_on)
        except UserError as error:  # e.g. every run failed: nothing to tabulate
            print(f"kdbench: no table: {error}", file=sys.stderr)
    return 1 if failed else 0


def check_stale(launch: Launch, states: list, store) -> set[str]:
    """Stored results made by other code than the installed, or distilled from other teacher
    weights than the stored teacher's (kdbench/staleness.py): one line per method and reason,
    and the user's choice. Returns the ids to retrain.

    Without --retrain-stale or --keep-stale it stops before anything is trained or written
    (exit 2): a re-run would otherwise either mix two versions in one table or discard
    results that took hours, and only the user knows which is meant. --retrain-stale moves
    the old records to runs/stale/ (never deleted) before the runs are redone."""
    from kdbench.grid import stale_lines, stale_runs

    stale = stale_runs(states, store)
    if not stale:
        return set()
    choice = {"ask": "--retrain-stale retrains them, --keep-stale keeps them",
              "retrain": "retraining them (--retrain-stale)", "keep": "kept (--keep-stale)"}[launch.stale]
    for line in stale_lines(stale, store):
        print(f"kdbench: {line}; {choice}", file=sys.stderr, flush=True)
    count = sum(len(runs) for runs in stale.values())
    if launch.stale == "ask":
        raise UserError(f"{count} stored result{'s were' if count != 1 else ' was'} made by other code "
                        "than the installed or from another teacher (above): choose --retrain-stale or --keep-stale; nothing was run")
    if launch.stale == "keep":
        return set()
    ids = {state.spec.id for runs in stale.values() for state in runs}
    if not launch.dry_run:
        for run_id in sorted(ids):
            store.set_aside(run_id)
        print(f"kdbench: {count} stale record{'s' if count != 1 else ''} moved to {store.stale_dir}/",
              file=sys.stderr, flush=True)
    return ids


def print_grid_table(grid, store, select_on: str | None = None) -> None:
    """The table of this grid's runs alone: the results directory may hold other experiments
    (other epochs, precisions, configs) that `kdbench table` would have to be told apart."""
    from kdbench.aggregate import summarize
    from kdbench.store import CorruptRecord
    from kdbench.tables import Layout, render_markdown

    records = []
    for spec in grid.teachers() + grid.students():
        try:
            record = store.read(spec.id)
        except CorruptRecord:
            continue  # named at the start of the command
        if record is not None:
            records.append(record)
    if not records:
        raise UserError("no run of this grid is stored")
    summary = summarize(records, settings=list(grid.settings), methods=list(grid.methods),
                        precision=grid.precision, select_on=select_on)
    sys.stdout.write(render_markdown(summary, Layout()))
    sys.stdout.flush()


def launch_grid(plan: Plan, teachers, students) -> list:
    """The runs to train, on the plan's executor, with the progress display."""
    from kdbench.launch import make_executor, student_groups
    from kdbench.progress import ProgressDisplay, start_estimate
    from kdbench.store import Store

    launch = plan.launch
    jobs = launch.jobs
    # Epoch times measured by the runs this directory holds: the start estimate, and the
    # display's time left until this grid has measured its own.
    records = list(Store(plan.results).records()) if plan.results.is_dir() else []
    device = "cuda" if launch.on_gpu else "cpu"
    on_slurm = launch.executor == "slurm"
    # The local executor's groups (kdbench.launch.student_groups), for the time left.
    groups = (student_groups(list(students), launch.group, launch.group_size)
              if launch.executor == "local" else [])
    measured = start_estimate(teachers + students, records, jobs, device, groups) if not on_slurm else None
    if measured:
        print(measured, file=sys.stderr, flush=True)
    elif not launch.on_gpu and not on_slurm:
        from kdbench.estimate import cpu_cost_warning

        warning = cpu_cost_warning(teachers, students, list(plan.settings), jobs, launch.options.data_dir,
                                   launch.group, launch.group_size)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    display = ProgressDisplay(teachers + students, jobs=jobs, records=records, device=device,
                              groups=groups)
    executor = make_executor(launch.executor, jobs=jobs, display=display, preset=launch.slurm_preset,
                             preset_overrides=list(launch.slurm_overrides), wait=launch.wait,
                             snapshot=launch.snapshot, group=launch.group,
                             group_size=launch.group_size)
    try:
        return executor.run(teachers, students, plan.results, launch.options)
    finally:
        display.close()
