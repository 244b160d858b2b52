"""Sweeps (kdbench/sweep.py): comma lists in --set and the recipe flags expand into variants.

Nothing trains here: the grid is built by the command line's own parser and
``grid_from_args``, and the bad lists go through ``main`` with --dry-run, as a user types
them. The end-to-end sweep with a validation split is in tests/test_validation.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from typing import ClassVar

import pytest

from kdbench import api
from kdbench.cli import build_parser, grid_from_args, main
from kdbench.errors import UserError
from kdbench.method import Method, MethodConfig
from kdbench.spec import RunSpec
from kdbench.sweep import Sweep, config_axes, is_scalar

SETTING = "synthetic/tiny"


def grid_of(tmp_path, *flags: str):
    args = build_parser().parse_args(["run", "--setting", SETTING, "--results", str(tmp_path), *flags])
    grid, _ = grid_from_args(args, creating=False)
    return grid


def pre_sweep_id(method: str, seed: int, config: dict, overrides: dict) -> str:
    """The id a run had before sweeps and validation splits existed: the sha256 of the
    canonical JSON of exactly the spec fields of that time, computed here by hand."""
    spec = {"setting": SETTING, "method": method, "seed": seed, "role": "student",
            "config": config, "overrides": overrides, "teacher_seed": 0,
            "teacher_checkpoint": None}
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def test_a_single_value_keeps_the_id_the_run_had_before_sweeps(tmp_path):
    grid = grid_of(tmp_path, "--methods", "kd", "--seeds", "1", "--set", "kd.temperature=2",
                   "--lr", "0.01", "--precision", "fp32")
    ids = {spec.method: spec.id for spec in grid.students()}
    assert ids == {"vanilla": pre_sweep_id("vanilla", 0, {}, {"lr": 0.01}),
                   "kd": pre_sweep_id("kd", 0, {"temperature": 2.0}, {"lr": 0.01})}


def test_lists_expand_into_the_cartesian_product_each_with_its_own_id(tmp_path):
    grid = grid_of(tmp_path, "--methods", "kd", "--seeds", "2", "--set", "kd.temperature=1,2,4",
                   "--lr", "0.01,0.05", "--precision", "fp32")
    students = grid.students()
    kd = [spec for spec in students if spec.method == "kd"]
    vanilla = [spec for spec in students if spec.method == "vanilla"]
    # The recipe axis applies to every student, the Student alone included; a method's own
    # axis only to it.
    assert {(s.config["temperature"], s.overrides["lr"], s.seed) for s in kd} == set(
        itertools.product([1.0, 2.0, 4.0], [0.01, 0.05], [0, 1]))
    assert len(kd) == 12
    assert {(s.overrides["lr"], s.seed) for s in vanilla} == set(itertools.product([0.01, 0.05], [0, 1]))
    assert all(s.config == {} for s in vanilla) and len(vanilla) == 4
    assert len({spec.id for spec in students}) == len(students) == 16
    assert grid.variant_count() == 8
    # Each variant is the spec a single-value command makes: sweeping changes no run's id.
    alone = grid_of(tmp_path, "--methods", "kd", "--seeds", "2", "--set", "kd.temperature=4",
                    "--lr", "0.05", "--precision", "fp32").students()
    assert {spec.id for spec in alone} <= {spec.id for spec in students}


def test_a_composition_sweeps_a_part_field(tmp_path):
    grid = grid_of(tmp_path, "--methods", "crd+kd", "--seeds", "1",
                   "--set", "crd+kd.kd.temperature=1,2", "--set", "crd+kd.crd.negatives=64")
    composed = [spec for spec in grid.students() if spec.method == "crd+kd"]
    assert [spec.config for spec in composed] == [{"kd.temperature": 1.0, "crd.negatives": 64},
                                                  {"kd.temperature": 2.0, "crd.negatives": 64}]
    assert composed[0].id != composed[1].id


def test_the_dry_run_names_every_variant_and_counts_them(tmp_path, capsys):
    assert main(["run", "--methods", "kd", "--seeds", "1", "--setting", SETTING, "--results",
                 str(tmp_path / "r"), "--set", "kd.temperature=2,4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 student runs (3 variants of 2 methods × 1 seeds" in out
    assert "kd seed 0 [temperature=2.0]" in out and "kd seed 0 [temperature=4.0]" in out
    assert not (tmp_path / "r").exists()


BAD_LISTS = [
    (["--set", "kd.temperature=2,,4"], "--set 'kd.temperature=2,,4': an empty item in the list"),
    (["--set", "kd.temperature=2,"], "an empty item in the list '2,'"),
    (["--set", "kd.temperature=2,2.0"], "'2.0' is listed twice (as '2')"),
    (["--set", "kd.temperature=2", "--set", "kd.temperature=4"], "kd.temperature is set twice"),
    (["--set", "kd.temperature=2,0"], "kd.temperature must be > 0, got 0.0"),
    (["--set", "kd.temperature=2,warm"], "expected a float, got 'warm'"),
    (["--lr", "0.01,,0.05"], "argument --lr: an empty item in the list '0.01,,0.05'"),
    (["--lr", "0.01,0.01"], "argument --lr: '0.01' is listed twice"),
    (["--lr", "0.01,inf"], "--lr must be a positive finite number, got inf"),
    (["--epochs", "1,0"], "argument --epochs: must be at least 1, got 0"),
    (["--batch-size", "64,1000000"], "--batch-size 1000000 is larger than the 1200 training images"),
]


@pytest.mark.parametrize("flags, message", BAD_LISTS, ids=[" ".join(case[0]) for case in BAD_LISTS])
def test_a_bad_list_is_one_line_and_exit_2_before_anything_is_written(tmp_path, capsys, flags, message):
    results = tmp_path / "results"
    assert main(["run", "--methods", "kd", "--seeds", "1", "--setting", SETTING, "--results",
                 str(results), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not results.exists()


def test_a_tuple_field_takes_its_commas_as_elements_not_as_a_sweep(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class ToyConfig(MethodConfig):
        layers: tuple[int, ...] = (1,)
        weight: float = 1.0

    class Toy(Method):
        name = "toy"
        Config: ClassVar[type[MethodConfig]] = ToyConfig

    from kdbench import registry

    monkeypatch.setattr(registry, "get", lambda name: Toy)
    (layers,) = config_axes(["toy.layers=1,2"], ["toy"])
    assert layers.values == ((1, 2),)  # one variant whose layers are (1, 2)
    (weight,) = config_axes(["toy.weight=1,2"], ["toy"])
    assert weight.values == (1.0, 2.0)  # a scalar's list: two variants
    assert Sweep((layers, weight)).count("toy") == 2
    assert is_scalar(float | None) and is_scalar(str) and not is_scalar(tuple[int, ...])


def test_the_api_sweeps_with_python_lists(tmp_path):
    args = api.parse_run_options({"methods": ["kd"], "seeds": 1, "setting": SETTING,
                                  "results": tmp_path, "set": {"kd.temperature": [2, 4]},
                                  "lr": [0.01, 0.05], "dry_run": True})
    cli = build_parser().parse_args(["run", "--methods", "kd", "--seeds", "1", "--setting", SETTING,
                                     "--results", str(tmp_path), "--set", "kd.temperature=2,4",
                                     "--lr", "0.01,0.05", "--dry-run"])
    assert vars(args) == vars(cli)
    with pytest.raises(UserError, match="listed twice"):
        grid_from_args(build_parser().parse_args(
            ["run", "--methods", "kd", "--setting", SETTING, "--set", "kd.alpha=1,1"]), creating=False)


def test_validation_split_is_part_of_the_id_and_absent_runs_keep_theirs(tmp_path):
    plain = grid_of(tmp_path, "--methods", "kd", "--seeds", "1", "--precision", "fp32")
    on_test = grid_of(tmp_path, "--methods", "kd", "--seeds", "1", "--precision", "fp32",
                      "--select-on", "test")
    on_val = grid_of(tmp_path, "--methods", "kd", "--seeds", "1", "--precision", "fp32",
                     "--select-on", "val")
    plain_ids = [spec.id for spec in plain.students()]
    assert plain_ids == [pre_sweep_id("vanilla", 0, {}, {}), pre_sweep_id("kd", 0, {}, {})]
    assert [spec.id for spec in on_test.students()] == plain_ids  # trains on the full set
    assert not set(spec.id for spec in on_val.students()) & set(plain_ids)
    assert {spec.held_out for spec in on_val.students()} == {0.1}
    # The teacher is shared: trained once on the full training set.
    assert [spec.id for spec in on_val.teachers()] == [spec.id for spec in plain.teachers()]
    assert RunSpec.from_json(on_val.students()[0].to_json()) == on_val.students()[0]
