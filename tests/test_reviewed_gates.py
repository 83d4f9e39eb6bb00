"""A reviewer's corrected gates (issue 16): export → correct → re-count, with an audit trail.

The review loop a lab runs: ``analyze --out STORE`` → ``gates STORE SAMPLE
--out DIR`` → move a gate (here with flowkit, or by editing the XML) →
``analyze FILE --gates REVIEWED``. The expected numbers are computed from the
events themselves (how many B cells lie on each side of the moved cut), never
written in.
"""
import contextlib
import csv
import hashlib
import io
import json
import re
import shutil
import warnings

import flowkit as fk
import numpy as np
import pytest

from cytometry.analysis import AnalysisOptions, analyze_file, apply_reviewed_gates, export_gating, gate_file
from cytometry.batch.run import run_batch
from cytometry.batch.store import ResultStore, is_reviewed_entry
from cytometry.loading.manifest import read_manifest
from cytometry.loading.reviewed_gates import ReviewedGatesError, read_gate_mapping
from cytometry.outputs.cli import main

from conftest import ROOT, SAMPLE_DIR, SHARED_DATA

TUBE = SAMPLE_DIR / "S01_screening_TBNK.fcs"
MANIFEST = SAMPLE_DIR / "manifest.csv"
OPTIONS = AnalysisOptions(beads_per_test=50120, sample_volume_ul=50)
REAL = SHARED_DATA / "real" / "flowsom_68983"
GATE_MAP_68983 = ROOT / "tests" / "data" / "flowsom_68983_gate_map.csv"


@pytest.fixture(scope="module")
def gated():
    return gate_file(TUBE)


@pytest.fixture(scope="module")
def loop(tmp_path_factory, gated):
    """The whole loop through the command line: analyse into a store, export, move the CD19 cut, re-count."""
    folder = tmp_path_factory.mktemp("review")
    store = folder / "run.store"
    assert main(["analyze", str(TUBE), "--manifest", str(MANIFEST), "--out", str(store), "--workers", "1",
                 "-q"]) == 0
    assert main(["gates", str(store), TUBE.name, "--out", str(folder / "export")]) == 0
    exported = folder / "export" / f"{TUBE.stem}.gating.xml"
    strategy = fk.parse_gating_xml(str(exported))
    gate = strategy.get_gate("b_cells")
    (dimension,) = gate.dimensions
    assert dimension.id == gated.panel.markers["CD19"]
    old_cut = float(dimension.min)
    cd19 = gated.data[:, gated.channels["CD19"]]
    # The new cut: the median CD19 of the automatic B cells, so about half of them leave the gate.
    # Midway between two events' values, so no event sits on the cut where float32 (our data) and float64
    # (flowkit's replay of the gates) could put it on different sides.
    values = np.unique(cd19[gated.gating.masks["b_cells"]])
    middle = len(values) // 2
    new_cut = float((values[middle - 1] + values[middle]) / 2)
    dimension.min = new_cut
    moved = folder / "moved.gating.xml"
    with open(moved, "wb") as fh:
        fk.export_gatingml(strategy, fh)
    return {"store": store, "exported": exported, "moved": moved, "old_cut": old_cut, "new_cut": new_cut,
            "folder": folder}


@pytest.fixture(scope="module")
def reviewed_run(loop):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # pytest's capsys is per test; this fixture is per module
        code = main(["analyze", str(TUBE), "--manifest", str(MANIFEST), "--out", str(loop["store"]), "--workers",
                     "1", "--gates", str(loop["moved"]), "--json", "-q", "--csv", str(loop["folder"] / "run.csv")])
    assert code == 0
    (result,) = json.loads(out.getvalue())["samples"]
    return result


def test_exported_gates_are_the_stored_automatic_gates(loop, gated):
    strategy = fk.parse_gating_xml(str(loop["exported"]))
    assert {gid[0] for gid in strategy.get_gate_ids()} == {g.name for g in gated.gating.gates}
    reviewed, audit = apply_reviewed_gates(gated, loop["exported"])
    for population, moved in audit["populations"].items():
        assert moved["moved_in"] == moved["moved_out"] == 0, population
        assert moved["reviewed_events"] == gated.gating.events(population)


