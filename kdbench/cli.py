"""The command line: ``python -m kdbench run | list | table | status``.

Argument checking happens here, before anything is written: a user's mistake is one clear
line and exit code 2, and results already stored are never touched by it.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from kdbench import settings
from kdbench.errors import UserError
from kdbench.sweep import value_list

EXIT_USAGE = 2
# Seeds go to numpy's legacy seeding (np.random.seed), which takes 0 to 2**32 - 1.
MAX_SEED = 2**32 - 1
# A grid larger than this is a typo (``--seeds 100000000000``), not an experiment: its run list
# alone would not fit in memory. Each run is minutes to hours of training.
MAX_GRID_RUNS = 100_000
MAX_LOADER_WORKERS = 64  # DataLoader processes per run: more is a typo, not a machine


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but its errors are our one-line errors (exit 2, no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def comma_list(text: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:  # --methods "" must not quietly mean the default
        raise argparse.ArgumentTypeError(f"empty list ({text!r})")
    return items


def seed_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seeds are whole numbers from 0 to {MAX_SEED}, got {value}")
    return value


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", type=comma_list, default=None,
                        help="comma-separated methods (see `kdbench list`); A+B adds B's loss "
                             "terms to A (e.g. crd+kd); the student alone (vanilla) is always "
                             "added as the baseline row")
    parser.add_argument("--seeds", type=positive_int, default=None,
                        help="number of seeds: 0, 1, ..., N-1 (default 5)")
    parser.add_argument("--seed-list", type=comma_list, default=None,
                        help="explicit seeds instead of --seeds, e.g. 3,7,11")
    parser.add_argument("--setting", type=comma_list, default=None,
                        help=f"setting names or patterns (default {settings.DEFAULT_SETTING}; "
                             f"offline: {settings.QUICK_SETTING})")
    parser.add_argument("--results", type=Path, default=Path("results"),
                        help="results directory (default ./results)")
    parser.add_argument("--epochs", type=value_list(positive_int),
                        help="override the recipe's epochs (students); a comma list sweeps them")
    parser.add_argument("--batch-size", type=value_list(positive_int),
                        help="override the recipe's batch size; a comma list sweeps it")
    parser.add_argument("--lr", type=value_list(float),
                        help="override the recipe's learning rate; a comma list (0.01,0.05) "
                             "sweeps it for every method, the Student included")
    parser.add_argument("--set", dest="assignments", action="append", default=[],
                        metavar="METHOD.FIELD=VALUE",
                        help="set a method config field (typed); a comma list of a scalar "
                             "field (kd.temperature=2,4) sweeps it: each value is a variant "
                             "with its own runs and row, lists multiply (cartesian product)")
    parser.add_argument("--select-on", choices=["val", "test"],
                        help="val: hold out 10%% of the training set (fixed per dataset), "
                             "train the students on the rest, and let the table report each "
                             "method's variant with the best mean validation accuracy (its "
                             "test accuracy); test: choose on the test set itself (optimistic, "
                             "so labelled), training on the full set")
    parser.add_argument("--teacher-seed", type=seed_number, default=0, metavar="SEED",
                        help="seed of the teacher every student distils from (default 0): each "
                             "teacher seed is trained once and is a different experiment, so its "
                             "student runs get their own ids and table rows")
    parser.add_argument("--teacher-checkpoint", type=Path,
                        help="use this teacher state_dict instead of training one: a file (a "
                             "torchvision or timm state_dict fits their networks), or "
                             "torchvision:<model> for torchvision's ImageNet weights where they "
                             "are in the torch hub cache (never downloaded)")
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        help="the networks' arithmetic: bf16 autocast (losses stay fp32) or fp32; "
                             "default bf16 where the runs get a GPU, fp32 on the CPU. Part of "
                             "each run's identity: bf16 and fp32 runs are never mixed")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="kdbench", description=(
        "Compare knowledge-distillation methods over seeds and write paper-ready tables."))
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    run = commands.add_parser("run", help="train a grid of methods × seeds (resumable)")
    add_grid_arguments(run)
    run.add_argument("--executor", choices=["local", "slurm", "inprocess"], default="local",
                     help="where runs happen (default local)")
    run.add_argument("--jobs", type=positive_int, default=None,
                     help="local executor: runs at once (default: 2 on a CPU with ≥2 cores, 1 on a GPU)")
    run.add_argument("--runs-per-gpu", type=positive_int, default=None, metavar="N",
                     help="runs in flight at once on one GPU (default 1), for students too small "
                          "to fill it alone; each run is its own process with its own seed and data "
                          "order, exactly as when run alone. Local executor on CUDA; with --executor "
                          "slurm, N runs per array task (a preset with a GPU per task)")
    run.add_argument("--no-group", action="store_true",
                     help="one run per process; by default the runs of one setting and seed train "
                          "together, one teacher forward per batch for all of them, with records "
                          "identical to runs trained alone (local and slurm executors)")
    run.add_argument("--group-size", type=positive_int, metavar="N",
                     help="at most N runs train together; a larger group goes in chunks of N. A "
                          "group's runs finish together, so smaller groups store records sooner "
                          "(for a machine lent a few hours at a time); records are the same")
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    run.add_argument("--compile", action="store_true", help="torch.compile the networks")
    run.add_argument("--loader-workers", type=int, metavar="N",
                     help="DataLoader worker processes of an ImageFolder dataset (default: one "
                          "per core, at most 8); its batches are the same for any N. In-memory "
                          "datasets use none")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic kernels on CUDA (no cuDNN autotuning): bit-identical "
                          "reruns on the same GPU, slower; the CPU is deterministic anyway")
    run.add_argument("--data-dir", type=Path, help="where datasets live (default ./data or $KDBENCH_DATA)")
    run.add_argument("--slurm", metavar="PRESET", default="default",
                     help="SLURM preset: a name in slurm/ (e.g. default, test) or a TOML path")
    run.add_argument("--slurm-set", dest="slurm_overrides", action="append", default=[],
                     metavar="FIELD=VALUE", help="override a SLURM preset field, e.g. partition=gpu")
    run.add_argument("--no-wait", action="store_true",
                     help="slurm: submit and return; `kdbench status` and `kdbench table` follow up")
    run.add_argument("--snapshot", action="store_true",
                     help="slurm: run jobs from a copy of the code, so edits while they queue "
                          "do not change what they run")
    run.add_argument("--no-table", action="store_true", help="do not print the table at the end")
    run.add_argument("--keep", choices=["last", "best"], default="last",
                     help="student weights kept in RESULTS/students/: last (default: the final "
                          "epoch's, for every run) or best (also the best test epoch's); not part "
                          "of the run id, and runs already stored are not retrained for it")
    run.add_argument("--tensorboard", action="store_true",
                     help="also log every epoch to RESULTS/tensorboard/<run id>/ (pip install "
                          "'kdbench[tensorboard]'); runs/<id>.csv is always written")
    stale = run.add_mutually_exclusive_group()
    stale.add_argument("--retrain-stale", action="store_true",
                       help="retrain stored results made by other code (another version of the "
                            "method's file or of the engine); their records move to runs/stale/")
    stale.add_argument("--keep-stale", action="store_true",
                       help="keep stored results made by other code as they are (tables mark them)")
    run.add_argument("--dry-run", action="store_true", help="show what would run, run nothing")

    commands.add_parser("list", help="methods (with their papers), settings and architectures")

    status = commands.add_parser("status", help="done / failed / running / missing runs of a grid")
    add_grid_arguments(status)

    table = commands.add_parser("table", help="mean ± std table from stored results")
    from kdbench.report import add_table_arguments

    add_table_arguments(table)
    return parser


# --- checking the grid ----------------------------------------------------------------------

def check_results_dir(results: Path) -> None:
    """Fail before training when results cannot be written, not after hours of it."""
    if results.exists() and not results.is_dir():
        raise UserError(f"results directory {results} is a file")
    try:
        results.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=results, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(f"results directory {results} is not writable: {error.strerror or error}") from None


def check_could_create(path: Path, what: str) -> None:
    """Fail when ``path`` (a directory or file to be made, parents included) could not be
    created, without creating anything: its nearest existing ancestor must be a writable
    directory (--dry-run, table --out)."""
    if path.is_dir():
        ancestor = path
    else:
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if path.exists() and not path.is_dir() and what.endswith("directory"):
            raise UserError(f"{what} {path} is a file")
    if not ancestor.is_dir():
        raise UserError(f"{what} {path} is not writable: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable: no permission to write in {ancestor}")


def check_device(args: argparse.Namespace) -> None:
    """--device names a device kdbench trains on, present here (on SLURM: on the nodes)."""
    if args.device is None:
        return
    import torch

    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {args.device}: not a device (cpu, cuda, cuda:1, mps)") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {args.device}: kdbench trains on cpu, cuda or mps")
    if args.executor == "slurm":
        return  # the nodes have the devices, not this machine
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {args.device}: no CUDA device here (torch.cuda.is_available() "
                            "is False); leave --device out to train on the CPU")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {args.device}: this machine has {count} CUDA "
                            f"device{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {args.device}: no MPS device here")


def check_batch_size(batch_sizes: Sequence[int] | None, chosen) -> None:
    """A batch larger than the training set is a mistake (and would not fit anyway)."""
    from kdbench.data import DATASET_SIZES

    if not batch_sizes:
        return
    batch_size = max(batch_sizes)
    for setting in chosen:
        images = min(DATASET_SIZES[setting.dataset][0], setting.train_subset or math.inf)
        if batch_size > images:
            raise UserError(f"--batch-size {batch_size} is larger than the {images} training "
                            f"images of {setting.name}")


def grid_from_args(args: argparse.Namespace, creating: bool):
    from kdbench import registry
    from kdbench.grid import Grid, with_baseline
    from kdbench.sweep import Sweep, config_axes, recipe_axes

    asked = args.methods if args.methods else ["kd"]
    twice = sorted({method for method in asked if asked.count(method) > 1})
    if twice:
        raise UserError(f"--methods: {', '.join(twice)} is listed twice")
    methods = with_baseline(asked)
    for method in methods:
        registry.get(method)  # unknown or broken (import fails): one line, exit 2
    if args.seed_list:
        try:
            seeds = [int(seed) for seed in args.seed_list]
        except ValueError:
            raise UserError(f"--seed-list: expected whole numbers, got {','.join(args.seed_list)}") from None
        wrong = [seed for seed in seeds if not 0 <= seed <= MAX_SEED]
        if wrong:
            raise UserError(f"--seed-list: seeds are whole numbers from 0 to {MAX_SEED}, got {wrong[0]}")
        if len(set(seeds)) != len(seeds):
            raise UserError("--seed-list: a seed is listed twice")
    chosen = settings.expand(args.setting or [settings.DEFAULT_SETTING])
    n_seeds = len(seeds) if args.seed_list else (args.seeds or 5)
    sweep = Sweep(tuple(config_axes(args.assignments, methods) + recipe_axes(
        {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr})))
    variants = sum(sweep.count(method) for method in methods)
    runs = n_seeds * variants * len(chosen)
    if runs > MAX_GRID_RUNS:
        what = f"--seeds {n_seeds}" if variants == len(methods) else f"{variants:,} variants × {n_seeds} seeds"
        raise UserError(f"{what}: that grid has {runs:,} runs, more than kdbench takes "
                        f"in one command ({MAX_GRID_RUNS:,})")
    if not args.seed_list:
        seeds = list(range(n_seeds))
    check_batch_size(args.batch_size, chosen)
    checksum = None
    if args.teacher_checkpoint is not None:
        from kdbench.store import Store
        from kdbench.teachers import register_checkpoint, resolve_checkpoint

        if len(chosen) != 1:
            raise UserError("--teacher-checkpoint needs exactly one --setting")
        checkpoint = resolve_checkpoint(args.teacher_checkpoint, chosen[0])
        if checkpoint.is_dir():
            raise UserError(f"teacher checkpoint {checkpoint} is a directory, not a "
                            "state_dict file")
        if not checkpoint.is_file():
            raise UserError(f"teacher checkpoint {checkpoint} does not exist")
        if creating:
            check_results_dir(args.results)
            checksum = register_checkpoint(checkpoint, chosen[0], Store(args.results),
                                           args.teacher_seed, getattr(args, "data_dir", None))
        else:
            from kdbench.store import sha256_file

            checksum = sha256_file(checkpoint)
    return Grid(tuple(s.name for s in chosen), tuple(methods), tuple(seeds), sweep,
                args.teacher_seed, checksum, resolve_precision(args), held_out_of(args),
                {s.name: s.spec_fields() for s in chosen}), chosen


def held_out_of(args: argparse.Namespace) -> float | None:
    """--select-on val holds out the validation split (kdbench/validation.py); --select-on
    test and no --select-on train on the full training set."""
    from kdbench.validation import VALIDATION_FRACTION

    return VALIDATION_FRACTION if getattr(args, "select_on", None) == "val" else None


def resolve_precision(args: argparse.Namespace) -> str:
    """--precision; else bf16 where the runs get a GPU (CUDA here, or a SLURM preset that gives
    each task one: the GPU is on the nodes), else fp32."""
    from kdbench.spec import BF16, FP32

    return args.precision or (BF16 if runs_get_gpu(args) else FP32)


def runs_get_gpu(args: argparse.Namespace) -> bool:
    """Whether the runs will train on a GPU: on SLURM the preset says (the GPU is on the
    nodes, not here); otherwise --device, or this machine's CUDA."""
    if getattr(args, "executor", None) == "slurm":
        from kdbench.slurm_presets import resolve_preset

        return resolve_preset(args.slurm, slurm_overrides(args)).gpus_per_task >= 1
    return runs_on_gpu(args)


