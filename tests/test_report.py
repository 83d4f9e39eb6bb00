"""The HTML QC report and the subject commands reading a store."""
import json

from cytometry.outputs.cli import main


def test_report_content_and_escaping(capsys, sample_dir, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "file,subject_id,visit,study_day,tube,beads_per_test,sample_volume_ul\n"
        f"{sample_dir / 'S01_screening_TBNK.fcs'},<script>alert(1)</script>,screening,-14,TBNK,50120,50\n"
        f"{sample_dir / 'S03_screening_TBNK.fcs'},S03,screening,-14,TBNK,50120,50\n"
        f"{sample_dir / 'S01_day010_CAR.fcs'},S01,d10,10,CAR,48950,50\n")
    files = [str(sample_dir / n) for n in ("S01_screening_TBNK.fcs", "S03_screening_TBNK.fcs", "S01_day010_CAR.fcs")]
    assert main(["analyze", *files, "--manifest", str(manifest), "--out", str(tmp_path / "store"),
                 "--workers", "1"]) == 0
    assert main(["report", str(tmp_path / "store"), "--out", str(tmp_path / "qc")]) == 0
    capsys.readouterr()
    text = (tmp_path / "qc" / "report.html").read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Screening eligibility" in text and "indeterminate" in text and "eligible" in text
    assert "S01_day010_CAR.fcs" in text and "CAR-T persistence" in text
    assert text.count("data:image/png;base64,") >= 4  # 3 gating thumbnails + 1 kinetics plot


def test_subject_commands_read_the_store(capsys, sample_dir, tmp_path):
    assert main(["analyze", str(sample_dir), "--manifest", str(sample_dir / "manifest.csv"), "--out",
                 str(tmp_path / "store")]) == 0
    capsys.readouterr()
    assert main(["eligibility", "--store", str(tmp_path / "store"), "--json"]) == 0
    from_store = json.loads(capsys.readouterr().out)["subjects"]
    assert main(["eligibility", str(sample_dir), "--manifest", str(sample_dir / "manifest.csv"), "--json"]) == 0
    from_files = json.loads(capsys.readouterr().out)["subjects"]
    assert [(s["subject_id"], s["verdict"], s["value"]) for s in from_store] == \
        [(s["subject_id"], s["verdict"], s["value"]) for s in from_files]
    assert main(["persistence", "--store", str(tmp_path / "store"), "--json"]) == 0
    subjects = json.loads(capsys.readouterr().out)["subjects"]
    assert subjects[0]["tmax_day"] == 10


def test_store_usage_errors(capsys, tmp_path):
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "qc")]) == 2
    assert main(["eligibility"]) == 2
    assert "--store" in capsys.readouterr().err
