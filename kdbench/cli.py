"""The command line: ``python -m kdbench run | list | table | status``.

The parser, and the dispatch to each command's module. ``run`` and ``status`` first resolve
their arguments into a plan (kdbench.plan), where every argument is checked before anything
is written: a user's mistake is one clear line and exit code 2, and results already stored are
never touched by it.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

from kdbench import settings
from kdbench.errors import UserError
from kdbench.plan import MAX_SEED, resolve_plan
# The plan's resolve steps lived here once, and tools and tests still import them from here.
from kdbench.plan import check_runs_per_gpu, grid_from_args, slurm_overrides  # noqa: F401
from kdbench.sweep import value_list

EXIT_USAGE = 2


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
    parser.add_argument("--gpus-per-run", type=positive_int, default=1, metavar="N",
                        help="train each student run across N processes with "
                             "DistributedDataParallel: one per GPU (NCCL), or N CPU processes "
                             "(gloo); the global batch and lr are the setting's, each process gets "
                             "batch/N. Part of each run's identity (default 1)")
    parser.add_argument("--sync-bn", action="store_true",
                        help="with --gpus-per-run N > 1: SyncBatchNorm (batch statistics over "
                             "the global batch; CUDA) instead of per-process BatchNorm")


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


# The commands that act on a plan (kdbench.plan.resolve_plan), as "module:function": imported
# when that command runs, so this module imports no command's, and none needs this one (the
# plan they take is kdbench.plan's; `status` once imported the command line back for its grid).
PLANNED = {"run": "kdbench.run_grid:run_plan", "status": "kdbench.status:print_status"}


def planned_command(name: str) -> Callable[..., int]:
    module, function = PLANNED[name].split(":")
    return getattr(importlib.import_module(module), function)


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
                from kdbench.writable import check_could_create

                if args.out:
                    check_could_create(Path(args.out), "table --out")
                return table_command(args, ["kdbench", *argv] if argv is not None else None)
            if args.command == "list":
                return command_list(args)
            return planned_command(args.command)(resolve_plan(args))
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