# --- commands ---------------------------------------------------------------------------------

def command_run(args: argparse.Namespace) -> int:
    from kdbench import data
    from kdbench.grid import state_of
    from kdbench.store import Store

    grid, chosen = grid_from_args(args, creating=False)
    check_runs_per_gpu(args)
    check_device(args)
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise UserError(f"--data-dir {args.data_dir} does not exist")
    if args.loader_workers is not None and not 0 <= args.loader_workers <= MAX_LOADER_WORKERS:
        raise UserError(f"--loader-workers: from 0 (load in the training process) to "
                        f"{MAX_LOADER_WORKERS}, got {args.loader_workers}")
    missing_data = []
    for setting in chosen:
        try:
            data.require_data(setting.dataset, setting.dataset_options, args.data_dir)
        except UserError as error:
            if not args.dry_run:
                raise
            missing_data.append(str(error))  # a dry run plans the grid all the same
    if args.tensorboard:
        from kdbench.logs import require_tensorboard

        require_tensorboard()
    if args.dry_run:
        check_could_create(args.results, "results directory")  # and create nothing
    else:
        check_results_dir(args.results)
        if args.teacher_checkpoint is not None:
            grid, chosen = grid_from_args(args, creating=True)
    store = Store(args.results)
    for path, reason in store.corrupt_records():
        print(f"kdbench: warning: skipped {reason}", file=sys.stderr)
    students = grid.students()
    # Teachers are trained (or a given checkpoint evaluated) even when only the baseline runs:
    # the teacher row belongs in every table.
    teachers = grid.teachers()
    teacher_states = [state_of(spec, store) for spec in teachers]
    todo_teachers = [state.spec for state in teacher_states if state.state != "done"]
    student_states = [state_of(spec, store) for spec in students]
    retrain = check_stale(args, student_states, store)
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
          + f"; results in {args.results}/", flush=True)
    for state in teacher_states:
        if state.state == "missing" and state.error:  # e.g. its weights file went missing
            print(f"kdbench: {state.spec.label()}: {state.error}", flush=True)
    failed = []
    submitted = []
    if not todo_students and not todo_teachers:
        print("kdbench: nothing to train: every result is stored", flush=True)
    elif args.dry_run:
        for spec in todo_teachers + todo_students:
            print(f"  would run {spec.label()} ({spec.id})")
        for line in missing_data:
            print(f"kdbench: note: a real run would stop here: {line}", file=sys.stderr)
        return 0
    else:
        results = launch_grid(args, todo_teachers, todo_students, chosen)
        # "submitted": queued on SLURM with --no-wait; not a failure, not a result yet.
        submitted = [result for result in results if result.status == "submitted"]
        failed = [result for result in results if result.status not in ("done", "submitted")]
        if submitted:
            flags = f"--results {args.results}"
            print(f"kdbench: {len(submitted)} run{'s' if len(submitted) > 1 else ''} submitted to SLURM; "
                  f"follow with `python -m kdbench status {flags}`, tabulate what has finished with "
                  f"`python -m kdbench table {flags}`", flush=True)
        if failed:
            print(f"kdbench: {len(failed)} run{'s' if len(failed) > 1 else ''} failed "
                  "(`kdbench status` shows them with their errors; re-running retries them):",
                  file=sys.stderr)
            for result in failed:
                print(f"  {result.spec.label()} ({result.spec.id}): {result.error}", file=sys.stderr)
    if not args.no_table and not submitted:
        print()
        try:
            print_grid_table(grid, store, args.select_on)
        except UserError as error:  # e.g. every run failed: nothing to tabulate
            print(f"kdbench: no table: {error}", file=sys.stderr)
    return 1 if failed else 0


