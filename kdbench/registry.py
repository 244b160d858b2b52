"""Method name -> Method class, filled lazily from the ``kdbench.methods`` entry-point group.

Built-in methods are registered through the same entry-point group as third-party ones (see
pyproject.toml), so the plugin path is the only path. Classes are imported only when asked
for by name: a plugin whose import fails cannot break a run of other methods; it is listed
with its error instead. Two distributions registering the same name is an error, not a
silent overwrite.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, version

from kdbench import composition, sources
from kdbench.errors import UserError, suggest
from kdbench.method import Method

GROUP = "kdbench.methods"


class UnknownMethod(UserError):
    pass


class BrokenPlugin(UserError):
    pass


@dataclass(frozen=True)
class Registration:
    name: str
    target: str  # "module:Class"
    distribution: str  # the package that registered it


@lru_cache(maxsize=1)
def registrations() -> dict[str, list[Registration]]:
    found: dict[str, list[Registration]] = {}
    for entry in entry_points(group=GROUP):
        distribution = entry.dist.name if entry.dist is not None else "?"
        registration = Registration(entry.name, entry.value, distribution)
        same = found.setdefault(entry.name, [])
        if registration not in same:  # one distribution seen twice on sys.path is not a clash
            same.append(registration)
    return found


def names() -> list[str]:
    return sorted(registrations())


@lru_cache(maxsize=None)
def get(name: str) -> type[Method]:
    """The Method class registered as ``name``, or the composition of registered methods that
    ``name`` joins with "+" ("crd+kd", kdbench/composition.py). Raises UserError for a user's
    mistake."""
    if composition.is_composition(name):
        return composition.compose(name, [get(part) for part in composition.part_names(name)])
    found = registrations().get(name)
    if not found:
        raise UnknownMethod(f"unknown method {name!r}; {suggest(name, names())}")
    if len(found) > 1:
        owners = ", ".join(f"{r.distribution} ({r.target})" for r in found)
        raise BrokenPlugin(f"method {name!r} is registered twice: {owners}; uninstall one")
    registration = found[0]
    try:
        loaded = EntryPoint(name, registration.target, GROUP).load()
    # Any import-time error of a plugin is the plugin's, not ours; sys.exit() at import too (a
    # SystemExit would end kdbench with the plugin's message and no word of which plugin).
    except (Exception, SystemExit) as error:
        imported = imported_module(registration.target) if isinstance(error, AttributeError) else ""
        raise BrokenPlugin(
            f"method {name!r} ({registration.target}, from {registration.distribution}) "
            f"failed to import: {type(error).__name__}: {error}{imported}"
        ) from error
    if not (inspect.isclass(loaded) and issubclass(loaded, Method)):
        raise BrokenPlugin(f"method {name!r} ({registration.target}) is not a kdbench Method")
    if getattr(loaded, "name", None) != name:
        raise BrokenPlugin(
            f"method {name!r} ({registration.target}) declares name {getattr(loaded, 'name', None)!r}"
        )
    return loaded


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


def source_sha256(method: type[Method]) -> str:
    """Hash of a method's code (kdbench/sources.py): records say exactly which code made them."""
    return sources.source_sha256(method)


def distribution_of(method: type[Method]) -> tuple[str | None, str | None]:
    """(name, version) of the installed distribution that registered ``method``, or
    (None, None) for a class that is not registered under its name."""
    found = registrations().get(getattr(method, "name", ""), [])
    if len(found) != 1:
        return None, None
    distribution = found[0].distribution
    try:
        return distribution, version(distribution)
    except PackageNotFoundError:
        return distribution, None


@dataclass(frozen=True)
class Description:
    """One method as ``kdbench list`` shows it."""

    name: str
    origin: str  # "distribution: module:Class"
    paper: str = ""
    display_name: str | None = None
    fidelity: str | None = None
    fidelity_note: str | None = None
    error: str | None = None  # why a plugin does not load; None when it does


def describe(name: str) -> Description:
    """``name`` as ``kdbench list`` shows it; never raises for a broken plugin."""
    registration = registrations()[name][0]
    origin = f"{registration.distribution}: {registration.target}"
    try:
        method = get(name)
    except UserError as error:
        return Description(name, origin, error=str(error))
    return Description(name, origin, method.paper, getattr(method, "display_name", None),
                       getattr(method, "fidelity", None), getattr(method, "fidelity_note", None))
