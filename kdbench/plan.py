"""A command's plan: its arguments resolved once into what ``run``, ``status`` and
``kdbench.api.run`` act on — the grid of runs, the results directory, and for ``run`` where
and how the runs train.

Every check a user's mistake can fail is made here, once, and before anything is written: a
UserError (one line, exit 2). The commands read the plan's fields and look at the arguments no
more, so a new option (processes per run for DDP, say) is a field and its resolve step here,
not another ``args`` check wherever it matters. Resolving writes nothing: the results
directory is created, and a user's teacher checkpoint registered, when the run starts
(kdbench.run_grid).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from kdbench import settings
from kdbench.errors import UserError

if TYPE_CHECKING:  # imported where used: the command line imports this module for its parser
    from kdbench.grid import Grid
    from kdbench.settings import Setting
    from kdbench.slurm_presets import SlurmPreset
    from kdbench.spec import RunSpec
    from kdbench.train import TrainOptions

# Seeds go to numpy's legacy seeding (np.random.seed), which takes 0 to 2**32 - 1.
MAX_SEED = 2**32 - 1
# A grid larger than this is a typo (``--seeds 100000000000``), not an experiment: its run list
# alone would not fit in memory. Each run is minutes to hours of training.
MAX_GRID_RUNS = 100_000
MAX_LOADER_WORKERS = 64  # DataLoader processes per run: more is a typo, not a machine
DEFAULT_SEEDS = 5


@dataclass(frozen=True)
class Launch:
    """Where and how ``run`` trains the grid's runs (kdbench.launch's executors)."""

    executor: str  # "local" | "inprocess" | "slurm"
    # Where the runs train: on SLURM the preset's tasks (the GPU is on the nodes), otherwise
    # --device, or this machine's CUDA when present.
    on_gpu: bool
    # Runs in flight at once: --runs-per-gpu, else --jobs, else 1 on a GPU and 2 on a CPU with
    # two cores or more (the local executor; the display's estimate elsewhere).
    jobs: int
    runs_per_gpu: int | None
    slurm_preset: str  # --slurm: a preset name in slurm/ or a TOML path
    slurm_overrides: tuple[str, ...]  # --slurm-set, then runs_per_task from --runs-per-gpu
    wait: bool  # not --no-wait
    snapshot: bool
    group: bool  # not --no-group: the runs of one setting and seed train together
    group_size: int | None  # --group-size: at most this many runs in one group
    # Processes (devices) that train one run together (--gpus-per-run; kdbench/ranks.py); the
    # grid's specs carry it too (RunSpec.processes: part of a run's identity).
    processes_per_run: int
    options: TrainOptions  # what every run's worker gets (device, compile, data_dir, keep ...)
    dry_run: bool
    table: bool  # print the grid's table at the end (not --no-table)
    stale: str  # stored results made by other code: "ask" (stop), "retrain" or "keep"
    # Datasets a --dry-run found missing: notes, where a real run stops with the first.
    missing_data: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    results: Path
    grid: Grid | None  # None: `status` of everything the results directory holds
    settings: tuple[Setting, ...] = ()  # the grid's settings, in grid.settings' order
    # Whether --precision was given: without it `status` shows every precision it finds runs
    # of, since it cannot know where `run` trained (kdbench.status.grid_states).
    precision_given: bool = False
    select_on: str | None = None  # "val" holds out the students' validation split (grid.held_out)
    # The user's teacher file (--teacher-checkpoint) whose sha256 is grid.teacher_checkpoint.
    teacher_checkpoint: Path | None = None
    launch: Launch | None = None  # `run` only

    def teachers(self) -> list[RunSpec]:
        return self.grid.teachers() if self.grid else []

    def students(self) -> list[RunSpec]:
        return self.grid.students() if self.grid else []


def resolve_plan(args: argparse.Namespace) -> Plan:
    """The plan of parsed ``run`` or ``status`` arguments, every check made, nothing written.

    ``status`` takes the grid arguments alone: without any of --methods, --setting, --seeds
    or --seed-list it shows everything the results directory holds, and its plan has no grid."""
    results = Path(args.results)
    select_on = getattr(args, "select_on", None)
    launching = args.command == "run"
    if not launching and not (args.methods or args.setting or args.seeds or args.seed_list):
        return Plan(results, None, precision_given=args.precision is not None, select_on=select_on)
    preset = slurm_preset(args)
    on_gpu = runs_get_gpu(args, preset)
    grid, chosen, checkpoint = resolve_grid(args, resolve_precision(args, on_gpu))
    launch = resolve_launch(args, preset, on_gpu, chosen) if launching else None
    return Plan(results, grid, tuple(chosen), args.precision is not None, select_on, checkpoint, launch)


# --- the grid ---------------------------------------------------------------------------------

def resolve_grid(args: argparse.Namespace, precision: str) -> tuple[Grid, list[Setting], Path | None]:
    """The grid the arguments name (methods, the baseline first; seeds; settings; the sweep of
    --set/--epochs/--batch-size/--lr; the teacher), its settings, and the user's teacher file."""
    from kdbench.grid import Grid
    from kdbench.store import sha256_file
    from kdbench.sweep import Sweep, config_axes, recipe_axes

    methods = resolve_methods(args.methods)
    seeds = resolve_seed_list(args.seed_list) if args.seed_list else None
    chosen = settings.expand(args.setting or [settings.DEFAULT_SETTING])
    n_seeds = len(seeds) if seeds is not None else (args.seeds or DEFAULT_SEEDS)
    sweep = Sweep(tuple(config_axes(args.assignments, methods) + recipe_axes(
        {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr})))
    check_grid_size(sweep, methods, n_seeds, len(chosen))
    check_batch_size(args.batch_size, chosen)
    checkpoint = teacher_file(args.teacher_checkpoint, chosen) if args.teacher_checkpoint is not None else None
    # Its sha256 is part of the id of every run that distils from it (the checksum registering
    # the file returns, kdbench.teachers.register_checkpoint).
    checksum = sha256_file(checkpoint) if checkpoint is not None else None
    grid = Grid(tuple(s.name for s in chosen), tuple(methods), tuple(seeds or range(n_seeds)), sweep,
                args.teacher_seed, checksum, precision, held_out_of(args),
                {s.name: s.spec_fields() for s in chosen}, getattr(args, "gpus_per_run", None) or 1,
                getattr(args, "sync_bn", False))
    return grid, chosen, checkpoint


