"""Entry-point plugin groups: a name -> an object, loaded lazily, one plugin's failure its own.

kdbench has three groups, each owned by the module that knows what its objects are:
``kdbench.methods`` (kdbench/registry.py: Method classes), ``kdbench.models``
(kdbench/models/__init__.py: model factories and families) and ``kdbench.datasets``
(kdbench/data.py: dataset sources). The built-ins are registered in kdbench's own
pyproject.toml, exactly as a third party registers theirs, so the plugin path is the only path.

What a group promises (DESIGN.md, "A method is one file"):
- nothing is imported until a name is asked for, so a plugin whose import fails cannot break
  a run that does not use it: asked for, it is a ``BrokenPlugin`` (a UserError: one line, exit
  2) naming the plugin, its target and its distribution;
- two distributions registering one name is an error, not a silent overwrite;
- an unknown name is a UserError that suggests the nearest registered ones.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, version
from typing import Any, Callable

from kdbench.errors import UserError, suggest


class UnknownPlugin(UserError):
    """A name that no distribution registers in the group."""


class BrokenPlugin(UserError):
    """A registered plugin that does not load, or loads as something else than its group needs."""


@dataclass(frozen=True)
class Registration:
    name: str
    target: str  # "module:attribute"
    distribution: str  # the package that registered it


class PluginGroup:
    """One entry-point group. ``kind`` names its objects in messages ("method", "model")."""

    def __init__(self, group: str, kind: str) -> None:
        self.group = group
        self.kind = kind
        self._found: dict[str, list[Registration]] | None = None
        self._loaded: dict[str, Any] = {}

    def clear(self) -> None:
        """Forget what was scanned and loaded (a test that installs a plugin mid-process)."""
        self._found = None
        self._loaded = {}

    def registrations(self) -> dict[str, list[Registration]]:
        """Every registration of the group, by name (entry points are scanned once)."""
        if self._found is None:
            self._found = self._scan()
        return self._found

    def _scan(self) -> dict[str, list[Registration]]:
        found: dict[str, list[Registration]] = {}
        for entry in entry_points(group=self.group):
            distribution = entry.dist.name if entry.dist is not None else "?"
            registration = Registration(entry.name, entry.value, distribution)
            same = found.setdefault(entry.name, [])
            if registration not in same:  # one distribution seen twice on sys.path is no clash
                same.append(registration)
        return found

    def names(self) -> list[str]:
        return sorted(self.registrations())

    def __contains__(self, name: str) -> bool:
        return name in self.registrations()

    def registration(self, name: str, unknown: type[UserError] = UnknownPlugin) -> Registration:
        """The one registration of ``name``; ``unknown`` (a UserError class) when there is none,
        BrokenPlugin when two distributions claim it."""
        found = self.registrations().get(name)
        if not found:
            raise unknown(f"unknown {self.kind} {name!r}; {suggest(name, self.names())}")
        if len(found) > 1:
            owners = ", ".join(f"{r.distribution} ({r.target})" for r in found)
            raise BrokenPlugin(f"{self.kind} {name!r} is registered twice: {owners}; uninstall one")
        return found[0]

    def load(self, name: str) -> Any:
        """The object registered as ``name``, imported on first use (then cached)."""
        if name not in self._loaded:
            self._loaded[name] = self._import(name)
        return self._loaded[name]

    def _import(self, name: str) -> Any:
        registration = self.registration(name)
        try:
            return EntryPoint(name, registration.target, self.group).load()
        # Any import-time error of a plugin is the plugin's, not ours; sys.exit() at import too
        # (a SystemExit would end kdbench with the plugin's message and no word of which plugin).
        except (Exception, SystemExit) as error:
            imported = imported_module(registration.target) if isinstance(error, AttributeError) else ""
            raise BrokenPlugin(
                f"{self.kind} {name!r} ({registration.target}, from {registration.distribution}) "
                f"failed to import: {type(error).__name__}: {error}{imported}"
            ) from error

    def load_checked(self, name: str, check: Callable[[Any], str | None]) -> Any:
        """``load(name)``, then ``check(loaded)``: a reason why it is not what the group needs,
        or None; a reason is a BrokenPlugin naming the plugin."""
        loaded = self.load(name)
        problem = check(loaded)
        if problem:
            registration = self.registration(name)
            raise BrokenPlugin(f"{self.kind} {name!r} ({registration.target}, from "
                               f"{registration.distribution}) {problem}")
        return loaded

    def origin(self, name: str) -> str:
        """"distribution: module:attribute", as ``kdbench list`` shows where a plugin came from."""
        registration = self.registrations()[name][0]
        return f"{registration.distribution}: {registration.target}"

    def distribution(self, name: str) -> tuple[str | None, str | None]:
        """(name, version) of the distribution that registered ``name``, or (None, None) when
        it is not registered exactly once."""
        found = self.registrations().get(name, [])
        if len(found) != 1:
            return None, None
        distribution = found[0].distribution
        try:
            return distribution, version(distribution)
        except PackageNotFoundError:
            return distribution, None


def imported_module(target: str) -> str:
    """Which module an entry point ``module:Class`` imported, when the class was not in it: the
    name may have found another module first on sys.path. A plugin's project folder of the
    module's name, seen from its parent directory, imports as a namespace package (issue 19)."""
    module = sys.modules.get(target.partition(":")[0].strip())
    if module is None:
        return ""
    if getattr(module, "__file__", None):
        return f"; the module imported as {module.__name__} is {module.__file__}"
    folders = ", ".join(str(folder) for folder in getattr(module, "__path__", []))
    return (f"; the module imported as {module.__name__} is a namespace package over {folders} "
            f"(a folder without __init__.py found first on sys.path, e.g. the plugin's project "
            f"folder from its parent directory): run kdbench from another directory")
