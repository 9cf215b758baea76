"""`mfkit book [RUN] [--output DIR]`: an executed run as a static HTML book, to read before running the chain.

nbconvert's HTMLExporter (lab template) renders every executed notebook of the run folder (`RUN/notebooks/`) with
all its outputs, figures embedded in the page. Each page starts with a cell linking the contents page and its
neighbours in chain order and opening the notebook in Colab, and ends with the numbers the run recorded beside
the committed reference (`reference/<profile>/`, or the smoke baselines for a smoke run). The contents page,
`index.html`, lists the chain in order. By default the book loads nothing from the network (math shows as TeX
source); `--online` typesets math with MathJax and shows the Colab badge image, both from their sites.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nbformat

from .errors import MfkitError
from .notebook_cells import BADGE_IMAGE, colab_url, render_badge

INDEX = "index.html"
# The lab template without what it loads from the network: require.js, the widget manager, MathJax, mermaid.
OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def exporter(online: bool = False) -> Any:
    """nbconvert's HTML exporter with the lab template; offline unless `online`."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    if online:
        return HTMLExporter(template_name="lab")
    loader = DictLoader({"mfkit-offline.html.j2": OFFLINE_TEMPLATE})
    return HTMLExporter(template_name="lab", extra_loaders=[loader], template_file="mfkit-offline.html.j2")


def page_name(stem: str) -> str:
    """The file of a notebook's page in the book."""
    return f"{stem}.html"


def _title(stem: str) -> str:
    """`03_full-finetuning` -> `03 full-finetuning`."""
    return stem.replace("_", " ", 1)


def _colab_link(stem: str, online: bool) -> str:
    """The notebook's Colab badge (online) or a plain link to the same place (offline: no image to fetch)."""
    name = f"{stem}.ipynb"
    return render_badge(name) if online else f"[Open in Colab]({colab_url(name)})"


def _cell(text: str) -> Any:
    """A markdown cell for the book's own text (rendered by nbconvert like every other cell)."""
    return nbformat.v4.new_markdown_cell(text)


def _numbers_table(metrics: Mapping[str, Any], reference: Mapping[str, Any] | None) -> str:
    """A markdown table of the recorded numbers, with the reference's beside them when there is one."""
    from .runner import format_value

    if not metrics:
        return "This notebook recorded no numbers in this run."
    if reference is None:
        rows = [f"| `{k}` | {format_value(v, 60)} |" for k, v in metrics.items()]
        return "\n".join(["| recorded | this run |", "|---|---:|", *rows])
    rows = [
        f"| `{k}` | {format_value(v, 60)} | {format_value(reference[k], 60) if k in reference else '-'} |"
        for k, v in metrics.items()
    ]
    return "\n".join(["| recorded | this run | reference |", "|---|---:|---:|", *rows])


def _page(
    nb: Any,
    stem: str,
    stems: list[str],
    entry: Mapping[str, Any],
    reference: Mapping[str, Any] | None,
    source: str,
    online: bool,
) -> Any:
    """The executed notebook with the book's header and numbers cells (a copy; the run folder is left as it is)."""
    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)  # widget state needs the widget manager from the network
    at = stems.index(stem)
    links = ["[Contents](index.html)"]
    if at > 0:
        links.append(f"[← {_title(stems[at - 1])}]({page_name(stems[at - 1])})")
    if at + 1 < len(stems):
        links.append(f"[{_title(stems[at + 1])} →]({page_name(stems[at + 1])})")
    links += [_colab_link(stem, online), "[its numbers](#mfkit-numbers)"]
    badge = render_badge(f"{stem}.ipynb")
    for cell in nb.cells:  # the notebook's own badge: a plain link when offline
        if cell.cell_type == "markdown" and not online and BADGE_IMAGE in cell.source:
            cell.source = cell.source.replace(badge, _colab_link(stem, online))
    status = entry.get("status", "?")
    numbers = _cell(
        f'<a id="mfkit-numbers"></a>\n\n## The numbers {stem} recorded\n\n'
        f"Status **{status}** in {entry.get('seconds', 0.0):.0f} s. The reference column is {source}; "
        "compare your own run with `mfkit results --compare reference`.\n\n"
        + _numbers_table(entry.get("metrics") or entry.get("partial_metrics") or {}, reference)
    )
    nb.cells = [_cell(" · ".join(links)), *nb.cells, numbers]
    return nb


