"""The chain runner: execute the numbered notebooks in order with papermill and collect their recorded numbers.

Each notebook runs in its own kernel, in the notebooks folder (so relative paths behave as in Jupyter), with
`PROFILE` and `ARTIFACTS_DIR` injected into its `parameters` cell. After each one the runner reads its results
ledger and prints a table row; at the end it writes `OUTPUT/summary.json`. A failed notebook does not stop the
chain: the notebooks that need it (directly or through others, per `metadata["mfkit"]["requires"]`) are skipped,
the independent ones still run.
"""

from __future__ import annotations

import ast
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nbformat
import papermill
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from .errors import MfkitError, check_choice, check_positive
from .paths import ARTIFACTS_ENV, REPO_DIR, atomic_path, notebooks_dir
from .profiles import PROFILE_NAMES
from .results import clear_results, load_results

KERNEL_NAME = "python3"
SUMMARY_NAME = "summary.json"
NOTEBOOK_PATTERN = re.compile(r"^(\d{2})_[\w.-]+\.ipynb$")
PARAM_TYPES = (str, int, float, bool, type(None), list, dict)
STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = "ok", "failed", "skipped"


@dataclass(frozen=True)
class Notebook:
    """One numbered notebook of the chain and the notebooks it needs."""

    number: str
    stem: str
    path: Path
    requires: tuple[str, ...] = ()


@dataclass
class Outcome:
    """What happened to one notebook in a run (one row of the table, one entry of summary.json)."""

    status: str
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    output: str | None = None


@dataclass
class ChainReport:
    """The result of `run_chain`: every notebook's outcome and where the summary went."""

    summary: dict[str, Any]
    summary_path: Path

    @property
    def ok(self) -> bool:
        return bool(self.summary["ok"])

    @property
    def exit_code(self) -> int:
        """0 when every selected notebook ran cleanly, else 1."""
        return 0 if self.ok else 1


# --- finding and selecting notebooks ---------------------------------------------------------------------


def _requires(path: Path) -> tuple[str, ...]:
    """The notebook stems listed in `metadata["mfkit"]["requires"]` of the notebook at `path`."""
    try:
        meta = nbformat.read(path, as_version=4).metadata
    except Exception as exc:  # nbformat raises several types for a broken file
        raise MfkitError(f"{path} is not a readable notebook ({exc}).", "open it in Jupyter and save it again.") from exc
    requires = meta.get("mfkit", {}).get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise MfkitError(
            f"{path.name}: metadata['mfkit']['requires'] must be a list of notebook names, got {requires!r}.",
            'write it as e.g. ["01_data-and-tokenizers"].',
        )
    return tuple(requires)


def discover(folder: str | os.PathLike | None = None) -> list[Notebook]:
    """The `NN_slug.ipynb` notebooks of `folder` (default: the repository's), in chain order."""
    folder = Path(folder).expanduser().resolve() if folder is not None else notebooks_dir()
    if not folder.is_dir():
        raise MfkitError(f"Notebooks folder {folder} does not exist.", "pass --notebooks DIR with the NN_slug.ipynb files.")
    paths = sorted(p for p in folder.iterdir() if NOTEBOOK_PATTERN.match(p.name))
    if not paths:
        raise MfkitError(f"No NN_slug.ipynb notebooks in {folder}.", "pass --notebooks DIR with the numbered notebooks.")
    found = [Notebook(p.name[:2], p.stem, p, _requires(p)) for p in paths]
    stems = {nb.stem for nb in found}
    for nb in found:
        unknown = [r for r in nb.requires if r not in stems]
        if unknown:
            raise MfkitError(
                f"{nb.path.name} requires {unknown}, which {'is' if len(unknown) == 1 else 'are'} not in {folder}.",
                f"fix metadata['mfkit']['requires'] of {nb.stem}: use notebook names such as {found[0].stem!r}.",
            )
    return found


def _number(option: str, value: str | int) -> int:
    """A notebook number given on the command line (`3`, `03`)."""
    text = str(value).strip()
    if not text.isdigit():
        raise MfkitError(f"{option} {value!r} is not a notebook number.", f"write it as two digits, e.g. {option} 03.")
    return int(text)


def parse_only(text: str | Sequence[str | int] | None) -> list[str] | None:
    """`"03,05"` (or a list) -> the tokens it names; None when not given."""
    if text is None:
        return None
    tokens = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    tokens = [t.strip() for t in tokens if t.strip()]
    if not tokens:
        raise MfkitError("--only is empty.", "name notebooks by number, e.g. --only 03,05.")
    return tokens


def _matches(nb: Notebook, token: str) -> bool:
    """True when `token` (a number like `3`/`03`, or a full name) names `nb`."""
    return int(nb.number) == int(token) if token.isdigit() else nb.stem == token


