"""A result never outlives the code that made it silently (issue 13).

End to end: ``methods/kd.py`` copied into a throw-away plugin distribution ("stale-kd", the
way tests/test_plugins.py installs one), trained, its file edited, the grid re-run: `run`
names the method, the file and both hashes in one line and stops (exit 2) until told to keep
or retrain; `status` counts the stale runs; --retrain-stale moves the old records aside
byte for byte. Each command runs in its own process, as a user's would (entry points and
modules are read per process).

Below it, the pure functions the tables use (kdbench/staleness.py) on hand-made records.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdbench.models import build_model
from kdbench.settings import get as get_setting
from kdbench.staleness import CodeVersion, code_version, group_by_code_version, is_stale, stale_summary

REPO = Path(__file__).resolve().parents[1]
SETTING = "synthetic/tiny"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("stale")
    site = work / "site"
    site.mkdir()
    source = (REPO / "methods" / "kd.py").read_text().replace('name = "kd"', 'name = "stalekd"')
    (site / "stale_kd.py").write_text(source)
    info = site / "stale_kd-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stale-kd\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[kdbench.methods]\nstalekd = stale_kd:KD\n")
    torch.manual_seed(0)  # an untrained teacher: these runs test bookkeeping, not accuracy
    torch.save(build_model(get_setting(SETTING).teacher, 10, 3).state_dict(), work / "teacher.pt")
    return work


def grid(work: Path, command: str) -> list[str]:
    args = [command, "--methods", "stalekd", "--setting", SETTING, "--seeds", "1", "--epochs", "1",
            "--results", str(work / "results"), "--teacher-checkpoint", str(work / "teacher.pt")]
    return args + (["--executor", "inprocess", "--no-table"] if command == "run" else [])


@pytest.fixture
def installed(workspace: Path, monkeypatch: pytest.MonkeyPatch):
    """The plugin installed in this process too (entry points are read once per process)."""
    from kdbench import registry

    monkeypatch.syspath_prepend(str(workspace / "site"))
    registry.registrations.cache_clear()
    registry.get.cache_clear()
    yield
    sys.modules.pop("stale_kd", None)
    registry.registrations.cache_clear()
    registry.get.cache_clear()


def records(work: Path, method: str) -> dict[str, dict]:
    found = {}
    for path in sorted((work / "results" / "runs").glob("*.json")):
        record = json.loads(path.read_text())
        if record["spec"]["method"] == method:
            found[path.name] = record
    return found


# ≈ 25 s of CPU: a real grid trained in its own process before the edit, then five commands
# (two of them training) in this one; splitting it would repeat the first grid.
@pytest.mark.slow
def test_an_edited_method_file_is_reported_and_nothing_mixes_silently(workspace: Path, installed, capsys) -> None:
    from kdbench.cli import main

    work = workspace
    plugin = work / "site" / "stale_kd.py"
    # The first grid in a process of its own, as a user's earlier `kdbench run` was: this
    # process imports the plugin only after its file is edited below.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work / "site"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-m", "kdbench", *grid(work, "run")], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "stale_kd" not in sys.modules
    old_sha = sha256(plugin)
    made = records(work, "stalekd")
    assert len(made) == 1
    for record in made.values():
        provenance = record["provenance"]
        assert provenance["method_source_sha256"] == old_sha
        assert provenance["method_source_files"] == {"stale_kd.py": old_sha}
        assert (provenance["method_distribution"], provenance["method_distribution_version"]) == ("stale-kd", "0.1.0")
    snapshot = {name: (work / "results" / "runs" / name).read_bytes() for name in made}

    # Edit the method's file (any edit: the hash cannot tell a comment from a formula).
    plugin.write_text(plugin.read_text() + "\n# edited after the grid was trained\n")
    new_sha = sha256(plugin)
    assert main(grid(work, "run")) == 2
    refused = capsys.readouterr()
    expected = (f"kdbench: stalekd: 1 stored result was made by another version of stale_kd.py "
                f"(sha256 {old_sha[:12]}… vs {new_sha[:12]}…); --retrain-stale retrains them, "
                "--keep-stale keeps them")
    lines = refused.err.strip().splitlines()
    assert lines[0] == expected  # one line per method: the baseline's code did not change
    assert len(lines) == 2 and lines[1].startswith("kdbench: error: 1 stored result was made by other code")
    assert "to train" not in refused.out
    assert {name: (work / "results" / "runs" / name).read_bytes() for name in made} == snapshot

    assert main(grid(work, "status")) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    columns = header.split()[2:]
    counts = {line.split()[1]: dict(zip(columns, line.split()[2:])) for line in rows
              if not line.startswith("stale:")}
    assert (counts["stalekd"]["done"], counts["stalekd"]["stale"]) == ("0", "1")
    assert (counts["vanilla"]["done"], counts["vanilla"]["stale"]) == ("1", "0")
    assert "stale: stalekd: 1 stored result was made by another version of stale_kd.py" in "\n".join(rows)

    assert main(grid(work, "run") + ["--keep-stale"]) == 0
    kept = capsys.readouterr()
    assert "kept (--keep-stale)" in kept.err and "nothing to train" in kept.out
    assert {name: (work / "results" / "runs" / name).read_bytes() for name in made} == snapshot

    assert main(grid(work, "run") + ["--retrain-stale"]) == 0
    retrained = capsys.readouterr()
    assert "1 already stored, 1 to train" in retrained.out, retrained.err[-2000:]
    aside = work / "results" / "runs" / "stale"
    for name, content in snapshot.items():
        run_id = name.removesuffix(".json")
        assert (aside / f"{run_id}.{old_sha[:12]}.json").read_bytes() == content  # kept, unchanged
    for record in records(work, "stalekd").values():
        assert record["status"] == "done" and record["provenance"]["method_source_sha256"] == new_sha

    assert main(grid(work, "run")) == 0
    assert "nothing to train" in capsys.readouterr().out


# --- the pure functions (tables call these) ------------------------------------------------------

def record(sha: str | None, training_version: int | None, files: dict | None = None) -> dict:
    provenance = {"method_source_sha256": sha, "training_version": training_version}
    if files is not None:
        provenance["method_source_files"] = files
    return {"id": "x", "status": "done", "spec": {}, "provenance": provenance}


def test_records_share_a_version_exactly_when_hash_and_engine_are_equal() -> None:
    a1, a2 = record("a" * 64, 1), record("a" * 64, 1)
    other_engine, other_code, unknown = record("a" * 64, 2), record("b" * 64, 1), {"id": "y", "spec": {}}
    groups = group_by_code_version([a1, other_code, a2, other_engine, unknown])
    assert list(groups) == [CodeVersion("a" * 64, 1), CodeVersion("b" * 64, 1), CodeVersion("a" * 64, 2),
                            CodeVersion(None, None)]
    assert groups[CodeVersion("a" * 64, 1)] == [a1, a2]
    installed = CodeVersion("a" * 64, 1)
    assert [is_stale(r, installed) for r in (a1, other_engine, other_code, unknown)] == [False, True, True, True]
    assert code_version(record("a" * 64, None)) != installed  # made before versions were recorded


def test_the_summary_names_the_changed_file_and_the_engine() -> None:
    installed = CodeVersion("f" * 64, 2)
    files = {"methods/fitnet.py": "1" * 64, "methods/kd.py": "2" * 64}
    # Only kd.py differs from what these records stored: only it is named.
    changed = record("e" * 64, 2, {"methods/fitnet.py": "1" * 64, "methods/kd.py": "3" * 64})
    assert stale_summary("fitnet", [changed], installed, files) == (
        f"fitnet: 1 stored result was made by another version of methods/kd.py "
        f"(sha256 {'e' * 12}… vs {'f' * 12}…)")
    older_engine = record("f" * 64, None)
    both = record("d" * 64, 1)  # no per-file hashes stored: every file of the method is named
    assert stale_summary("fitnet", [changed, older_engine, both], installed, files) == (
        "fitnet: 3 stored results were made by other code (2 by another version of "
        f"methods/fitnet.py + methods/kd.py (sha256 {'d' * 12}…, {'e' * 12}… vs {'f' * 12}…); "
        "2 by another engine (training_version 1, not recorded vs 2))")