def test_moved_cd19_cut_changes_b_cells_by_exactly_the_events_it_moves(loop, reviewed_run, gated):
    cd19 = gated.data[:, gated.channels["CD19"]]
    automatic_b = gated.gating.masks["b_cells"]
    leaving = int((automatic_b & (cd19 < loop["new_cut"])).sum())
    assert leaving > 0 and loop["new_cut"] > loop["old_cut"]
    audit = reviewed_run["gating"]["reviewed_gates"]
    b = audit["populations"]["b_cells"]
    assert b == {"automatic_events": int(automatic_b.sum()), "reviewed_events": int(automatic_b.sum()) - leaving,
                 "moved_in": 0, "moved_out": leaving}
    assert reviewed_run["populations"]["b_cells"]["events"] == int(automatic_b.sum()) - leaving
    for population, moved in audit["populations"].items():
        if population != "b_cells":
            assert moved["moved_in"] == moved["moved_out"] == 0, population
            counted = reviewed_run["beads"] if population == "beads" else reviewed_run["populations"][population]
            assert counted["events"] == gated.gating.events(population), population


def test_reviewed_counts_come_from_the_same_counting_code(reviewed_run, gated):
    # Same beads, same constants: cells/uL scale with the events, and the verdict is decided again.
    automatic = analyze_file(TUBE, read_manifest(MANIFEST).lookup(TUBE))
    b_auto, b_rev = automatic["populations"]["b_cells"], reviewed_run["populations"]["b_cells"]
    assert reviewed_run["beads"]["events"] == automatic["beads"]["events"]
    assert b_rev["cells_per_ul"] == pytest.approx(b_auto["cells_per_ul"] * b_rev["events"] / b_auto["events"],
                                                  rel=1e-3)
    assert b_rev["ci95"][0] < b_rev["cells_per_ul"] < b_rev["ci95"][1]
    assert b_rev["ci95"] != b_auto["ci95"]
    assert reviewed_run["eligibility"]["verdict"] in ("eligible", "not_eligible", "indeterminate")
    assert reviewed_run["gating"]["reviewed_gates"]["automatic"]["populations"]["b_cells"]["events"] == \
        b_auto["events"]


