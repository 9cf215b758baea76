"""Profiles pick sizes: `smoke` (CI, ~1 min a notebook on 2 CPU cores), `cpu` (a laptop), `gpu` (Colab T4 and up).

Each notebook's sizes live here, in one table, so the notebooks, the chain runner and the tests agree on them.
A notebook passes its explicit knobs to `configure`; any knob that is not None overrides the profile.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .env import seed_everything
from .errors import MfkitError, check_choice
from .paths import artifacts_dir as resolve_artifacts_dir
from .results import clear_results, set_notebook

PROFILE_NAMES = ("smoke", "cpu", "gpu")

# notebook -> profile -> knob -> value. Knob names are the notebook's parameters in lower case.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "00_setup-and-tour": {p: {} for p in PROFILE_NAMES},
    "01_data-and-tokenizers": {
        "smoke": {"vocab_size": 2000, "tokenizer_lines": 4000, "min_frequency": 2},
        "cpu": {"vocab_size": 4000, "tokenizer_lines": None, "min_frequency": 2},
        "gpu": {"vocab_size": 8000, "tokenizer_lines": None, "min_frequency": 2},
    },
    "02_pretraining-tiny-lm": {
        # cpu: ~1.6M training tokens (about 2 passes over Austen); more small steps beat fewer large ones here.
        "smoke": {"max_steps": 120, "batch_size": 16, "block_size": 64, "n_layer": 2, "n_embd": 64, "n_head": 2,
                  "lr": 5e-3, "eval_every": 40, "eval_batches": 8},
        "cpu": {"max_steps": 800, "batch_size": 16, "block_size": 128, "n_layer": 4, "n_embd": 128, "n_head": 4,
                "lr": 2e-3, "eval_every": 200, "eval_batches": 25},
        "gpu": {"max_steps": 3000, "batch_size": 32, "block_size": 256, "n_layer": 6, "n_embd": 384, "n_head": 6,
                "lr": 1e-3, "eval_every": 250, "eval_batches": 50},
    },
    "03_full-finetuning": {
        "smoke": {"max_steps": 24, "batch_size": 16, "max_length": 64, "lr": 1e-4, "warmup": 0.1, "eval_every": 12,
                  "train_limit": 800, "eval_limit": 160, "patience": 3},
        "cpu": {"max_steps": 400, "batch_size": 16, "max_length": 128, "lr": 1e-4, "warmup": 0.1, "eval_every": 100,
                "train_limit": None, "eval_limit": None, "patience": 3},
        "gpu": {"max_steps": 1500, "batch_size": 32, "max_length": 256, "lr": 5e-5, "warmup": 0.1, "eval_every": 150,
                "train_limit": None, "eval_limit": None, "patience": 4},
    },
    # Issue 3 notebooks: provisional sizes, tuned by their authors.
    "04_multistep-finetuning": {
        "smoke": {"max_steps": 20, "batch_size": 8, "max_length": 64, "lr": 1e-4, "warmup": 0.1, "top_lr": 1e-3,
                  "lr_divisor": 2.6, "cut_frac": 0.1, "stlr_ratio": 32, "head_steps": 4, "unfreeze_every": 2,
                  "eval_every": 10, "train_limit": 400, "eval_limit": 100},
        "cpu": {"max_steps": 300, "batch_size": 16, "max_length": 128, "lr": 1e-4, "warmup": 0.1, "top_lr": 1e-3,
                "lr_divisor": 2.6, "cut_frac": 0.1, "stlr_ratio": 32, "head_steps": 30, "unfreeze_every": 15,
                "eval_every": 50, "train_limit": None, "eval_limit": None},
        "gpu": {"max_steps": 1000, "batch_size": 32, "max_length": 256, "lr": 5e-5, "warmup": 0.1, "top_lr": 1e-3,
                "lr_divisor": 2.6, "cut_frac": 0.1, "stlr_ratio": 32, "head_steps": 100, "unfreeze_every": 50,
                "eval_every": 100, "train_limit": None, "eval_limit": None},
    },
    "05_peft-lora": {
        "smoke": {"max_steps": 4, "batch_size": 8, "max_length": 64, "warmup": 0.1, "train_limit": 200, "eval_limit": 32,
                  "lora_ranks": [2, 4], "rank": 4, "virtual_tokens": 8,
                  "lrs": {"full": 1e-4, "lora": 2e-3, "adalora": 2e-3, "ia3": 3e-3, "prefix": 1e-2, "prompt": 3e-2},
                  "verse_steps": 2, "verse_batch_size": 2, "verse_lr": 2e-3, "verse_rank": 8, "verse_max_length": 128,
                  "verse_train_limit": 16, "verse_eval": 4, "max_new_tokens": 16},
        "cpu": {"max_steps": 200, "batch_size": 16, "max_length": 64, "warmup": 0.1, "train_limit": None, "eval_limit": None,
                "lora_ranks": [2, 4, 16], "rank": 4, "virtual_tokens": 16,
                "lrs": {"full": 1e-4, "lora": 1e-3, "adalora": 1e-3, "ia3": 3e-3, "prefix": 1e-2, "prompt": 3e-2},
                "verse_steps": 80, "verse_batch_size": 4, "verse_lr": 2e-3, "verse_rank": 8, "verse_max_length": 160,
                "verse_train_limit": 400, "verse_eval": 48, "max_new_tokens": 64},
        "gpu": {"max_steps": 600, "batch_size": 32, "max_length": 256, "warmup": 0.1, "train_limit": None, "eval_limit": None,
                "lora_ranks": [2, 4, 16], "rank": 4, "virtual_tokens": 16,
                "lrs": {"full": 5e-5, "lora": 1e-3, "adalora": 1e-3, "ia3": 3e-3, "prefix": 1e-2, "prompt": 3e-2},
                "verse_steps": 300, "verse_batch_size": 16, "verse_lr": 1e-3, "verse_rank": 8, "verse_max_length": 192,
                "verse_train_limit": 5000, "verse_eval": 200, "max_new_tokens": 96},
    },
    "06_prompting-few-shot": {
        "smoke": {"shots": (0, 2), "draws": 1, "templates": ("spam-ham", "yes-no"), "eval_limit": 16,
                  "max_chars": 200, "max_context_tokens": 2048},
        "cpu": {"shots": (0, 1, 2, 4, 8), "draws": 3, "templates": ("spam-ham", "yes-no", "folder-a-b"),
                "eval_limit": 100, "max_chars": 200, "max_context_tokens": 2048},
        "gpu": {"shots": (0, 1, 2, 4, 8), "draws": 5, "templates": ("spam-ham", "yes-no", "folder-a-b"),
                "eval_limit": None, "max_chars": 400, "max_context_tokens": 4096},
    },
}


class Config(Mapping):
    """A read-only mapping of a notebook's resolved knobs, also readable as attributes (`cfg.max_steps`)."""

    def __init__(self, knobs: dict[str, Any]) -> None:
        self._knobs = dict(knobs)

    def __getitem__(self, name: str) -> Any:
        return self._knobs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._knobs)

    def __len__(self) -> int:
        return len(self._knobs)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_knobs"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"Config({self._knobs!r})"


