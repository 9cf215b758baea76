"""The chain's summary for the spam task: every optimization step's numbers read from the ledger, and the export
of the chosen model (safetensors + tokenizer, the decision rule, a model card, ONNX) for `mfkit predict` and
`mfkit serve`.

The waterfall reads what each notebook recorded in this run's artifacts; a notebook that did not run is named
in its row ("run notebook NN first"), never silently dropped.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .classify import CARD_NAME
from .errors import MfkitError
from .evaluation import selection_helper
from .paths import atomic_folder
from .predict import SERVING_CONFIG
from .results import load_results


@dataclass(frozen=True)
class Step:
    """One row of the waterfall: where its numbers are recorded and where its model is saved (if it is)."""

    name: str
    notebook: str
    f1: str
    seconds: str | None = None
    folder: str | None = None  # under ARTIFACTS_DIR/models
    servable: bool = (
        True  # a transformers folder that `mfkit predict` and `mfkit serve` load (else TorchScript)
    )


STEPS: tuple[Step, ...] = (
    Step("TF-IDF + logistic regression", "03_full-finetuning", "baseline_f1"),
    Step("full fine-tuning", "03_full-finetuning", "test_f1", "train_seconds", "03-classifier"),
    Step("multi-step (ULMFiT)", "04_multistep-finetuning", "ulmfit_f1", "ulmfit_seconds"),
    Step("LoRA (best rank)", "05_peft-lora", "best_lora_f1"),
    Step("distilled (3 layers)", "16_distillation", "student_f1", "student_train_seconds", "16-student"),
    Step("dynamic int8", "17_quantization", "int8_f1", None, "17-quantized", servable=False),
    Step("pruned FFN (structured)", "18_pruning", "ffn_f1", "structured_seconds", "18-pruned"),
    Step("pruned FFN + int8", "18_pruning", "ffn_int8_f1"),
)


def _value(results: Mapping[str, Any], key: str | None) -> float:
    value = results.get(key) if key else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else np.nan


def _ledgers(artifacts: str | Path, notebooks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each notebook's recorded results ({} where it has not run)."""
    found = {}
    for notebook in dict.fromkeys(notebooks):
        try:
            found[notebook] = load_results(notebook, artifacts)
        except (MfkitError, FileNotFoundError):
            found[notebook] = {}
    return found


def _status(step: Step, results: Mapping[str, Any], score: float) -> str:
    if not results:
        return f"not run: run notebook {step.notebook} first"
    if np.isnan(score):
        return f"{step.notebook} recorded no {step.f1!r}"
    return "ok"


def waterfall(artifacts: str | Path, steps: Sequence[Step] = STEPS) -> pd.DataFrame:
    """One row per step: test F1, its difference to full fine-tuning, training seconds, and what was missing."""
    ledgers = _ledgers(artifacts, [step.notebook for step in steps])
    rows = []
    for step in steps:
        results = ledgers[step.notebook]
        f1 = _value(results, step.f1)
        rows.append(
            {
                "step": step.name,
                "notebook": step.notebook[:2],
                "test F1": f1,
                "train seconds": _value(results, step.seconds),
                "model folder": step.folder or "",
                "servable": step.servable and step.folder is not None,
                "status": _status(step, results, f1),
            }
        )
    table = pd.DataFrame(rows).set_index("step")
    full = table.loc[table["model folder"] == "03-classifier", "test F1"]
    table.insert(2, "F1 - full", table["test F1"] - (full.iloc[0] if len(full) else np.nan))
    return table


# The generation track (06 -> 07): chrF of the greedy answers against the Basic English references. 06 and 07 score
# different test verses (each picks EVAL_VERSES of them evenly), so 07 first scores 06's model on its own verses
# ("start"), and differences are taken only against that row, on the same verses. `f1` holds the chrF key.
GENERATION_STEPS: tuple[Step, ...] = (
    Step("copy the KJV verse", "06_instruction-tuning", "copy_chrf"),
    Step("zero-shot SmolLM2", "06_instruction-tuning", "zero_shot_chrf"),
    Step("LoRA SFT", "06_instruction-tuning", "lora_chrf", "train_seconds", "06-smollm2-verse-lora", False),
    Step("06's model, 07's verses", "07_preference-alignment", "start_chrf"),
    Step("SFT, more steps", "07_preference-alignment", "sft_chrf"),
    Step("DPO", "07_preference-alignment", "dpo_chrf", None, "07-smollm2-verse-dpo", False),
    Step("IPO", "07_preference-alignment", "ipo_chrf"),
    Step("SimPO", "07_preference-alignment", "simpo_chrf"),
    Step("ORPO", "07_preference-alignment", "orpo_chrf"),
)
GENERATION_START = "06's model, 07's verses"