def test_result_records_the_audit_fields(loop, reviewed_run):
    gating = reviewed_run["gating"]
    assert gating["source"] == "reviewed"
    audit = gating["reviewed_gates"]
    assert audit["file"] == loop["moved"].name
    assert audit["sha256"] == hashlib.sha256(loop["moved"].read_bytes()).hexdigest()
    assert audit["format"] == "gatingml"
    assert audit["mapping"]["b_cells"].endswith("b_cells")
    assert any("manual gates in effect" in flag for flag in reviewed_run["qc_flags"])
    with open(loop["folder"] / "run.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["gating_source"] == "reviewed" and row["reviewed_gates_sha256"] == audit["sha256"]
    assert int(row["b_cell_events"]) == audit["populations"]["b_cells"]["reviewed_events"]


def test_store_keeps_the_automatic_result_beside_the_reviewed_one(loop, reviewed_run, gated):
    store = ResultStore(loop["store"])
    entries = store.entries()
    assert sorted(is_reviewed_entry(e) for e in entries) == [False, True]
    by_kind = {is_reviewed_entry(e): store.results_for(e) for e in entries}
    assert by_kind[False]["gating"]["source"] == "automatic"
    assert by_kind[False]["populations"]["b_cells"]["events"] == gated.gating.events("b_cells")
    assert by_kind[True]["populations"]["b_cells"]["events"] == reviewed_run["populations"]["b_cells"]["events"]
    reviewed_entry = next(e for e in entries if is_reviewed_entry(e))
    assert store.masks(reviewed_entry.name)["b_cells"].sum() == reviewed_run["populations"]["b_cells"]["events"]
    # Readers take the reviewed result in place of the automatic one.
    _, results = store.one_parameter_set()
    assert [r["gating"]["source"] for r in results] == ["reviewed"]


def test_report_marks_manual_gates_and_shows_both_counts(loop, reviewed_run, gated):
    assert main(["report", str(loop["store"]), "--out", str(loop["folder"] / "report"), "--no-thumbnails",
                 "-q"]) == 0
    html = (loop["folder"] / "report" / "report.html").read_text()
    assert "manual gates in effect" in html
    b = reviewed_run["gating"]["reviewed_gates"]["populations"]["b_cells"]
    row = re.search(r"<tr><td>b_cells</td>.*?</tr>", html, re.S).group(0)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[2:6] == [f"{b['automatic_events']:,}", f"{b['reviewed_events']:,}", "0", f"{b['moved_out']:,}"]


def test_lowered_cut_takes_in_exactly_the_parent_events_between_the_cuts(tmp_path, gated):
    strategy = fk.parse_gating_xml(_export(tmp_path, gated))
    gate = strategy.get_gate("b_cells")
    old_cut = float(gate.dimensions[0].min)
    cd19 = gated.data[:, gated.channels["CD19"]]
    parent = gated.gating.masks[gate_parent(gated, "b_cells")]
    below = np.unique(cd19[parent & (cd19 < old_cut)])
    at = int(0.9 * len(below))
    new_cut = float((below[at - 1] + below[at]) / 2)  # between two events, as above
    gate.dimensions[0].min = new_cut
    path = tmp_path / "lowered.xml"
    with open(path, "wb") as fh:
        fk.export_gatingml(strategy, fh)
    reviewed, audit = apply_reviewed_gates(gated, path)
    entering = int((parent & (cd19 >= new_cut) & (cd19 < old_cut)).sum())
    assert entering > 0
    assert audit["populations"]["b_cells"]["moved_in"] == entering
    assert audit["populations"]["b_cells"]["moved_out"] == 0
    assert reviewed.gating.events("b_cells") == gated.gating.events("b_cells") + entering


def gate_parent(gated, name):
    return next(g.parent for g in gated.gating.gates if g.name == name)


def _export(folder, gated):
    path = folder / "auto.gating.xml"
    with open(path, "wb") as fh:
        export_gating(gated, fh)
    return str(path)


def _b_cells_block(text):
    return re.search(r'<gating:RectangleGate gating:id="b_cells".*?</gating:RectangleGate>', text, re.S)


@pytest.mark.parametrize("problem", ["wrong_channel", "missing_population", "not_gatingml", "not_xml",
                                     "transform_scale"])
def test_bad_reviewed_files_are_one_line_errors_naming_the_file(tmp_path, gated, problem):
    text = open(_export(tmp_path, gated)).read()
    block = _b_cells_block(text)
    if problem == "wrong_channel":
        text = text.replace(block.group(0), block.group(0).replace('data-type:name="APC-A"', 'data-type:name="APC-X"'))
        expected = "channel 'APC-X'"
    elif problem == "missing_population":
        text = text.replace(block.group(0), "")
        expected = "lacks population b_cells"
    elif problem == "not_gatingml":
        text = "<?xml version='1.0'?><html><body>not gates</body></html>"
        expected = "not GatingML 2.0"
    elif problem == "not_xml":
        text = "population,gate\nb_cells,x\n"
        expected = "not XML"
    else:
        # The CD19 channel's logicle made for a 20-bit scale while the file's range is 18 bits.
        text = re.sub(r'(<transforms:transformation transforms:id="logicle_APC-A">\s*<transforms:logicle '
                      r'transforms:T=")262144(\.0)?"', r'\g<1>1048576"', text)
        expected = "T = 1.04858e+06"
    path = tmp_path / "reviewed.xml"
    path.write_text(text)
    result = analyze_file(TUBE, read_manifest(MANIFEST).lookup(TUBE), gates=path)
    assert result["status"] == "error"
    assert result["error"].startswith("reviewed gates reviewed.xml: ")
    assert expected in result["error"], result["error"]
    assert "\n" not in result["error"]
    # The automatic result is intact beside the error.
    assert result["automatic_result"]["status"] == "ok"
    assert result["automatic_result"]["populations"]["b_cells"]["events"] == gated.gating.events("b_cells")
    assert result["eligibility"]["verdict"] == "qc_fail"


def test_bad_reviewed_file_in_a_store_leaves_the_automatic_entry(tmp_path, capsys, gated):
    bad = tmp_path / "bad.xml"
    bad.write_text("<?xml version='1.0'?><notes/>")
    store = tmp_path / "run.store"
    code = main(["analyze", str(TUBE), "--manifest", str(MANIFEST), "--out", str(store), "--workers", "1",
                 "--gates", str(bad)])
    captured = capsys.readouterr()
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {TUBE}: reviewed gates bad.xml: not GatingML 2.0 or a FlowJo workspace "
                      "(XML root <notes>)"]
    assert "Traceback" not in captured.err
    entries = ResultStore(store).entries()
    assert [is_reviewed_entry(e) for e in entries] == [False]
    automatic = ResultStore(store).results_for(entries[0])
    assert automatic["status"] == "ok" and automatic["gating"]["source"] == "automatic"
    assert automatic["populations"]["b_cells"]["events"] == gated.gating.events("b_cells")