def _executed(run: Path, stem: str, entry: Mapping[str, Any]) -> Path | None:
    """The executed copy of a notebook in a run folder, or None (skipped notebooks have none)."""
    for candidate in (entry.get("output"), run / "notebooks" / f"{stem}.ipynb"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _reference(profile: str) -> tuple[dict[str, Any], str]:
    """Each notebook's reference numbers for `profile` and what they are; ({}, why not) when there are none."""
    from .reference import load_reference

    try:
        found = load_reference(profile)
    except MfkitError as exc:
        return {}, f"empty ({exc.args[0] if exc.args else exc})"
    what = (
        "the smoke baselines"
        if found["profile"] == "smoke"
        else f"the committed {found['profile']} reference"
    )
    return {stem: e["metrics"] for stem, e in found["notebooks"].items()}, what


def build_book(
    run: str | os.PathLike | None = None, output: str | os.PathLike | None = None, online: bool = False
) -> Path:
    """Render the run folder `run` (default: the latest run) into `output` (default `RUN/book`); return the index."""
    from .runner import find_run, latest_run, load_summary

    folder = find_run(run) if run is not None else latest_run()
    summary = load_summary(folder)
    entries: Mapping[str, Mapping[str, Any]] = summary["notebooks"]
    executed = {stem: _executed(folder, stem, e) for stem, e in sorted(entries.items())}
    stems = [stem for stem, path in executed.items() if path is not None]
    if not stems:
        raise MfkitError(
            f"The run at {folder} holds no executed notebook.",
            "run the chain first: mfkit run --profile cpu.",
        )
    out = Path(output).expanduser().resolve() if output is not None else folder / "book"
    out.mkdir(parents=True, exist_ok=True)
    html = exporter(online)
    reference, source = _reference(str(summary.get("profile")))
    headings = {}
    for stem in stems:
        nb = nbformat.read(executed[stem], as_version=4)
        headings[stem] = heading(nb) or _title(stem)
        page = _page(nb, stem, stems, entries[stem], reference.get(stem), source, online)
        body, _ = html.from_notebook_node(page, resources={"metadata": {"name": headings[stem]}})
        (out / page_name(stem)).write_text(body, encoding="utf-8")
    contents = nbformat.v4.new_notebook()
    contents.cells = [_cell(_contents(summary, entries, headings, online))]
    body, _ = html.from_notebook_node(contents, resources={"metadata": {"name": "mfkit: the executed chain"}})
    index = out / INDEX
    index.write_text(body, encoding="utf-8")
    return index


def heading(nb: Any) -> str | None:
    """The title of a notebook: the first `# ` line of its first markdown cell, or None."""
    first = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    lines = first.source.splitlines() if first is not None else []
    return next((line[2:].strip() for line in lines if line.startswith("# ")), None)


def _contents(
    summary: Mapping[str, Any],
    entries: Mapping[str, Mapping[str, Any]],
    headings: Mapping[str, str],
    online: bool,
) -> str:
    """The contents page (markdown): what the book is, then the chain in order (a page for each executed one)."""
    rows = []
    for stem, entry in sorted(entries.items()):
        name = f"[{headings[stem]}]({page_name(stem)})" if stem in headings else _title(stem)
        seconds = f"{entry.get('seconds', 0.0):.0f}" if stem in headings else "-"
        rows.append(f"| {name} | {entry.get('status', '?')} | {seconds} | {_colab_link(stem, online)} |")
    return "\n".join(
        [
            "# mfkit: the executed chain",
            "",
            f"Every notebook as the `{summary.get('profile')}` run of {summary.get('started')} executed it, "
            "outputs and figures included. Read the executed chain, then run it yourself "
            f"(`mfkit run --profile {summary.get('profile')}`) and compare your numbers with the reference: "
            "`mfkit results --compare reference`.",
            "",
            "| notebook | status | seconds | Colab |",
            "|---|---|---:|---|",
            *rows,
        ]
    )
