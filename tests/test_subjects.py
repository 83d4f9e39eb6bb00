"""Screening decisions per subject, CAR-T kinetics and the two subject commands."""
import csv
import json

import pytest

from cytometry.outputs.cli import main
from cytometry.decisions.subjects import AplasiaRule, kinetics, safe_cell, screening_decisions, trapezoid_auc


def screening(file, day, verdict, value=6.0, subject="S1", status="ok"):
    return {"file": file, "subject_id": subject, "study_day": day, "status": status,
            "eligibility": {"verdict": verdict, "value": value, "ci95": [value - 1, value + 1], "events": 40,
                            "reasons": [f"{verdict} reason"], "criterion": "CD19+ B cells > 5 cells/uL"}}


def test_reacquisition_supersedes_indeterminate():
    rows = screening_decisions([screening("first.fcs", -21, "indeterminate", 5.4),
                                screening("again.fcs", -14, "eligible", 7.9)])
    assert rows[0]["verdict"] == "eligible" and rows[0]["file"] == "again.fcs"
    assert any("first.fcs" in r and "superseded" in r for r in rows[0]["reasons"])


def test_later_qc_fail_does_not_override_a_valid_tube():
    rows = screening_decisions([screening("good.fcs", -21, "not_eligible", 1.2),
                                screening("bad.fcs", -14, "qc_fail", 9.0)])
    assert rows[0]["verdict"] == "not_eligible" and rows[0]["file"] == "good.fcs"
    assert any("bad.fcs" in r and "failed QC" in r for r in rows[0]["reasons"])


def test_all_tubes_failed_gives_qc_fail_and_subjects_are_separate():
    rows = screening_decisions([screening("a.fcs", -14, "qc_fail", subject="S2"),
                                screening("b.fcs", -14, "eligible", subject="S3"),
                                {"file": "day7.fcs", "subject_id": "S3", "study_day": 7, "eligibility": None}])
    assert [(r["subject_id"], r["verdict"]) for r in rows] == [("S2", "qc_fail"), ("S3", "eligible")]


def point(day, car, b, lloq=5.0):
    return {"study_day": day, "car_t": {"cells_per_ul": car, "ci95": [car * 0.8, car * 1.2], "below_lloq": car < lloq,
                                        "events": 100},
            "b_cells": {"cells_per_ul": b, "ci95": [b * 0.8, b * 1.2], "below_lloq": b < lloq, "events": 100}}


def test_kinetics_on_a_known_curve():
    pts = [point(0, 0.0, 50), point(4, 20, 0.2), point(10, 200, 0.0), point(21, 80, 0.0), point(28, 40, 0.0),
           point(56, 3.0, 0.4), point(84, 1.0, 2.0)]
    k = kinetics(pts)
    assert (k["cmax"], k["tmax_day"]) == (200, 10)
    # Hand-computed trapezoid: 0-4: 40, 4-10: 660, 10-21: 1540, 21-28: 420.
    assert k["auc_0_28"] == pytest.approx(40 + 660 + 1540 + 420)
    assert (k["clast"], k["tlast_day"]) == (40, 28)  # 3.0 and 1.0 are below LLOQ
    assert k["persistence_last_visit"]["study_day"] == 84 and k["persistence_last_visit"]["below_lloq"]
    assert (k["aplasia_onset_day"], k["aplasia_recovery_day"], k["aplasia_duration_days"]) == (4, 84, 80)
    assert k["conventions"]["below_lloq_in_auc"] == "taken as 0"


def test_aplasia_ongoing_and_configurable():
    pts = [point(0, 0.0, 30), point(7, 50, 0.5), point(28, 10, 3.0)]
    assert kinetics(pts)["aplasia_recovery_day"] == 28
    strict = kinetics(pts, AplasiaRule(threshold_cells_per_ul=5.0, version="2"))
    assert strict["aplasia_onset_day"] == 7 and strict["aplasia_ongoing"] and strict["aplasia_duration_days"] == 21
    assert strict["aplasia_rule"]["version"] == "2"


def test_below_lloq_points_count_as_zero_in_auc():
    assert trapezoid_auc([0, 10, 20], [0.0, 0.0, 100.0]) == pytest.approx(500.0)
    k = kinetics([point(0, 4.0, 10), point(10, 4.0, 10), point(20, 100, 10)])
    assert k["auc_0_28"] == pytest.approx(500.0)


