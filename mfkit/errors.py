"""One error type for everything a learner can fix: it names the problem and the fix."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class MfkitError(ValueError):
    """A bad input, a missing artifact or an unreachable resource, with the fix in the message."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  Fix: {fix}")


def check_choice(name: str, value: object, choices: list | tuple | set) -> None:
    """Raise `MfkitError` unless `value` is one of `choices`."""
    if value not in choices:
        options = ", ".join(repr(c) for c in sorted(choices, key=str))
        raise MfkitError(f"{name}={value!r} is not a valid choice.", f"use one of {options}.")


def check_positive(name: str, value: float | int, allow_zero: bool = False) -> None:
    """Raise `MfkitError` unless `value` is a positive number (or zero, when allowed)."""
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        bound = "zero or more" if allow_zero else "greater than zero"
        raise MfkitError(f"{name}={value!r} must be a number {bound}.", f"pass {name} as a number {bound}.")


def check_writable(folder: str | os.PathLike, name: str, fix: str) -> Path:
    """Create `folder` if needed and prove a file can be written in it (none is left); else raise `MfkitError`.

    Called before a long run, so a read-only folder is reported in one line instead of after all the work.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MfkitError(
            f"{name} {folder} cannot be written to ({reason}).",
            f"{fix}, or make the folder writable (e.g. chmod -R u+w).",
        ) from exc
    return folder