def select(
    notebooks: Sequence[Notebook],
    only: Sequence[str | int] | None = None,
    start: str | int | None = None,
    end: str | int | None = None,
) -> list[Notebook]:
    """The notebooks picked by `--only` (numbers or names) and the `--from`/`--to` range, in chain order."""
    low = _number("--from", start) if start is not None else None
    high = _number("--to", end) if end is not None else None
    if low is not None and high is not None and low > high:
        raise MfkitError(f"--from {start} comes after --to {end}.", "give --from a number no larger than --to.")
    chosen = list(notebooks)
    if only is not None:
        tokens = [str(t).strip() for t in only]
        unmatched = [t for t in tokens if not any(_matches(nb, t) for nb in notebooks)]
        if unmatched:
            raise MfkitError(
                f"--only {','.join(unmatched)} matches no notebook.",
                f"use the numbers of the notebooks present: {', '.join(nb.number for nb in notebooks)}.",
            )
        chosen = [nb for nb in chosen if any(_matches(nb, t) for t in tokens)]
    chosen = [nb for nb in chosen if (low is None or int(nb.number) >= low) and (high is None or int(nb.number) <= high)]
    if not chosen:
        raise MfkitError(
            "No notebook is selected by that --only/--from/--to combination.",
            f"pick from the notebooks present: {', '.join(nb.number for nb in notebooks)}.",
        )
    return chosen


def prerequisites(stem: str, graph: Mapping[str, Iterable[str]]) -> set[str]:
    """Every notebook `stem` needs, directly or through the notebooks it needs."""
    seen: set[str] = set()
    stack = list(graph.get(stem, ()))
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(graph.get(name, ()))
    seen.discard(stem)
    return seen


# --- parameters ----------------------------------------------------------------------------------------------


def _literal(text: str) -> Any:
    """A Python literal when `text` is one (`3`, `0.1`, `True`, `[1, 2]`, `'x'`), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _check_passable(key: str, value: Any) -> None:
    """Refuse values papermill would silently turn into strings (tuples, sets, bytes, complex)."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if not isinstance(value, PARAM_TYPES) or (isinstance(value, dict) and not all(isinstance(k, str) for k in value)):
        raise MfkitError(
            f"--param {key}={value!r}: a {type(value).__name__} cannot be passed to a notebook.",
            "use a string, number, True/False/None, a list [...] or a dict with string keys.",
        )
    for item in items:
        _check_passable(key, item)


def parse_params(items: Iterable[str] | None) -> dict[str, Any]:
    """`["MAX_STEPS=10", "MODEL=minilm"]` -> `{"MAX_STEPS": 10, "MODEL": "minilm"}` (values as Python literals)."""
    params: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MfkitError(f"--param {item!r} is not KEY=VALUE.", "write it as e.g. --param MAX_STEPS=10.")
        if not key.isidentifier() or key != key.upper():
            hint = key.upper() if key.upper().isidentifier() else "MAX_STEPS"
            raise MfkitError(
                f"--param {key!r} is not a notebook parameter name.",
                f"parameters are UPPER_CASE names from the notebook's parameters cell, e.g. --param {hint}={raw}.",
            )
        value = _literal(raw.strip())
        _check_passable(key, value)
        params[key] = value
    return params


# --- running ---------------------------------------------------------------------------------------------------


def _check_kernel() -> None:
    """Stop early, with the fix, when no `python3` Jupyter kernel can be started."""
    try:
        KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel as exc:
        raise MfkitError(
            f"No Jupyter kernel named {KERNEL_NAME!r} is installed.",
            "install one for this environment: python -m ipykernel install --sys-prefix --name python3",
        ) from exc


