"""The chain runner: execute the numbered notebooks in order with papermill and collect their recorded numbers.

Each notebook runs in its own kernel, in the notebooks folder (so relative paths behave as in Jupyter), with
`PROFILE` and `ARTIFACTS_DIR` injected into its `parameters` cell. After each one the runner reads its results
ledger and prints a table row; at the end it writes `OUTPUT/summary.json`. A failed notebook does not stop the
chain: the notebooks that need it (directly or through others, per `metadata["mfkit"]["requires"]`) are skipped,
the independent ones still run.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nbformat
import papermill
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from .errors import MfkitError, check_choice, check_positive, check_writable
from .paths import ARTIFACTS_ENV, atomic_path, chain_notebooks_dir, runs_dir
from .profiles import PROFILE_NAMES
from .results import clear_results, load_results, load_run, set_aside_failed

KERNEL_NAME = "python3"
SUMMARY_NAME = "summary.json"
NOTEBOOK_PATTERN = re.compile(r"^(\d{2})_[\w.-]+\.ipynb$")
PARAM_TYPES = (str, int, float, bool, type(None), list, dict)
STATUS_OK, STATUS_FAILED, STATUS_SKIPPED = "ok", "failed", "skipped"
ALWAYS_INJECTED = ("PROFILE", "ARTIFACTS_DIR")
# Injected into the notebooks that have them unless `--param` says otherwise: nobody can move a widget in a
# headless run, so interactive notebooks render one static result instead.
HEADLESS_DEFAULTS = {"INTERACTIVE": False}
# The kernels get Jupyter's inline backend whatever MPLBACKEND says (CI sets Agg, under which ipykernel keeps Agg
# and an executed notebook stores no figure).
KERNEL_MPLBACKEND = "module://matplotlib_inline.backend_inline"
_CHAINED = ("The above exception was the direct cause", "During handling of the above exception")


@dataclass(frozen=True)
class Notebook:
    """One numbered notebook of the chain and the notebooks it needs."""

    number: str
    stem: str
    path: Path
    requires: tuple[str, ...] = ()
    parameters: frozenset[str] = frozenset()
    # Notebooks whose results it reads where they ran: waited for side by side, never a reason to skip it.
    after: tuple[str, ...] = ()


@dataclass
class Outcome:
    """What happened to one notebook in a run (one row of the table, one entry of summary.json)."""

    status: str
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    output: str | None = None
    partial_metrics: dict[str, Any] = field(default_factory=dict)
    partial_ledger: str | None = None
    run: dict[str, Any] = field(default_factory=dict)


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


def _read(path: Path) -> Any:
    """The notebook at `path`, or an `MfkitError` when it cannot be read."""
    try:
        return nbformat.read(path, as_version=4)
    except Exception as exc:  # nbformat raises several types for a broken file
        raise MfkitError(
            f"{path} is not a readable notebook ({exc}).", "open it in Jupyter and save it again."
        ) from exc


def _requires(path: Path, meta: Mapping[str, Any], key: str = "requires") -> tuple[str, ...]:
    """The notebook stems listed in `metadata["mfkit"][key]` of a notebook: `requires` (the notebooks it needs)
    or `after` (the notebooks whose results it reads where they ran, e.g. 20's waterfall)."""
    requires = meta.get("mfkit", {}).get(key, [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise MfkitError(
            f"{path.name}: metadata['mfkit'][{key!r}] must be a list of notebook names, got {requires!r}.",
            'write it as e.g. ["01_data-and-tokenizers"].',
        )
    return tuple(requires)


def parameter_names(source: str) -> frozenset[str]:
    """The names a `parameters` cell assigns (`NAME = value`, `NAME: type = value`)."""
    try:
        tree = ast.parse(source)
    except (
        SyntaxError
    ):  # e.g. an IPython magic in the cell: fall back to the lines that look like assignments
        return frozenset(re.findall(r"^([A-Za-z_]\w*)\s*(?::[^=]*)?=(?!=)", source, flags=re.MULTILINE))
    names: set[str] = set()
    for node in tree.body:
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        for target in targets:
            names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return frozenset(names)


def _parameters(nb: Any) -> frozenset[str]:
    """The parameters of a notebook: the names its `parameters`-tagged cells assign."""
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    return frozenset().union(*(parameter_names(c.source) for c in cells))


def discover(folder: str | os.PathLike | None = None) -> list[Notebook]:
    """The `NN_slug.ipynb` notebooks of `folder` (default: the repository's), in chain order."""
    folder = Path(folder).expanduser().resolve() if folder is not None else chain_notebooks_dir()
    if not folder.is_dir():
        raise MfkitError(
            f"Notebooks folder {folder} does not exist.", "pass --notebooks DIR with the NN_slug.ipynb files."
        )
    paths = sorted(p for p in folder.iterdir() if NOTEBOOK_PATTERN.match(p.name))
    if not paths:
        raise MfkitError(
            f"No NN_slug.ipynb notebooks in {folder}.", "pass --notebooks DIR with the numbered notebooks."
        )
    read = {p: _read(p) for p in paths}
    found = [
        Notebook(
            p.name[:2],
            p.stem,
            p,
            _requires(p, nb.metadata),
            _parameters(nb),
            _requires(p, nb.metadata, "after"),
        )
        for p, nb in read.items()
    ]
    stems = {nb.stem for nb in found}
    for nb in found:
        unknown = [r for r in (*nb.requires, *nb.after) if r not in stems]
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
        raise MfkitError(
            f"{option} {value!r} is not a notebook number.", f"write it as two digits, e.g. {option} 03."
        )
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
        raise MfkitError(
            f"--from {start} comes after --to {end}.", "give --from a number no larger than --to."
        )
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
    chosen = [
        nb
        for nb in chosen
        if (low is None or int(nb.number) >= low) and (high is None or int(nb.number) <= high)
    ]
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
    if not isinstance(value, PARAM_TYPES) or (
        isinstance(value, dict) and not all(isinstance(k, str) for k in value)
    ):
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


def check_params(params: Mapping[str, Any], chosen: Sequence[Notebook]) -> None:
    """Refuse a `--param` that none of the selected notebooks has in its parameters cell (usually a typo)."""
    known = set().union(*(nb.parameters for nb in chosen)) | set(ALWAYS_INJECTED)
    unknown = [key for key in params if key not in known]
    if not unknown:
        return
    hints = {key: difflib.get_close_matches(key, sorted(known), n=1) for key in unknown}
    near = "; ".join(f"{key} -> {match[0]}?" for key, match in hints.items() if match)
    names = ", ".join(nb.stem for nb in chosen)
    raise MfkitError(
        f"--param {', '.join(unknown)}: no selected notebook ({names}) has "
        f"{'this parameter' if len(unknown) == 1 else 'these parameters'}"
        + (f" (did you mean {near})" if near else "")
        + ".",
        f"use parameters from the notebooks' parameters cells: {', '.join(sorted(known - set(ALWAYS_INJECTED)))}.",
    )


def params_for(nb: Notebook, injected: Mapping[str, Any]) -> dict[str, Any]:
    """The injected parameters a notebook has (PROFILE and ARTIFACTS_DIR always), so no notebook gets another's."""
    return {k: v for k, v in injected.items() if k in ALWAYS_INJECTED or k in nb.parameters}


def check_folders(out_dir: Path, artifacts: Path) -> None:
    """Stop before any notebook runs when the output or artifacts folder cannot be written."""
    check_writable(
        out_dir / "notebooks", "The output folder", "pass --output DIR with a folder you can write to"
    )
    check_writable(
        artifacts / "results",
        "ARTIFACTS_DIR",
        "pass --param ARTIFACTS_DIR=DIR with a folder you can write to",
    )


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
def _env_vars(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables (inherited by the kernels) for the duration of the run."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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


def root_cause(traceback: Sequence[str]) -> str | None:
    """The first exception of a chained traceback ("The above exception was the direct cause..."), or None."""
    entries = [papermill.exceptions.strip_color(str(e)) for e in traceback]
    first = next((i for i, e in enumerate(entries) if any(m in e for m in _CHAINED)), None)
    if not first:
        return None
    lines = [line for line in entries[first - 1].splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def describe_failure(nb: Notebook, exc: Exception, executed: Path) -> str:
    """One short message naming the notebook, the failing cell and the error."""
    if isinstance(exc, papermill.PapermillExecutionError):
        number = _source_cell_number(nb.path, exc.cell_index)
        where = f"cell {number}" if number is not None else "the injected parameters cell"
        first = next((line for line in str(exc.source).splitlines() if line.strip()), "")
        cause = root_cause(exc.traceback or [])
        caused = (
            f"\n  caused by {_short(cause, 1)}"
            if cause and cause.split(":", 1)[-1].strip() not in exc.evalue
            else ""
        )
        return (
            f"{nb.stem} failed in {where} (In [{exc.exec_count}]: {_short(first, 1, 80)}): "
            f"{exc.ename}: {_short(exc.evalue)}{caused}\n  executed notebook: {executed}"
        )
    return f"{nb.stem} failed: {type(exc).__name__}: {_short(str(exc), 1)}\n  executed notebook: {executed}"


def _execute(
    nb: Notebook, executed: Path, parameters: dict[str, Any], timeout: float | None, log_output: bool
) -> None:
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
    nb: Notebook,
    output: Path,
    artifacts: Path,
    parameters: dict[str, Any],
    timeout: float | None,
    log_output: bool,
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
    if error is None:
        return Outcome(STATUS_OK, seconds, metrics, None, str(executed), run=_read_run(nb.stem, artifacts))
    moved = set_aside_failed(nb.stem, artifacts)  # a later notebook must not read a failed run's numbers
    return Outcome(
        STATUS_FAILED,
        seconds,
        {},
        error,
        str(executed),
        partial_metrics=metrics,
        partial_ledger=str(moved) if moved else None,
    )


def _read_run(stem: str, artifacts: Path) -> dict[str, Any]:
    """A notebook's run record (knobs, versions), {} when it has none or it cannot be read."""
    try:
        return load_run(stem, artifacts)
    except (OSError, ValueError):
        return {}


def _skip_reason(
    nb: Notebook, graph: Mapping[str, Iterable[str]], outcomes: Mapping[str, Outcome]
) -> str | None:
    """Why `nb` must be skipped (a prerequisite failed or was skipped in this run), or None."""
    blocked = sorted(
        p for p in prerequisites(nb.stem, graph) if p in outcomes and outcomes[p].status != STATUS_OK
    )
    if not blocked:
        return None
    return "needs " + ", ".join(f"{p} ({outcomes[p].status})" for p in blocked)


def resolve_output(profile: str, output: str | os.PathLike | None) -> Path:
    """The run's output folder: `output`, else `runs/<profile>` (of the clone, or of the working folder)."""
    return Path(output).expanduser().resolve() if output is not None else (runs_dir() / profile).resolve()


def _dependents(graph: Mapping[str, Iterable[str]]) -> dict[str, int]:
    """How many notebooks need each notebook, directly or through others (the scheduler starts those first)."""
    counts = dict.fromkeys(graph, 0)
    for stem in graph:
        for needed in prerequisites(stem, graph):
            counts[needed] = counts.get(needed, 0) + 1
    return counts


def kernel_threads(jobs: int, cpus: int | None = None) -> int | None:
    """Threads per kernel when `jobs` notebooks run side by side (the cores shared out), None for one at a time."""
    if jobs <= 1:
        return None
    return max(1, (cpus or os.cpu_count() or 1) // jobs)


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
    jobs: int = 1,
) -> ChainReport:
    """Run the selected notebooks, print a table row after each, write `OUTPUT/summary.json`.

    With `jobs` > 1, up to that many notebooks run side by side, each as soon as the notebooks it requires have
    finished, and each kernel gets an equal share of the cores (`OMP_NUM_THREADS`); with 1, in number order.
    Raises `MfkitError` for bad input before anything runs; notebook failures are reported, not raised.
    """
    check_choice("--profile", profile, PROFILE_NAMES)
    if timeout is not None:
        check_positive("--timeout", timeout)
    check_positive("--jobs", jobs)
    params = dict(params or {})
    if "PROFILE" in params:
        raise MfkitError("PROFILE cannot be passed as a parameter.", "use --profile smoke|cpu|gpu.")
    found = discover(notebooks)
    chosen = select(found, only, start, end)
    check_params(params, chosen)
    _check_kernel()
    out_dir = resolve_output(profile, output)
    artifacts = Path(params.pop("ARTIFACTS_DIR", out_dir / "artifacts")).expanduser().resolve()
    check_folders(out_dir, artifacts)
    injected = {**HEADLESS_DEFAULTS, "PROFILE": profile, "ARTIFACTS_DIR": str(artifacts), **params}
    graph = {nb.stem: nb.requires for nb in found}
    width = max([len(nb.stem) for nb in chosen] + [len("notebook")])
    threads = kernel_threads(jobs)
    from .reference import cpu_info  # reference reads run summaries, so it imports this module

    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.perf_counter()
    side_by_side = f", {jobs} at a time with {threads} thread(s) each" if threads else ""
    print(
        f"mfkit run: profile {profile}, {len(chosen)} notebook(s){side_by_side}, output {out_dir}", flush=True
    )
    print(table_header(width), flush=True)

    def report(nb: Notebook, outcome: Outcome) -> None:
        outcomes[nb.stem] = outcome
        print(table_row(nb.stem, asdict(outcome), width), flush=True)
        if outcome.status == STATUS_FAILED:
            print(indent(outcome.error or ""), flush=True)
            if outcome.partial_metrics:
                print(indent(partial_note(asdict(outcome))), flush=True)

    outcomes: dict[str, Outcome] = {}
    kernel_env = {ARTIFACTS_ENV: str(artifacts), "MPLBACKEND": KERNEL_MPLBACKEND}
    if threads and "OMP_NUM_THREADS" not in os.environ:
        kernel_env["OMP_NUM_THREADS"] = str(threads)
    with _env_vars(kernel_env):
        if jobs == 1:
            for nb in chosen:
                reason = _skip_reason(nb, graph, outcomes)
                outcome = (
                    Outcome(STATUS_SKIPPED, error=f"{nb.stem} skipped: {reason}")
                    if reason
                    else run_notebook(nb, out_dir, artifacts, params_for(nb, injected), timeout, log_output)
                )
                report(nb, outcome)
        else:
            _run_side_by_side(
                chosen, graph, jobs, report, outcomes, out_dir, artifacts, injected, timeout, log_output
            )

    summary = {
        "profile": profile,
        "ok": all(o.status == STATUS_OK for o in outcomes.values()),
        "started": started_at,
        "seconds": round(time.perf_counter() - started, 2),
        "jobs": jobs,
        "machine": cpu_info(),
        "notebooks_dir": str(chosen[0].path.parent),
        "output_dir": str(out_dir),
        "artifacts_dir": str(artifacts),
        "parameters": params,
        "notebooks": {nb.stem: asdict(outcomes[nb.stem]) for nb in chosen},
    }
    path = write_summary(summary, out_dir)
    print()
    print(format_summary(summary), flush=True)
    return ChainReport(summary, path)


def _run_side_by_side(
    chosen: Sequence[Notebook],
    graph: Mapping[str, Iterable[str]],
    jobs: int,
    report: Callable[[Notebook, Outcome], None],
    outcomes: Mapping[str, Outcome],
    out_dir: Path,
    artifacts: Path,
    injected: Mapping[str, Any],
    timeout: float | None,
    log_output: bool,
) -> None:
    """Run `chosen` in up to `jobs` kernels at once, each notebook once every chosen notebook it needs (or reads,
    `after`) is done.

    The waiting notebook that most others need starts first (ties: number order), so long dependency paths
    begin early.
    """
    names = {nb.stem for nb in chosen}
    needs = {nb.stem: (prerequisites(nb.stem, graph) | set(nb.after)) & names for nb in chosen}
    weight = _dependents(graph)
    waiting = sorted(chosen, key=lambda nb: (-weight.get(nb.stem, 0), nb.number))
    running: dict[Future[Outcome], Notebook] = {}
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="mfkit-run") as pool:
        while waiting or running:
            before = len(waiting)
            for nb in [nb for nb in waiting if needs[nb.stem] <= outcomes.keys()]:
                reason = _skip_reason(nb, graph, outcomes)
                if reason:
                    waiting.remove(nb)
                    report(nb, Outcome(STATUS_SKIPPED, error=f"{nb.stem} skipped: {reason}"))
                elif len(running) < jobs:
                    waiting.remove(nb)
                    args = (nb, out_dir, artifacts, params_for(nb, injected), timeout, log_output)
                    running[pool.submit(run_notebook, *args)] = nb
            if not running:
                if len(waiting) == before:  # nothing can start, nothing will finish: they need each other
                    raise MfkitError(
                        f"{', '.join(nb.stem for nb in waiting)} require each other (metadata requires).",
                        "fix the notebooks' `requires` so that no notebook needs itself, or run with --jobs 1.",
                    )
                continue  # a skip above may have made others ready (to be skipped too)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: running[f].number):
                report(running.pop(future), future.result())


# --- summary and table --------------------------------------------------------------------------------------


def write_summary(summary: Mapping[str, Any], output: Path) -> Path:
    """Write `OUTPUT/summary.json` in one atomic rename; return its path."""
    path = Path(output) / SUMMARY_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path


def latest_run(root: str | os.PathLike | None = None) -> Path:
    """The output folder of the most recent run: the newest `summary.json` under `root` (default `runs/`)."""
    root = Path(root).expanduser().resolve() if root is not None else runs_dir()
    found = sorted(root.rglob(SUMMARY_NAME), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise MfkitError(
            f"No run summary under {root}.", "run `mfkit run` first, or pass --output DIR of a run."
        )
    return found[-1].parent


def find_run(name: str | os.PathLike) -> Path:
    """A run's output folder from what a user types: a folder, its summary.json, or a profile name (runs/<profile>)."""
    path = Path(name).expanduser()
    if path.name == SUMMARY_NAME:
        path = path.parent
    if not path.exists() and str(name) in PROFILE_NAMES:
        path = runs_dir() / str(name)
    return path.resolve()


def load_summary(output: str | os.PathLike) -> dict[str, Any]:
    """Read `OUTPUT/summary.json` of an earlier run."""
    path = Path(output).expanduser().resolve() / SUMMARY_NAME
    if not path.is_file():
        raise MfkitError(
            f"No run summary at {path}.", "run `mfkit run` first, or pass the --output DIR of that run."
        )
    try:
        summary = json.loads(path.read_text())
    except ValueError as exc:
        raise MfkitError(
            f"{path} is not valid JSON ({exc}).", "rerun `mfkit run` to write it again."
        ) from exc
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


def partial_note(entry: Mapping[str, Any]) -> str:
    """The line that shows what a failed notebook recorded before failing, marked as not being its results."""
    where = f" (kept in {entry['partial_ledger']})" if entry.get("partial_ledger") else ""
    return (
        f"recorded before it failed, NOT results{where}: {format_metrics(entry.get('partial_metrics') or {})}"
    )


def indent(text: str, prefix: str = "    ") -> str:
    """Indent every line of `text`."""
    return "\n".join(prefix + line for line in text.splitlines())


def format_summary(summary: Mapping[str, Any]) -> str:
    """The full table of a run, then one line per problem and a verdict."""
    entries: Mapping[str, Mapping[str, Any]] = summary["notebooks"]
    width = max([len(s) for s in entries] + [len("notebook")])
    lines = [table_header(width)] + [table_row(stem, e, width) for stem, e in entries.items()]
    problems = [
        e["error"] + ("\n  " + partial_note(e) if e.get("partial_metrics") else "")
        for e in entries.values()
        if e.get("status") != STATUS_OK and e.get("error")
    ]
    if problems:
        lines += [""] + [indent(p, "  ") for p in problems]
    counts = {
        s: sum(e.get("status") == s for e in entries.values())
        for s in (STATUS_OK, STATUS_FAILED, STATUS_SKIPPED)
    }
    verdict = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines.append(
        f"profile {summary.get('profile')}: {verdict} in {summary.get('seconds', 0.0):.1f} s "
        f"(summary: {Path(summary.get('output_dir', '.')) / SUMMARY_NAME})"
    )
    machine = summary.get("machine")
    if machine:
        jobs = summary.get("jobs", 1)
        lines.append(
            f"ran on {machine.get('model')} ({machine.get('kind')}, {machine.get('cores')} cores), "
            + (f"{jobs} notebooks at a time" if jobs > 1 else "one notebook at a time")
        )
    return "\n".join(lines)


def _difference(a: Any, b: Any) -> str:
    """B - A for two numbers (not booleans), else '' ."""
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
    return f"{b - a:+.4g}" if numeric else ("" if a == b else "changed")


def _knob_changes(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The knobs (and profile, seed) whose values differ between two run records."""
    flat_a = {**a.get("knobs", {}), "profile": a.get("profile"), "seed": a.get("seed")}
    flat_b = {**b.get("knobs", {}), "profile": b.get("profile"), "seed": b.get("seed")}
    skip = {"artifacts_dir"}
    return [
        f"{k}: {format_value(flat_a.get(k), 20)} -> {format_value(flat_b.get(k), 20)}"
        for k in sorted(set(flat_a) | set(flat_b))
        if k not in skip and flat_a.get(k) != flat_b.get(k)
    ]


def format_comparison(
    a: Mapping[str, Any], b: Mapping[str, Any], label_a: str = "A", label_b: str = "B"
) -> str:
    """Two runs side by side: for each notebook its metrics in A and B and the difference B - A.

    A notebook that did not run cleanly in one of them shows its status there instead of numbers; the knobs
    that differ between the two runs of a notebook (from the ledgers' run records) are listed under it.
    """
    entries_a, entries_b = a["notebooks"], b["notebooks"]
    stems = list(entries_a) + [s for s in entries_b if s not in entries_a]
    rows: list[tuple[str, str, str, str]] = []
    notes: dict[int, list[str]] = {}
    for stem in stems:
        ea, eb = entries_a.get(stem, {}), entries_b.get(stem, {})
        ma, mb = ea.get("metrics") or {}, eb.get("metrics") or {}
        rows.append((stem, ea.get("status", "-"), eb.get("status", "-"), ""))
        for name in list(ma) + [n for n in mb if n not in ma]:
            va, vb = ma.get(name), mb.get(name)
            rows.append(
                (
                    f"  {name}",
                    format_value(va, 24) if name in ma else "-",
                    format_value(vb, 24) if name in mb else "-",
                    _difference(va, vb) if name in ma and name in mb else "",
                )
            )
        changes = (
            _knob_changes(ea.get("run") or {}, eb.get("run") or {}) if ea.get("run") and eb.get("run") else []
        )
        if changes:
            notes[len(rows) - 1] = [f"  knobs that differ: {'; '.join(changes)}"]
    widths = [
        max(len(r[i]) for r in [("notebook / metric", label_a, label_b, "B - A"), *rows]) for i in range(4)
    ]

    def line(r: tuple[str, str, str, str]) -> str:
        return f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip()

    out = [
        f"A: {a.get('output_dir', label_a)} (profile {a.get('profile')}, started {a.get('started')})",
        f"B: {b.get('output_dir', label_b)} (profile {b.get('profile')}, started {b.get('started')})",
        "",
        line(("notebook / metric", "A", "B", "B - A")),
    ]
    for i, r in enumerate(rows):
        out.append(line(r))
        out.extend(notes.get(i, []))
    return "\n".join(out)