def grid_from_args(args: argparse.Namespace, creating: bool = False) -> tuple[Grid, list[Setting]]:
    """The grid step of ``resolve_plan`` alone, its precision resolved as the plan's (tools and
    tests that want the runs of some arguments, not a plan). ``creating`` is kept for callers
    of the time this step registered a teacher checkpoint; it writes nothing either way now:
    registering is the run's (kdbench.run_grid), and the grid is the same."""
    grid, chosen, _ = resolve_grid(args, resolve_precision(args, runs_get_gpu(args, slurm_preset(args))))
    return grid, chosen


def resolve_methods(asked: Sequence[str] | None) -> list[str]:
    """--methods (default kd), the baseline first; each name known and importable."""
    from kdbench import registry
    from kdbench.grid import with_baseline

    asked = list(asked) if asked else ["kd"]
    twice = sorted({method for method in asked if asked.count(method) > 1})
    if twice:
        raise UserError(f"--methods: {', '.join(twice)} is listed twice")
    methods = with_baseline(asked)
    for method in methods:
        registry.get(method)  # unknown or broken (import fails): one line, exit 2
    return methods


def resolve_seed_list(seed_list: Sequence[str]) -> list[int]:
    try:
        seeds = [int(seed) for seed in seed_list]
    except ValueError:
        raise UserError(f"--seed-list: expected whole numbers, got {','.join(seed_list)}") from None
    wrong = [seed for seed in seeds if not 0 <= seed <= MAX_SEED]
    if wrong:
        raise UserError(f"--seed-list: seeds are whole numbers from 0 to {MAX_SEED}, got {wrong[0]}")
    if len(set(seeds)) != len(seeds):
        raise UserError("--seed-list: a seed is listed twice")
    return seeds


