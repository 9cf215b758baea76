"""Choices read validation data only: no notebook (and no kit function) hands test-split outputs to a function
that chooses something.

The kit marks every function that chooses (a threshold, a temperature, the variant kept, the model served) with
`@evaluation.selection_helper`. This test reads the code cells of every notebook and the kit's own source, finds
each call of one of them, and fails when

- an argument names test-split data (a name, attribute or string key with a word starting with "test"), or
- no argument names validation data at all (so the reader cannot see which split chose), or
- a result named `chosen...`, `kept...`, `selected...` or `served...` is taken with a bare `max`/`min`/`sorted`
  (with a `key=`) or `.idxmax()`/`.idxmin()` instead of a selection helper, which would hide the split it read.

It is a static check of names, not of values: it holds as long as the notebooks name their splits, which they do
(`val_labels`, `raw["validation"]`, `loaders.test`, `test_texts`).
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import nbformat
import pytest

from mfkit.evaluation import SELECTION_HELPERS
from mfkit.paths import notebooks_dir

KIT = Path(__file__).resolve().parents[1] / "mfkit"
NOTEBOOKS = sorted(notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
CHOICE_NAMES = ("chosen", "kept", "selected", "served")
BARE_CHOOSERS = {"max", "min", "sorted"}
BARE_METHODS = {"idxmax", "idxmin"}


def _decorated_helpers() -> dict[str, str]:
    """name -> module of every function in the kit's source decorated with `selection_helper`."""
    found = {}
    for path in sorted(KIT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for decorator in node.decorator_list:
                    name = getattr(decorator, "id", getattr(decorator, "attr", ""))
                    if name == "selection_helper":
                        found[node.name] = f"mfkit.{path.stem}"
    return found


HELPERS = _decorated_helpers()


def _words(node: ast.AST) -> list[str]:
    """The lower-case words an expression names: identifiers, attributes, keyword names and string constants,
    split at underscores, dots and other non-letters (`val_labels` -> val, labels; `raw["test"]` -> raw, test)."""
    parts = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            parts.append(sub.id)
        elif isinstance(sub, ast.Attribute):
            parts.append(sub.attr)
        elif isinstance(sub, ast.keyword) and sub.arg:
            parts.append(sub.arg)
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            parts.append(sub.value)
    return [w for part in parts for w in re.split(r"[^a-z]+", part.lower()) if w]


def _is_test(word: str) -> bool:
    return word.startswith("test")


def _is_validation(word: str) -> bool:
    return word in ("val", "vals", "valid") or word.startswith("validation")


def _callee(call: ast.Call) -> str:
    return getattr(call.func, "id", getattr(call.func, "attr", ""))


def _bare_choice(value: ast.AST) -> str | None:
    """The chooser of `value` when it is `max/min/sorted(..., key=...)` or `<...>.idxmax()/.idxmin()`."""
    if not isinstance(value, ast.Call):
        return None
    name = _callee(value)
    if (
        isinstance(value.func, ast.Name)
        and name in BARE_CHOOSERS
        and any(k.arg == "key" for k in value.keywords)
    ):
        return name
    if isinstance(value.func, ast.Attribute) and name in BARE_METHODS:
        return name
    return None


def _code(source: str) -> ast.Module | None:
    """A code cell as a syntax tree; IPython magics and shell lines are blanked out first."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def violations(source: str, where: str = "") -> list[str]:
    """What is wrong with the selections in one piece of Python source (a code cell or a module)."""
    tree = _code(source)
    if tree is None:
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _callee(node) in HELPERS:
            arguments = [*node.args, *node.keywords]
            words = [w for argument in arguments for w in _words(argument)]
            text = ast.unparse(node)[:160]
            if any(_is_test(w) for w in words):
                found.append(f"{where}: {_callee(node)} is given test-split data: {text}")
            elif not any(_is_validation(w) for w in words):
                found.append(f"{where}: {_callee(node)} is given no data named as validation: {text}")
        if isinstance(node, ast.Assign):
            targets = [t for target in node.targets for t in ast.walk(target) if isinstance(t, ast.Name)]
            chooser = _bare_choice(node.value)
            if chooser and any(t.id.lower().startswith(CHOICE_NAMES) for t in targets):
                found.append(
                    f"{where}: {ast.unparse(node)[:160]} chooses with a bare {chooser}; use a selection helper "
                    "(e.g. evaluation.choose_variant) on validation predictions"
                )
    return found


def notebook_violations(path: Path) -> list[str]:
    cells = nbformat.read(path, as_version=4).cells
    return [
        v
        for i, cell in enumerate(cells)
        if cell.cell_type == "code"
        for v in violations(cell.source, f"{path.stem} cell {i}")
    ]


def test_the_registry_holds_every_decorated_helper_and_each_says_validation() -> None:
    for module in set(HELPERS.values()):
        importlib.import_module(module)
    assert set(HELPERS) == set(SELECTION_HELPERS)
    assert {"choose_threshold", "fit_temperature", "choose_variant", "choose", "serving_rule"} <= set(HELPERS)
    for name, function in SELECTION_HELPERS.items():
        assert "validation" in (function.__doc__ or ""), (
            f"{name}'s docstring does not say it reads validation"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_notebook_chooses_on_the_test_split(path: Path) -> None:
    found = notebook_violations(path)
    assert not found, (
        "choose on validation predictions only; the test split is scored once, after:\n" + "\n".join(found)
    )


def test_the_kit_chooses_on_validation_only() -> None:
    found = [v for path in sorted(KIT.glob("*.py")) for v in violations(path.read_text(), path.name)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        # 17 before the fix: the int8 variant kept by its test F1 change
        'chosen = max(dynamic, key=lambda n: table.loc[n, "F1 change (points)"])',
        # 20 before the fix: the served model chosen from a table of test F1s
        "chosen = pipeline.choose(table, cfg.tolerance)",
        "threshold, f1 = evaluation.choose_threshold(test.labels, test_spam)",
        "t = evaluation.fit_temperature(logits['test'], labels)",
        "name, scores = evaluation.choose_variant(val_labels, {n: p.preds for n, p in on_test.items()})",
        'kept = table["test F1"].idxmax()',
    ],
)
def test_the_check_catches_a_choice_on_the_test_split(source: str) -> None:
    assert violations(source, "example"), f"not caught: {source}"


@pytest.mark.parametrize(
    "source",
    [
        "chosen, val_f1 = evaluation.choose_variant(val_labels, {n: p.preds for n, p in on_validation.items()})",
        "chosen = pipeline.choose(table, cfg.tolerance, validation_labels=val_labels, validation_preds=val_preds)",
        'threshold, f1 = evaluation.choose_threshold(val.labels, val_spam, metric="f1")',
        'rule = pipeline.serving_rule(source, path, raw["validation"]["text"], raw["validation"]["label"], 64)',
        "hardest = max(difficulty, key=difficulty.get)",  # a name that is not a kept choice
    ],
)
def test_the_check_passes_a_choice_on_validation(source: str) -> None:
    assert not violations(source, "example")
