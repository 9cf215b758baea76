"""Datasets for the chain: the shipped ones, a local file, or a hub name, always as train/validation/test.

Every loader returns a `datasets.DatasetDict` with the keys `train`, `validation` and `test`. A text dataset has
a `text` column (and a `label` column when it is labelled), whatever its source called them, so later notebooks
see one schema.

Splits are made without random state: each item (or each group of items, such as a chapter) is placed by the
SHA-256 hash of a stable key, so the same data always splits the same way on every machine. The small helpers
below (`normalize_text`, `dedupe`, `hash_split`, `stratified_split`, `check_no_leakage`) are the ones that
built the shipped files (`data/build_data.py`) and the ones notebook 01 explains.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from .errors import MfkitError
from .paths import DATA_ENV, data_dir

SHIPPED = ("austen", "spam", "brown", "kjv_bbe")
SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
SPAM_LABELS = ["ham", "spam"]
SPAN_TAGS = ["O", "B-NAME", "I-NAME"]
BUILD_COMMAND = "python data/build_data.py"

_LOCAL_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json"}
_SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation"}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_WHITESPACE = re.compile(r"\s+")

_STRING = Value("string")
_INT = Value("int64")
SHIPPED_FEATURES: dict[str, Features] = {
    "austen": Features({"text": _STRING, "book": _STRING, "chapter": _INT, "split": _STRING}),
    "spam": Features(
        {
            "text": _STRING,
            "subject": _STRING,
            "label": ClassLabel(names=SPAM_LABELS),
            "group": _STRING,
            "split": _STRING,
        }
    ),
    "brown": Features(
        {
            "tokens": datasets.Sequence(_STRING),
            "pos": datasets.Sequence(_STRING),
            "spans": datasets.Sequence(ClassLabel(names=SPAN_TAGS)),
            "genre": _STRING,
            "doc": _STRING,
            "split": _STRING,
        }
    ),
    "kjv_bbe": Features(
        {
            "source": _STRING,
            "target": _STRING,
            "book": _STRING,
            "chapter": _INT,
            "verse": _INT,
            "split": _STRING,
        }
    ),
}


# --------------------------------------------------------------------------------------------------------------
# Pure helpers: cleaning, deduplication, deterministic splits, leakage checks
# --------------------------------------------------------------------------------------------------------------


def normalize_text(text: str | Sequence[str]) -> str:
    """The form in which two texts count as the same: NFKC, case-folded, whitespace runs made one space.

    A list of tokens is joined with spaces first, so token sequences compare like sentences.
    """
    if not isinstance(text, str):
        text = " ".join(text)
    text = unicodedata.normalize("NFKC", text).casefold()
    return _WHITESPACE.sub(" ", text).strip()


def _key_function(key: str | Callable[[Mapping[str, Any]], Any]) -> Callable[[Mapping[str, Any]], Any]:
    """Turn a field name into a function that reads that field; leave a function as it is."""
    if callable(key):
        return key
    return lambda record: record[key]


def dedupe(records: Iterable[Mapping[str, Any]], key: str | Callable[[Mapping[str, Any]], Any]) -> list:
    """Keep the first record of each normalized `key` value (a field name or a function of the record).

    The order of the kept records is the input order; `len(records) - len(result)` is how many were dropped.
    """
    read = _key_function(key)
    seen: set[str] = set()
    kept = []
    for record in records:
        value = normalize_text(read(record))
        if value not in seen:
            seen.add(value)
            kept.append(record)
    return kept


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Check that `fractions` are three non-negative numbers for train/validation/test that sum to 1."""
    ok = (
        len(fractions) == len(SPLITS)
        and all(isinstance(f, int | float) and not isinstance(f, bool) and f >= 0 for f in fractions)
        and abs(sum(fractions) - 1.0) < 1e-6
        and fractions[0] > 0
    )
    if not ok:
        raise MfkitError(
            f"split_fractions={tuple(fractions)!r} is not three fractions for train/validation/test.",
            "pass three non-negative numbers that sum to 1 with a positive train share, e.g. (0.8, 0.1, 0.1).",
        )
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def _unit_hash(key: str) -> int:
    """A 64-bit number from the SHA-256 of `key`: the same on every machine and every Python run."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def hash_split(key: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """Place one item by the hash of its key: 'train', 'validation' or 'test' with the given probabilities.

    Independent per item (no need to see the other items), so the realised shares only approach `fractions`
    for many items; `stratified_split` gives exact shares within each stratum.
    """
    fractions = check_fractions(fractions)
    point = _unit_hash(key) / 2**64
    cumulative = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        cumulative += fraction
        if point < cumulative:
            return name
    return SPLITS[-1]


def allocate(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[int]:
    """Share `n` units among the splits: largest remainders, and at least one unit per split when `n` allows."""
    fractions = check_fractions(fractions)
    quotas = [n * f for f in fractions]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(wanted):
        for i in wanted:
            if counts[i] == 0:
                counts[max(range(len(counts)), key=lambda j: counts[j])] -= 1
                counts[i] = 1
    return counts


def stratified_split(
    keys: Sequence[str],
    strata: Sequence[Hashable] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> list[str]:
    """The split of each item: equal keys form one unit, units are shared out within each stratum.

    Within a stratum the units are ordered by the hash of their key and cut at the `allocate` counts, so every
    stratum (a label, a genre, a book) is divided in the given proportions and no key lands in two splits.
    A unit's stratum is the stratum of its first item.
    """
    fractions = check_fractions(fractions)
    if strata is not None and len(strata) != len(keys):
        raise MfkitError(
            f"stratified_split got {len(keys)} keys but {len(strata)} strata.",
            "pass one stratum (e.g. the label) per key.",
        )
    units: dict[Hashable, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            units[strata[i] if strata is not None else None].append(key)
    placed: dict[str, str] = {}
    for members in units.values():
        ordered = sorted(members, key=lambda k: (_unit_hash(k), k))
        start = 0
        for name, count in zip(SPLITS, allocate(len(ordered), fractions), strict=True):
            for key in ordered[start : start + count]:
                placed[key] = name
            start += count
    return [placed[key] for key in keys]


def column_values(dataset: Dataset, column: str) -> list:
    """One column as a Python list, converted in one batch (iterating a lazy column row by row is slow)."""
    return dataset[column][:]


def _column_keys(dataset: Dataset, column: str) -> set[str]:
    """The normalized values of one column of `dataset`."""
    return {normalize_text(value) for value in column_values(dataset, column)}


def check_no_leakage(dataset_dict: Mapping[str, Dataset], column: str = "text") -> None:
    """Raise `MfkitError` if any normalized value of `column` occurs in more than one split."""
    keys = {name: _column_keys(split, column) for name, split in dataset_dict.items()}
    shared: set[str] = set()
    pairs = []
    for a, b in combinations(keys, 2):
        common = keys[a] & keys[b]
        if common:
            pairs.append(f"{a}/{b}: {len(common)}")
            shared |= common
    if shared:
        example = min(shared, key=len)[:80]
        raise MfkitError(
            f"{len(shared)} distinct {column!r} values occur in more than one split ({', '.join(pairs)}); "
            f"e.g. {example!r}. Scores on the held-out splits would be too optimistic.",
            "deduplicate before splitting (mfkit.data.dedupe) and split by the normalized text "
            "(mfkit.data.stratified_split), or let load_data make the split.",
        )


def label_names(ds: Dataset | DatasetDict, column: str = "label") -> list[str]:
    """The class names of a label column: a ClassLabel's names, else the sorted distinct values as text."""
    table = ds["train"] if isinstance(ds, DatasetDict) else ds
    if column not in table.column_names:
        raise MfkitError(
            f"There is no {column!r} column; the columns are {table.column_names}.",
            "pass the name of the label column, or load the data with label_column=...",
        )
    feature = table.features[column]
    inner = getattr(feature, "feature", None)
    for candidate in (feature, inner):
        if isinstance(candidate, ClassLabel):
            return list(candidate.names)
    values = column_values(table, column)
    if values and isinstance(values[0], list):
        values = [v for row in values for v in row]
    return sorted({str(v) for v in values})


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def shipped_path(name: str) -> Path:
    """Where the shipped dataset `name` lives: `data_dir()/NAME.jsonl.gz`."""
    return data_dir() / f"{name}.jsonl.gz"


