"""The bad-input matrix: every mistake a learner can make ends in one `MfkitError` naming the problem and the fix.

Each case is a bad input given the way a learner gives it: through the API (`load_data`, `configure`,
`load_model`, `record`, ...) or, for a representative subset, through `mfkit run --param` on a tiny throwaway
notebook that configures, loads its data and then "trains" (writes a marker file). Every case checks:

- an `MfkitError` (exit code 2, or a failed notebook whose error is an `MfkitError`) whose message holds words
  naming the problem and a "Fix:" holding words naming the fix, and no raw traceback;
- that it came before any training (the marker file was never written);
- that nothing half-written is left behind: no temporary file, no ledger holding numbers that a later notebook
  or the summary could take for results.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from helpers import run_cli

import mfkit
from mfkit import cli
from mfkit.data import load_data
from mfkit.errors import MfkitError
from mfkit.models import check_max_length, check_tokenizer_fits, load_model, load_tokenizer
from mfkit.results import record, set_notebook

NOTEBOOK = "99_bad-inputs"
# A profile table of our own, so the cases do not follow the real notebooks' sizes.
TABLE = {
    profile: {
        "max_steps": 10,
        "batch_size": 8,
        "lr": 1e-3,
        "warmup": 0.1,
        "cut_frac": 0.1,
        "lora_ranks": [2, 4],
        "lrs": {"full": 1e-4, "lora": 1e-3},
        "train_limit": 100 if profile == "smoke" else None,
    }
    for profile in ("smoke", "cpu", "gpu")
}


@pytest.fixture(autouse=True)
def profile_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(mfkit.profiles.PROFILES, NOTEBOOK, TABLE)


# --- bad files --------------------------------------------------------------------------------------------------


def csv_file(
    folder: Path, rows: list[tuple[Any, ...]], header: str = "text,label", name: str = "data.csv"
) -> Path:
    """A CSV with `header` and `rows` (values without commas)."""
    path = folder / name
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def labelled(labels: list[Any], per_label: int = 20) -> list[tuple[str, Any]]:
    """`per_label` distinct texts for each label."""
    return [(f"mail {label} number {i}", label) for label in labels for i in range(per_label)]


def header_only(tmp: Path) -> Path:
    return csv_file(tmp, [])


def zero_bytes(tmp: Path) -> Path:
    (tmp / "data.csv").write_bytes(b"")
    return tmp / "data.csv"


def latin1(tmp: Path) -> Path:
    path = tmp / "data.csv"
    path.write_bytes(
        b"text,label\n" + b"".join(f"caf\u00e9 cr\u00e8me {i},{i % 2}\n".encode("latin-1") for i in range(40))
    )
    return path


def unterminated_quote(tmp: Path) -> Path:
    path = csv_file(tmp, labelled([0, 1]))
    path.write_text(path.read_text() + '"a mail cut in the midd')
    return path


def last_row_cut(tmp: Path) -> Path:
    path = csv_file(tmp, labelled([0, 1]))
    path.write_text(path.read_text() + "a mail without its label")
    return path


def truncated_gzip(tmp: Path) -> Path:
    lines = "".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(3000)).encode()
    packed = gzip.compress(lines)
    path = tmp / "data.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2])
    return path


def broken_jsonl(tmp: Path) -> Path:
    path = tmp / "data.jsonl"
    path.write_text('{"text": "fine", "label": 0}\n{"text": "broken", "label": \n')
    return path


def whitespace_only(tmp: Path) -> Path:
    path = tmp / "data.csv"
    path.write_text("\n  \n\n")
    return path


def gapped_labels(tmp: Path) -> Path:
    return csv_file(tmp, labelled([0, 1, 4, 5]))


def label_only_in_test(tmp: Path) -> Path:
    rows = [(f"mail {i}", i % 2, "train") for i in range(20)] + [
        ("mail v", 0, "validation"),
        ("mail w", 1, "validation"),
    ]
    rows += [("mail t", 0, "test"), ("mail u", 2, "test")]
    return csv_file(tmp, rows, header="text,label,split")


def single_class(tmp: Path) -> Path:
    return csv_file(tmp, labelled(["spam"], 40))


def two_rows(tmp: Path) -> Path:
    return csv_file(tmp, [("one mail", "ham"), ("another mail", "spam")])


def text_labels(tmp: Path) -> Path:
    return csv_file(tmp, labelled(["ham", "spam"]), header="body,category")


def fractional_labels(tmp: Path) -> Path:
    return csv_file(tmp, labelled([0.5, 1.5]))


def unlabelled(tmp: Path) -> Path:
    return csv_file(tmp, [(f"line {i}",) for i in range(40)], header="text")


def folder_without_config(tmp: Path) -> Path:
    folder = tmp / "my-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("weights coming soon")
    return folder


# --- the API cases: (id, action on tmp_path, words of the problem, words of the fix) ------------------------------


def _tiny_bert() -> Any:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config)


def _configure(tmp: Path, **knobs: Any) -> Any:
    return mfkit.configure(NOTEBOOK, "smoke", artifacts_dir=tmp / "artifacts", quiet=True, **knobs)


def _record(tmp: Path, name: str, value: Any) -> Any:
    set_notebook("99_bad-inputs", tmp / "artifacts")
    return record(name, value)


def _read_only_artifacts(tmp: Path) -> Any:
    blocker = tmp / "artifacts-file"
    blocker.write_text("a file where the artifacts folder should be")
    return mfkit.configure(NOTEBOOK, "smoke", artifacts_dir=blocker / "inside", quiet=True)


Action = Callable[[Path], Any]
API_CASES: list[tuple[str, Action, list[str], list[str]]] = [
    # malformed data files
    ("csv-header-only", lambda t: load_data(header_only(t)), ["no data rows"], ["add rows"]),
    ("csv-zero-bytes", lambda t: load_data(zero_bytes(t)), ["empty (0 bytes)"], ["write it again"]),
    ("csv-latin1", lambda t: load_data(latin1(t)), ["not UTF-8", "line 2", "UnicodeDecodeError"], ["UTF-8"]),
    (
        "csv-unterminated-quote",
        lambda t: load_data(unterminated_quote(t)),
        ["not well-formed CSV"],
        ["in full"],
    ),
    ("csv-last-row-cut", lambda t: load_data(last_row_cut(t)), ["truncated", "line 42"], ["in full"]),
    ("jsonl-gz-truncated", lambda t: load_data(truncated_gzip(t)), ["truncated gzip"], ["again"]),
    (
        "jsonl-broken-line",
        lambda t: load_data(broken_jsonl(t)),
        ["could not be read as JSON"],
        ["well-formed"],
    ),
    ("csv-whitespace-only", lambda t: load_data(whitespace_only(t)), ["only whitespace"], ["holds the data"]),
    (
        "model-folder-without-config",
        lambda t: load_model(str(folder_without_config(t))),
        ["config.json"],
        ["save_pretrained"],
    ),
    (
        "tokenizer-folder-without-files",
        lambda t: load_tokenizer(str(folder_without_config(t))),
        ["not a saved tokenizer"],
        ["save_pretrained"],
    ),
    # labels against the classes
    ("labels-not-contiguous", lambda t: load_data(gapped_labels(t)), ["[0, 1, 4, 5]", "0..3"], ["renumber"]),
    (
        "label-only-in-test",
        lambda t: load_data(label_only_in_test(t)),
        ["test split", "['2']", "never has"],
        ["training examples"],
    ),
    (
        "single-class",
        lambda t: load_data(single_class(t), positive_label="spam"),
        ["single class", "'spam'"],
        ["at least two classes"],
    ),
    (
        "empty-validation-split",
        lambda t: load_data(two_rows(t), positive_label="spam"),
        ["validation", "no rows"],
        ["more rows"],
    ),
    (
        "text-labels-without-positive",
        lambda t: load_data(text_labels(t), text_column="body", label_column="category"),
        ["cannot tell which one is the positive"],
        ["positive_label='spam'", "POSITIVE_LABEL"],
    ),
    (
        "positive-label-absent",
        lambda t: load_data(
            text_labels(t), text_column="body", label_column="category", positive_label="junk"
        ),
        ["'junk' is not one of"],
        ["'ham'"],
    ),
    ("fractional-labels", lambda t: load_data(fractional_labels(t)), ["not class ids"], ["whole numbers"]),
    (
        "positive-label-without-labels",
        lambda t: load_data(unlabelled(t), positive_label="spam"),
        ["no label column"],
        ["LABEL_COLUMN"],
    ),
    (
        "missing-text-column",
        lambda t: load_data(text_labels(t), label_column="category", positive_label="spam"),
        ["'text'", "body"],
        ["text_column="],
    ),
    # configure: values checked before anything loads
    (
        "max-steps-text",
        lambda t: _configure(t, max_steps="ten"),
        ["max_steps='ten'", "whole number"],
        ["None"],
    ),
    ("lr-negative", lambda t: _configure(t, lr=-1), ["lr=-1", "greater than zero"], ["parameters cell"]),
    ("lr-infinite", lambda t: _configure(t, lr=math.inf), ["lr=inf", "finite"], ["parameters cell"]),
    (
        "batch-size-zero",
        lambda t: _configure(t, batch_size=0),
        ["batch_size=0", "1 or more"],
        ["parameters cell"],
    ),
    ("max-steps-fraction", lambda t: _configure(t, max_steps=2.5), ["max_steps=2.5"], ["parameters cell"]),
    ("seed-text", lambda t: _configure(t, seed="abc"), ["seed='abc'"], ["parameters cell"]),
    ("limit-negative", lambda t: _configure(t, train_limit=-5), ["train_limit=-5"], ["parameters cell"]),
    (
        "text-column-number",
        lambda t: _configure(t, text_column=3),
        ["text_column=3", "string"],
        ["parameters cell"],
    ),
    ("knob-typo", lambda t: _configure(t, maxsteps=3), ["maxsteps", "max_steps?"], ["max_steps"]),
    (
        "lrs-unknown-key",
        lambda t: _configure(t, lrs={"lorra": 1e-3}),
        ["lorra", "'lora'"],
        ["parameters cell"],
    ),
    (
        "lrs-bad-value",
        lambda t: _configure(t, lrs={"lora": "fast"}),
        ["lrs['lora']='fast'"],
        ["parameters cell"],
    ),
    (
        "list-knob-empty",
        lambda t: _configure(t, lora_ranks=[]),
        ["lora_ranks=[]", "non-empty"],
        ["parameters cell"],
    ),
    (
        "fraction-knob-above-one",
        lambda t: _configure(t, cut_frac=1.5),
        ["cut_frac=1.5", "between 0 and 1"],
        ["parameters cell"],
    ),
    (
        "several-bad-values-at-once",
        lambda t: _configure(t, max_steps="ten", lr=-1),
        ["max_steps='ten'", "lr=-1"],
        ["parameters cell"],
    ),
    ("artifacts-dir-unwritable", _read_only_artifacts, ["ARTIFACTS_DIR", "cannot be written"], ["writable"]),
    # models: inputs that do not fit the model
    (
        "max-length-beyond-positions",
        lambda t: check_max_length("minilm", 100_000),
        ["MAX_LENGTH=100000", "512"],
        ["at most 512"],
    ),
    (
        "tokenizer-of-another-model",
        lambda t: check_tokenizer_fits(_tiny_bert(), load_tokenizer("minilm")),
        ["30,522 tokens", "100 rows"],
        ["same name"],
    ),
    # the ledger
    ("record-infinity", lambda t: _record(t, "loss", math.inf), ["infinity", "JSON"], ["finite number"]),
    ("record-nan", lambda t: _record(t, "loss", math.nan), ["NaN"], ["computation"]),
    ("record-reserved-name", lambda t: _record(t, "_run", 1), ["reserved"], ["plain name"]),
]


def leftovers(folder: Path) -> list[str]:
    """Temporary files, and ledgers that hold numbers, anywhere under `folder`."""
    bad = [str(p) for p in folder.rglob("*.tmp")]
    for ledger in folder.rglob("results/*.json"):
        numbers = {k: v for k, v in json.loads(ledger.read_text()).items() if k != "_run"}
        if numbers:
            bad.append(f"{ledger}: {numbers}")
    return bad


def assert_names_problem_and_fix(message: str, problem: list[str], fix: list[str]) -> None:
    said, _, remedy = message.partition("Fix:")
    assert remedy, f"no fix in: {message}"
    for word in problem:
        assert word in said, f"{word!r} not in the problem: {said}"
    for word in fix:
        assert word in remedy, f"{word!r} not in the fix: {remedy}"


@pytest.mark.parametrize(
    ("action", "problem", "fix"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES]
)
def test_api_bad_input(
    action: Action, problem: list[str], fix: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(MfkitError) as info:
        action(tmp_path)
    assert_names_problem_and_fix(str(info.value), problem, fix)
    assert leftovers(tmp_path) == []


def test_matrix_is_large_enough() -> None:
    assert len(API_CASES) + len(RUN_CASES) + len(CLI_CASES) >= 30


# --- the same inputs, accepted when they are right (so the cases above cannot pass by accident) ------------------


def test_good_inputs_pass_the_same_checks(tmp_path: Path) -> None:
    dd = load_data(text_labels(tmp_path), text_column="body", label_column="category", positive_label="ham")
    assert dd["train"].features["label"].names == ["spam", "ham"]  # the positive class has id 1
    cfg = _configure(tmp_path, lrs={"lora": 5e-4}, train_limit="all", seed=7, max_steps=3.0, warmup=0)
    assert cfg.lrs == {"full": 1e-4, "lora": 5e-4} and cfg.train_limit is None and cfg.max_steps == 3
    check_max_length("minilm", 512)
    check_tokenizer_fits(load_model("minilm"), load_tokenizer("minilm"))


# --- through `mfkit run` ------------------------------------------------------------------------------------------

PARAMETERS = """\
PROFILE = "cpu"
ARTIFACTS_DIR = None
SEED = 0
DATASET = "spam"
TEXT_COLUMN = None
LABEL_COLUMN = None
POSITIVE_LABEL = None
MAX_STEPS = None
LR = None
TRAIN_LIMIT = None"""

BODY = f"""\
cfg = mfkit.configure(
    "{NOTEBOOK}", PROFILE, artifacts_dir=ARTIFACTS_DIR, seed=SEED, max_steps=MAX_STEPS, lr=LR,
    train_limit=TRAIN_LIMIT, text_column=TEXT_COLUMN, label_column=LABEL_COLUMN, positive_label=POSITIVE_LABEL,
)
mfkit.record("configured", 1)
raw = mfkit.load_data(DATASET, text_column=cfg.text_column, label_column=cfg.label_column,
                      positive_label=cfg.positive_label)