def generation_waterfall(artifacts: str | Path, steps: Sequence[Step] = GENERATION_STEPS) -> pd.DataFrame:
    """One row per step of the generation track: chrF, chrF against the input (copying), the archaic-word share
    and the held-out implicit-reward accuracy where the notebook recorded them, the difference in chrF to
    06's model on the same verses (07's rows only), and what was missing."""
    ledgers = _ledgers(artifacts, [step.notebook for step in steps])
    rows = []
    for step in steps:
        results = ledgers[step.notebook]
        key = step.f1.removesuffix("_chrf")
        chrf = _value(results, step.f1)
        rows.append(
            {
                "step": step.name,
                "notebook": step.notebook[:2],
                "chrF": chrf,
                "chrF to input": _value(results, f"{key}_chrf_to_input"),
                "archaic share": _value(results, f"{key}_archaic_rate"),
                "reward accuracy": _value(results, f"{key}_reward_accuracy"),
                "train seconds": _value(results, step.seconds),
                "model folder": step.folder or "",
                "status": _status(step, results, chrf),
            }
        )
    table = pd.DataFrame(rows).set_index("step")
    if GENERATION_START in table.index:
        start = table.loc[GENERATION_START]
        difference = (table["chrF"] - start["chrF"]).where(table["notebook"] == start["notebook"])
    else:
        difference = np.nan
    table.insert(3, "chrF - start", difference)
    return table


@selection_helper
def choose(
    table: pd.DataFrame,
    tolerance: float = 0.01,
    *,
    validation_labels: Sequence[int],
    validation_preds: Mapping[str, Sequence[int]],
) -> str:
    """The fastest servable saved model (lowest `latency ms` in `table`) whose F1 on the **validation** split is
    at most `tolerance` below full fine-tuning's F1 there.

    `validation_preds` maps a step of the table to its predicted class ids on the validation examples whose
    labels are `validation_labels`; it must include full fine-tuning (the row saved in `03-classifier`), the
    reference. The table's test F1 is never read: the chosen model's test F1 is measured after the choice, so it
    stays an honest estimate.
    """
    from .evaluation import f1_of_positive

    reference = table.index[table["model folder"] == "03-classifier"]
    if len(reference) == 0 or reference[0] not in validation_preds:
        raise MfkitError(
            "full fine-tuning (03-classifier) has no validation predictions, so nothing can be compared to it.",
            "run notebook 03 first and pass its validation predictions in validation_preds.",
        )
    labels = np.asarray(validation_labels)
    val_f1 = {step: f1_of_positive(labels, np.asarray(preds)) for step, preds in validation_preds.items()}
    saved = table[table["servable"] & (table["status"] == "ok") & table["latency ms"].notna()]
    saved = saved[saved.index.isin(list(val_f1))]
    good = [step for step in saved.index if val_f1[step] >= val_f1[reference[0]] - tolerance]
    if not good:
        raise MfkitError(
            "no saved model is within tolerance of full fine-tuning on validation, or none was measured.",
            "run notebook 03 first (its classifier is always a candidate), or raise the tolerance.",
        )
    return str(saved.loc[good, "latency ms"].idxmin())


