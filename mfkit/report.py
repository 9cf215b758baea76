"""Takeaways that quote this run: prose whose numbers are filled in from the notebook's results ledger.

A notebook's takeaways are a Markdown text with `{name:format}` placeholders, e.g. `"LoRA kept {lora_f1:.3f}"`.
`takeaways` fills every placeholder from the values the notebook recorded with `mfkit.record` in this run, so a
number in the takeaways can never be one typed in from an earlier run. A placeholder that names nothing recorded
stops with an error instead of printing a stale or made-up figure.
"""

from __future__ import annotations

import string
from typing import Any

from .errors import MfkitError
from .results import load_results
from .results import _current as _current_ledger


def current_results() -> dict[str, Any]:
    """The numbers the running notebook has recorded so far (its ledger)."""
    notebook = _current_ledger["notebook"]
    if notebook is None:
        raise MfkitError("No notebook is running, so there is no ledger to quote.", "call mfkit.configure(...) first.")
    return load_results(notebook, _current_ledger["artifacts_dir"])


def fill(text: str, values: dict[str, Any]) -> str:
    """`text` with every `{name:format}` placeholder replaced by `values[name]` formatted as asked."""
    missing = sorted({name for _, name, _, _ in string.Formatter().parse(text) if name and name not in values})
    if missing:
        raise MfkitError(
            f"The takeaways quote {missing}, which this run did not record.",
            "record each quoted number with mfkit.record(name, value) before the takeaways cell, or fix the name.",
        )
    return text.format_map(values)


def takeaways(text: str) -> Any:
    """Show `text` as Markdown with its placeholders filled from this run's ledger; return the Markdown object."""
    from IPython.display import Markdown, display

    filled = Markdown(fill(text, current_results()))
    display(filled)
    return filled
