"""Panels as data: a new panel is one JSON file; the engine is not edited."""
import json
from pathlib import Path

import numpy as np
import pytest

from cytometry.analysis import AnalysisOptions, analyze_file
from cytometry.outputs.cli import main
from cytometry.simulation.metamorphic import read_table, write_table
from cytometry.simulation.simulate import default_concentrations, simulate_tube, write_tube
from gating.panels import BUILTIN_PANEL_DIR, PanelDefinitionError, load_panel, load_panels

PANEL_DIR = Path(__file__).with_name("panels")


def _bcell_tube(tmp_path, b_cells=150.0):
    """A CD45/CD19/CD20 tube made from a simulated TBNK tube: the T/NK markers removed, a CD20 channel added.

    B cells are CD20+ as they are CD19+ (CD20 = 0.8 × the CD19 detector's
    light, in a detector of its own outside the spillover matrix).
    """
    tube = simulate_tube("tbnk", seed=8, blood_volume_ul=4.0,
                         concentrations=default_concentrations("tbnk", b_cells=b_cells))
    source = write_tube(tube, tmp_path / "tbnk.fcs")
    table = read_table(source)
    cd19 = next(i for i, s in enumerate(table.pns) if s.upper().startswith("CD19"))
    pns = [s if s.upper().startswith(("CD45", "CD19")) or not s else "" for s in table.pns]
    events = np.column_stack([table.events, 0.8 * table.events[:, cd19]])
    from dataclasses import replace

    table = replace(table, events=events, pnn=table.pnn + ["BV421-A"], pns=pns + ["CD20 BV421"],
                    ranges=table.ranges + [table.ranges[cd19]])
    return write_table(table, tmp_path / "bcell_enum.fcs"), tube


def test_builtin_panels_are_files():
    panels = load_panels()
    assert {"tbnk", "car"} <= set(panels)
    for panel in panels.values():
        assert Path(panel.source).parent == BUILTIN_PANEL_DIR


def test_new_panel_is_one_file(tmp_path):
    path, tube = _bcell_tube(tmp_path)
    options = AnalysisOptions(beads_per_test=50000.0, sample_volume_ul=50.0, panel_dirs=(str(PANEL_DIR),))
    result = analyze_file(path, options=options)
    assert result["status"] == "ok", result["error"]
    assert result["panel"] == "bcell_enum"
    populations = result["populations"]
    assert set(populations) == {"leukocytes", "lymphocytes", "b_cells", "cd20_b_cells"}
    from cytometry.simulation.simulate import LABEL_NAMES

    true_b = int((tube.labels == LABEL_NAMES.index("b_cell")).sum())
    assert abs(populations["b_cells"]["events"] - true_b) <= max(5, 0.05 * true_b)
    # every CD19+ B cell is CD20+ here, so the subset is (nearly) all of them
    assert populations["cd20_b_cells"]["events"] >= 0.95 * populations["b_cells"]["events"]
    assert populations["cd20_b_cells"]["parent"] == "b_cells"
    assert populations["b_cells"]["cells_per_ul"] > 0 and populations["b_cells"]["reliable"]


def test_new_panel_from_the_command_line(capsys, tmp_path):
    path, _ = _bcell_tube(tmp_path)
    code = main(["analyze", str(path), "--json", "--panels", str(PANEL_DIR)])
    out = capsys.readouterr().out
    assert code == 0
    assert json.loads(out)["samples"][0]["panel"] == "bcell_enum"
    # Without the panel folder the tube is no known panel: a one-line error naming what is missing.
    code = main(["analyze", str(path), "--json"])
    captured = capsys.readouterr()
    assert code == 1 and "CD3" in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize("spec, problem", [
    ({"name": "x", "markers": {"required": ["CD45"]}, "plan": [{"population": "a", "method": "nonsense"}]},
     "unknown method"),
    ({"name": "x", "markers": {"required": ["CD45"]},
      "plan": [{"population": "a", "parent": "nowhere", "method": "positive", "dimensions": ["CD45"]}]},
     "made by no earlier step"),
    ({"name": "x", "plan": []}, "missing key 'markers'"),
])
def test_bad_panel_file_is_one_clear_line(tmp_path, capsys, spec, problem):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(PanelDefinitionError, match=problem) as info:
        load_panel(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    code = main(["analyze", str(tmp_path), "--panels", str(path)])
    err = capsys.readouterr().err
    assert code != 0 and problem in err and "Traceback" not in err


def test_an_edited_gating_plan_analyses_again(tmp_path):
    """The results store keys on the panels' content: a changed plan is a changed parameter."""
    from cytometry.batch.store import params_hash

    folder = tmp_path / "panels"
    folder.mkdir()
    spec = json.loads((PANEL_DIR / "bcell_enumeration.json").read_text())
    (folder / "bcell.json").write_text(json.dumps(spec))
    options = AnalysisOptions(panel_dirs=(str(folder),))
    before = params_hash(options)
    assert params_hash(options) == before
    spec["plan"][-1]["args"]["find_in"] = "b_cells"
    (folder / "bcell.json").write_text(json.dumps(spec))
    assert params_hash(options) != before