@contextmanager
def _env_var(name: str, value: str) -> Iterator[None]:
    """Set an environment variable (inherited by the kernels) for the duration of the run."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _short(text: str, lines: int = 3, width: int = 200) -> str:
    """The first few lines of an error message, each cut to `width` characters."""
    text = papermill.exceptions.strip_color(str(text)).strip()
    kept = [line if len(line) <= width else line[: width - 3] + "..." for line in text.splitlines()[:lines]]
    more = " ..." if len(text.splitlines()) > lines else ""
    return "\n".join(kept) + more


def _source_cell_number(path: Path, executed_index: int) -> int | None:
    """1-based position in the source notebook of cell `executed_index` of the executed one.

    papermill adds one `injected-parameters` cell after the `parameters` cell (or at the top); None means the
    failing cell is that injected one.
    """
    tags = [cell.metadata.get("tags", []) for cell in nbformat.read(path, as_version=4).cells]
    if any("injected-parameters" in t for t in tags):
        return executed_index + 1
    injected_at = next((i + 1 for i, t in enumerate(tags) if "parameters" in t), 0)
    if executed_index == injected_at:
        return None
    return executed_index + (0 if executed_index > injected_at else 1)


def describe_failure(nb: Notebook, exc: Exception, executed: Path) -> str:
    """One short message naming the notebook, the failing cell and the error."""
    if isinstance(exc, papermill.PapermillExecutionError):
        number = _source_cell_number(nb.path, exc.cell_index)
        where = f"cell {number}" if number is not None else "the injected parameters cell"
        first = next((line for line in str(exc.source).splitlines() if line.strip()), "")
        return (
            f"{nb.stem} failed in {where} (In [{exc.exec_count}]: {_short(first, 1, 80)}): "
            f"{exc.ename}: {_short(exc.evalue)}\n  executed notebook: {executed}"
        )
    return f"{nb.stem} failed: {type(exc).__name__}: {_short(str(exc), 1)}\n  executed notebook: {executed}"


def _execute(nb: Notebook, executed: Path, parameters: dict[str, Any], timeout: float | None, log_output: bool) -> None:
    """Run one notebook with papermill, in its own folder, writing the executed copy to `executed`."""
    papermill.execute_notebook(
        nb.path,
        executed,
        parameters=parameters,
        kernel_name=KERNEL_NAME,
        language="python",
        cwd=nb.path.parent,
        progress_bar=False,
        log_output=log_output,
        execution_timeout=timeout,
    )


def _read_metrics(stem: str, artifacts: Path) -> tuple[dict[str, Any], str | None]:
    """A notebook's ledger, or ({}, why) when it cannot be read."""
    try:
        ledger = load_results(stem, artifacts)
    except (OSError, ValueError) as exc:
        return {}, f"its results ledger could not be read: {exc}"
    if not isinstance(ledger, dict):
        return {}, f"its results ledger is a {type(ledger).__name__}, not a mapping of names to values"
    return ledger, None


def run_notebook(
    nb: Notebook, output: Path, artifacts: Path, parameters: dict[str, Any], timeout: float | None, log_output: bool
) -> Outcome:
    """Execute one notebook and collect its outcome; its earlier ledger is cleared first so numbers never mix."""
    executed = output / "notebooks" / nb.path.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    clear_results(nb.stem, artifacts)
    started = time.perf_counter()
    error = None
    try:
        _execute(nb, executed, parameters, timeout, log_output)
    except (papermill.PapermillExecutionError, CellTimeoutError, DeadKernelError, RuntimeError) as exc:
        error = describe_failure(nb, exc, executed)
    seconds = round(time.perf_counter() - started, 2)
    metrics, ledger_error = _read_metrics(nb.stem, artifacts)
    if ledger_error and error is None:
        error = f"{nb.stem}: {ledger_error}"
    status = STATUS_FAILED if error else STATUS_OK
    return Outcome(status, seconds, metrics, error, str(executed))


def _skip_reason(nb: Notebook, graph: Mapping[str, Iterable[str]], outcomes: Mapping[str, Outcome]) -> str | None:
    """Why `nb` must be skipped (a prerequisite failed or was skipped in this run), or None."""
    blocked = sorted(p for p in prerequisites(nb.stem, graph) if p in outcomes and outcomes[p].status != STATUS_OK)
    if not blocked:
        return None
    return "needs " + ", ".join(f"{p} ({outcomes[p].status})" for p in blocked)


def resolve_output(profile: str, output: str | os.PathLike | None) -> Path:
    """The run's output folder: `output`, else `runs/<profile>` of the repository (absolute)."""
    return Path(output).expanduser().resolve() if output is not None else (REPO_DIR / "runs" / profile).resolve()


