"""The results ledger: each notebook records its key numbers in `ARTIFACTS_DIR/results/<notebook>.json`.

Beside the numbers, the ledger keeps what produced them under the reserved key `RUN_KEY` ("_run"): the
notebook's resolved knobs, profile, seed and package versions, written by `mfkit.configure`. `load_results`
returns the numbers alone; `load_run` returns that record. The ledger of a notebook that failed is moved to
`results/failed/` by the chain runner, so no later notebook or table takes its partial numbers for results.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

from .errors import MfkitError
from .paths import artifacts_dir, atomic_path, is_main_process

RUN_KEY = "_run"
FAILED_DIR = "failed"
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
            raise MfkitError(
                "record() got NaN.", "check the computation that produced it; NaN is never a result."
            )
        if math.isinf(value):
            raise MfkitError(
                f"record() got {value} (infinity), which standard JSON cannot hold.",
                "check the computation that produced it (a division by zero, a loss that diverged); record a "
                "finite number, or None when there is no value.",
            )
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    raise MfkitError(
        f"record() cannot store a {type(value).__name__}.",
        "record numbers, strings, booleans, or lists/dicts of them.",
    )


def _read_ledger(path: Path) -> dict[str, Any]:
    """The whole ledger at `path`, reserved keys included ({} when there is none)."""
    return json.loads(path.read_text()) if path.exists() else {}


def _write_ledger(notebook: str, name: str, value: Any) -> None:
    """Set `name` in `notebook`'s ledger of the current artifacts folder, written atomically as strict JSON."""
    path = ledger_path(notebook, _current["artifacts_dir"])
    ledger = _read_ledger(path)
    ledger[name] = _plain(value)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(ledger, indent=2, sort_keys=True, allow_nan=False))


def _notebook(notebook: str | None) -> str:
    chosen = notebook or _current["notebook"]
    if chosen is None:
        raise MfkitError(
            "record() does not know which notebook is running.", "call mfkit.configure(...) first."
        )
    return chosen


def record(name: str, value: Any, notebook: str | None = None) -> Any:
    """Store `value` under `name` in the current notebook's ledger (written atomically) and return it."""
    if not isinstance(name, str) or not name or name.startswith("_"):
        raise MfkitError(
            f"record() got the name {name!r}; names starting with '_' are reserved (e.g. {RUN_KEY!r}).",
            "record under a plain name such as 'test_f1'.",
        )
    if is_main_process():  # under `accelerate launch` every process records the same (broadcast) figures
        _write_ledger(_notebook(notebook), name, value)
    return value


def record_run(info: dict[str, Any], notebook: str | None = None) -> None:
    """Store what produced this run's numbers (knobs, versions) under `RUN_KEY` of the notebook's ledger."""
    _write_ledger(_notebook(notebook), RUN_KEY, info)


def load_results(notebook: str, artifacts: str | Path | None = None) -> dict[str, Any]:
    """One notebook's recorded numbers ({} if it recorded none yet), without the run record."""
    ledger = _read_ledger(ledger_path(notebook, artifacts))
    return {k: v for k, v in ledger.items() if k != RUN_KEY} if isinstance(ledger, dict) else ledger


def current_results() -> dict[str, Any]:
    """The numbers the running notebook (the one `configure` started) has recorded so far."""
    return load_results(_notebook(None), _current["artifacts_dir"])


def load_run(notebook: str, artifacts: str | Path | None = None) -> dict[str, Any]:
    """What produced a notebook's numbers: its knobs, profile, seed and versions ({} when not recorded)."""
    ledger = _read_ledger(ledger_path(notebook, artifacts))
    return ledger.get(RUN_KEY, {}) if isinstance(ledger, dict) else {}


def failed_ledger_path(notebook: str, artifacts: str | Path | None = None) -> Path:
    """Where the partial ledger of a failed run of `notebook` is kept (out of the way of readers)."""
    return artifacts_dir(artifacts) / "results" / FAILED_DIR / f"{notebook}.json"


def set_aside_failed(notebook: str, artifacts: str | Path | None = None) -> Path | None:
    """Move a failed notebook's partial ledger to `results/failed/`; return its new path (None if none)."""
    path = ledger_path(notebook, artifacts)
    if not path.exists():
        return None
    target = failed_ledger_path(notebook, artifacts)
    target.parent.mkdir(parents=True, exist_ok=True)
    path.replace(target)
    return target


def clear_results(notebook: str, artifacts: str | Path | None = None) -> None:
    """Forget a notebook's earlier numbers (a failed run's too), so a rerun never mixes old and new results."""
    ledger_path(notebook, artifacts).unlink(missing_ok=True)
    failed_ledger_path(notebook, artifacts).unlink(missing_ok=True)


def load_all_results(artifacts: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Every notebook's recorded numbers, keyed by notebook name (run records and failed runs left out)."""
    folder = artifacts_dir(artifacts) / "results"
    return {p.stem: load_results(p.stem, artifacts) for p in sorted(folder.glob("*.json"))}