def check_grid_size(sweep, methods: list[str], n_seeds: int, n_settings: int) -> None:
    variants = sum(sweep.count(method) for method in methods)
    runs = n_seeds * variants * n_settings
    if runs > MAX_GRID_RUNS:
        what = f"--seeds {n_seeds}" if variants == len(methods) else f"{variants:,} variants × {n_seeds} seeds"
        raise UserError(f"{what}: that grid has {runs:,} runs, more than kdbench takes "
                        f"in one command ({MAX_GRID_RUNS:,})")


def check_batch_size(batch_sizes: Sequence[int] | None, chosen: Sequence[Setting]) -> None:
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


def teacher_file(given: Path | str, chosen: Sequence[Setting]) -> Path:
    """The state_dict file --teacher-checkpoint names (a path, or torchvision:<model>)."""
    from kdbench.teachers import resolve_checkpoint

    if len(chosen) != 1:
        raise UserError("--teacher-checkpoint needs exactly one --setting")
    checkpoint = resolve_checkpoint(given, chosen[0])
    if checkpoint.is_dir():
        raise UserError(f"teacher checkpoint {checkpoint} is a directory, not a state_dict file")
    if not checkpoint.is_file():
        raise UserError(f"teacher checkpoint {checkpoint} does not exist")
    return checkpoint


def held_out_of(args: argparse.Namespace) -> float | None:
    """--select-on val holds out the validation split (kdbench/validation.py); --select-on
    test and no --select-on train on the full training set."""
    from kdbench.validation import VALIDATION_FRACTION

    return VALIDATION_FRACTION if getattr(args, "select_on", None) == "val" else None


# --- where the runs train ---------------------------------------------------------------------

def slurm_overrides(args: argparse.Namespace) -> list[str]:
    """--slurm-set, plus runs_per_task from --runs-per-gpu (checked by check_runs_per_gpu)."""
    if getattr(args, "executor", None) == "slurm" and args.runs_per_gpu is not None:
        return [*args.slurm_overrides, f"runs_per_task={args.runs_per_gpu}"]
    return list(getattr(args, "slurm_overrides", []))


def slurm_preset(args: argparse.Namespace) -> SlurmPreset | None:
    """The SLURM preset of --executor slurm, its overrides applied (None for other executors)."""
    if getattr(args, "executor", None) != "slurm":
        return None
    from kdbench.slurm_presets import resolve_preset

    return resolve_preset(args.slurm, slurm_overrides(args))


