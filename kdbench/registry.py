"""Method name -> Method class, filled lazily from the ``kdbench.methods`` entry-point group.

Built-in methods are registered through the same entry-point group as third-party ones (see
pyproject.toml), so the plugin path is the only path. Classes are imported only when asked
for by name: a plugin whose import fails cannot break a run of other methods; it is listed
with its error instead. Two distributions registering the same name is an error, not a
silent overwrite.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache

from kdbench import composition, sources
from kdbench.errors import UserError
from kdbench.method import Method
from kdbench.plugins import BrokenPlugin, PluginGroup, Registration, UnknownPlugin

GROUP = "kdbench.methods"
METHODS = PluginGroup(GROUP, "method")

__all__ = ["GROUP", "METHODS", "BrokenPlugin", "Registration", "UnknownMethod", "describe",
           "distribution_of", "get", "names", "registrations", "source_sha256"]


class UnknownMethod(UnknownPlugin):
    pass


def registrations() -> dict[str, list[Registration]]:
    return METHODS.registrations()


# Tests that install a plugin mid-process clear the scan (and what was imported) this way.
registrations.cache_clear = METHODS.clear  # type: ignore[attr-defined]


def names() -> list[str]:
    return METHODS.names()


def _not_a_method(name: str):
    def check(loaded: object) -> str | None:
        if not (inspect.isclass(loaded) and issubclass(loaded, Method)):
            return "is not a kdbench Method"
        if getattr(loaded, "name", None) != name:
            return f"declares name {getattr(loaded, 'name', None)!r}"
        return None

    return check


@lru_cache(maxsize=None)
def get(name: str) -> type[Method]:
    """The Method class registered as ``name``, or the composition of registered methods that
    ``name`` joins with "+" ("crd+kd", kdbench/composition.py). Raises UserError for a user's
    mistake."""
    if composition.is_composition(name):
        return composition.compose(name, [get(part) for part in composition.part_names(name)])
    METHODS.registration(name, unknown=UnknownMethod)
    return METHODS.load_checked(name, _not_a_method(name))



def source_sha256(method: type[Method]) -> str:
    """Hash of a method's code (kdbench/sources.py): records say exactly which code made them."""
    return sources.source_sha256(method)


def distribution_of(method: type[Method]) -> tuple[str | None, str | None]:
    """(name, version) of the installed distribution that registered ``method``, or
    (None, None) for a class that is not registered under its name."""
    return METHODS.distribution(getattr(method, "name", ""))


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
    origin = METHODS.origin(name)
    try:
        method = get(name)
    except UserError as error:
        return Description(name, origin, error=str(error))
    return Description(name, origin, method.paper, getattr(method, "display_name", None),
                       getattr(method, "fidelity", None), getattr(method, "fidelity_note", None))