pathlib.Path(cfg.artifacts_dir, "trained.marker").write_text("training ran")
mfkit.record("train_rows", len(raw["train"]))"""


def tiny_notebook(folder: Path) -> Path:
    """A throwaway notebook: its own profile table, configure, record, load the data, then stand in for training."""
    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    setup = f"import pathlib\n\nimport mfkit\n\nmfkit.profiles.PROFILES[{NOTEBOOK!r}] = {TABLE!r}"
    nb.cells = [nbformat.v4.new_code_cell(setup), params, nbformat.v4.new_code_cell(BODY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / f"{NOTEBOOK}.ipynb")
    return folder


# (id, --param values made from tmp_path, words of the problem, words of the fix)
RUN_CASES: list[tuple[str, Callable[[Path], list[str]], list[str], list[str]]] = [
    ("latin1-csv", lambda t: [f"DATASET={latin1(t)}"], ["not UTF-8", "UnicodeDecodeError"], ["UTF-8"]),
    ("max-steps-text", lambda t: ["MAX_STEPS=ten"], ["max_steps='ten'"], ["parameters cell"]),
    ("labels-not-contiguous", lambda t: [f"DATASET={gapped_labels(t)}"], ["0..3"], ["renumber"]),
    ("two-row-csv", lambda t: [f"DATASET={two_rows(t)}", "POSITIVE_LABEL=spam"], ["no rows"], ["more rows"]),
    (
        "text-labels-without-positive",
        lambda t: [f"DATASET={text_labels(t)}", "TEXT_COLUMN=body", "LABEL_COLUMN=category"],
        ["positive class"],
        ["POSITIVE_LABEL"],
    ),
]


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_notebook(tmp_path_factory.mktemp("bad-inputs") / "notebooks")


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize(
    ("params", "problem", "fix"), [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES]
)
def test_run_bad_input(
    params: Callable[[Path], list[str]], problem: list[str], fix: list[str], notebooks: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code, printed = run_cli(
        "run", "--notebooks", str(notebooks), "--output", str(out), "--param", *params(tmp_path)
    )
    entry = json.loads((out / "summary.json").read_text())["notebooks"][NOTEBOOK]
    assert code == 1 and entry["status"] == "failed", printed
    assert "MfkitError" in entry["error"]
    assert_names_problem_and_fix(entry["error"].split("executed notebook:")[0], problem, fix)
    artifacts = out / "artifacts"
    assert not (artifacts / "trained.marker").exists()  # stopped before the training
    assert entry["metrics"] == {}  # the numbers recorded before the failure are not shown as results
    assert leftovers(artifacts) == []
    if entry["partial_metrics"]:
        assert Path(entry["partial_ledger"]).parent == artifacts / "results" / "failed"
        assert "NOT results" in printed


@pytest.mark.notebooks
@pytest.mark.slow
def test_run_bring_your_own_csv(notebooks: Path, tmp_path: Path) -> None:
    """The same notebook with the right parameters trains, records its numbers and the run's knobs."""
    out = tmp_path / "run"
    code, printed = run_cli(
        "run",
        "--notebooks",
        str(notebooks),
        "--output",
        str(out),
        "--param",
        f"DATASET={text_labels(tmp_path)}",
        "TEXT_COLUMN=body",
        "LABEL_COLUMN=category",
        "POSITIVE_LABEL=spam",
        "TRAIN_LIMIT=all",
    )
    entry = json.loads((out / "summary.json").read_text())["notebooks"][NOTEBOOK]
    assert code == 0, printed
    assert (out / "artifacts" / "trained.marker").exists()
    assert entry["metrics"] == {"configured": 1, "train_rows": 32}
    assert entry["run"]["knobs"]["positive_label"] == "spam" and entry["run"]["knobs"]["train_limit"] is None
    assert set(entry["run"]["versions"]) >= {"python", "torch", "transformers", "mfkit"}