def test_mapping_file_names_the_gate_and_unknown_populations_are_refused(tmp_path, gated):
    text = open(_export(tmp_path, gated)).read().replace('gating:id="b_cells"', 'gating:id="CD19_positive"')
    path = tmp_path / "renamed.xml"
    path.write_text(text)
    with pytest.raises(ReviewedGatesError, match="lacks population b_cells"):
        apply_reviewed_gates(gated, path)
    mapping = tmp_path / "map.csv"
    mapping.write_text("population,gate\nb_cells,cd16_56_negative > CD19_positive\n")
    assert read_gate_mapping(mapping) == {"b_cells": ("cd16_56_negative", "CD19_positive")}
    reviewed, audit = apply_reviewed_gates(gated, path, mapping)
    assert reviewed.gating.events("b_cells") == gated.gating.events("b_cells")
    assert audit["mapping_file"] == "map.csv"
    mapping.write_text("population,gate\nb_cell,CD19_positive\n")
    with pytest.raises(ReviewedGatesError, match="unknown population"):
        apply_reviewed_gates(gated, path, mapping)


def test_manifest_gates_column_counts_that_sample_from_its_reviewed_gates(tmp_path, capsys, gated):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(TUBE, folder / TUBE.name)
    strategy = fk.parse_gating_xml(_export(tmp_path, gated))
    dimension = strategy.get_gate("b_cells").dimensions[0]
    cd19 = gated.data[:, gated.channels["CD19"]]
    dimension.min = float(np.percentile(cd19[gated.gating.masks["b_cells"]], 75))
    with open(folder / "S01.reviewed.xml", "wb") as fh:
        fk.export_gatingml(strategy, fh)
    lines = MANIFEST.read_text().splitlines()
    header = lines[0] + ",gates"
    row = next(line for line in lines if line.startswith(TUBE.name)) + ",S01.reviewed.xml"
    (folder / "manifest.csv").write_text(f"{header}\n{row}\n")
    manifest = read_manifest(folder / "manifest.csv")
    (result,) = run_batch(manifest.files(), manifest, workers=1)
    expected = int((gated.gating.masks["b_cells"] & (cd19 >= dimension.min)).sum())
    assert result["gating"]["source"] == "reviewed"
    assert result["populations"]["b_cells"]["events"] == expected
    # A listed gates file that is missing is a manifest problem: nothing is analysed.
    (folder / "manifest.csv").write_text(f"{header}\n{row.replace('S01.reviewed.xml', 'absent.xml')}\n")
    code = main(["analyze", str(folder), "--manifest", str(folder / "manifest.csv"), "-q"])
    assert code == 2
    assert f"row 2 ({TUBE.name}): gates file not found" in capsys.readouterr().err