def _take(table: Dataset, rows: list[int]) -> Dataset:
    """The rows of `table` as their own dataset: a slice when they are contiguous, else a flattened selection.

    A plain `select` keeps an indices mapping that makes every later column read slow; a slice has none.
    """
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return table.select(range(rows[0], rows[0] + len(rows)))
    return table.select(rows).flatten_indices()


def _split_by_column(table: Dataset, column: str = "split") -> DatasetDict:
    """Cut one table into train/validation/test by the values of `column`, which is then dropped."""
    values = [
        _SPLIT_ALIASES.get(str(v).strip().lower(), str(v).strip().lower())
        for v in column_values(table, column)
    ]
    unknown = sorted(set(values) - set(SPLITS))
    if unknown:
        raise MfkitError(
            f"The {column!r} column holds {unknown}, which are not split names.",
            f"use only {list(SPLITS)} (or 'dev'/'valid' for validation), or drop the column to let mfkit split.",
        )
    rows: dict[str, list[int]] = {name: [] for name in SPLITS}
    for i, value in enumerate(values):
        rows[value].append(i)
    empty = [name for name in SPLITS if not rows[name]]
    if empty:
        raise MfkitError(
            f"The {column!r} column has no rows for {empty}.",
            "give every split some rows, or drop the column to let mfkit make a stratified split.",
        )
    table = table.remove_columns(column)
    return DatasetDict({name: _take(table, rows[name]) for name in SPLITS})