def check_stale(args: argparse.Namespace, states: list, store) -> set[str]:
    """Stored results made by other code than the installed (kdbench/staleness.py): one line
    per method, and the user's choice. Returns the ids to retrain.

    Without --retrain-stale or --keep-stale it stops before anything is trained or written
    (exit 2): a re-run would otherwise either mix two versions in one table or discard
    results that took hours, and only the user knows which is meant. --retrain-stale moves
    the old records to runs/stale/ (never deleted) before the runs are redone."""
    from kdbench.grid import stale_lines, stale_runs

    stale = stale_runs(states)
    if not stale:
        return set()
    choice = ("--retrain-stale retrains them, --keep-stale keeps them" if not (args.retrain_stale or args.keep_stale)
              else "retraining them (--retrain-stale)" if args.retrain_stale else "kept (--keep-stale)")
    for line in stale_lines(stale):
        print(f"kdbench: {line}; {choice}", file=sys.stderr, flush=True)
    count = sum(len(runs) for runs in stale.values())
    if not (args.retrain_stale or args.keep_stale):
        raise UserError(f"{count} stored result{'s were' if count != 1 else ' was'} made by other code "
                        "than the installed (above): choose --retrain-stale or --keep-stale; nothing was run")
    if args.keep_stale:
        return set()
    ids = {state.spec.id for runs in stale.values() for state in runs}
    if not args.dry_run:
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


