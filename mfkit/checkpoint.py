"""Complete training checkpoints (model, optimizer, scheduler, scaler, step, per-process RNG state), written atomically.

A checkpoint also carries a fingerprint of what produced it (the settings that shape the run, the model's tensor
shapes, the optimizer's groups, the callbacks, the number of processes), so that a run never resumes from a
checkpoint of another configuration: `check_fingerprint` names what differs instead.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MfkitError
from .paths import artifacts_dir, atomic_path

CHECKPOINT_NAME = "last.pt"


def run_folder(
    group: str, knobs: Mapping[str, Any], artifacts: str | Path | None = None, extra: str = ""
) -> Path:
    """`ARTIFACTS_DIR/checkpoints/<group>/<hash>`: where one training run keeps its checkpoint.

    The hash covers `knobs` (sizes, steps, learning rate, seed...) and `extra` (e.g. a tokenizer's vocabulary):
    a rerun with the same settings resumes, a run with other settings starts afresh in its own folder instead of
    being refused by the checkpoint of another configuration.
    """
    plain = {k: v for k, v in knobs.items() if k != "artifacts_dir"}
    digest = hashlib.sha256((json.dumps(plain, sort_keys=True, default=str) + extra).encode()).hexdigest()[
        :12
    ]
    return artifacts_dir(artifacts) / "checkpoints" / group / digest


def rng_state() -> dict[str, Any]:
    """Every random state a training step of this process can touch: Python, NumPy, torch CPU and its CUDA device.

    Only the current CUDA device's generator (the one this process trains on; under `accelerate launch` each
    process has its own): a checkpoint of every visible GPU's could not be restored on a machine with fewer.
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (from a checkpoint that saved every GPU's, this device's entry)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, list | tuple):  # written by an older mfkit: one state per visible GPU
        index = torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda)


def temp_files(path: str | Path) -> list[Path]:
    """Temporary files `save_checkpoint` writes beside `path` before its rename (see `paths.atomic_path`)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Delete temporary files a killed checkpoint write left beside `path`; return what was removed.

    A kill between `torch.save` and the rename leaves such a file behind (the checkpoint itself stays whole).
    Call it when a run starts, before anything writes to the same folder.
    """
    removed = []
    for tmp in temp_files(path):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` in one atomic rename: a crash never leaves half a checkpoint.

    `payload` should hold the RNG state of every process (`fit` stores one `rng_state()` per rank under "ranks");
    when it has none, this process's RNG state is added under "rng".
    """
    path = Path(path)
    if "ranks" not in payload and "rng" not in payload:
        payload = {**payload, "rng": rng_state()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (CPU tensors; the caller restores RNG state)."""
    path = Path(path)
    if not path.is_file():
        raise MfkitError(f"No checkpoint at {path}.", "check the path, or train without resuming.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise MfkitError(
            f"{path} is not a readable mfkit checkpoint ({exc}).", "delete it and train again."
        ) from exc


def _plain(value: Any) -> Any:
    """`value` as JSON would give it back (tuples become lists, paths strings), so saved and new compare equal."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they agree).

    Nested dicts are compared key by key ("config.lr: 0.001 in the checkpoint, 0.003 now"); long values such as
    the model's shapes are summarised by how many entries differ.
    """
    saved, current = _plain(dict(saved)), _plain(dict(current))
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict) and key != "shapes":
            lines += [
                f"{key}.{sub}: {old.get(sub)!r} in the checkpoint, {new.get(sub)!r} now"
                for sub in sorted(set(old) | set(new))
                if old.get(sub) != new.get(sub)
            ]
        elif isinstance(old, dict) and isinstance(new, dict):
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            lines.append(f"{key}: {len(changed)} tensor(s) differ in shape or presence, e.g. {changed[:3]}")
        else:
            lines.append(f"{key}: {old!r} in the checkpoint, {new!r} now")
    return lines


def check_fingerprint(path: str | Path, saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> None:
    """Raise `MfkitError` unless the checkpoint at `path` was written by a run configured like this one."""
    fix = (
        "resume with the settings it was written with, or pass resume=False (or another checkpoint_dir) "
        "to start a fresh run."
    )
    if saved is None:
        raise MfkitError(f"{path} was written by an older mfkit and records no configuration to check.", fix)
    differences = fingerprint_differences(saved, current)
    if differences:
        raise MfkitError(
            f"{path} was written by a run configured differently, so resuming from it would not continue this "
            "run:\n    " + "\n    ".join(differences),
            fix,
        )
