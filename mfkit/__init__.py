"""mfkit: the helper package behind the numbered notebooks of multi-step language-model optimization.

The names most notebooks need are importable from here; each lives in a small module of its own:

- `setup`, `seed_everything` (env) — device, precision, seeds, versions
- `configure` (profiles) — a notebook's knobs from its profile (smoke / cpu / gpu) and explicit overrides
- `record` (results) — the results ledger the chain runner and the regression tests read
- `takeaways` (report) — a notebook's takeaways, their numbers filled in from this run's ledger
- `fit`, `TrainConfig`, `Callback`, `History` (training) — the training loop
- `load_data` (data), `load_model`, `load_tokenizer` (models) — offline-first data and models
"""

from .env import seed_everything, setup
from .errors import MfkitError
from .profiles import configure
from .results import record

__all__ = ["MfkitError", "configure", "record", "seed_everything", "setup"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Import the heavier modules (transformers, datasets) only when a notebook first asks for them."""
    lazy = {
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
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(f".{lazy[name]}", __name__), name)
    raise AttributeError(f"module 'mfkit' has no attribute {name!r}")