def runs_on_gpu(args: argparse.Namespace) -> bool:
    """Whether runs started from here get a GPU: --device, else this machine's CUDA."""
    import torch

    device = getattr(args, "device", None)  # `status` has no --device: this machine's default
    return (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")


def runs_get_gpu(args: argparse.Namespace, preset: SlurmPreset | None = None) -> bool:
    """Whether the runs will train on a GPU: on SLURM the preset says (the GPU is on the
    nodes, not here); otherwise --device, or this machine's CUDA."""
    if preset is not None:
        return preset.gpus_per_task >= 1
    return runs_on_gpu(args)


def resolve_precision(args: argparse.Namespace, on_gpu: bool) -> str:
    """--precision; else bf16 where the runs get a GPU, else fp32."""
    from kdbench.spec import BF16, FP32

    return args.precision or (BF16 if on_gpu else FP32)


def check_runs_per_gpu(args: argparse.Namespace, preset: SlurmPreset | None = None) -> None:
    """--runs-per-gpu is the local executor's runs at once (--jobs) when the runs use a GPU,
    and the SLURM preset's runs_per_task when its tasks get a GPU each."""
    if args.runs_per_gpu is None:
        return
    if args.executor not in ("local", "slurm"):
        raise UserError(f"--runs-per-gpu applies to the local and slurm executors, not --executor {args.executor}")
    if args.jobs is not None:
        raise UserError("--runs-per-gpu and --jobs both set how many runs go at once: give one")
    if args.executor == "slurm":
        if any(override.partition("=")[0].strip() == "runs_per_task" for override in args.slurm_overrides):
            raise UserError("--runs-per-gpu and --slurm-set runs_per_task both set the runs of one "
                            "SLURM task: give one")
        # The GPU is on the nodes, not here: the preset says whether the tasks get one.
        preset = preset or slurm_preset(args)
        if preset.gpus_per_task < 1:
            raise UserError(f"--runs-per-gpu with --executor slurm needs a preset that gives each task "
                            f"a GPU, but {preset.source} has gpus_per_task = {preset.gpus_per_task}; "
                            f"to share a CPU task, use --slurm-set runs_per_task={args.runs_per_gpu}")
        return
    if not runs_on_gpu(args):
        raise UserError("--runs-per-gpu needs a CUDA device (these runs use the CPU); "
                        "on the CPU, --jobs sets the runs at once")


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


def resolve_jobs(args: argparse.Namespace, on_gpu: bool) -> int:
    """Runs at once. Several runs in flight share one GPU when one small run cannot fill it;
    each is its own process with its own RunSpec seed and data order, so sharing changes no
    run's batches."""
    from kdbench.launch import usable_cores

    return args.runs_per_gpu or args.jobs or (1 if on_gpu else min(2, usable_cores()))


def check_data(args: argparse.Namespace, chosen: Sequence[Setting]) -> list[str]:
    """Every setting's dataset is where the runs will read it. A dry run plans the grid all
    the same: it returns what is missing, as notes."""
    from kdbench import data

    if args.data_dir is not None and not args.data_dir.is_dir():
        raise UserError(f"--data-dir {args.data_dir} does not exist")
    if args.loader_workers is not None and not 0 <= args.loader_workers <= MAX_LOADER_WORKERS:
        raise UserError(f"--loader-workers: from 0 (load in the training process) to "
                        f"{MAX_LOADER_WORKERS}, got {args.loader_workers}")
    missing = []
    for setting in chosen:
        try:
            data.require_data(setting.dataset, setting.dataset_options, args.data_dir)
        except UserError as error:
            if not args.dry_run:
                raise
            missing.append(str(error))
    return missing


def resolve_launch(args: argparse.Namespace, preset: SlurmPreset | None, on_gpu: bool,
                   chosen: Sequence[Setting]) -> Launch:
    """The rest of `run`'s arguments, checked in the order the command always checked them."""
    from kdbench.train import TrainOptions
    from kdbench.writable import check_could_create

    check_runs_per_gpu(args, preset)
    check_device(args)
    from kdbench.ranks import check_request

    check_request(getattr(args, "gpus_per_run", None) or 1, getattr(args, "sync_bn", False),
                  args.executor, args.device)
    missing_data = check_data(args, chosen)
    if args.tensorboard:
        from kdbench.logs import require_tensorboard

        require_tensorboard()
    # Nothing is created here; a real run creates the directory when it starts.
    check_could_create(Path(args.results), "results directory")
    options = TrainOptions(device=args.device, compile=args.compile, data_dir=args.data_dir,
                           deterministic=args.deterministic, keep=args.keep,
                           tensorboard=args.tensorboard, loader_workers=args.loader_workers)
    return Launch(
        executor=args.executor, on_gpu=on_gpu, jobs=resolve_jobs(args, on_gpu),
        runs_per_gpu=args.runs_per_gpu, slurm_preset=args.slurm,
        slurm_overrides=tuple(slurm_overrides(args)), wait=not args.no_wait, snapshot=args.snapshot,
        group=not args.no_group, group_size=args.group_size, processes_per_run=getattr(args, "gpus_per_run", None) or 1,
        options=options, dry_run=args.dry_run, table=not args.no_table,
        stale="retrain" if args.retrain_stale else "keep" if args.keep_stale else "ask",
        missing_data=tuple(missing_data))
