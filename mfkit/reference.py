"""The reference ledger: the recorded results of a full run, committed so a learner can compare theirs with them.

`save_reference(RUN)` copies a clean run's ledgers (every notebook's `results/<notebook>.json`, its `_run` knobs
and versions included) into `reference/<profile>/results/` of the clone, and writes `reference/<profile>/index.json`
with what each notebook took and the machine it ran on (CPU model, with or without AVX-512, cores).
`mfkit results --save-reference runs/cpu` does it.

`compare_with_reference(RUN)` (`mfkit results --compare reference [RUN]`) sets a run beside the reference of its
profile, metric by metric, with the spread the kit knows for each: the tolerance of `tests/baselines/smoke.json`
(measured between CPU kinds), widened to the seed spread where the reference records one. A `smoke` run is compared
with the smoke baselines themselves. Each difference is called expected (within the spread) or UNEXPECTED.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import MfkitError
from .paths import REPO_DIR, atomic_path
from .results import RUN_KEY
from .runner import (
    STATUS_OK,
    _difference,
    _knob_changes,
    find_run,
    format_value,
    latest_run,
    load_summary,
)

REFERENCE_NAME = "reference"
INDEX_NAME = "index.json"
BASELINES = REPO_DIR / "tests" / "baselines" / "smoke.json"
SMOKE = "smoke"
# Words that name a spread over seeds in a recorded name (`lora_r4_f1_spread`, `icl_f1_std_k0`, `spread_eda_1`),
# words that name the mean it belongs to (`winner_seed_mean`), and the score a spread may leave out (`spread_eda_1`
# is the spread of `f1_eda_1`).
SPREAD_WORDS = frozenset({"spread", "std"})
MEAN_WORDS = frozenset({"seed", "mean"})
SCORE_WORDS = ("f1", "accuracy")
EXPECTED, UNEXPECTED, SAME, NOT_JUDGED = "expected", "UNEXPECTED", "same", "no known spread"


def reference_root() -> Path:
    """`reference/` of the clone: the committed ledgers live in the repository, not in an installed kit."""
    return REPO_DIR / REFERENCE_NAME


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """This machine's CPU: model name, kind (AVX-512 or not, from /proc/cpuinfo's flags), cores, architecture."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    if not flags:
        kind = "unknown (no /proc/cpuinfo flags)"
    elif "avx512f" in flags:
        kind = "AVX-512"
    elif "avx2" in flags:
        kind = "AVX2, no AVX-512"
    else:
        kind = "no AVX2"
    return {
        "model": fields.get("model name") or platform.processor() or "unknown",
        "kind": kind,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
    }


# --- saving -------------------------------------------------------------------------------------------------


