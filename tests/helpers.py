"""Plain helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

from mfkit import cli


def run_cli(*argv: str) -> tuple[int, str]:
    """Call `mfkit ...` in-process; return the exit code and what it printed."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(list(argv))
    return code, out.getvalue()
