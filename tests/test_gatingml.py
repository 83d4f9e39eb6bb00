"""GatingML export: re-applying the exported gates with flowkit reproduces the counts."""
import io

import flowkit as fk
import pytest

from cytometry.analysis import (AnalysisOptions, analyze_gated, car_reference_of, export_gating, gate_file,
                                with_car_reference)
from gating import POPULATIONS
from gating.gatingml import gate_paths

TUBES = ["S01_screening_TBNK.fcs", "S03_screening_TBNK.fcs", "S02_screening_TBNK.fcs", "S01_day010_CAR.fcs",
         "S01_day084_CAR.fcs"]


def _with_pre_infusion_reference(sample_dir):
    reference = car_reference_of(gate_file(sample_dir / "S01_day000_CAR.fcs"), "pre-infusion tube S01_day000_CAR.fcs")
    return with_car_reference(AnalysisOptions(beads_per_test=50000, sample_volume_ul=50), reference)


@pytest.mark.parametrize("name", TUBES + ["S01_day007_CAR.fcs with reference", "S01_day010_CAR.fcs with reference"])
def test_reapplied_gatingml_reproduces_counts(sample_dir, tmp_path, name):
    options = AnalysisOptions(beads_per_test=50000, sample_volume_ul=50)
    if name.endswith(" with reference"):
        name = name.removesuffix(" with reference")
        options = _with_pre_infusion_reference(sample_dir)
    path = sample_dir / name
    gated = gate_file(path, options)
    if options.gating.car_reference is not None:
        car_gate = next(g for g in gated.gating.gates if g.name == "car_t")
        assert car_gate.method.startswith("cut leaving above it the positives counted against the reference")
    result = analyze_gated(gated, options=options)
    xml_path = tmp_path / "gates.xml"
    with open(xml_path, "wb") as fh:
        export_gating(gated, fh)
    text = xml_path.read_text()
    assert "gating:PolygonGate" in text and "transforms:logicle" in text and "spill" in text

    # A fresh flowkit session reads the file back and gates the raw FCS file itself.
    strategy = fk.parse_gating_xml(str(xml_path))
    gating_results = strategy.gate_sample(fk.Sample(str(path), subsample=0))
    paths = gate_paths(gated.gating)
    for population in list(POPULATIONS) + ["beads"]:
        if population not in gated.gating.masks:
            continue
        membership = gating_results.get_gate_membership(population, gate_path=paths[population])
        reported = result["beads"]["events"] if population == "beads" else result["populations"][population]["events"]
        assert int(membership.sum()) == reported, population


def test_export_names_every_population_gate(sample_dir):
    gated = gate_file(sample_dir / "S01_day010_CAR.fcs")
    buffer = io.BytesIO()
    strategy = export_gating(gated, buffer)
    names = {gate_id for gate_id, _ in strategy.get_gate_ids()}
    assert {"beads", "leukocytes", "live", "lymphocytes", "t_cells", "b_cells", "car_t", "cd4_t", "cd8_t"} <= names