def save_reference(run: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Copy a clean run's ledgers into `root/<profile>/` (default `reference/`); return that folder.

    Only notebooks that ran ok are taken; a notebook the run did not include keeps its earlier reference entry.
    """
    summary = load_summary(find_run(run))
    profile = str(summary.get("profile"))
    if profile == SMOKE:
        raise MfkitError(
            "A smoke run is compared with tests/baselines/smoke.json, not with a reference ledger.",
            "refresh the smoke baselines with tests/baselines/make_baselines.py, or save a cpu or gpu run.",
        )
    entries: Mapping[str, Mapping[str, Any]] = summary["notebooks"]
    bad = [stem for stem, entry in entries.items() if entry.get("status") != STATUS_OK]
    if bad or not entries:
        raise MfkitError(
            f"The run at {summary.get('output_dir')} is not clean ({', '.join(bad) or 'no notebooks'}).",
            "fix and rerun those notebooks; a reference is taken from a run where every notebook ran ok.",
        )
    results = Path(summary["artifacts_dir"]) / "results"
    missing = [stem for stem in entries if not (results / f"{stem}.json").is_file()]
    if missing:
        raise MfkitError(
            f"No results ledger for {', '.join(missing)} in {results}.",
            "save the reference from the run folder whose artifacts are still in place, or rerun it.",
        )
    folder = Path(root or reference_root()) / profile
    (folder / "results").mkdir(parents=True, exist_ok=True)
    index = _read_index(folder)
    machine = summary.get("machine") or cpu_info()  # the runner records the machine; older runs did not
    saved = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for stem, entry in entries.items():
        shutil.copyfile(results / f"{stem}.json", folder / "results" / f"{stem}.json")
        index["notebooks"][stem] = {
            "seconds": entry.get("seconds"),
            "run_started": summary.get("started"),
            "saved": saved,
            "machine": machine,
        }
    index["notebooks"] = dict(sorted(index["notebooks"].items()))
    with atomic_path(folder / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=1) + "\n")
    return folder


def _read_index(folder: Path) -> dict[str, Any]:
    """The index of a reference folder, or a new one."""
    path = folder / INDEX_NAME
    index = json.loads(path.read_text()) if path.is_file() else {}
    return {
        "about": "the recorded results of a full run of this profile, compared by `mfkit results --compare "
        "reference`; refreshed with `mfkit results --save-reference RUN`",
        "profile": folder.name,
        **index,
        "notebooks": index.get("notebooks", {}),
    }


# --- loading ------------------------------------------------------------------------------------------------


def load_baselines(path: str | os.PathLike | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """The smoke baselines: notebook -> metric -> {"value", and "abs" or "rel"}."""
    path = Path(path or BASELINES)
    if not path.is_file():
        raise MfkitError(
            f"No baselines at {path}: the reference numbers ship with a clone of the repository.",
            "compare from a clone (git clone the repository, then `mfkit results --compare reference RUN`).",
        )
    return json.loads(path.read_text())


def load_reference(
    profile: str, root: str | os.PathLike | None = None, baselines: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The reference of `profile` as a run summary (notebooks -> metrics, run) with each metric's tolerance.

    `smoke`: the smoke baselines. Other profiles: `reference/<profile>/`, falling back to `reference/cpu/`.
    """
    checks = load_baselines(baselines)
    if profile == SMOKE:
        notebooks = {
            stem: {"status": STATUS_OK, "metrics": {k: c["value"] for k, c in found.items()}}
            for stem, found in checks.items()
        }
        return {
            "profile": SMOKE,
            "source": str(Path(baselines or BASELINES)),
            "notebooks": notebooks,
            "checks": checks,
        }
    base = Path(root or reference_root())
    folder = next((base / p for p in (profile, "cpu") if (base / p / INDEX_NAME).is_file()), None)
    if folder is None:
        raise MfkitError(
            f"No reference ledger under {base} for the {profile} profile.",
            f"save one from a clean full run: mfkit run --profile {profile} && "
            f"mfkit results --save-reference runs/{profile}",
        )
    index = _read_index(folder)
    notebooks = {}
    for stem in index["notebooks"]:
        ledger = json.loads((folder / "results" / f"{stem}.json").read_text())
        metrics = {k: v for k, v in ledger.items() if k != RUN_KEY}
        notebooks[stem] = {"status": STATUS_OK, "metrics": metrics, "run": ledger.get(RUN_KEY, {})}
    return {
        "profile": folder.name,
        "source": str(folder),
        "notebooks": notebooks,
        "checks": checks,
        "machines": {stem: e.get("machine", {}) for stem, e in index["notebooks"].items()},
    }


# --- comparing ----------------------------------------------------------------------------------------------


def _core(name: str, drop: frozenset[str]) -> tuple[str, ...]:
    """The words of a recorded name without those in `drop`."""
    return tuple(word for word in name.split("_") if word not in drop)


def seed_spread(name: str, metrics: Mapping[str, Any]) -> float | None:
    """The spread over seeds recorded beside metric `name` (e.g. `lora_r4_f1_spread` for `lora_r4_f1`), or None."""
    if SPREAD_WORDS & set(name.split("_")):
        return None
    core = _core(name, MEAN_WORDS)
    wanted = {core} | {tuple(w for w in core if w != score) for score in SCORE_WORDS if score in core}
    for other, value in metrics.items():
        words = set(other.split("_"))
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if numeric and SPREAD_WORDS & words and _core(other, SPREAD_WORDS | MEAN_WORDS) in wanted:
            return abs(float(value))
    return None


def allowed_difference(
    name: str, reference: Any, metrics: Mapping[str, Any], check: Mapping[str, Any] | None
) -> tuple[float | None, str]:
    """How far a run may be from `reference` for metric `name`, and how that spread reads ('±0.05', '±10%', ...)."""
    spread = seed_spread(name, metrics)
    tolerance = None
    label = ""
    if check is not None and ("abs" in check or "rel" in check):
        tolerance = max(check.get("abs", 0.0), check.get("rel", 0.0) * abs(float(reference)))
        label = f"±{check['abs']:.3g}" if "abs" in check else f"±{100 * check['rel']:.3g}%"
    if spread is not None and (tolerance is None or spread > tolerance):
        return spread, f"±{spread:.3g} seeds"
    return tolerance, label


def judge(
    name: str, reference: Any, yours: Any, metrics: Mapping[str, Any], check: Mapping[str, Any] | None
) -> tuple[str, str]:
    """(the spread as text, the verdict) for one metric recorded in both the reference and a run."""
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (reference, yours))
    if not numeric:
        if reference == yours:
            return "", SAME
        return "", UNEXPECTED if check is not None else NOT_JUDGED
    allowed, label = allowed_difference(name, reference, metrics, check)
    if allowed is None:
        return "", SAME if reference == yours else NOT_JUDGED
    return label, EXPECTED if abs(yours - reference) <= allowed + 1e-12 else UNEXPECTED


