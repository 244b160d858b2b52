"""SLURM presets: what to ask the cluster for, kept in ``slurm/NAME.toml`` files.

A preset is a small TOML file (see slurm/README.md for every field); ``--slurm NAME`` picks
``slurm/NAME.toml`` (looked up in ./slurm/, then in the slurm/ folder next to this package),
``--slurm path/to/file.toml`` any file, and ``--slurm-set FIELD=VALUE`` overrides one field.
Everything here is checked before anything is submitted: a preset that does not parse, an
unknown field or a value of the wrong type is a ``UserError`` naming the file and the problem.

Parsed with tomllib and plain dataclasses; no submitit here (kdbench/slurm.py maps a preset
onto submitit's parameters), so the checks run on a laptop without SLURM.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kdbench.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is the same parser, where it is installed
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

# slurm/ in the source tree (an editable install or a clone); a plain pip install has none,
# then presets come from ./slurm/ or a path.
BUNDLED_PRESETS = Path(__file__).resolve().parent.parent / "slurm"


@dataclass(frozen=True)
class SlurmPreset:
    """What every job of a grid asks for. Field meanings: slurm/README.md."""

    # The defaults are slurm/default.toml's values (a test keeps the two equal); the reasons
    # for them are given there.
    partition: str | None = None  # None: the cluster's default partition
    gpus_per_task: int = 1
    cpus_per_task: int = 4  # also the run's CPU threads (TrainOptions.threads)
    mem_gb: float = 16.0
    time_min: int = 360  # per job attempt; a requeued job gets the full limit again
    array_parallelism: int = 16  # tasks of one array running at once (sbatch --array=...%N)
    # Student runs trained at once by one array task (each its own process, seed and data order,
    # sharing the task's GPUs and CPUs): for runs too small to fill a GPU alone.
    runs_per_task: int = 1
    # The processes of one run across several (--gpus-per-run N: one SLURM task each) that go
    # on one node; 0: all N on one node. N = 8 with 4 here is 2 nodes of 4 tasks.
    processes_per_node: int = 0
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # Seconds before the time limit at which SLURM sends USR2, the signal that makes submitit
    # requeue a checkpointable job; it must come before the limit.
    signal_delay_s: int = 120
    max_requeues: int = 3  # time-outs a job may be requeued after (submitit max_num_timeout)
    setup: tuple[str, ...] = ()  # shell lines run before the job (module load, conda activate)
    python: str | None = None  # command that runs Python on the nodes; None: this interpreter
    sbatch: dict[str, str | int | bool] = field(default_factory=dict)  # any other #SBATCH option
    source: str = "built-in defaults"  # where the preset came from (messages, provenance)

    def describe(self) -> str:
        gpus = f"{self.gpus_per_task} GPU{'s' if self.gpus_per_task != 1 else ''}" if self.gpus_per_task else "no GPU"
        where = f"partition {self.partition}" if self.partition else "default partition"
        runs = f"{self.runs_per_task} run{'s' if self.runs_per_task != 1 else ''} per task"
        return (f"{where}, {gpus}, {self.cpus_per_task} CPUs, {self.mem_gb:g} GB, "
                f"{self.time_min} min per task, {runs}, {self.array_parallelism} tasks at once")


# field -> (accepted Python types, description for messages); "source" is not user-settable.
FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "partition": ((str,), "a string"),
    "gpus_per_task": ((int,), "a whole number"),
    "cpus_per_task": ((int,), "a whole number"),
    "mem_gb": ((int, float), "a number"),
    "time_min": ((int,), "a whole number of minutes"),
    "array_parallelism": ((int,), "a whole number"),
    "runs_per_task": ((int,), "a whole number"),
    "processes_per_node": ((int,), "a whole number"),
    "account": ((str,), "a string"),
    "qos": ((str,), "a string"),
    "constraint": ((str,), "a string"),
    "signal_delay_s": ((int,), "a whole number of seconds"),
    "max_requeues": ((int,), "a whole number"),
    "setup": ((list,), "a list of strings"),
    "python": ((str,), "a string"),
    "sbatch": ((dict,), "a table of sbatch options"),
}
MINIMUM = {"gpus_per_task": 0, "cpus_per_task": 1, "mem_gb": 0.001, "time_min": 1,
           "array_parallelism": 1, "runs_per_task": 1, "processes_per_node": 0, "signal_delay_s": 0, "max_requeues": 0}


def _check_value(name: str, value: Any, where: str) -> Any:
    """``value`` converted for field ``name``; UserError (naming ``where``) if it does not fit."""
    types, expected = FIELD_TYPES[name]
    # bool is an int in Python, but `gpus_per_task = true` is a mistake, not 1 GPU.
    if isinstance(value, bool) or not isinstance(value, types):
        raise UserError(f"{where}: {name} must be {expected}, got {value!r}")
    if name in MINIMUM and value < MINIMUM[name]:
        raise UserError(f"{where}: {name} must be at least {MINIMUM[name]}, got {value!r}")
    if name == "setup":
        if not all(isinstance(line, str) for line in value):
            raise UserError(f"{where}: setup must be a list of strings, got {value!r}")
        return tuple(value)
    if name == "sbatch":
        for key, option in value.items():
            # true is a bare flag (--exclusive); submitit would write false as "--key=False".
            if option is not True and (isinstance(option, bool) or not isinstance(option, (str, int))):
                raise UserError(f"{where}: sbatch.{key} must be a string, a whole number or "
                                f"true, got {option!r}")
        return dict(value)
    if name == "mem_gb":
        return float(value)
    return value


def preset_from_mapping(data: dict[str, Any], where: str) -> SlurmPreset:
    unknown = sorted(set(data) - set(FIELD_TYPES))
    if unknown:
        raise UserError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(unknown)} (fields: {', '.join(FIELD_TYPES)})")
    values = {name: _check_value(name, value, where) for name, value in data.items()}
    return SlurmPreset(**values, source=where)


def find_preset(name_or_path: str) -> Path:
    """``default`` → ./slurm/default.toml or the bundled slurm/default.toml; a path → itself."""
    looks_like_path = name_or_path.endswith(".toml") or "/" in name_or_path or "\\" in name_or_path
    if looks_like_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"--slurm {name_or_path}: no such preset file")
        return path
    candidates = [Path("slurm") / f"{name_or_path}.toml", BUNDLED_PRESETS / f"{name_or_path}.toml"]
    for path in candidates:
        if path.is_file():
            return path
    known = sorted({path.stem for folder in (Path("slurm"), BUNDLED_PRESETS) if folder.is_dir()
                    for path in folder.glob("*.toml")})
    raise UserError(f"--slurm {name_or_path}: no preset of that name "
                    f"(known: {', '.join(known) or 'none'}; or give a path to a .toml file)")


def load_preset(name_or_path: str) -> SlurmPreset:
    if tomllib is None:
        raise UserError("SLURM presets are TOML: they need Python >= 3.11 (tomllib) or `pip install tomli`")
    path = find_preset(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"SLURM preset {path}: not valid TOML: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"SLURM preset {path}: cannot be read: {error}") from None
    return preset_from_mapping(data, f"SLURM preset {path}")


def parse_override(preset: SlurmPreset, assignment: str) -> SlurmPreset:
    """Apply one ``--slurm-set FIELD=VALUE`` (``sbatch.OPTION=VALUE`` for an extra option).

    The value is read as the field's type: ``partition=gpu`` needs no quotes, numbers are
    numbers, ``setup`` takes a TOML list (``setup=["module load cuda"]``) and an empty value
    unsets an optional string field (``account=``)."""
    where = f"--slurm-set {assignment}"
    name, equals, raw = assignment.partition("=")
    name = name.strip()
    if not equals or not name:
        raise UserError(f"{where}: expected FIELD=VALUE, e.g. partition=gpu or time_min=60")
    if name.startswith("sbatch."):
        option = name.removeprefix("sbatch.")
        if not option:
            raise UserError(f"{where}: expected sbatch.OPTION=VALUE, e.g. sbatch.mail-type=END")
        flag: str | bool = True if raw.lower() == "true" else raw  # sbatch.exclusive=true: --exclusive
        return replace(preset, sbatch={**preset.sbatch, option: flag})
    if name not in FIELD_TYPES:
        raise UserError(f"{where}: unknown field {name!r} (fields: {', '.join(FIELD_TYPES)})")
    types, expected = FIELD_TYPES[name]
    if types == (str,):  # every string field is optional: empty unsets it
        return replace(preset, **{name: raw or None})
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        raise UserError(f"{where}: {name} must be {expected}, got {raw!r}") from None
    return replace(preset, **{name: _check_value(name, value, where)})


def resolve_preset(name_or_path: str, overrides: list[str] | None = None) -> SlurmPreset:
    """The preset ``--slurm`` names, with the ``--slurm-set`` overrides applied in order."""
    preset = load_preset(name_or_path)
    for assignment in overrides or []:
        preset = parse_override(preset, assignment)
    if preset.signal_delay_s >= preset.time_min * 60:
        # SLURM would send the time-limit warning (USR2) at once, or never: no requeue.
        raise UserError(f"{preset.source}: signal_delay_s ({preset.signal_delay_s} s) must be shorter "
                        f"than time_min ({preset.time_min} min)")
    return preset
