"""Complete training checkpoints (model, optimizer, scheduler, step, RNG state), written atomically."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MfkitError
from .paths import atomic_path

CHECKPOINT_NAME = "last.pt"


def rng_state() -> dict[str, Any]:
    """Every random state a training step can touch: Python, NumPy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (plus RNG state) to `path` in one atomic rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({**payload, "rng": rng_state()}, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (CPU tensors; the caller restores RNG state)."""
    path = Path(path)
    if not path.is_file():
        raise MfkitError(f"No checkpoint at {path}.", "check the path, or train without resuming.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise MfkitError(f"{path} is not a readable mfkit checkpoint ({exc}).", "delete it and train again.") from exc
