"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

import difflib


class UserError(Exception):
    """A mistake in the user's input (names, numbers, paths, files): one clear line, exit 2."""


def suggest(name: str, candidates: list[str]) -> str:
    """The tail of an "unknown name" message: the nearest names, or all of them."""
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return "known: " + ", ".join(candidates)
