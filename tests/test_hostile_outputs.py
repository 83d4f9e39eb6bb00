"""Outputs under hostile names and text (issue 15, defects 11-13).

Subject IDs and file names choose output file names and appear in figures,
tables, CSV and HTML. Each must stay data: never a path, never matplotlib
math, never a spreadsheet formula, never a terminal escape sequence. An
``indeterminate`` verdict's advice must ask for more than was acquired.
"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from cytometry.counts import Count, bead_count
from cytometry.decisions.eligibility import decide
from cytometry.decisions.subjects import safe_cell, write_csv
from cytometry.outputs.formatting import printable, safe_name

# Raw characters that must never reach a terminal table or the HTML: ESC, CSI, BEL, U+202E (right-to-left
# override), U+2066 (left-to-right isolate), a C1 control (U+009B, the one-byte CSI), tab, CR.
RAW_CONTROLS = ("\x1b", "\x07", "\u202e", "\u2066", "\x9b", "\t", "\r")
HOSTILE_SUBJECT = "\x1b[2J\x07E\u202elive\u2066\x9bX"
LONG_ID = "Z" * 300


def _cli(*args, check_rc=0):
    result = subprocess.run([sys.executable, "-m", "cytometry", *map(str, args)], capture_output=True, text=True,
                            encoding="utf-8", errors="surrogateescape")
    assert result.returncode == check_rc, result.stderr
    assert "Traceback" not in result.stderr
    return result


# ---------------------------------------------------------------- defect 11: names and mathtext

def test_safe_name_keeps_plain_names_and_separates_changed_ones():
    assert safe_name("S01") == "S01" and safe_name("S01_day010_CAR") == "S01_day010_CAR"
    names = ["S/01", "S_01", "S\\01", "S 01", "S:01", "..", ".", "", "S_01-0123456789", "CON", "x$^$", LONG_ID,
             LONG_ID + "Y", "\x1b[31mS\u202e", "é"]
    made = [safe_name(name) for name in names]
    assert len(set(made)) == len(names)  # S/01 and S_01 never write the same file
    for name, out in zip(names, made):
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", out), (name, out)
        assert len(out.encode()) <= 100
        assert out == safe_name(name)  # the same ID always gives the same file


@pytest.fixture(scope="module")
def hostile_store(sample_dir, tmp_path_factory):
    """Five CAR tubes whose subject IDs are hostile, analysed once into a store."""
    root = tmp_path_factory.mktemp("hostile_store")
    subjects = {"x$^$": 4, "S/01": 7, "S_01": 7, LONG_ID: 10, HOSTILE_SUBJECT: 14}
    lines = ["file,subject_id,visit,study_day,tube,beads_per_test,sample_volume_ul"]
    # Five different tubes: the same file twice would be one tube (same SHA-256), whatever its subject.
    tubes = ["S01_day000_CAR.fcs", "S01_day004_CAR.fcs", "S01_day007_CAR.fcs", "S01_day010_CAR.fcs",
             "S01_day014_CAR.fcs"]
    for index, ((subject, day), tube) in enumerate(zip(subjects.items(), tubes)):
        name = f"tube{index}.fcs"
        shutil.copy(sample_dir / tube, root / name)
        quoted = '"' + subject.replace('"', '""') + '"'
        lines.append(f"{name},{quoted},D{day},{day},CAR,48950,50")
    # The hostile subject's screening tube (S03's, indeterminate): for the eligibility table.
    shutil.copy(sample_dir / "S03_screening_TBNK.fcs", root / "tube5.fcs")
    lines.append('tube5.fcs,"' + HOSTILE_SUBJECT + '",screening,-14,TBNK,50120,50')
    (root / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    analysed = _cli("analyze", *sorted(root.glob("tube*.fcs")), "--manifest", root / "manifest.csv",
                    "--out", root / "store")
    return root, subjects, analysed


def test_persistence_plots_for_hostile_subject_ids(hostile_store):
    root, subjects, _ = hostile_store
    plots, table = root / "kinetics", root / "kinetics.csv"
    result = _cli("persistence", "--store", root / "store", "--plots", plots, "--csv", table, "--json")
    assert "Glyph" not in result.stderr  # no control character drawn raw (a missing-glyph warning) either
    doc = json.loads(result.stdout)
    assert sorted(s["subject_id"] for s in doc["subjects"]) == sorted(subjects)  # IDs kept as given in the data
    written = sorted(plots.iterdir())
    assert len(written) == len(subjects)  # S/01 and S_01 are two files
    for subject in doc["subjects"]:
        figure = subject["kinetics_figure"]
        assert figure.endswith(".kinetics.png") and len(figure.rsplit("/", 1)[-1].encode()) < 255
        assert open(figure, "rb").read(4) == b"\x89PNG"
    assert {row["subject_id"] for row in csv.DictReader(open(table, encoding="utf-8"))} == set(subjects)


def test_a_figure_that_cannot_be_written_loses_neither_csv_nor_json(hostile_store):
    root, subjects, _ = hostile_store
    blocked = root / "not_a_folder"
    blocked.write_text("a file where the plots folder should be")
    result = _cli("persistence", "--store", root / "store", "--plots", blocked, "--csv", root / "blocked.csv",
                  "--json", check_rc=1)
    doc = json.loads(result.stdout)
    assert len(doc["subjects"]) == len(subjects) and all("kinetics_figure_error" in s for s in doc["subjects"])
    assert len(list(csv.DictReader(open(root / "blocked.csv", encoding="utf-8")))) >= len(subjects)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(subjects) and all("kinetics figure of subject" in line for line in errors)


@pytest.fixture(scope="module")
def hostile_report(hostile_store):
    root, subjects, _ = hostile_store
    _cli("report", root / "store", "--out", root / "qc", "--no-thumbnails")
    return (root / "qc" / "report.html").read_text(encoding="utf-8"), subjects


def test_report_with_hostile_subject_ids(hostile_report):
    text, subjects = hostile_report
    assert "x$^$" in text and LONG_ID in text
    assert text.count("data:image/png;base64,") == len(subjects)  # one kinetics figure per subject


@pytest.fixture(scope="module")
def hostile_files(sample_dir, tmp_path_factory):
    """The same CAR tube under hostile file names, analysed once with --csv, --plots and --gatingml."""
    root = tmp_path_factory.mktemp("hostile_files")
    run = root / "run"
    run.mkdir()
    # A tab, a CR, matplotlib math in a 250-byte name (its .gating.xml would be 257 bytes), "=", ESC and U+202E,
    # and bytes that are not UTF-8 (a name Python holds as surrogates).
    names = ["\tT.fcs", "\rR.fcs", "a$^$" + "L" * 242 + ".fcs", "=\x1b[31mE\u202e.fcs", os.fsdecode(b"\xff\xfe.fcs")]
    for name in names:
        shutil.copy(sample_dir / "S01_day004_CAR.fcs", run / name)
    # -v: the log lines name the CSV file, whose name holds an escape sequence too.
    table = root / "samples\x1b[31m.csv"
    result = _cli("analyze", run, "--beads-per-test", 48950, "--sample-volume-ul", 50, "--csv", table,
                  "--plots", root / "plots", "--gatingml", root / "gml", "-v")
    rows = list(csv.DictReader(open(table, newline="", encoding="utf-8")))
    return root, names, result, rows


def test_plots_and_gatingml_for_hostile_file_names(hostile_files):
    root, names, analysed, rows = hostile_files
    assert len(rows) == len(names) and all(row["status"] == "ok" for row in rows)
    assert "Glyph" not in analysed.stderr
    assert not [row["flags"] for row in rows if "output:" in row["flags"]]  # every figure and GatingML written
    for folder, suffix in (("plots", ".gating.png"), ("gml", ".gating.xml")):
        written = sorted(p.name for p in (root / folder).iterdir())
        assert len(written) == len(names) and all(n.endswith(suffix) and len(n.encode()) < 255 for n in written)


# ---------------------------------------------------------------- defect 12: CSV and control characters

def test_csv_cells_starting_with_tab_or_cr_are_neutralised_and_numbers_stay_numbers(tmp_path):
    for text in ("\tcmd", "\rcmd", "=1+1", "+1+A1", "-1+A1", "@SUM(A1)"):
        assert safe_cell(text) == "'" + text
    # Numbers, and text that is a plain number (a study day read as text), stay usable as numbers.
    assert safe_cell(-14) == -14 and safe_cell(-2.5) == -2.5 and safe_cell("-14") == "-14"
    assert safe_cell("+3.5e2") == "+3.5e2" and safe_cell("S01") == "S01" and safe_cell(None) is None
    target = tmp_path / "out.csv"
    write_csv(target, [("a", "a"), ("b", "b")], [{"a": "\tx", "b": -14}, {"a": "\ry", "b": "-7"}])
    rows = list(csv.reader(open(target, newline="")))
    assert rows[1:] == [["'\tx", "-14"], ["'\ry", "-7"]]


def test_analyze_csv_neutralises_file_names(hostile_files):
    _, _, _, rows = hostile_files
    files = {row["file"] for row in rows}
    assert {"'\tT.fcs", "'\rR.fcs", "'=\x1b[31mE\u202e.fcs", "\\udcff\\udcfe.fcs"} <= files
    assert all(not f.startswith(("=", "+", "-", "@", "\t", "\r")) for f in files)


def test_printable_escapes_controls_and_keeps_text():
    assert printable("S01 µL – ≥ 5") == "S01 µL – ≥ 5"
    assert printable("\x1b[31mE\u202e\t\x9b") == "\\x1b[31mE\\u202e\\t\\x9b"
    assert printable("a\nb\x00") == "a\\nb\\x00"


def test_cli_tables_escape_control_characters(hostile_files, hostile_store):
    _, _, analysed, _ = hostile_files
    for raw in RAW_CONTROLS:
        assert raw not in analysed.stdout and raw not in analysed.stderr
    assert "samples\\x1b[31m.csv" in analysed.stderr  # the log line, escaped
    assert "=\\x1b[31mE\\u202e.fcs" in analysed.stdout and "\\tT.fcs" in analysed.stdout
    root, _, from_store = hostile_store
    outputs = [from_store.stdout, _cli("persistence", "--store", root / "store").stdout,
               _cli("eligibility", "--store", root / "store", "--csv", root / "eligibility.csv").stdout]
    for out in outputs:
        for raw in RAW_CONTROLS:
            assert raw not in out
        assert "\\x1b[2J\\x07E\\u202elive\\u2066\\x9bX" in out


def test_eligibility_csv_keeps_the_study_day_a_number(hostile_store):
    root, _, _ = hostile_store
    _cli("eligibility", "--store", root / "store", "--csv", root / "eligibility.csv")
    rows = list(csv.DictReader(open(root / "eligibility.csv", newline="", encoding="utf-8")))
    assert [(row["subject_id"], row["study_day"], row["verdict"]) for row in rows] == \
        [(HOSTILE_SUBJECT, "-14", "indeterminate")]


def test_inspect_escapes_keywords(sample_dir, tmp_path):
    data = (sample_dir / "S01_day004_CAR.fcs").read_bytes()
    assert data.count(b"/$CYT/FACSCanto II/") == 1
    hostile = tmp_path / "hostile.fcs"
    hostile.write_bytes(data.replace(b"/$CYT/FACSCanto II/", b"/$CYT/\x1b[2J\xe2\x80\xaeCanto/"))  # same length
    out = _cli("inspect", hostile).stdout
    assert "\x1b" not in out and "\u202e" not in out and "\\x1b[2J" in out


def test_report_escapes_control_characters(hostile_report):
    text, _ = hostile_report
    for raw in RAW_CONTROLS:
        assert raw not in text
    assert "\\x1b[2J\\x07E\\u202elive\\u2066\\x9bX" in text


# ---------------------------------------------------------------- defect 13: what would settle it

def _proposal(reasons):
    """(events proposed or None, volume factor) from an indeterminate verdict's reasons; None if no proposal."""
    for reason in reasons:
        factor = re.search(r"~([\d.,]+)x the volume", reason)
        if factor:
            events = re.search(r"about ([\d,]+) events of this population \(now ([\d,]+)", reason)
            return (tuple(int(g.replace(",", "")) for g in events.groups()) if events else None,
                    float(factor.group(1).replace(",", "")))
    return None