def test_gates_command_one_line_error_for_an_unknown_sample(tmp_path, capsys, loop):
    code = main(["gates", str(loop["store"]), "S99_screening_TBNK.fcs", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("cytometry: error: ") and "S99_screening_TBNK.fcs" in err and "\n" not in err


def _need_real():
    if not (REAL / "68983.fcs").exists() or not (REAL / "gating.wsp").exists():
        pytest.skip(f"{REAL} not present beside the project (CI clones without shared/data/real)")


def test_expert_workspace_gives_the_expert_event_counts(capsys):
    _need_real()
    code = main(["analyze", str(REAL / "68983.fcs"), "--gates", str(REAL / "gating.wsp"), "--gate-map",
                 str(GATE_MAP_68983), "--json"])
    (result,) = json.loads(capsys.readouterr().out)["samples"]
    assert code == 0, result["error"]
    # flowkit's own replay of the workspace on the FCS file is the reference.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        workspace = fk.Workspace(str(REAL / "gating.wsp"), fcs_samples=str(REAL / "68983.fcs"))
    workspace.analyze_samples(sample_id="68983.fcs")
    report = workspace.get_gating_results("68983.fcs").report
    flowkit_counts = {row.gate_name: int(row["count"]) for _, row in report.iterrows()}
    expected = {"t_cells": "T cells", "b_cells": "B cells", "cd4_t": "CD4 T cells", "cd8_t": "CD8 T cells"}
    for population, gate in expected.items():
        assert result["populations"][population]["events"] == flowkit_counts[gate], population
    assert {p: result["populations"][p]["events"] for p in expected} == \
        {"t_cells": 10747, "b_cells": 2460, "cd4_t": 7482, "cd8_t": 1407}
    audit = result["gating"]["reviewed_gates"]
    assert audit["format"] == "flowjo-workspace" and audit["workspace_sample"] == "68983.fcs"
    assert audit["mapping_file"] == GATE_MAP_68983.name
    assert audit["populations"]["b_cells"]["reviewed_events"] == 2460


def test_another_samples_workspace_is_refused(gated):
    _need_real()
    result = analyze_file(TUBE, read_manifest(MANIFEST).lookup(TUBE), gates=REAL / "gating.wsp")
    assert result["status"] == "error"
    assert "workspace holds the gates of 68983.fcs, not of S01_screening_TBNK.fcs" in result["error"]
    assert result["automatic_result"]["populations"]["b_cells"]["events"] == gated.gating.events("b_cells")


def test_workspace_of_another_acquisition_under_the_same_name_is_refused(tmp_path):
    _need_real()
    text = (REAL / "gating.wsp").read_text(encoding="utf-8", errors="replace")
    changed = re.sub(r'(name="\$TOT"\s+value=")19225"', r'\g<1>19226"', text)
    assert changed != text
    path = tmp_path / "other.wsp"
    path.write_text(changed, encoding="utf-8")
    result = analyze_file(REAL / "68983.fcs", gates=path, gate_map=GATE_MAP_68983)
    assert result["status"] == "error"
    assert "$TOT '19226'" in result["error"] and "another acquisition" in result["error"]


def test_workspace_on_another_scale_is_refused(tmp_path):
    _need_real()
    text = (REAL / "gating.wsp").read_text(encoding="utf-8", errors="replace")
    # Only FlowJo's biex transforms (the fluorescence channels): scatter stays on the file's scale.
    changed = re.sub(r'(<transforms:biex[^>]*transforms:maxRange=")262144"', r'\g<1>1048576"', text)
    assert changed != text
    path = tmp_path / "rescaled.wsp"
    path.write_text(changed, encoding="utf-8")
    result = analyze_file(REAL / "68983.fcs", gates=path, gate_map=GATE_MAP_68983)
    assert result["status"] == "error"
    assert result["error"].startswith("reviewed gates rescaled.wsp: gate ")
    assert "T = 1.04858e+06" in result["error"] and "range 262144" in result["error"], result["error"]
    assert "channel FSC" not in result["error"] and "channel SSC" not in result["error"]


def test_reviewed_export_keeps_the_helper_gates_the_figures_and_bead_doublets_need(tmp_path, gated):
    reviewed, _ = apply_reviewed_gates(gated, _export(tmp_path, gated))
    for name in ("bead_bright", "not_beads", "singlets", "cd3_negative"):
        assert np.array_equal(reviewed.gating.masks[name], gated.gating.masks[name]), name
    result = analyze_file(TUBE, read_manifest(MANIFEST).lookup(TUBE), gates=tmp_path / "auto.gating.xml")
    automatic = analyze_file(TUBE, read_manifest(MANIFEST).lookup(TUBE))
    assert result["beads"] == automatic["beads"]