def run_chain(
    profile: str = "smoke",
    only: Sequence[str | int] | None = None,
    start: str | int | None = None,
    end: str | int | None = None,
    output: str | os.PathLike | None = None,
    params: Mapping[str, Any] | None = None,
    notebooks: str | os.PathLike | None = None,
    timeout: float | None = None,
    log_output: bool = False,
) -> ChainReport:
    """Run the selected notebooks in order, print a table row after each, write `OUTPUT/summary.json`.

    Raises `MfkitError` for bad input before anything runs; notebook failures are reported, not raised.
    """
    check_choice("--profile", profile, PROFILE_NAMES)
    if timeout is not None:
        check_positive("--timeout", timeout)
    params = dict(params or {})
    if "PROFILE" in params:
        raise MfkitError("PROFILE cannot be passed as a parameter.", "use --profile smoke|cpu|gpu.")
    found = discover(notebooks)
    chosen = select(found, only, start, end)
    _check_kernel()
    out_dir = resolve_output(profile, output)
    artifacts = Path(params.pop("ARTIFACTS_DIR", out_dir / "artifacts")).expanduser().resolve()
    injected = {"PROFILE": profile, "ARTIFACTS_DIR": str(artifacts), **params}
    graph = {nb.stem: nb.requires for nb in found}
    width = max([len(nb.stem) for nb in chosen] + [len("notebook")])

    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    outcomes: dict[str, Outcome] = {}
    print(f"mfkit run: profile {profile}, {len(chosen)} notebook(s), output {out_dir}", flush=True)
    print(table_header(width), flush=True)
    with _env_var(ARTIFACTS_ENV, str(artifacts)):
        for nb in chosen:
            reason = _skip_reason(nb, graph, outcomes)
            if reason:
                outcome = Outcome(STATUS_SKIPPED, error=f"{nb.stem} skipped: {reason}")
            else:
                outcome = run_notebook(nb, out_dir, artifacts, injected, timeout, log_output)
            outcomes[nb.stem] = outcome
            print(table_row(nb.stem, asdict(outcome), width), flush=True)
            if outcome.status == STATUS_FAILED:
                print(indent(outcome.error or ""), flush=True)

    summary = {
        "profile": profile,
        "ok": all(o.status == STATUS_OK for o in outcomes.values()),
        "started": started_at,
        "seconds": round(time.perf_counter() - started, 2),
        "notebooks_dir": str(chosen[0].path.parent),
        "output_dir": str(out_dir),
        "artifacts_dir": str(artifacts),
        "parameters": params,
        "notebooks": {stem: asdict(o) for stem, o in outcomes.items()},
    }
    path = write_summary(summary, out_dir)
    print()
    print(format_summary(summary), flush=True)
    return ChainReport(summary, path)


# --- summary and table --------------------------------------------------------------------------------------


def write_summary(summary: Mapping[str, Any], output: Path) -> Path:
    """Write `OUTPUT/summary.json` in one atomic rename; return its path."""
    path = Path(output) / SUMMARY_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path


def load_summary(output: str | os.PathLike) -> dict[str, Any]:
    """Read `OUTPUT/summary.json` of an earlier run."""
    path = Path(output).expanduser().resolve() / SUMMARY_NAME
    if not path.is_file():
        raise MfkitError(f"No run summary at {path}.", "run `mfkit run` first, or pass the --output DIR of that run.")
    try:
        summary = json.loads(path.read_text())
    except ValueError as exc:
        raise MfkitError(f"{path} is not valid JSON ({exc}).", "rerun `mfkit run` to write it again.") from exc
    if not isinstance(summary, dict) or not isinstance(summary.get("notebooks"), dict):
        raise MfkitError(f"{path} is not an mfkit run summary.", "rerun `mfkit run` to write it again.")
    return summary


def format_value(value: Any, limit: int = 40) -> str:
    """A compact rendering of one recorded value: floats to 4 significant digits, long values cut."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list):
        text = "[" + ", ".join(format_value(v, limit) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {format_value(v, limit)}" for k, v in value.items()) + "}"
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """`{"acc": 0.912345, "steps": 30}` -> `acc=0.9123 steps=30`."""
    return " ".join(f"{k}={format_value(v)}" for k, v in metrics.items())


def table_header(width: int) -> str:
    """The column titles of the chain table."""
    return f"{'notebook':<{width}}  {'status':<7}  {'seconds':>8}  metrics"


def table_row(stem: str, entry: Mapping[str, Any], width: int) -> str:
    """One notebook's line: name, status, seconds, metrics."""
    seconds = f"{entry.get('seconds', 0.0):8.1f}" if entry.get("status") != STATUS_SKIPPED else f"{'-':>8}"
    return f"{stem:<{width}}  {entry.get('status', '?'):<7}  {seconds}  {format_metrics(entry.get('metrics') or {})}"


def indent(text: str, prefix: str = "    ") -> str:
    """Indent every line of `text`."""
    return "\n".join(prefix + line for line in text.splitlines())


def format_summary(summary: Mapping[str, Any]) -> str:
    """The full table of a run, then one line per problem and a verdict."""
    entries: Mapping[str, Mapping[str, Any]] = summary["notebooks"]
    width = max([len(s) for s in entries] + [len("notebook")])
    lines = [table_header(width)] + [table_row(stem, e, width) for stem, e in entries.items()]
    problems = [e["error"] for e in entries.values() if e.get("status") != STATUS_OK and e.get("error")]
    if problems:
        lines += [""] + [indent(p, "  ") for p in problems]
    counts = {s: sum(e.get("status") == s for e in entries.values()) for s in (STATUS_OK, STATUS_FAILED, STATUS_SKIPPED)}
    verdict = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines.append(f"profile {summary.get('profile')}: {verdict} in {summary.get('seconds', 0.0):.1f} s "
                 f"(summary: {Path(summary.get('output_dir', '.')) / SUMMARY_NAME})")
    return "\n".join(lines)