def test_indeterminate_never_proposes_fewer_events_than_acquired():
    # 15 events, 12 cells/uL, interval [4.5-25] (few beads): the old rule proposed 12 events, "~0.8x the volume".
    out = decide(Count(events=15, cells_per_ul=12.0, ci95=(4.5, 25.0), below_lloq=True))
    assert out["verdict"] == "indeterminate"
    (proposed, now), factor = _proposal(out["reasons"])
    assert now == 15 and proposed > now and factor > 1


def test_indeterminate_proposal_asks_for_more_and_would_settle_it():
    # Bead tubes near the threshold of 5 cells/uL (50,000 beads in 50 uL: cells/uL = 1000 x cells / beads).
    seen = 0
    for cells in (0, 1, 3, 9, 15, 26, 40, 60, 120, 400):
        for value in (1.0, 2.0, 3.5, 4.5, 4.9, 5.1, 5.5, 7.0, 9.0, 12.0, 20.0):
            beads = max(1, round(1000.0 * max(cells, 1) / value))
            count = bead_count(cells, beads, 50000.0, 50.0)
            out = decide(count)
            if out["verdict"] != "indeterminate":
                continue
            seen += 1
            proposal = _proposal(out["reasons"])
            if proposal is None:  # then it says so, and indeed 1000x the blood would still straddle 5
                assert any("no amount of further acquisition" in r for r in out["reasons"]), out["reasons"]
                far = bead_count(round(cells * 1000), round(beads * 1000), 50000.0, 50.0)
                assert far.ci95[0] <= 5.0 < far.ci95[1]
                continue
            events, factor = proposal
            assert factor > 1, out["reasons"]
            if cells:
                assert events[1] == cells and events[0] > cells, out["reasons"]
            # If the value holds, that much more blood (cells and beads alike) gives an interval clear of 5.
            scaled = bead_count(round(cells * factor), round(beads * factor), 50000.0, 50.0)
            assert not (scaled.ci95[0] <= 5.0 < scaled.ci95[1]), (cells, beads, scaled, out["reasons"])
    assert seen >= 15


def test_a_value_on_the_threshold_says_no_acquisition_settles_it():
    out = decide(Count(events=40, cells_per_ul=5.0, ci95=(3.6, 6.8), below_lloq=False))
    assert out["verdict"] == "indeterminate" and _proposal(out["reasons"]) is None
    assert any("no amount" in reason for reason in out["reasons"]), out["reasons"]
