"""The notebooks teach with figures: executed, they show them inline (issue 14, item 5)."""
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name, least_figures", [("01_gating_walkthrough.ipynb", 4), ("02_persistence.ipynb", 1)])
def test_executed_notebook_shows_its_figures(name, least_figures):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    images = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert len(images) >= least_figures, f"{name}: {len(images)} figures shown inline"
    tables = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if "text/html" in output.get("data", {})]
    if name.startswith("01"):
        assert any("pct_of_parent" in "".join(t["data"]["text/html"]) for t in tables), "no stats table shown"
