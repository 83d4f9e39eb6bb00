"""Notebooks are committed without outputs (they run in CI instead)."""
import json
from pathlib import Path

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_and_have_no_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_gating_walkthrough.ipynb", "02_persistence.ipynb"]
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code), path.name