def load_variant(folder: str | Path) -> tuple[Any, Any]:
    """A saved model and its tokenizer: a transformers folder, or notebook 17's TorchScript int8 folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .quantize import SCRIPT_NAME, load_quantized

    folder = Path(folder)
    if (folder / SCRIPT_NAME).is_file():
        model, tokenizer, _ = load_quantized(folder)
        return model, tokenizer
    return AutoModelForSequenceClassification.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(
        folder
    )


@selection_helper
def serving_rule(
    source: str | Path,
    rule_file: str | Path,
    validation_texts: Sequence[str],
    validation_labels: Sequence[int],
    max_length: int,
) -> tuple[dict[str, float], str]:
    """(threshold and temperature, where they came from) for serving the classifier saved in `source`.

    Notebook 15's rule (`rule_file`) is reused only when it was tuned for this very model folder: a threshold is a
    property of one model's probabilities. Otherwise, the temperature and the F1-maximising threshold are fitted
    here the way 15 fits them, on the validation mails only (the test split chooses nothing).
    """
    from .evaluation import choose_threshold, fit_temperature, scale_logits
    from .predict import Predictor

    source, rule_file = Path(source), Path(rule_file)
    saved = json.loads(rule_file.read_text()) if rule_file.is_file() else {}
    if saved and Path(saved.get("model_folder", "")).name == source.name:
        rule = {"threshold": float(saved["threshold"]), "temperature": float(saved.get("temperature", 1.0))}
        return rule, f"notebook 15 (tuned for {source.name} on validation)"
    model, tokenizer = load_variant(source)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    probs = Predictor(model, tokenizer, labels, max_length=max_length).probabilities(validation_texts)
    log_probs = np.log(np.clip(probs, 1e-12, 1.0))  # logits up to a per-row constant: same softmax at every T
    temperature = fit_temperature(log_probs, validation_labels)
    threshold, _ = choose_threshold(validation_labels, scale_logits(log_probs, temperature)[:, 1])
    why = f"15 tuned {Path(saved['model_folder']).name}" if saved else "notebook 15 has not run"
    return {"threshold": threshold, "temperature": temperature}, (
        f"fitted here for {source.name} on {len(validation_labels)} validation mails ({why})"
    )


def model_card(
    name: str, settings: Mapping[str, Any], scores: Mapping[str, Any], serving: Mapping[str, Any], limits: str
) -> str:
    """A short model card (Markdown): what the model is, its data and numbers, its decision rule, its limits."""
    lines = [
        f"# {name}",
        "",
        f"Exported by mfkit on {datetime.now(timezone.utc):%Y-%m-%d}.",
        "",
        "## Data and training",
        "",
        *[f"- {k}: {v}" for k, v in sorted(settings.items()) if v is not None],
        "",
        "## Test scores (from the run that produced it)",
        "",
        *[f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(scores.items())],
        "",
        "## Decision rule",
        "",
        *[f"- {k}: {v}" for k, v in sorted(serving.items())],
        "",
        "## Limits",
        "",
        limits,
        "",
    ]
    return "\n".join(lines)


def export_onnx(
    model: torch.nn.Module, tokenizer: Any, path: Path, max_length: int, texts: Sequence[str]
) -> float:
    """Write `model` as ONNX (dynamic batch and length) and return the largest |ONNX - PyTorch| logit difference
    on `texts` (ONNX Runtime on the CPU)."""
    import onnxruntime

    model = model.eval().cpu()
    sample = tokenizer(
        list(texts[:2]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    axes = {
        "input_ids": {0: "batch", 1: "length"},
        "attention_mask": {0: "batch", 1: "length"},
        "logits": {0: "batch"},
    }
    torch.onnx.export(
        model,
        (sample["input_ids"], sample["attention_mask"]),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_axes=axes,
        dynamo=False,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    onnx_logits = session.run(None, {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")})[
        0
    ]
    with torch.no_grad():
        torch_logits = model(
            **{k: torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask")}
        ).logits
    return float(np.abs(onnx_logits - torch_logits.numpy()).max())


def export_model(
    source: str | Path,
    target: str | Path,
    serving: Mapping[str, Any],
    card: str,
    onnx_texts: Sequence[str] = (),
) -> tuple[Path, float | None]:
    """Copy the saved model `source` to `target` with its serving rule and model card, plus ONNX when
    `onnx_texts` are given and ONNX Runtime is installed; all in one rename. Returns the folder and the ONNX check
    (None when not exported)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = Path(source)
    if not (source / "config.json").is_file():
        raise MfkitError(
            f"{source} is not a saved classifier.", "export a folder written by save_pretrained."
        )
    difference = None
    with atomic_folder(target) as staging:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        (staging / SERVING_CONFIG).write_text(json.dumps(dict(serving), indent=2, sort_keys=True))
        (staging / "README.md").write_text(card)
        if onnx_texts and _has_onnxruntime():
            model = AutoModelForSequenceClassification.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
            difference = export_onnx(
                model, tokenizer, staging / "model.onnx", serving["max_length"], onnx_texts
            )
    return Path(target).resolve(), difference


def _has_onnxruntime() -> bool:
    import importlib.util

    return (
        importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
    )


def read_card(folder: str | Path) -> dict[str, Any]:
    """The card a notebook saved beside its model (`settings`, `scores`), or {} when there is none."""
    path = Path(folder) / CARD_NAME
    return json.loads(path.read_text()) if path.is_file() else {}