def _file_bytes(path: Path) -> bytes:
    """The content of a data file, decompressed when it ends in .gz; `MfkitError` for an empty or cut-off file."""
    if path.stat().st_size == 0:
        raise MfkitError(
            f"{path} is empty (0 bytes).", "point at the file that holds the data, or write it again."
        )
    if path.suffix.lower() != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise MfkitError(
            f"{path} is a damaged or truncated gzip file ({type(exc).__name__}: {exc}).",
            "copy or download the file again (a .gz file cut short cannot be read), or rebuild it.",
        ) from exc


def _utf8_text(path: Path, content: bytes) -> str:
    """`content` decoded as UTF-8 (a byte-order mark allowed); `MfkitError` naming the line of the first bad byte."""
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        raise MfkitError(
            f"{path} is not UTF-8 text: byte 0x{content[exc.start]:02x} on line {line} cannot be decoded "
            f"(UnicodeDecodeError: {exc.reason}); it was probably saved as Latin-1 or Windows-1252.",
            f"save it again as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name} > utf8_{path.name}`, or in "
            "Python read it with encoding='latin-1' and write it with encoding='utf-8'), then load that file.",
        ) from exc


def _check_csv_rows(path: Path, text: str) -> None:
    """Raise `MfkitError` for a CSV whose rows do not all have the header's number of fields.

    An unterminated quote at the end, or a last row with fewer fields, means the file was cut short.
    """
    reader = csv.reader(io.StringIO(text), strict=True)
    width, rows = None, 0
    try:
        for row in reader:
            if not row:
                continue
            rows += 1
            if width is None:
                width = len(row)
            elif len(row) != width:
                short = reader.line_num == text.rstrip("\n").count("\n") + 1 and len(row) < width
                problem = (
                    "its last row is incomplete: the file looks truncated" if short else "it is not a table"
                )
                raise MfkitError(
                    f"{path}: line {reader.line_num} has {len(row)} field(s) but the header has {width}; {problem}.",
                    'export the file again in full; quote a field that holds a comma ("a, b").',
                )
    except csv.Error as exc:
        raise MfkitError(
            f"{path} is not well-formed CSV near line {reader.line_num} ({exc}): a quoted field is broken or "
            "never ends (a file cut short ends like this).",
            'export or copy the file again in full; a quote inside a quoted field is written twice ("").',
        ) from exc


def check_data_file(path: Path, builder: str) -> None:
    """Raise `MfkitError` up front for a data file that cannot be read whole: empty, cut off, not UTF-8."""
    text = _utf8_text(path, _file_bytes(path))
    if not text.strip():
        raise MfkitError(f"{path} holds only whitespace.", "point at the file that holds the data.")
    if builder == "csv":
        _check_csv_rows(path, text)


