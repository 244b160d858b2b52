"""The plan (kdbench/plan.py): a command's arguments resolved once. The same arguments give an
equal plan; resolving writes nothing, so a bad argument fails before any file exists; `status`
and `run --dry-run` see one grid; and the command line and the commands' modules do not import
each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import kdbench
from kdbench.cli import build_parser, main
from kdbench.errors import UserError
from kdbench.plan import resolve_plan
from kdbench.status import grid_states
from kdbench.store import Store

SETTING = "synthetic/tiny"
# A grid with a sweep, explicit seeds and a validation split: every part of a run's id.
GRID = ["--setting", SETTING, "--methods", "at,kd", "--seed-list", "3,1",
        "--set", "kd.temperature=2,4", "--select-on", "val"]


def plan_of(*argv: str):
    return resolve_plan(build_parser().parse_args(list(argv)))


def files_under(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_the_same_arguments_resolve_to_an_equal_plan_and_other_arguments_to_another(tmp_path):
    results = str(tmp_path / "results")
    argv = ["run", *GRID, "--results", results, "--jobs", "3", "--group-size", "4", "--keep", "best"]
    plan = plan_of(*argv)
    assert plan == plan_of(*argv)
    assert plan.grid.methods == ("vanilla", "at", "kd") and plan.grid.seeds == (3, 1)
    assert plan.grid.held_out is not None and plan.select_on == "val"
    launch = plan.launch
    assert (launch.executor, launch.jobs, launch.group, launch.group_size) == ("local", 3, True, 4)
    assert launch.processes_per_run == 1  # one process per run until DDP
    assert launch.options.keep == "best" and launch.stale == "ask" and not launch.dry_run
    # The teacher is shared; each of vanilla, at and the two kd variants has both seeds.
    assert len(plan.teachers()) == 1 and len(plan.students()) == 4 * 2
    # Another seed list is another grid, and another plan; an option of the launch alone
    # (runs at once) changes the launch, not the grid.
    other = plan_of(*[("3,2" if arg == "3,1" else arg) for arg in argv])
    assert other != plan and other.grid != plan.grid
    fewer_jobs = plan_of(*[("2" if arg == "3" else arg) for arg in argv])
    assert fewer_jobs.grid == plan.grid and fewer_jobs.launch.jobs == 2 and fewer_jobs != plan


BAD = [
    (["--methods", "kdd"], "did you mean kd"),
    (["--seed-list", "1,1"], "a seed is listed twice"),
    (["--set", "kd.temperature=0"], "kd.temperature must be > 0"),
    (["--device", "banana"], "--device banana: not a device"),
    (["--data-dir", "NOWHERE"], "does not exist"),
    (["--loader-workers", "65"], "--loader-workers: from 0"),
    (["--results", "FILE/results"], "is a file, not a directory"),
    (["--teacher-checkpoint", "NOWHERE"], "does not exist"),
    (["--runs-per-gpu", "2", "--jobs", "2"], "give one"),
    (["--executor", "inprocess", "--runs-per-gpu", "2"], "applies to the local and slurm executors"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(extra) for extra, _ in BAD])
def test_a_bad_argument_raises_while_resolving_before_any_file_is_created(extra, message, tmp_path):
    (tmp_path / "FILE").write_text("a file, not a directory")
    before = files_under(tmp_path)
    extra = [str(tmp_path / arg) if arg in {"FILE/results", "NOWHERE"} else arg for arg in extra]
    argv = ["run", "--setting", SETTING, "--methods", "kd", "--seeds", "1",
            "--results", str(tmp_path / "results"), *extra]  # a later --results wins
    with pytest.raises(UserError, match=re.escape(message)):
        plan_of(*argv)
    assert files_under(tmp_path) == before


def test_resolving_a_good_plan_writes_nothing_either(tmp_path):
    results = tmp_path / "deep" / "results"
    plan = plan_of("run", *GRID, "--results", str(results))
    assert plan.results == results and plan.students()
    assert files_under(tmp_path) == []  # the run creates the directory, not its plan


def test_status_and_a_dry_run_agree_on_the_grid_same_ids_same_order(tmp_path, capsys):
    results = tmp_path / "results"
    grid_arguments = [*GRID, "--results", str(results)]
    capsys.readouterr()
    assert main(["run", *grid_arguments, "--dry-run"]) == 0
    planned = re.findall(r"would run (.+) \(([0-9a-f]+)\)", capsys.readouterr().out)
    assert len(planned) == 1 + 4 * 2

    status_plan = plan_of("status", *grid_arguments)
    run_plan = plan_of("run", *grid_arguments)
    assert status_plan.grid == run_plan.grid  # precision included: neither was given one
    states = grid_states(status_plan.grid, Store(results), status_plan.precision_given)
    assert [(state.spec.label(), state.spec.id) for state in states] == planned

    # And `status` of these arguments counts exactly those runs, all missing, by method row.
    assert main(["status", *grid_arguments]) == 0
    lines = capsys.readouterr().out.splitlines()
    counts = {tuple(line.split()[:2]): int(line.split()[-1]) for line in lines[1:]}
    assert counts == {(SETTING, "teacher"): 1, (SETTING, "vanilla"): 2, (SETTING, "at"): 2,
                      (SETTING, "kd"): 4}


def test_a_gpu_preset_makes_gpu_runs_from_a_machine_without_one(tmp_path):
    """Where the runs train decides the plan's default precision and --runs-per-gpu: on SLURM
    the preset's tasks, not this machine (slurm/default.toml gives each task a GPU)."""
    plan = plan_of("run", "--setting", SETTING, "--methods", "kd", "--seeds", "1",
                   "--results", str(tmp_path / "results"), "--executor", "slurm",
                   "--slurm", "default", "--runs-per-gpu", "2")
    assert plan.launch.on_gpu and plan.grid.precision == "bf16"
    assert plan.launch.slurm_overrides == ("runs_per_task=2",) and plan.launch.jobs == 2
    if not torch.cuda.is_available():
        local = plan_of("run", "--setting", SETTING, "--methods", "kd", "--seeds", "1",
                        "--results", str(tmp_path / "results"))
        assert not local.launch.on_gpu and local.grid.precision == "fp32"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_command_line_and_the_commands_do_not_import_each_other():
    package = Path(kdbench.__file__).parent
    commands = {"kdbench.status", "kdbench.run_grid"}
    assert not imported_modules(package / "cli.py") & commands
    for name in ("status.py", "run_grid.py", "plan.py"):
        assert "kdbench.cli" not in imported_modules(package / name), name
    # The plan is what they share, and it needs none of them.
    assert not imported_modules(package / "plan.py") & (commands | {"kdbench.cli"})
