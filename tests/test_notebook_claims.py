"""What the notebooks claim: they name only notebooks that exist, their takeaways quote only this run's numbers, and
the cells that read the results state no outcome the run has not decided."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

from mfkit.errors import MfkitError
from mfkit.paths import notebooks_dir
from mfkit.report import fill

NOTEBOOKS = sorted(notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
NUMBERS = {p.name[:2] for p in NOTEBOOKS}
# "notebook 03", "notebooks 04 and 05", "notebooks 03-06", "notebooks 02, 09 or 14"
MENTION = re.compile(r"\bnotebooks?\s+(\d{2}(?:\s*(?:,|and|or|-|–|to)\s*\d{2})*)", re.IGNORECASE)
# What a takeaway may contain besides words: math, code, placeholders, citations with a year, notebook numbers.
ALLOWED = [
    re.compile(r"\$\$.*?\$\$", re.DOTALL),
    re.compile(r"\$[^$]*\$"),
    re.compile(r"`[^`]*`"),
    re.compile(r"\{[A-Za-z_][\w]*(?::[^{}]*)?\}"),
    re.compile(r"\([^()]*\b(?:19|20)\d{2}\b[^()]*\)"),  # a published reference: (Author et al., 2021: 27%)
    MENTION,
    re.compile(r"^\s*\d+\.\s", re.MULTILINE),  # list numbering
    re.compile(r"\b\d{2}_[\w-]+"),  # a notebook's file name
]


def _prose(path: Path) -> list[str]:
    """The Markdown cells of a notebook and the comments of its code cells."""
    cells = nbformat.read(path, as_version=4).cells
    texts = [c.source for c in cells if c.cell_type == "markdown"]
    texts += [
        line.split("#", 1)[1]
        for c in cells
        if c.cell_type == "code"
        for line in c.source.splitlines()
        if "#" in line
    ]
    return texts


def _takeaways(path: Path) -> str:
    """The text of the notebook's Takeaways section (from a Markdown cell or an `mfkit.takeaways(...)` call)."""
    for cell in nbformat.read(path, as_version=4).cells:
        if "## Takeaways" not in cell.source and "takeaways(" not in cell.source:
            continue
        if cell.cell_type == "markdown":
            return cell.source.split("## Takeaways", 1)[1].split("## Exercises", 1)[0]
        for node in ast.walk(ast.parse(cell.source)):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) == "takeaways"
            ):
                return ast.literal_eval(node.args[0])
    raise AssertionError(f"{path.name} has no Takeaways section")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_prose_names_only_notebooks_that_exist(path: Path) -> None:
    wrong = []
    for text in _prose(path):
        for sentence in re.split(r"(?<=[.!?])\s+|\n\|", text):
            named = set()
            for match in MENTION.finditer(sentence):
                named |= set(re.findall(r"\d{2}", match.group(1)))
            missing = named - NUMBERS
            if missing and "planned" not in sentence.lower():
                wrong.append(f"{sorted(missing)} in: {sentence.strip()[:120]}")
    assert not wrong, (
        f"{path.name} names notebooks that do not exist (mark planned ones as planned):\n" + "\n".join(wrong)
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_takeaways_quote_only_recorded_numbers(path: Path) -> None:
    text = _takeaways(path)
    for pattern in ALLOWED:
        text = pattern.sub(" ", text)
    typed = re.findall(r"(?<![\w.\-])\d[\d,.]*%?", text)
    assert not typed, (
        f"{path.name}: its takeaways type in numbers {typed}; quote recorded values with "
        "mfkit.takeaways('... {name:.3f} ...') or cite the paper they come from (Author, year)."
    )


# An outcome word ("DPO is better", "the sweep is faster"), unless it is hedged into what to look for (a condition, a
# question, an instruction to read or compare) or filled from the ledger by a placeholder.
COMPARATIVE = re.compile(
    r"\b(better|worse|beats?|outperform\w*|wins?|higher|lower|faster|slower|more accurate|less accurate"
    r"|improves?|improved|hurts?|helps?|helped)\b(?!-)",
    re.IGNORECASE,
)
HEDGED = re.compile(
    r"\b(if|where|when|whether|unless|look for|look at|read|check|compare|can|could|may|might|should|would"
    r"|expect\w*|typically|usually|often|tends?)\b|\?|\{",
    re.IGNORECASE,
)


def _unhedged_comparisons(path: Path) -> list[str]:
    """Sentences of the Markdown cells after the first recorded result (Takeaways and Exercises aside, tables and
    math left out) that state a comparative outcome as fact: the run decides those, so they read from the ledger
    or say what to look for."""
    found, results_seen = [], False
    for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
        if cell.cell_type == "code":
            results_seen = results_seen or "record(" in cell.source
            continue
        if not results_seen or "## Takeaways" in cell.source or "## Exercises" in cell.source:
            continue
        text = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith("|"))
        text = re.sub(r"\$[^$]*\$|`[^`]*`", " ", text)
        for sentence in re.split(r"(?<=[.!;])\s+|\n- ", text):
            if COMPARATIVE.search(sentence) and not HEDGED.search(sentence):
                found.append(f"cell {index}: {' '.join(sentence.split())[:160]}")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_interpretation_cells_do_not_fix_the_outcome(path: Path) -> None:
    found = _unhedged_comparisons(path)
    assert not found, (
        f"{path.name} states outcomes the run decides, outside its takeaways; fill them from the ledger "
        "(mfkit.takeaways / a {placeholder}) or say what to look for (if ..., compare ...):\n"
        + "\n".join(found)
    )


def test_fill_quotes_recorded_values_and_refuses_unrecorded_ones() -> None:
    assert (
        fill("F1 {f1:.3f} after {steps} steps", {"f1": 0.96251, "steps": 200}) == "F1 0.963 after 200 steps"
    )
    with pytest.raises(MfkitError, match=r"(?s)\['f1'\].*mfkit.record"):
        fill("F1 {f1:.3f}", {"accuracy": 0.9})


def test_the_checks_catch_typed_numbers_and_unknown_notebooks(tmp_path: Path) -> None:
    """The two checks above must be able to fail: a typed-in number and a notebook 42 are caught."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("As notebook 42 shows.\n\n## Takeaways\n\n- F1 rose to 0.97.\n")
    ]
    bad = tmp_path / "99_bad.ipynb"
    nbformat.write(nb, bad)
    with pytest.raises(AssertionError, match="0.97"):
        test_takeaways_quote_only_recorded_numbers(bad)
    with pytest.raises(AssertionError, match="42"):
        test_prose_names_only_notebooks_that_exist(bad)


def test_the_check_catches_a_fixed_verdict_after_the_results(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(
            "DPO is better than SFT here."
        ),  # before any result: the idea, not a verdict
        nbformat.v4.new_code_cell("mfkit.record('dpo_accuracy', 0.7)"),
        nbformat.v4.new_markdown_cell(
            "**Reading it.** DPO is clearly better than SFT. Check whether IPO is faster."
        ),
    ]
    bad = tmp_path / "99_bad.ipynb"
    nbformat.write(nb, bad)
    assert _unhedged_comparisons(bad) == ["cell 2: **Reading it.** DPO is clearly better than SFT."]
    with pytest.raises(AssertionError, match="clearly better"):
        test_interpretation_cells_do_not_fix_the_outcome(bad)