def _read_table(path: Path, builder: str, **kwargs: Any) -> Dataset:
    """`datasets.load_dataset(builder, path)` after `check_data_file`, its errors turned into `MfkitError`."""
    check_data_file(path, builder)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as exc:
        root = exc
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        if "corresponds to no data" in str(exc) or type(root).__name__ == "EmptyDataError":
            raise MfkitError(
                f"{path} has no data rows (a header alone, or nothing).",
                "add rows below the header: one row per example, with its text (and label).",
            ) from exc
        raise MfkitError(
            f"{path} could not be read as {builder.upper()}: {type(root).__name__}: {str(root)[:200]}",
            f"check that the file is well-formed {builder.upper()} (open it in a text editor or "
            f"{'pandas.read_csv' if builder == 'csv' else 'json.loads line by line'}) and load it again.",
        ) from exc


def _load_shipped(name: str) -> DatasetDict:
    """Read a shipped `data/NAME.jsonl.gz` into its three splits."""
    path = shipped_path(name)
    if not path.is_file():
        raise MfkitError(
            f"The shipped dataset {name!r} is missing: there is no {path}.",
            f"rebuild the shipped data with `{BUILD_COMMAND}` in the repository, or check that ${DATA_ENV} "
            "(if set) points at the folder that holds the .jsonl.gz files.",
        )
    return _split_by_column(_read_table(path, "json", features=SHIPPED_FEATURES[name]))


