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
from .results import current_results


def fill(text: str, values: dict[str, Any]) -> str:
    """`text` with every `{name:format}` placeholder replaced by `values[name]` formatted as asked."""
    missing = sorted(
        {name for _, name, _, _ in string.Formatter().parse(text) if name and name not in values}
    )
    if missing:
        raise MfkitError(
            f"The takeaways quote {missing}, which this run did not record.",
            "record each quoted number with mfkit.record(name, value) before the takeaways cell, or fix the name.",
        )
    return text.format_map(values)


def takeaways(text: str) -> None:
    """Show `text` as Markdown with its placeholders filled from this run's ledger.

    It returns nothing: a notebook cell that ends with this call would otherwise show the Markdown twice.
    """
    from IPython.display import Markdown, display

    display(Markdown(fill(text, current_results())))
