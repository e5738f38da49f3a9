"""One exception type for every user-facing error.

The CLI prints a `BenchError` as one line and exits with status 2, so each message must say on its
own what was wrong (the file, key or value at fault) and what was expected.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class BenchError(Exception):
    """An error caused by the user's input (config, names, files), not by a bug."""


def choices_hint(value: str, choices: Iterable[str]) -> str:
    """'valid: a, b, c (did you mean b?)' for an error line."""
    choices = sorted(choices)
    hint = f"valid: {', '.join(choices)}" if choices else "none are available"
    close = difflib.get_close_matches(str(value), choices, n=1)
    if close:
        hint += f" (did you mean '{close[0]}'?)"
    return hint
