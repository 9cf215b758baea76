"""Executed notebooks keep their figures, and `mfkit book` renders a run folder into a static HTML book.

The figure test runs a one-cell notebook through the runner under `MPLBACKEND=Agg` (what CI sets); the book tests
use a small fake run folder (no kernel). The browser test builds the book of a real run (the session's smoke chain
when it runs anyway, else notebook 00 alone: about 2 minutes on 2 busy cores) and opens every page in headless
Chromium.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from helpers import run_cli

from mfkit import runner
from mfkit.book import build_book
from mfkit.errors import MfkitError
from mfkit.notebook_cells import BADGE_IMAGE, colab_url, render_badge


def _has_png(path) -> bool:
    """True when an executed notebook holds an image/png output."""
    nb = nbformat.read(path, as_version=4)
    return any(
        "image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs
    )


@pytest.mark.notebooks
def test_a_run_keeps_its_figures_under_mplbackend_agg(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\n\nplt.plot([0, 1], [1, 0])\nplt.show()")
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "01_plot.ipynb")
    report = runner.run_chain("smoke", output=tmp_path / "run", notebooks=folder)
    assert report.ok
    assert _has_png(tmp_path / "run" / "notebooks" / "01_plot.ipynb")


# --- the book, from a fake run folder -------------------------------------------------------------------------

# A 1x1 PNG, as matplotlib's inline backend would store a figure.
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def fake_executed_run(root: Path) -> Path:
    """A run folder as `mfkit run` leaves it: two executed notebooks (one with a figure), one skipped, a summary."""
    (root / "notebooks").mkdir(parents=True)
    notebooks = {}
    for stem, status in (("00_tour", "ok"), ("01_plots", "ok"), ("02_later", "skipped")):
        notebooks[stem] = {
            "status": status,
            "seconds": 3.0,
            "metrics": {"score": 0.5} if status == "ok" else {},
        }
        if status != "ok":
            continue
        cell = nbformat.v4.new_code_cell("plot()", execution_count=1)
        if stem == "01_plots":
            cell.outputs = [
                nbformat.v4.new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})
            ]
        nb = nbformat.v4.new_notebook()
        nb.cells = [
            nbformat.v4.new_markdown_cell(f"# {stem}\n\n{render_badge(stem + '.ipynb')}\n\n$x^2$"),
            cell,
        ]
        notebooks[stem]["output"] = str(root / "notebooks" / f"{stem}.ipynb")
        nbformat.write(nb, notebooks[stem]["output"])
    summary = {
        "profile": "cpu",
        "ok": False,
        "started": "2025-01-01",
        "output_dir": str(root),
        "notebooks": notebooks,
    }
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def test_the_book_renders_a_run_folder(tmp_path):
    run = fake_executed_run(tmp_path / "run")
    code, out = run_cli("book", str(run), "--output", str(tmp_path / "book"))
    assert code == 0 and "index.html" in out
    pages = sorted(p.name for p in (tmp_path / "book").iterdir())
    assert pages == ["00_tour.html", "01_plots.html", "index.html"]
    index = (tmp_path / "book" / "index.html").read_text()
    assert index.index("00_tour.html") < index.index("01_plots.html") and "02 later" in index
    assert ">01_plots</a>" in index  # the notebook's own title
    assert colab_url("01_plots.ipynb") in index
    page = (tmp_path / "book" / "01_plots.html").read_text()
    assert "data:image/png;base64," + PNG[:20] in page
    assert (
        'href="00_tour.html"' in page and 'href="index.html"' in page and colab_url("01_plots.ipynb") in page
    )
    assert "mfkit-numbers" in page and "score" in page
    # offline by default: nothing is fetched from the network (no script, style or image from another site)
    for html in (index, page):
        assert not re.findall(r'<(?:script|img|link)[^>]+(?:src|href)="https?://', html)
    online = tmp_path / "online" / "01_plots.html"
    build_book(run, tmp_path / "online", online=True)
    assert BADGE_IMAGE in online.read_text() and "MathJax" in online.read_text()


def test_the_book_needs_executed_notebooks(tmp_path):
    run = fake_executed_run(tmp_path / "run")
    for path in (run / "notebooks").iterdir():
        path.unlink()
    with pytest.raises(MfkitError, match="no executed notebook"):
        build_book(run)


# --- the book of a real run, in headless Chromium -----------------------------------------------------------


@pytest.fixture(scope="module")
def book_run(request, tmp_path_factory) -> Path:
    """A run folder to build the book from: the session's smoke chain (conftest's `smoke_chain`) when this session
    runs it anyway, else notebook 00 run here alone, under MPLBACKEND=Agg as CI sets it."""
    if any("smoke_chain" in item.fixturenames for item in request.session.items):
        return Path(request.getfixturevalue("smoke_chain")["output"])
    output = tmp_path_factory.mktemp("run00")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MPLBACKEND", "Agg")
        assert run_cli("run", "--profile", "smoke", "--only", "00", "--output", str(output))[0] == 0
    return output


def _figures(path: Path) -> int:
    """How many image/png outputs an executed notebook holds."""
    nb = nbformat.read(path, as_version=4)
    return sum(
        "image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs
    )


@pytest.mark.browser
@pytest.mark.notebooks
@pytest.mark.slow
def test_every_page_of_the_book_loads_with_its_figures_in_chromium(book_run, tmp_path):
    """Each page loads from disk with no console error and shows every figure of its notebook (00's heatmap too)."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    from test_browser import BROWSER, DRIVER

    if not (BROWSER and DRIVER):
        pytest.skip("Chromium and its driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    index = build_book(book_run, tmp_path / "book")
    figures = {p.stem: _figures(p) for p in (book_run / "notebooks").glob("*.ipynb")}
    assert figures.get("00_setup-and-tour", 0) >= 1, "notebook 00's heatmap was not stored"
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    try:
        driver.get(index.as_uri())
        linked = [
            a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "td a[href$='.html']")
        ]
        assert [Path(h).stem for h in linked] == sorted(figures), "the contents page lists the chain in order"
        problems = []
        for page in [index.as_uri(), *linked]:
            driver.get(page)
            stem = Path(page).stem
            errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            shown = driver.execute_script(
                "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length"
            )
            if driver.execute_script("return document.readyState") != "complete" or errors:
                problems.append(f"{stem}: {errors or 'did not load'}")
            if shown < figures.get(stem, 0):
                problems.append(f"{stem}: {shown} of its {figures[stem]} figures shown")
        assert not problems, "\n".join(problems)
    finally:
        driver.quit()
