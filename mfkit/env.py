"""The machine a notebook runs on: device, precision, seeds, versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_SEED = 0
REPORTED_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "accelerate", "peft", "papermill")


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA if present, else Apple MPS, else CPU (or `prefer`, when given)."""
    if prefer:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_precision(device: torch.device | str) -> str:
    """Mixed-precision mode for `accelerate`: bf16 on GPUs that support it, fp16 on older CUDA GPUs, else 'no'.

    fp16 needs loss scaling (accelerate adds a GradScaler); bf16 has fp32's exponent range and does not.
    On CPU and MPS we train in fp32: CPU autocast to bf16 is slower than fp32 for these small models
    on most CPUs, and its rounding changes results between machines.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return "no"
    # Native bf16 only (Ampere and newer): a T4 "supports" bf16 through slow emulation, and wants fp16 instead.
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def seed_everything(seed: int = DEFAULT_SEED, deterministic: bool = False) -> int:
    """Seed Python, NumPy and torch (all devices); optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return seed


def versions(packages: tuple[str, ...] = REPORTED_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages the kit leans on ('missing' where absent)."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


@dataclass(frozen=True)
class Environment:
    """What `setup()` found: the device, its precision, the seed and the package versions."""

    device: torch.device
    precision: str
    seed: int
    colab: bool
    versions: dict[str, str]
    threads: int

    def describe(self) -> str:
        lines = [
            f"device     {self.device}"
            + (f" ({torch.cuda.get_device_name(0)})" if self.device.type == "cuda" else "")
        ]
        lines += [f"precision  {self.precision}", f"threads    {self.threads}", f"seed       {self.seed}"]
        lines += [f"colab      {self.colab}"] + [f"{k:<10} {v}" for k, v in self.versions.items()]
        return "\n".join(lines)


def setup(seed: int = DEFAULT_SEED, device: str | None = None, quiet: bool = False) -> Environment:
    """The one call of every notebook's setup cell: pick the device and precision, seed, report versions."""
    chosen = pick_device(device)
    env = Environment(
        device=chosen,
        precision=pick_precision(chosen),
        seed=seed_everything(seed),
        colab=in_colab(),
        versions=versions(),
        threads=torch.get_num_threads(),
    )
    if not quiet:
        print(env.describe())
    return env