def _only_in(reference_has_it: bool, profile: str) -> str:
    """The verdict of a metric recorded on one side only (the smoke baselines leave machine-dependent ones out)."""
    if reference_has_it:
        return "only in the reference"
    return "not a baseline (machine-dependent)" if profile == SMOKE else "only in yours"


def format_reference_comparison(reference: Mapping[str, Any], run: Mapping[str, Any]) -> str:
    """A run beside the reference: per metric the two values, the difference, the spread, and the verdict."""
    rows: list[tuple[str, ...]] = []
    notes: dict[int, list[str]] = {}
    counts = {EXPECTED: 0, UNEXPECTED: 0, NOT_JUDGED: 0}
    for stem, entry in run["notebooks"].items():
        ref = reference["notebooks"].get(stem)
        checks = reference["checks"].get(stem, {})
        if ref is None:
            rows.append((stem, "-", entry.get("status", "-"), "", "", "not in the reference"))
            continue
        rows.append((stem, "", entry.get("status", "-"), "", "", ""))
        if entry.get("status") != STATUS_OK:
            continue
        mine, theirs = entry.get("metrics") or {}, ref["metrics"]
        for name in list(theirs) + [n for n in mine if n not in theirs]:
            if name not in mine or name not in theirs:
                shown = (
                    (format_value(theirs.get(name), 24), "-")
                    if name in theirs
                    else ("-", format_value(mine[name], 24))
                )
                rows.append((f"  {name}", *shown, "", "", _only_in(name in theirs, reference["profile"])))
                continue
            spread, verdict = judge(name, theirs[name], mine[name], theirs, checks.get(name))
            counts[EXPECTED if verdict == SAME else verdict] += 1
            rows.append(
                (
                    f"  {name}",
                    format_value(theirs[name], 24),
                    format_value(mine[name], 24),
                    _difference(theirs[name], mine[name]),
                    spread,
                    verdict,
                )
            )
        changes = (
            _knob_changes(ref.get("run") or {}, entry.get("run") or {})
            if ref.get("run") and entry.get("run")
            else []
        )
        if changes:
            notes[len(rows) - 1] = [f"  knobs that differ (they explain differences): {'; '.join(changes)}"]
    titles = ("notebook / metric", "reference", "yours", "yours - ref", "spread", "verdict")
    widths = [max(len(r[i]) for r in [titles, *rows]) for i in range(len(titles))]

    def line(r: tuple[str, ...]) -> str:
        cells = (
            [f"{r[0]:<{widths[0]}}"]
            + [f"{c:>{w}}" for c, w in zip(r[1:5], widths[1:5], strict=True)]
            + [r[5]]
        )
        return "  ".join(cells).rstrip()

    machine, where = (run["machine"], "run on") if run.get("machine") else (cpu_info(), "this machine:")
    kinds = sorted({f"{m.get('model')} ({m.get('kind')})" for m in reference.get("machines", {}).values()})
    out = [
        f"reference: {reference['profile']} ({reference['source']})"
        + (f", run on {'; '.join(kinds)}" if kinds else ""),
        f"yours:     {run.get('output_dir')} (profile {run.get('profile')}, started {run.get('started')}); "
        f"{where} {machine.get('model')} ({machine.get('kind')})",
        "spread: the tolerance between CPU kinds of tests/baselines/smoke.json, or the reference's spread over seeds "
        "where larger; UNEXPECTED = outside it",
        "",
        line(titles),
    ]
    for i, r in enumerate(rows):
        out.append(line(r))
        out.extend(notes.get(i, []))
    out += [
        "",
        f"{counts[EXPECTED]} expected, {counts[UNEXPECTED]} UNEXPECTED, {counts[NOT_JUDGED]} with no known spread",
    ]
    return "\n".join(out)


def compare_with_reference(
    run: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    baselines: str | os.PathLike | None = None,
) -> str:
    """`mfkit results --compare reference [RUN]`: the run (default: the latest) beside its profile's reference."""
    summary = load_summary(find_run(run) if run is not None else latest_run())
    return format_reference_comparison(load_reference(str(summary.get("profile")), root, baselines), summary)