def profile_knobs(notebook: str, profile: str) -> dict[str, Any]:
    """The sizes `profile` gives `notebook` (a copy)."""
    check_choice("PROFILE", profile, PROFILE_NAMES)
    if notebook not in PROFILES:
        raise MfkitError(f"No profile table for notebook {notebook!r}.", f"add it to PROFILES in {__file__}.")
    return dict(PROFILES[notebook][profile])


def configure(
    notebook: str,
    profile: str = "smoke",
    artifacts_dir: str | Path | None = None,
    seed: int = 0,
    quiet: bool = False,
    **knobs: Any,
) -> Config:
    """Resolve a notebook's knobs from its profile and explicit overrides, seed, and start its results ledger.

    Knobs passed as None take the profile's value; an unknown knob is an error (it is usually a typo).
    """
    resolved = profile_knobs(notebook, profile)
    unknown = sorted(set(knobs) - set(resolved))
    if unknown:
        raise MfkitError(
            f"Unknown knob(s) {unknown} for {notebook}.", f"use the notebook's parameters: {sorted(resolved)}."
        )
    resolved.update({k: v for k, v in knobs.items() if v is not None})
    folder = resolve_artifacts_dir(artifacts_dir)
    set_notebook(notebook, folder)
    clear_results(notebook, folder)
    seed_everything(seed)
    resolved.update(profile=profile, seed=seed, artifacts_dir=folder, notebook=notebook)
    cfg = Config(resolved)
    if not quiet:
        width = max(map(len, cfg))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in cfg.items()))
    return cfg

