"""Write tests/baselines/smoke.json from a smoke run's summary.json: `python tests/baselines/make_baselines.py runs/smoke/summary.json`.

Each recorded number becomes a baseline with a tolerance: scores in [0, 1] within 0.05 absolute, other quality
numbers within 10% relative. Timings, throughputs and other machine-dependent figures are left out (they belong in
`mfkit bench`, not in a regression test). Review the diff before committing it: a changed baseline is a claim.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MACHINE_DEPENDENT = (
    "seconds",
    "per_s",
    "memory",
    "threads",
    "device",
    "precision",
    "_mb",
    "_ms",
    "time",
    "latency",
    "speedup",
    "throughput",
    "cost_",  # time ratios (08)
    "_goal",  # verdicts that include a speed goal (13, 15)
    "goals_",  # 14: the goals missed, with their measured speed-ups
    "chosen",  # 17 chooses the fastest model: which one depends on the machine
)
BASELINES = Path(__file__).with_name("smoke.json")


def tolerance(value: float) -> dict[str, float]:
    if 0.0 <= value <= 1.0 and isinstance(value, float):
        return {"abs": 0.05}
    return {"rel": 0.10}


def baselines_from(summary: dict) -> dict[str, dict[str, dict[str, float]]]:
    result: dict[str, dict[str, dict[str, float]]] = {}
    for notebook, entry in summary["notebooks"].items():
        if entry["status"] != "ok":
            raise SystemExit(
                f"{notebook} did not run ok ({entry['status']}); fix it before taking baselines."
            )
        checks = {}
        for name, value in sorted(entry["metrics"].items()):
            if any(word in name for word in MACHINE_DEPENDENT):
                continue
            if isinstance(value, bool | str):
                checks[name] = {"value": value}
            elif isinstance(value, int | float):
                checks[name] = {"value": value, **tolerance(value)}
        result[notebook] = checks
    return result


if __name__ == "__main__":
    summary = json.loads(Path(sys.argv[1]).read_text())
    BASELINES.write_text(json.dumps(baselines_from(summary), indent=1, sort_keys=True) + "\n")
    print(f"wrote {BASELINES}")
