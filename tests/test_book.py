"""Executed notebooks keep their figures, and `mfkit book` renders a run folder into a static HTML book.

The figure test runs a one-cell notebook through the runner under `MPLBACKEND=Agg` (what CI sets); the book tests
use a small fake run folder (no kernel).
"""

from __future__ import annotations

import nbformat
import pytest

from mfkit import runner


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