# --- `mfkit run` input that is refused before any notebook starts --------------------------------------------------


def _file_in_the_way(tmp: Path) -> Path:
    blocker = tmp / "blocker"
    blocker.write_text("a file, not a folder")
    return blocker


CLI_CASES: list[tuple[str, Callable[[Path], list[str]], list[str], list[str]]] = [
    ("param-typo", lambda t: ["--param", "MAXSTEPS=2"], ["MAXSTEPS", "MAX_STEPS?"], ["parameters cells"]),
    ("param-of-no-notebook", lambda t: ["--param", "VERSE_STEPS=2"], ["VERSE_STEPS", NOTEBOOK], ["DATASET"]),
    (
        "output-unwritable",
        lambda t: ["--output", str(_file_in_the_way(t) / "run")],
        ["output folder", "cannot be written"],
        ["--output DIR"],
    ),
    (
        "artifacts-unwritable",
        lambda t: ["--param", f"ARTIFACTS_DIR={_file_in_the_way(t) / 'a'}"],
        ["ARTIFACTS_DIR", "cannot be written"],
        ["--param ARTIFACTS_DIR=DIR"],
    ),
]


@pytest.mark.parametrize(
    ("argv", "problem", "fix"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES]
)
def test_run_refuses_before_any_notebook(
    argv: Callable[[Path], list[str]],
    problem: list[str],
    fix: list[str],
    notebooks: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[Any] = []
    monkeypatch.setattr("papermill.execute_notebook", lambda *a, **k: started.append(a))
    args = argv(tmp_path)
    if "--output" not in args:
        args += ["--output", str(tmp_path / "run")]
    code = cli.main(["run", "--notebooks", str(notebooks), *args])
    err = capsys.readouterr().err
    assert code == 2 and not started
    assert err.startswith("mfkit run: ") and "Traceback" not in err
    assert_names_problem_and_fix(err, problem, fix)
    assert not list(tmp_path.rglob("summary.json"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_artifacts_with_earlier_results(
    notebooks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifacts = tmp_path / "artifacts"
    (artifacts / "results").mkdir(parents=True)
    (artifacts / "results" / f"{NOTEBOOK}.json").write_text('{"f1": 0.9}')
    (artifacts / "results").chmod(0o555)
    try:
        code = cli.main(
            [
                "run",
                "--notebooks",
                str(notebooks),
                "--output",
                str(tmp_path / "run"),
                "--param",
                f"ARTIFACTS_DIR={artifacts}",
            ]
        )
    finally:
        (artifacts / "results").chmod(0o755)
    assert code == 2 and "cannot be written" in capsys.readouterr().err