def _local_builder(path: Path) -> str | None:
    """'csv' or 'json' for a local data file name (optionally .gz), else None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _LOCAL_BUILDERS.get(suffixes[-1]) if suffixes else None


def _missing_column(role: str, column: str, columns: list[str]) -> MfkitError:
    """The error for a text or label column that is not in the data."""
    return MfkitError(
        f"The {role} column {column!r} is not in the data; its columns are {columns}.",
        f"pass {role}_column= with one of {columns}.",
    )


def _pick_columns(
    columns: list[str], text_column: str | None, label_column: str | None
) -> tuple[str, str | None]:
    """Resolve the text and label column names (defaults 'text' and, when present, 'label')."""
    text = text_column or "text"
    if text not in columns:
        raise _missing_column("text", text, columns)
    if label_column is not None and label_column not in columns:
        raise _missing_column("label", label_column, columns)
    label = label_column or ("label" if "label" in columns else None)
    if label == text:
        raise MfkitError(
            f"text_column and label_column are both {text!r}.",
            "pass two different columns for text and label.",
        )
    return text, label


def _rename(table: Dataset, old: str, new: str) -> Dataset:
    """Rename column `old` to `new`, refusing to overwrite a different column called `new`."""
    if old == new:
        return table
    if new in table.column_names:
        raise MfkitError(
            f"Cannot rename {old!r} to {new!r}: the data already has a {new!r} column.",
            f"rename or drop the existing {new!r} column first, or pass {new}_column={new!r}.",
        )
    return table.rename_column(old, new)


def _check_filled(table: Dataset, column: str) -> None:
    """Raise `MfkitError` if `column` has empty (missing) values."""
    missing = sum(value is None for value in column_values(table, column))
    if missing:
        raise MfkitError(
            f"The {column!r} column has {missing} empty values.",
            "fill or remove those rows before loading (mfkit never guesses them).",
        )


def _standardize(table: Dataset, text_column: str | None, label_column: str | None) -> Dataset:
    """Rename the chosen text/label columns to `text`/`label` and check they are filled."""
    text, label = _pick_columns(table.column_names, text_column, label_column)
    table = _rename(table, text, "text")
    _check_filled(table, "text")
    if label is not None:
        table = _rename(table, label, "label")
        _check_filled(table, "label")
    return table


def _label_strings(dd: DatasetDict) -> DatasetDict:
    """A ClassLabel `label` column turned back into its names (so it can be encoded in another order)."""
    feature = dd["train"].features["label"]
    if not isinstance(feature, ClassLabel):
        return dd
    return DatasetDict(
        {
            split: table.cast_column("label", Value("int64")).map(
                lambda batch: {"label": [feature.int2str(v) for v in batch["label"]]},
                batched=True,
                features=Features({**table.features, "label": _STRING}),
                keep_in_memory=True,
            )
            for split, table in dd.items()
        }
    )


def _class_order(names: Sequence[str], positive_label: Any) -> list[str]:
    """Class names in id order: sorted, with `positive_label` (when given) moved to id 1, the positive class."""
    names = sorted(names)
    if positive_label is None:
        if len(names) == 2:
            raise MfkitError(
                f"The labels are text ({names[0]!r}, {names[1]!r}), so mfkit cannot tell which one is the positive "
                "class (the one precision, recall and F1 are reported for).",
                f"pass positive_label= (in a notebook: POSITIVE_LABEL), e.g. positive_label={names[1]!r}.",
            )
        return names
    if str(positive_label) not in names:
        raise MfkitError(
            f"positive_label={positive_label!r} is not one of the labels {names}.",
            f"pass one of {names} as positive_label (in a notebook: POSITIVE_LABEL), spelled as in the data.",
        )
    rest = [n for n in names if n != str(positive_label)]
    return rest[:1] + [str(positive_label)] + rest[1:]


def _encode_labels(dd: DatasetDict, positive_label: Any = None) -> DatasetDict:
    """Encode a text (or ClassLabel) `label` column as a ClassLabel whose id 1 is `positive_label`.

    Integer labels are kept: their positive class is 1, and `positive_label` may only say so.
    """
    if "label" not in dd["train"].column_names:
        if positive_label is not None:
            raise MfkitError(
                f"positive_label={positive_label!r} was given but the data has no label column.",
                "pass label_column= (in a notebook: LABEL_COLUMN) naming the label column, or leave positive_label unset.",
            )
        return dd
    feature = dd["train"].features["label"]
    if isinstance(feature, Value) and feature.dtype not in ("string", "large_string"):
        if positive_label is not None and str(positive_label) != "1":
            raise MfkitError(
                f"positive_label={positive_label!r}, but the labels are numbers, whose positive class is 1.",
                "leave positive_label unset, or write the labels as text (e.g. 'spam'/'ham') and name one.",
            )
        return dd
    if isinstance(feature, ClassLabel) and positive_label in (None, *feature.names[1:2]):
        return dd  # already in the kit's order
    dd = _label_strings(dd)
    names = _class_order(
        {value for split in dd.values() for value in column_values(split, "label")}, positive_label
    )
    return dd.cast_column("label", ClassLabel(names=names))


def check_splits_filled(dd: Mapping[str, Dataset], source: str) -> None:
    """Raise `MfkitError` when a split has no rows (e.g. a tiny file leaves validation empty)."""
    sizes = {name: len(table) for name, table in dd.items()}
    empty = [name for name, n in sizes.items() if n == 0]
    if empty:
        raise MfkitError(
            f"{source} gives the {'/'.join(empty)} split(s) no rows ({sizes}): too few rows to split "
            "train/validation/test.",
            "use more rows (at least a few per class and split; 30 or more in all), or add a 'split' column "
            "that puts rows in every split.",
        )


def check_labels(dd: Mapping[str, Dataset], column: str = "label") -> list[str]:
    """Check that the labels are usable class ids before any training; return the class names.

    The ids must be 0..C-1 (integers, or a ClassLabel), the training split must hold at least two classes,
    and every class seen in validation or test must occur in training. Raises `MfkitError` naming the fix.
    """
    names = label_names(dd["train"] if "train" in dd else next(iter(dd.values())), column)
    feature = dd["train"].features[column]
    seen = {split: set(column_values(table, column)) for split, table in dd.items()}
    if not isinstance(feature, ClassLabel):
        values = set().union(*seen.values())
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise MfkitError(
                f"The {column!r} column holds values that are not class ids 0..C-1: {sorted(values, key=str)[:8]}.",
                "write the labels as text (mfkit numbers them) or as whole numbers 0, 1, ...",
            )
        if values != set(range(len(values))):
            raise MfkitError(
                f"The labels are {sorted(values)}; class ids must be 0..{len(values) - 1} with none missing, "
                "or the model gets outputs for classes that never occur.",
                f"renumber them 0..{len(values) - 1} (e.g. {dict(zip(sorted(values), range(len(values)), strict=True))}), "
                "or write them as text and let mfkit number them.",
            )
        names = [str(v) for v in range(len(values))]

    def name(i: int) -> str:
        return names[i] if isinstance(feature, ClassLabel) else str(i)

    if len(seen.get("train", ())) < 2:
        only = ", ".join(repr(name(v)) for v in sorted(seen.get("train", ())))
        raise MfkitError(
            f"The training split holds a single class ({only}): a classifier needs at least two.",
            "load data with examples of at least two classes (check label_column / LABEL_COLUMN).",
        )
    for split, values in seen.items():
        unseen = sorted(values - seen["train"])
        if unseen:
            raise MfkitError(
                f"The {split} split has label(s) {[name(v) for v in unseen]} that the training split never has.",
                "give every class training examples (more rows, or let mfkit split: drop the 'split' column), "
                "or drop those rows.",
            )
    return [name(i) for i in range(len(names))]


def _make_split(table: Dataset, fractions: Sequence[float]) -> DatasetDict:
    """Split `table` by the hash of its normalized text, stratified by `label` when there is one.

    A table without a `text` column (e.g. tokens for token classification) is split by row position.
    """
    if "text" in table.column_names:
        keys = [normalize_text(text) for text in column_values(table, "text")]
    else:
        keys = [f"row-{i}" for i in range(len(table))]
    strata = column_values(table, "label") if "label" in table.column_names else None
    chosen = stratified_split(keys, strata, fractions)
    rows: dict[str, list[int]] = {name: [] for name in SPLITS}
    for i, name in enumerate(chosen):
        rows[name].append(i)
    return DatasetDict({name: _take(table, rows[name]) for name in SPLITS})


def _load_local(
    path: Path, builder: str, text_column: str | None, label_column: str | None, fractions: Sequence[float]
) -> DatasetDict:
    """Load a local CSV/JSON(L) file, standardize its columns and split it."""
    if not path.is_file():
        raise MfkitError(
            f"There is no file at {path} (looked from {Path.cwd()}).",
            "check the path; a relative path starts from the folder the notebook runs in.",
        )
    table = _read_table(path, builder)
    if len(table) == 0:
        raise MfkitError(f"{path} has no data rows.", "add rows: one per example, with its text (and label).")
    table = _standardize(table, text_column, label_column)
    has_split = "split" in table.column_names
    return _split_by_column(table) if has_split else _make_split(table, fractions)


def hub_offline() -> bool:
    """True when the environment asks Hugging Face libraries to stay offline."""
    return any(os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"} for var in _OFFLINE_VARS)


def _hub_unreachable(name: str, reason: str) -> MfkitError:
    """The error for a hub dataset that cannot be fetched."""
    return MfkitError(
        f"{name!r} is not a shipped dataset or a local file, and the Hugging Face Hub cannot be reached ({reason}).",
        f"use a shipped dataset ({', '.join(SHIPPED)}), a local .csv/.json/.jsonl file, or connect to the "
        f"internet and unset {' and '.join(_OFFLINE_VARS)}.",
    )


def _is_connection_error(error: BaseException) -> bool:
    """True for the errors a missing network gives (whatever HTTP library raised them)."""
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    names = " ".join(cls.__name__ for cls in type(error).__mro__)
    return any(word in names for word in ("Connect", "Timeout", "LocalEntryNotFound", "Offline"))


def _fill_missing_splits(dd: DatasetDict, fractions: Sequence[float]) -> DatasetDict:
    """Give a hub dataset the three splits: carve the missing ones out of `train` with a stratified split."""
    if "train" not in dd:
        raise MfkitError(
            f"The dataset has no 'train' split (it has {list(dd)}).", "load a dataset that has a train split."
        )
    missing = [name for name in SPLITS if name not in dd]
    if not missing:
        return DatasetDict({name: dd[name] for name in SPLITS})
    shares = dict(zip(SPLITS, check_fractions(fractions), strict=True))
    for name in SPLITS[1:]:
        if name not in missing:
            shares[name] = 0.0  # that split exists already: train keeps its rows
    total = sum(shares.values())
    carved = _make_split(dd["train"], tuple(shares[name] / total for name in SPLITS))
    return DatasetDict({name: carved[name] if name in [*missing, "train"] else dd[name] for name in SPLITS})


def _load_hub(
    name: str, text_column: str | None, label_column: str | None, fractions: Sequence[float]
) -> DatasetDict:
    """Load `name` from the Hugging Face Hub and bring it to the kit's schema."""
    if hub_offline():
        set_vars = [var for var in _OFFLINE_VARS if os.environ.get(var)]
        raise _hub_unreachable(name, f"offline mode is on: {', '.join(set_vars)} set")
    try:
        loaded = datasets.load_dataset(name)
    except Exception as error:
        if _is_connection_error(error):
            raise _hub_unreachable(name, f"{type(error).__name__}: {error}") from error
        if type(error).__name__ in {"DatasetNotFoundError", "FileNotFoundError"}:
            raise MfkitError(
                f"{name!r} is not a shipped dataset, not a local file and not a dataset on the Hub.",
                f"check the spelling; shipped datasets are {', '.join(SHIPPED)}; local files end in "
                ".csv, .json or .jsonl.",
            ) from error
        raise
    dd = DatasetDict({_SPLIT_ALIASES.get(split, split): table for split, table in loaded.items()})
    if text_column is not None or label_column is not None:
        dd = DatasetDict(
            {split: _standardize(table, text_column, label_column) for split, table in dd.items()}
        )
    return _fill_missing_splits(dd, fractions)


