"""The results ledger: each notebook records its key numbers in `ARTIFACTS_DIR/results/<notebook>.json`."""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

from .errors import MfkitError
from .paths import artifacts_dir, atomic_path

_current: dict[str, Any] = {"notebook": None, "artifacts_dir": None}


def set_notebook(notebook: str, artifacts: str | Path | None = None) -> Path:
    """Make `notebook` the one whose ledger `record` writes to; return the ledger's path."""
    _current["notebook"] = notebook
    _current["artifacts_dir"] = artifacts_dir(artifacts)
    return ledger_path(notebook, _current["artifacts_dir"])


def ledger_path(notebook: str, artifacts: str | Path | None = None) -> Path:
    """Path of one notebook's results JSON."""
    return artifacts_dir(artifacts) / "results" / f"{notebook}.json"


def _plain(value: Any) -> Any:
    """Turn numpy/torch scalars into JSON numbers; refuse what a baseline could not compare."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            raise MfkitError("record() got NaN.", "check the computation that produced it; NaN is never a result.")
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    raise MfkitError(
        f"record() cannot store a {type(value).__name__}.",
        "record numbers, strings, booleans, or lists/dicts of them.",
    )


def record(name: str, value: Any, notebook: str | None = None) -> Any:
    """Store `value` under `name` in the current notebook's ledger (written atomically) and return it."""
    notebook = notebook or _current["notebook"]
    if notebook is None:
        raise MfkitError("record() does not know which notebook is running.", "call mfkit.configure(...) first.")
    path = ledger_path(notebook, _current["artifacts_dir"])
    ledger = load_results(notebook, _current["artifacts_dir"])
    ledger[name] = _plain(value)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(ledger, indent=2, sort_keys=True))
    return value


def load_results(notebook: str, artifacts: str | Path | None = None) -> dict[str, Any]:
    """One notebook's recorded numbers ({} if it recorded none yet)."""
    path = ledger_path(notebook, artifacts)
    return json.loads(path.read_text()) if path.exists() else {}


def clear_results(notebook: str, artifacts: str | Path | None = None) -> None:
    """Forget a notebook's earlier numbers, so a rerun never mixes old and new results."""
    ledger_path(notebook, artifacts).unlink(missing_ok=True)


def load_all_results(artifacts: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Every notebook's ledger, keyed by notebook name."""
    folder = artifacts_dir(artifacts) / "results"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