def runs_on_gpu(args: argparse.Namespace) -> bool:
    import torch

    device = getattr(args, "device", None)  # `status` has no --device: this machine's default
    return (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")


def check_runs_per_gpu(args: argparse.Namespace) -> None:
    """--runs-per-gpu is the local executor's runs at once (--jobs) when the runs use a GPU,
    and the SLURM preset's runs_per_task when its tasks get a GPU each."""
    if args.runs_per_gpu is None:
        return
    if args.executor not in ("local", "slurm"):
        raise UserError(f"--runs-per-gpu applies to the local and slurm executors, not --executor {args.executor}")
    if args.jobs is not None:
        raise UserError("--runs-per-gpu and --jobs both set how many runs go at once: give one")
    if args.executor == "slurm":
        from kdbench.slurm_presets import resolve_preset

        if any(override.partition("=")[0].strip() == "runs_per_task" for override in args.slurm_overrides):
            raise UserError("--runs-per-gpu and --slurm-set runs_per_task both set the runs of one "
                            "SLURM task: give one")
        # The GPU is on the nodes, not here: the preset says whether the tasks get one.
        preset = resolve_preset(args.slurm, args.slurm_overrides)
        if preset.gpus_per_task < 1:
            raise UserError(f"--runs-per-gpu with --executor slurm needs a preset that gives each task "
                            f"a GPU, but {preset.source} has gpus_per_task = {preset.gpus_per_task}; "
                            f"to share a CPU task, use --slurm-set runs_per_task={args.runs_per_gpu}")
        return
    if not runs_on_gpu(args):
        raise UserError("--runs-per-gpu needs a CUDA device (these runs use the CPU); "
                        "on the CPU, --jobs sets the runs at once")


def slurm_overrides(args: argparse.Namespace) -> list[str]:
    """--slurm-set, plus runs_per_task from --runs-per-gpu (checked by check_runs_per_gpu)."""
    if args.executor == "slurm" and args.runs_per_gpu is not None:
        return [*args.slurm_overrides, f"runs_per_task={args.runs_per_gpu}"]
    return list(args.slurm_overrides)


def launch_grid(args: argparse.Namespace, teachers, students, chosen) -> list:
    from kdbench.launch import make_executor, usable_cores
    from kdbench.progress import ProgressDisplay
    from kdbench.train import TrainOptions

    on_gpu = runs_on_gpu(args)
    cores = usable_cores()
    # Several runs in flight share one GPU when one small run cannot fill it; each is its own
    # process with its own RunSpec seed and data order, so sharing changes no run's batches.
    jobs = args.runs_per_gpu or args.jobs or (1 if on_gpu else min(2, cores))
    options = TrainOptions(device=args.device, compile=args.compile, data_dir=args.data_dir,
                           deterministic=args.deterministic, keep=args.keep,
                           tensorboard=args.tensorboard, loader_workers=args.loader_workers)
    from kdbench.progress import start_estimate
    from kdbench.store import Store

    # Epoch times measured by the runs this directory holds: the start estimate, and the
    # display's time left until this grid has measured its own.
    records = list(Store(Path(args.results)).records()) if Path(args.results).is_dir() else []
    device = "cuda" if on_gpu else "cpu"
    measured = start_estimate(teachers + students, records, jobs, device) if args.executor != "slurm" else None
    if measured:
        print(measured, file=sys.stderr, flush=True)
    elif not on_gpu and args.executor != "slurm":
        from kdbench.estimate import cpu_cost_warning

        warning = cpu_cost_warning(teachers, students, chosen, jobs, args.data_dir,
                                   not args.no_group, args.group_size)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    display = ProgressDisplay(teachers + students, jobs=jobs, records=records, device=device)
    executor = make_executor(args.executor, jobs=jobs, display=display, preset=args.slurm,
                             preset_overrides=slurm_overrides(args), wait=not args.no_wait,
                             snapshot=args.snapshot, group=not args.no_group,
                             group_size=args.group_size)
    try:
        return executor.run(teachers, students, args.results, options)
    finally:
        display.close()


def command_list(args: argparse.Namespace) -> int:
    from kdbench import registry

    print("Methods (kdbench.methods entry points):")
    for name in registry.names():
        method = registry.describe(name)
        print(f"  {method.name:<10} {f'BROKEN: {method.error}' if method.error else method.paper}")
        if method.error is None:
            print(f"  {'':<10} row \"{method.display_name or method.name}\" · fidelity: "
                  f"{method.fidelity or 'not declared'}"
                  + (f" · {method.fidelity_note}" if method.fidelity_note else ""))
        print(f"  {'':<10} [{method.origin}]")
    print("  A+B        any method with another's loss terms added (RepDistiller's -a), e.g. crd+kd;\n"
          f"  {'':<10} set a part's field with --set crd+kd.kd.alpha=0.9 (kdbench/composition.py)")
    print("\nSettings:")
    for setting in settings.SETTINGS.values():
        default = "  (default)" if setting.name == settings.DEFAULT_SETTING else ""
        print(f"  {setting.name:<36} {setting.description}{default}")
    print("\nArchitectures:", ", ".join(listed_architectures()))
    return 0


def listed_architectures() -> list[str]:
    """The zoo's named architectures, then every other one a setting uses (e.g. wrn_10_2 of
    synthetic/tiny, wrn_22_4 of the MHGD pair), in the order the settings name them."""
    from kdbench.models import KNOWN_ARCHITECTURES

    named = dict.fromkeys(KNOWN_ARCHITECTURES)
    for setting in settings.SETTINGS.values():
        named.update(dict.fromkeys([setting.teacher, setting.student]))
    return list(named)


def command_status(args: argparse.Namespace) -> int:
    from kdbench.status import print_status

    return print_status(args)


COMMANDS = {"run": command_run, "list": command_list, "status": command_status}


def main(argv: Sequence[str] | None = None) -> int:
    from kdbench.console import ascii_where_needed
    from kdbench.interrupt import exit_code, signals_interrupt

    ascii_where_needed()
    command = None
    try:
        # Ctrl-C and SIGTERM raise kdbench.interrupt.Interrupted (a KeyboardInterrupt): the local
        # executor stops its workers on the way out.
        with signals_interrupt():
            args = build_parser().parse_args(argv)
            command = args.command
            if args.command == "table":
                from kdbench.report import table_command

                if args.out:
                    check_could_create(Path(args.out), "table --out")
                return table_command(args, ["kdbench", *argv] if argv is not None else None)
            return COMMANDS[args.command](args)
    except UserError as error:
        print(f"kdbench: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as interrupt:
        how = f" ({interrupt.args[0]})" if interrupt.args else ""
        if command == "run":
            again = shlex.join(sys.argv[1:] if argv is None else list(argv))
            print(f"kdbench: interrupted{how}; every finished epoch is checkpointed: resume with "
                  f"the same command (python -m kdbench {again})", file=sys.stderr)
        else:
            print(f"kdbench: interrupted{how}", file=sys.stderr)
        return exit_code(interrupt)
