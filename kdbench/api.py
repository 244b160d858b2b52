"""kdbench from Python (notebooks): results as DataFrames, the table's cells, a grid launched
from code, and a run's kept student.

    from kdbench import api

    api.run(methods=["kd"], seeds=5, setting="fashion_mnist/quick")  # `kdbench run ...`
    runs = api.runs("results")        # one row per run: spec fields, config.*, recipe.*, metrics
    cells = api.summary("results").cells  # mean, std, n, p-values: what `kdbench table` prints
    student = api.load_student("results", runs.run_id[0])  # nn.Module in eval mode
    top1, top5 = api.evaluate(student, runs.setting[0])

``run`` goes through the command line's own parser, its plan (kdbench.plan) and the run
command (kdbench.run_grid): the same checks, the same messages (a mistake raises ``kdbench.errors.UserError`` with the line the CLI would print),
the same executors. ``runs``, ``history`` and ``summary`` read records only.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from kdbench.errors import UserError
from kdbench.store import Store, load_records

PathLike = str | Path

# Columns every runs() frame has, in this order; then config.* and recipe.* (sorted).
RUN_COLUMNS = (
    "run_id", "status", "setting", "dataset", "teacher_arch", "student_arch", "role", "method",
    "row", "title", "seed", "teacher_seed", "teacher_checkpoint", "precision",
    "top1_last", "top5_last", "top1_best", "top5_best", "best_epoch",
    "wall_seconds", "train_seconds", "images_per_second", "extra_parameters",
    "student_weights", "best_student_weights", "error", "fidelity", "version", "git_commit",
    "device", "finished_at",
)


# --- reading results ------------------------------------------------------------------------

def runs(results: PathLike = "results") -> pd.DataFrame:
    """One row per stored run (done or failed), teachers included.

    Columns: ``RUN_COLUMNS`` — the spec's fields (setting, method, seed, role, teacher_seed,
    teacher_checkpoint, precision), the setting's dataset and architectures, ``row`` (the
    row key ``kdbench table --methods`` takes) and ``title`` (the row's printed title), both
    as a table of the whole directory makes them, the record's metrics (percent; best_epoch 1-based), times, the kept
    students' files (paths relative to ``results``; ``best_student_weights`` with --keep
    best), the error's first line, and the code version — then one ``config.<field>`` column
    per field of the method's resolved config and one ``recipe.<field>`` per field of the
    resolved recipe (``recipe.augmentation.flip``; the teacher's recipe on a teacher's row),
    and ``held_out`` with the ``val_*`` metrics of runs that held out a validation split.
    """
    records = load_records(results)
    frame = pd.DataFrame([_run_row(record) for record in records])
    if frame.empty:
        return pd.DataFrame(columns=list(RUN_COLUMNS))
    frame["row"], frame["title"] = _rows_and_titles(records)
    extra = sorted(column for column in frame.columns if column not in RUN_COLUMNS)
    frame = frame[[*RUN_COLUMNS, *extra]]
    order = frame["role"].map({"teacher": 0}).fillna(1)
    return (frame.assign(_order=order).sort_values(["setting", "_order", "method", "seed", "run_id"])
            .drop(columns="_order").reset_index(drop=True))


def history(results: PathLike, run_id: str) -> pd.DataFrame:
    """A run's per-epoch metrics (its record's history; the same columns as runs/<id>.csv)."""
    from kdbench.logs import columns_of, row_of

    record = _read_done(Store(Path(results)), run_id)
    entries = record.get("history") or []
    return pd.DataFrame([row_of(entry) for entry in entries], columns=columns_of(entries))


def summary(results: PathLike = "results", **options: Any):
    """The aggregated cells behind ``kdbench table`` (``kdbench.aggregate.summarize``).

    Options are summarize's: metric ("last", "best", "top5_last", ...), settings and methods
    (lists, or comma-separated strings as on the command line), paired, alpha, decimals,
    labels ({row or method: title}), precision, pool_versions; compare_published=True attaches
    the published numbers as ``table --compare-published`` does. Returns the Summary: its
    ``cells`` DataFrame (setting, row, title, n, mean, std, ci_halfwidth, delta, p-values, ...),
    ``comparisons``, ``runs``, ``notes``.
    """
    from kdbench.aggregate import load_published, summarize

    for key in ("settings", "methods"):
        if isinstance(options.get(key), str):
            options[key] = [part.strip() for part in options[key].split(",") if part.strip()]
    if options.pop("compare_published", False):
        options["published"] = load_published()
    records = load_records(results)
    if not records:
        raise UserError(f"{results} holds no run records (looked for {Store(Path(results)).runs_dir}/*.json)")
    return summarize(records, **options)


# --- launching a grid -----------------------------------------------------------------------

def run(methods: Iterable[str] | str | None = None, seeds: int | Iterable[int] | None = None,
        setting: Iterable[str] | str | None = None, results: PathLike = "results",
        **options: Any) -> pd.DataFrame:
    """Run a grid as ``kdbench run`` does, and return ``runs(results)`` for its runs.

    ``seeds``: a number N (seeds 0 … N-1, ``--seeds``) or the seeds themselves
    (``--seed-list``). ``options`` are the command's other options under their Python names:
    ``epochs=1``, ``batch_size=128``, ``executor="inprocess"``, ``keep="best"``,
    ``tensorboard=True``, ``set={"kd.temperature": 2}`` (or a list of "METHOD.FIELD=VALUE";
    a list value sweeps, ``set={"kd.temperature": [2, 4]}``, as does ``lr=[0.01, 0.05]``),
    ``no_table=True``, ``dry_run=True``, ... Flags take True. Everything goes through the
    command line's parser and plan, and ``kdbench run``'s code, so a mistake raises the UserError the command
    would print, before anything is trained or written. Failed runs are rows with status
    "failed" (and the command's lines on stderr).
    """
    from kdbench.plan import resolve_plan
    from kdbench.run_grid import run_plan

    if seeds is not None and not isinstance(seeds, (int, str)):
        if "seed_list" in options:
            raise UserError("run(): give the seeds either as seeds= or as seed_list=, not both")
        options["seed_list"] = list(seeds)
        seeds = None
    given = {"methods": methods, "seeds": seeds, "setting": setting, "results": results, **options}
    plan = resolve_plan(parse_run_options(given))
    run_plan(plan)
    ids = [spec.id for spec in [*plan.teachers(), *plan.students()]]
    frame = runs(plan.results)
    return frame[frame["run_id"].isin(ids)].reset_index(drop=True)


def parse_run_options(options: Mapping[str, Any]) -> argparse.Namespace:
    """The namespace ``kdbench run`` builds, from Python keyword options: each becomes its
    command-line flag and the command's own parser reads them, types and checks included."""
    from kdbench.cli import build_parser

    parser = run_parser(build_parser())
    flags = {action.option_strings[-1].lstrip("-").replace("-", "_"): action
             for action in parser._actions if action.option_strings and action.dest != "help"}
    argv = ["run"]
    for name, value in options.items():
        if name not in flags:
            raise TypeError(f"run() got an unknown option {name!r}; options: {', '.join(sorted(flags))}")
        argv += _as_arguments(flags[name], value)
    return build_parser().parse_args(argv)


def run_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``run`` subcommand's parser inside the command line's parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices["run"]
    raise RuntimeError("the command line has no run subcommand")


def _as_arguments(action: argparse.Action, value: Any) -> list[str]:
    flag = action.option_strings[-1]
    if value is None or value is False:
        return []
    if action.nargs == 0:  # a flag
        if value is not True:
            raise TypeError(f"{flag} is a flag: give True, got {value!r}")
        return [flag]
    if isinstance(action, argparse._AppendAction):  # --set, --slurm-set: one flag per item
        items = ([f"{key}={_text(item)}" for key, item in value.items()] if isinstance(value, Mapping)
                 else [value] if isinstance(value, str) else list(value))
        return [part for item in items for part in (flag, _text(item))]
    if isinstance(value, (list, tuple, range)):
        return [flag, ",".join(_text(item) for item in value)]
    return [flag, _text(value)]


def _text(value: Any) -> str:
    """A value as the command line spells it; a list or tuple is a sweep's comma list
    (``set={"kd.temperature": [2, 4]}`` is ``--set kd.temperature=2,4``)."""
    if isinstance(value, (list, tuple, range)):
        return ",".join(_text(item) for item in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


# --- kept students --------------------------------------------------------------------------

def load_student(results: PathLike, run_id: str, which: str = "last", device: str = "cpu"):
    """The student a run kept, as the nn.Module it trained (eval mode, on ``device``).

    ``which``: "last" (every run's final epoch) or "best" (runs trained with ``--keep best``).
    The network is built from the record's own setting (architecture, classes, input
    channels), so it loads even where the setting is no longer defined; its file is checked
    against the record's checksum. It maps normalised images to logits: pixels / 255, then
    ``(x - mean) / std`` with the dataset's normalisation (``evaluate`` does
    this). A teacher's run id gives the teacher.
    """
    import torch

    from kdbench.data import shape_of
    from kdbench.models import build_model
    from kdbench.store import sha256_file
    from kdbench.students import KEEP_CHOICES, WEIGHTS_FIELD

    if which not in KEEP_CHOICES:
        raise UserError(f"which must be one of {', '.join(KEEP_CHOICES)}, got {which!r}")
    store = Store(Path(results))
    record = _read_done(store, run_id)
    kept = (record.get(WEIGHTS_FIELD) or {}).get(which)
    if kept is None and which == "last":
        kept = record.get("teacher_weights")  # a teacher registered from a user's checkpoint
    if kept is None:
        why = ("it was trained without --keep best" if which == "best" and record.get(WEIGHTS_FIELD)
               else "it was made before kdbench kept students")
        raise UserError(f"run {run_id} has no kept {which} student: {why}")
    path = store.root / kept["path"]
    if not path.is_file():
        raise UserError(f"run {run_id}: its {which} student {path} is missing")
    if sha256_file(path) != kept["sha256"]:
        raise UserError(f"run {run_id}: {path} does not match the checksum in its record "
                        "(changed or replaced since the run)")
    setting = record["setting"]
    arch = setting["teacher"] if record["spec"].get("role") == "teacher" else setting["student"]
    # Records made before "in_channels" was stored: the dataset plugin says.
    in_channels = setting.get("in_channels") or shape_of(setting["dataset"],
                                                         setting.get("dataset_options")).in_channels
    model = build_model(arch, setting["num_classes"], in_channels)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def evaluate(model, setting: str, data_dir: PathLike | None = None,
             precision: str = "fp32") -> tuple[float, float]:
    """Top-1 and top-5 accuracy (percent) of ``model`` on ``setting``'s test split, computed
    as training evaluates (same normalisation, batches, arithmetic): a kept last student gives
    its record's top1_last/top5_last exactly on the device and thread count it trained with.
    ``precision``: "bf16" evaluates under bf16 autocast, as a bf16 run did."""
    import contextlib

    import torch

    from kdbench import settings
    from kdbench.data import open_stream
    from kdbench.settings import Augmentation
    from kdbench.train import evaluate as evaluate_on

    [chosen] = settings.expand([setting]) if settings.is_path(setting) else [settings.get(setting)]
    device = next(model.parameters()).device
    # The test split does not depend on the training subset or the seed; an ImageFolder
    # stream's test batches are at most the recipe's batch size, as in training.
    stream = open_stream(chosen.dataset, chosen.dataset_options, None, device,
                         chosen.recipe.batch_size, Augmentation(), 0,
                         Path(data_dir) if data_dir else None)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    return evaluate_on(model, stream, autocast, channels_last=False)


# --- records -> rows ------------------------------------------------------------------------

def _read_done(store: Store, run_id: str) -> dict[str, Any]:
    record = store.read(run_id)
    if record is None:
        raise UserError(f"no run {run_id!r} in {store.root} (looked for {store.record_path(run_id)})")
    if record.get("status") != "done":
        raise UserError(f"run {run_id} is {record.get('status')}, not done")
    return record


def _run_row(record: Mapping[str, Any]) -> dict[str, Any]:
    from kdbench.aggregate import method_version
    from kdbench.rows import flatten
    from kdbench.spec import record_precision
    from kdbench.students import KEEP_BEST, KEEP_LAST, WEIGHTS_FIELD

    spec = record.get("spec") or {}
    setting = record.get("setting") if isinstance(record.get("setting"), Mapping) else {}
    metrics = record.get("metrics") or {}
    provenance = record.get("provenance") or {}
    error = record.get("error") or {}
    kept = record.get(WEIGHTS_FIELD) or {}
    last = kept.get(KEEP_LAST) or record.get("teacher_weights") or {}
    # A failed record holds only its spec: its recipe is what the spec overrides.
    recipe = setting.get("recipe") if setting else spec.get("overrides")
    config = record.get("config") if record.get("config") is not None else spec.get("config")
    row = {
        "run_id": record["id"], "status": record.get("status"),
        "setting": setting.get("name") or spec.get("setting"), "dataset": setting.get("dataset"),
        "teacher_arch": setting.get("teacher"), "student_arch": setting.get("student"),
        "role": spec.get("role", "student"), "method": spec.get("method"),
        "title": None, "seed": spec.get("seed"),
        "teacher_seed": spec.get("teacher_seed"), "teacher_checkpoint": spec.get("teacher_checkpoint"),
        "precision": record_precision(record),
        **{name: metrics.get(name) for name in ("top1_last", "top5_last", "top1_best", "top5_best",
                                                 "best_epoch")},
        # The validation split's share and accuracy (run --select-on val; None otherwise).
        "held_out": spec.get("held_out"),
        **{name: metrics.get(name) for name in ("val_top1_last", "val_top5_last", "val_top1_best",
                                                 "val_top5_best")},
        **{name: record.get(name) for name in ("wall_seconds", "train_seconds", "images_per_second",
                                               "extra_parameters")},
        "student_weights": last.get("path"),
        "best_student_weights": (kept.get(KEEP_BEST) or {}).get("path"),
        "error": f"{error.get('type')}: {str(error.get('message', '')).splitlines()[0] if error.get('message') else ''}"
                 if error else None,
        "fidelity": provenance.get("fidelity"), "version": method_version(record),
        "git_commit": provenance.get("git_commit"), "device": provenance.get("device"),
        "finished_at": provenance.get("finished_at"),
    }
    row.update({f"config.{key}": value for key, value in flatten(config or {}).items()})
    row.update({f"recipe.{key}": value for key, value in flatten(recipe or {}).items()})
    return row


def _rows_and_titles(records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Each record's table row key and printed row title, as ``summarize`` makes them for the
    whole directory's runs."""
    from kdbench.aggregate import runs_frame
    from kdbench.rows import label_rows, row_titles

    frame = runs_frame(records)
    frame["row"] = label_rows(frame)
    titles = row_titles(frame)
    return frame["row"].tolist(), [titles[row] for row in frame["row"]]
