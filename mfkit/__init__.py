"""mfkit: the helper package behind the numbered notebooks of multi-step language-model optimization.

The names most notebooks need are importable from here; each lives in a small module of its own:

- `setup`, `seed_everything` (env) — device, precision, seeds, versions
- `configure` (profiles) — a notebook's knobs from its profile (smoke / cpu / gpu) and explicit overrides
- `record` (results) — the results ledger the chain runner and the regression tests read
- `takeaways` (report) — a notebook's takeaways, their numbers filled in from this run's ledger
- `fit`, `TrainConfig`, `Callback`, `History` (training) — the training loop
- `load_data` (data), `load_model`, `load_tokenizer` (models) — offline-first data and models
"""

# Only the standard-library modules load eagerly: the setup cell imports `mfkit.bootstrap` to repair an install
# whose dependencies (numpy, transformers, ...) are missing, so `import mfkit` itself must not need them.
from .errors import MfkitError

__all__ = ["MfkitError", "configure", "record", "seed_everything", "setup"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Import the modules that need the kit's dependencies (torch, transformers, ...) when first asked for."""
    lazy = {
        "setup": "env",
        "seed_everything": "env",
        "configure": "profiles",
        "record": "results",
        "fit": "training",
        "TrainConfig": "training",
        "Callback": "training",
        "History": "training",
        "load_data": "data",
        "load_model": "models",
        "load_tokenizer": "models",
        "make_loader": "loaders",
        "takeaways": "report",
    }
    import importlib
    import importlib.util

    if name in lazy:
        return getattr(importlib.import_module(f".{lazy[name]}", __name__), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # `mfkit.profiles` without importing it first
    raise AttributeError(f"module 'mfkit' has no attribute {name!r}")