def test_csv_cells_are_neutralised():
    assert safe_cell("=1+1") == "'=1+1" and safe_cell("@SUM(A1)") == "'@SUM(A1)" and safe_cell(-3) == -3


@pytest.fixture(scope="module")
def persistence_json(sample_dir, tmp_path_factory):
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("persistence")
    result = subprocess.run([sys.executable, "-m", "cytometry.outputs.cli", "persistence", str(sample_dir), "--manifest",
                             str(sample_dir / "manifest.csv"), "--json", "--plots", str(out),
                             "--csv", str(out / "timeline.csv")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), out


def test_persistence_contract_and_recovery_of_the_true_kinetics(persistence_json, sample_dir):
    doc, out = persistence_json
    subjects = {s["subject_id"]: s for s in doc["subjects"]}
    s01 = subjects["S01"]
    for key in ("timeline", "cmax", "tmax_day", "auc_0_28", "clast", "tlast_day", "aplasia_onset_day",
                "aplasia_recovery_day"):
        assert key in s01
    point0 = s01["timeline"][0]
    assert set(point0) >= {"study_day", "car_t", "b_cells", "qc_flags"}
    assert set(point0["car_t"]) >= {"cells_per_ul", "ci95", "below_lloq"}
    # The simulator's truth for the series.
    truth = {}
    for p in s01["timeline"]:
        name = p["file"].split("/")[-1].replace(".fcs", ".json")
        truth[p["study_day"]] = json.loads((sample_dir / "truth" / name).read_text())["concentrations_per_ul"]
    true_car = {d: t["car_t"] for d, t in truth.items()}
    true_tmax = max(true_car, key=true_car.get)
    assert s01["tmax_day"] == true_tmax
    peak = next(p for p in s01["timeline"] if p["study_day"] == true_tmax)
    assert peak["car_t"]["ci95"][0] <= true_car[true_tmax] <= peak["car_t"]["ci95"][1]
    # AUC within what the intervals allow: the AUC of the lower and of the upper bounds bracket the truth.
    days = sorted(d for d in true_car if 0 <= d <= 28)
    lows = [next(p for p in s01["timeline"] if p["study_day"] == d)["car_t"]["ci95"][0] for d in days]
    highs = [next(p for p in s01["timeline"] if p["study_day"] == d)["car_t"]["ci95"][1] for d in days]
    assert trapezoid_auc(days, lows) <= trapezoid_auc(days, [true_car[d] for d in days]) <= trapezoid_auc(days, highs)
    assert s01["aplasia_onset_day"] == 4  # B cells ~0 from day 4 in the truth
    assert (out / "S01.kinetics.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(open(out / "timeline.csv")))
    assert len(rows) == len(s01["timeline"]) and "car_t_per_ul" in rows[0]


def test_eligibility_command_json_and_csv(capsys, sample_dir, tmp_path):
    code = main(["eligibility", str(sample_dir), "--manifest", str(sample_dir / "manifest.csv"), "--json",
                 "--csv", str(tmp_path / "eligibility.csv")])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    verdicts = {s["subject_id"]: s["verdict"] for s in doc["subjects"]}
    assert verdicts == {"S01": "eligible", "S02": "not_eligible", "S03": "indeterminate", "S04": "eligible",
                        "S05": "eligible"}
    for subject in doc["subjects"]:
        assert set(subject) >= {"subject_id", "verdict", "value", "ci95", "events", "file", "reasons"}
    rows = list(csv.DictReader(open(tmp_path / "eligibility.csv")))
    assert [r["subject_id"] for r in rows] == sorted(verdicts) and "b_cells_per_ul" in rows[0]


def test_formula_like_subject_id_is_neutralised_in_csv(capsys, sample_dir, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,subject_id,visit,study_day,tube,beads_per_test,sample_volume_ul\n"
                        f"{sample_dir / 'S01_screening_TBNK.fcs'},=HYPERLINK(\"x\"),screening,-14,TBNK,50120,50\n")
    code = main(["eligibility", str(sample_dir / "S01_screening_TBNK.fcs"), "--manifest", str(manifest),
                 "--csv", str(tmp_path / "out.csv")])
    capsys.readouterr()
    assert code == 0
    rows = list(csv.reader(open(tmp_path / "out.csv")))
    assert rows[1][0] == "'=HYPERLINK(\"x\")"
