"""Batch prediction with a saved classifier: `mfkit predict MODEL_DIR --input FILE --output FILE`.

A model folder is anything `AutoModelForSequenceClassification.from_pretrained` reads (03's classifier, 16's
student, the folder notebook 20 exports). When it holds `mfkit-serving.json` (written by the export), its
decision threshold, temperature and maximum length are used: the threshold notebook 15 chose on validation data.
Without it, the positive class wins when its probability is at least 0.5 and mails are cut at the length the
model's card names (or 512 tokens).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .classify import CARD_NAME
from .errors import MfkitError, check_positive

SERVING_CONFIG = "mfkit-serving.json"
READERS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclass
class Predictor:
    """A classifier, its tokenizer and the decision rule applied to its probabilities."""

    model: Any
    tokenizer: Any
    labels: list[str]
    positive: int = 1
    threshold: float = 0.5
    temperature: float = 1.0
    max_length: int = 512

    @classmethod
    def load(cls, model_dir: str | os.PathLike, threshold: float | None = None) -> Predictor:
        """The classifier in `model_dir` with its serving settings; `threshold` overrides the saved one."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(model_dir)
        if not (folder / "config.json").is_file():
            raise MfkitError(
                f"{folder} is not a saved classifier (no config.json).",
                "pass a folder written by save_pretrained, e.g. ARTIFACTS_DIR/models/03-classifier or 20's export.",
            )
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        serving = _read_json(folder / SERVING_CONFIG)
        card = _read_json(folder / CARD_NAME).get("settings", {})
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        chosen = serving.get("threshold", 0.5) if threshold is None else threshold
        if not 0.0 <= chosen <= 1.0:
            raise MfkitError(
                f"threshold={chosen!r} is not a probability.", "pass a threshold between 0 and 1."
            )
        return cls(
            model=model,
            tokenizer=tokenizer,
            labels=labels,
            positive=int(serving.get("positive", 1 if len(labels) == 2 else 0)),
            threshold=float(chosen),
            temperature=float(serving.get("temperature", 1.0)),
            max_length=int(serving.get("max_length", card.get("max_length", 512))),
        )

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Class probabilities (rows sum to 1) after the temperature, `batch_size` texts per forward pass."""
        check_positive("batch_size", batch_size)
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            logits = self.model(**batch).logits.float() / self.temperature
            out.append(torch.softmax(logits, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)))

    def decide(self, probabilities: np.ndarray) -> list[str]:
        """Labels: for two classes, positive when its probability reaches the threshold; else the argmax."""
        if len(self.labels) == 2:
            chosen = np.where(
                probabilities[:, self.positive] >= self.threshold, self.positive, 1 - self.positive
            )
        else:
            chosen = probabilities.argmax(axis=1)
        return [self.labels[i] for i in chosen]

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, Any]]:
        """One dict per text, every number named for what it holds.

        Two classes: `label` (the decision), `positive_label` (the class the threshold is about) and `p_positive`
        (the probability of that class, the number compared with the threshold), e.g.
        `{"label": "great", "positive_label": "other", "p_positive": 0.2}`. More classes: `label` (the argmax) and
        `p_label`, the probability of that label.
        """
        probs = self.probabilities(texts, batch_size)
        labels = self.decide(probs)
        if len(self.labels) == 2:
            positive = self.labels[self.positive]
            return [
                {"label": label, "positive_label": positive, "p_positive": float(probs[i, self.positive])}
                for i, label in enumerate(labels)
            ]
        return [
            {"label": label, "p_label": float(probs[i, c])}
            for i, (label, c) in enumerate(zip(labels, probs.argmax(axis=1), strict=True))
        ]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_texts(path: str | os.PathLike, text_column: str = "text") -> tuple[pd.DataFrame, list[str]]:
    """The rows of a .csv or .jsonl file and their texts, or one `MfkitError` naming what is wrong."""
    path = Path(path)
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise MfkitError(f"{path.name}: unknown file type.", "pass a .csv or a .jsonl file.")
    if not path.is_file():
        raise MfkitError(f"{path} does not exist.", "check the --input path.")
    if path.stat().st_size == 0:
        raise MfkitError(f"{path} is empty.", "pass a file with a header (CSV) or one JSON object per line.")
    try:
        frame = (
            pd.read_csv(path, dtype=str, keep_default_na=False)
            if kind == "csv"
            else pd.read_json(path, lines=True)
        )
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise MfkitError(
            f"{path.name} could not be read as {kind}: {exc}", f"check that it is valid UTF-8 {kind}."
        ) from exc
    if frame.empty:
        raise MfkitError(f"{path.name} has no rows.", "pass a file with at least one row to predict.")
    if text_column not in frame.columns:
        raise MfkitError(
            f"{path.name} has no column {text_column!r} (columns: {', '.join(map(str, frame.columns))}).",
            "name the column that holds the text with --text-column.",
        )
    texts = frame[text_column]
    missing = texts.isna() | (texts.astype(str).str.strip() == "")
    if missing.any():
        rows = ", ".join(str(i + 1) for i in np.flatnonzero(missing.to_numpy())[:5])
        raise MfkitError(
            f"{path.name}: empty text in row(s) {rows}.", "remove those rows or fill in their text."
        )
    return frame, texts.astype(str).tolist()


def write_atomically(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write `frame` as .csv or .jsonl to `path` through a temporary file: never a half-written output."""
    path = Path(path)
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise MfkitError(f"{path.name}: unknown output type.", "name the output .csv or .jsonl.")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        if kind == "csv":
            frame.to_csv(staging, index=False)
        else:
            frame.to_json(staging, orient="records", lines=True, force_ascii=False)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)
    return path


def predict_file(
    model_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    text_column: str = "text",
    batch_size: int = 32,
    threshold: float | None = None,
    progress: bool = True,
) -> Path:
    """Predict every row of `input_path` and write it to `output_path` with the prediction's fields added
    (`Predictor.predict`: `label`, `positive_label`, `p_positive` for two classes; `label`, `p_label` for more)."""
    from tqdm.auto import tqdm

    frame, texts = read_texts(input_path, text_column)  # bad input stops here, before the model loads
    predictor = Predictor.load(model_dir, threshold)
    rows = []
    for start in tqdm(
        range(0, len(texts), batch_size), disable=not progress, desc="predicting", unit="batch"
    ):
        rows.extend(predictor.predict(texts[start : start + batch_size], batch_size))
    result = frame.assign(**{field: [r[field] for r in rows] for field in rows[0]})
    return write_atomically(result, output_path)
