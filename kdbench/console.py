"""Output for a terminal that may not speak UTF-8.

kdbench's messages and tables use a few non-ASCII signs (×, ±, →, Δ, α, †, ‡). Under a
non-UTF-8 locale (``LC_ALL=C`` with ``PYTHONUTF8=0``: a minimal container, a cron job, some
SLURM nodes) printing one raised UnicodeEncodeError and killed the command. There, stdout and
stderr spell each sign in ASCII instead (``x``, ``+/-``, ``->``) and anything else as ``?``.
Files kdbench writes (tables, records) are UTF-8 whatever the locale.
"""

from __future__ import annotations

import codecs
import sys

ASCII_SPELLING = {
    "×": "x", "±": "+/-", "→": "->", "←": "<-", "≥": ">=", "≤": "<=", "≈": "~", "—": "-",
    "–": "-", "…": "...", "Δ": "delta", "α": "alpha", "σ": "sigma", "μ": "mu", "†": "+",
    "‡": "++", "·": "*", "²": "^2", "‖": "||", "’": "'", "‘": "'", "“": '"', "”": '"',
}
ERROR_HANDLER = "kdbench-ascii"
SAMPLE = "".join(ASCII_SPELLING)


def _spell_in_ascii(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start:error.end]
    return "".join(ASCII_SPELLING.get(char, "?") for char in text), error.end


codecs.register_error(ERROR_HANDLER, _spell_in_ascii)


def ascii_where_needed() -> None:
    """Make stdout and stderr spell kdbench's signs in ASCII when their encoding cannot."""
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None)
        if not encoding or not hasattr(stream, "reconfigure"):
            continue
        try:
            SAMPLE.encode(encoding)
        except UnicodeEncodeError:
            stream.reconfigure(errors=ERROR_HANDLER)
        except LookupError:
            continue