def _finish(dd: DatasetDict, source: str, positive_label: Any) -> DatasetDict:
    """Check a loaded dataset before anything trains on it: every split filled, labels usable, positive class set."""
    check_splits_filled(dd, source)
    dd = _encode_labels(dd, positive_label)
    if "label" in dd["train"].column_names:
        check_labels(dd)
    return dd


def load_data(
    name_or_path: str | os.PathLike,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    positive_label: Any = None,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> DatasetDict:
    """Load a dataset as a `DatasetDict` with `train`, `validation` and `test`.

    - A shipped name (`SHIPPED`): the file in the data folder, with its fixed splits; spam's `label` is a
      ClassLabel (ham, spam) and brown's `spans` a sequence of ClassLabel (O, B-NAME, I-NAME).
    - A local `.csv`, `.json` or `.jsonl` file (optionally `.gz`), UTF-8: `text_column` (default `text`) and
      `label_column` (default `label`, when present) are renamed to `text`/`label`. A `split` column is used
      as given, otherwise the rows are split by the hash of their text in `split_fractions`, stratified by label.
    - Any other name: `datasets.load_dataset(name)` from the Hub ('dev'/'valid' read as validation), with
      missing splits carved from `train` in `split_fractions`. Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)
      or unreachable, it raises `MfkitError` naming the shipped datasets.

    Text labels become a ClassLabel: sorted names, except that `positive_label` (required for two text
    classes) gets id 1, the class that precision, recall and F1 are reported for. Integer labels must be
    0..C-1 (their positive class is 1). Before anything trains, every split must have rows, the training split
    at least two classes, and no class may occur only in validation or test; a file that is empty, cut short
    or not UTF-8 is refused up front. Every problem raises `MfkitError` naming the fix.

    `text_column`/`label_column` given for a shipped or hub dataset rename those columns the same way.
    """
    fractions = check_fractions(split_fractions)
    name = os.fspath(name_or_path)
    if name in SHIPPED:
        if fractions != DEFAULT_FRACTIONS:
            raise MfkitError(
                f"The shipped dataset {name!r} comes with fixed splits; split_fractions={fractions} cannot apply.",
                "leave split_fractions at its default for shipped data (re-split the returned splits yourself "
                "with mfkit.data.stratified_split if you need other shares).",
            )
        dd = _load_shipped(name)
        if text_column is not None or label_column is not None:
            dd = DatasetDict(
                {split: _standardize(table, text_column, label_column) for split, table in dd.items()}
            )
        return _finish(dd, name, positive_label)
    path = Path(name).expanduser()
    builder = _local_builder(path)
    if builder is not None:
        return _finish(
            _load_local(path, builder, text_column, label_column, fractions), str(path), positive_label
        )
    if path.exists():
        raise MfkitError(
            f"{path} exists but is not a .csv, .json or .jsonl file.",
            "save the data as CSV or JSON lines with a text column (and a label column), then load that file.",
        )
    return _finish(_load_hub(name, text_column, label_column, fractions), name, positive_label)
