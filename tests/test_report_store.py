"""The report is drawn from the store alone: every figure without the FCS files, its counts equal to the table's.

The committed samples are analysed once (module fixture) into a store in a
temporary copy, the FCS files are then deleted, and the report is written
from another folder.
"""
import re
import shutil
import subprocess

import h5py
import pytest

from cytometry.outputs.cli import main
from cytometry.outputs.plots import GatingView, gating_figure, gating_steps
from cytometry.outputs.report import population_rows
from cytometry.batch.store import REPORT_EVENTS, ResultStore
from store_legacy import unsealed

LEGEND = re.compile(r"^(\w+): ([\d,]+) events")


@pytest.fixture(scope="module")
def reported(sample_dir, tmp_path_factory):
    """A store of sample_fcs/ whose FCS files were deleted, and its report written from elsewhere."""
    root = tmp_path_factory.mktemp("report_store")
    run = root / "run"
    shutil.copytree(sample_dir, run)
    store = root / "store"
    assert main(["analyze", str(run), "--manifest", str(run / "manifest.csv"), "--out", str(store),
                 "--workers", "2"]) == 0
    fcs = sorted(run.glob("*.fcs"))
    assert len(fcs) == 14
    for path in fcs:
        path.unlink()  # the report must not need them
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(elsewhere)
        assert main(["report", str(store), "--out", "qc"]) == 0
    return {"store": ResultStore(store), "html": (elsewhere / "qc" / "report.html").read_text(), "files": fcs,
            "report": elsewhere / "qc" / "report.html"}


def _sections(text):
    """Sample file name → its per-sample section of the report."""
    return {re.search(r"<h2>([^<]+)</h2>", part).group(1): part
            for part in text.split("<section class='sample'")[1:]}


def _table_events(section):
    """Population → events, read back from a section's hierarchy table."""
    rows = re.findall(r"<span class='indent\d'>(\w+)</span>(?: <b>UNRELIABLE</b>)?</td><td class='num'>([\d,]+)</td>",
                      section)
    return {name: int(events.replace(",", "")) for name, events in rows}


def test_every_figure_is_drawn_without_the_fcs_files(reported):
    assert not any(path.exists() for path in reported["files"])
    sections = _sections(reported["html"])
    assert sorted(sections) == sorted(path.name for path in reported["files"])
    for name, section in sections.items():
        assert "<img class='gating'" in section, name
        assert "data:image/png;base64," in section, name
        assert "class='missing'" not in section, name


def test_figure_counts_equal_the_table(reported):
    """For every sample: each count written in a figure's legend equals the report table's and the result's."""
    store = reported["store"]
    sections = _sections(reported["html"])
    _, results = store.one_parameter_set()
    assert len(results) == 14
    for result in results:
        name = result["file"].rsplit("/", 1)[-1]
        table = _table_events(sections[name])
        assert table == {k: v["events"] for k, v in result["populations"].items()}, name
        view = GatingView.from_store(store, result["store_entry"], result)
        figure = gating_figure(view)
        written = {}
        for ax in figure.axes:
            legend = ax.get_legend()
            for text in legend.get_texts() if legend is not None else []:
                match = LEGEND.match(text.get_text())
                assert match, text.get_text()
                written[match.group(1)] = int(match.group(2).replace(",", ""))
        shown = {k: v for k, v in written.items() if k in table}
        expected = {"t_cells", "b_cells", "lymphocytes", "cd4_t", "cd8_t"} | \
            ({"car_t"} if result["panel"] == "car" else {"nk_cells"})
        assert expected <= set(shown), (name, sorted(shown))
        assert shown == {k: table[k] for k in shown}, name
        # The % of parent written is the table's (both from the full-file counts).
        pct = {g["population"]: g["pct_of_parent"] for step in gating_steps(view) for g in step["gates"]}
        for row in population_rows(result):
            if row["population"] in pct and row["pct_of_parent"]:
                assert abs(pct[row["population"]] - float(row["pct_of_parent"])) <= \
                    0.006 * float(row["pct_of_parent"]), (name, row["population"])


def test_stored_events_are_a_bounded_subsample_whose_masks_reproduce(reported):
    store = reported["store"]
    sizes = []
    for entry in store.entries():
        stored = store.events(entry.name)
        masks = store.masks(entry.name)
        n = next(iter(masks.values())).size
        assert stored["n_events"] == n
        assert stored["events"].shape[0] == min(n, REPORT_EVENTS) == len(stored["index"])
        sizes.append(n)
        # The subsample's rows select the same events the gates select: re-apply the T-cell cut to them.
        result = store.results_for(entry.name)
        gate = next(g for g in result["gating"]["gates"] if g["name"] == "t_cells")
        cd3 = stored["events"][:, stored["columns"]["CD3"]]
        parent = masks[gate["parent"]][stored["index"]]
        recomputed = parent & (cd3 >= gate["dimensions"][0]["min"])
        differ = (recomputed != masks["t_cells"][stored["index"]]).sum()
        assert differ <= 2, (entry.name, differ)  # float32 storage can move an event sitting on the cut
    assert max(sizes) > REPORT_EVENTS > min(sizes)  # both paths, subsampled and whole, are exercised


def test_rows_sorted_and_numbers_rounded(reported):
    text = reported["html"]
    order = [m for m in re.findall(r"<h2>([^<]+\.fcs)</h2>", text)]
    days = [n for n in order if n.startswith("S01_day")]
    assert days == sorted(days) and order[0] == "S01_screening_TBNK.fcs"
    assert order.index("S01_day084_CAR.fcs") < order.index("S02_screening_TBNK.fcs")
    assert not re.search(r"\d\.\d{5,}", text.split("<h2>Per sample</h2>")[0].split("<img")[0])
    assert not re.search(r"\de[+-]\d\d", re.sub(r"data:image/png;base64,[^']+", "", text))
    assert "@media print" in text and "Reviewed by" in text


def test_audit_block_from_the_file_keywords_and_car_reference(reported):
    sections = _sections(reported["html"])
    section = sections["S01_day028_CAR.fcs"]
    result = next(r for r in reported["store"].one_parameter_set()[1] if r["file"].endswith("S01_day028_CAR.fcs"))
    assert result["sha256"] in section
    assert "FACSCanto II" in section and "30-MAR-2026" in section
    assert result["car_threshold"]["source"] in section and "gain ratio" in section
    assert "<span class='check-flag'>flag</span>" in section and "stop_rule" in section




def test_a_sample_without_stored_events_says_so(sample_dir, tmp_path, capsys):
    files = [str(sample_dir / n) for n in ("S01_screening_TBNK.fcs", "S03_screening_TBNK.fcs")]
    store = tmp_path / "store"
    assert main(["analyze", *files, "--manifest", str(sample_dir / "manifest.csv"), "--out", str(store),
                 "--workers", "1"]) == 0
    entries = ResultStore(store).entries()
    unsealed(entries[0])  # as written before events (and seals) were stored
    with h5py.File(entries[0], "r+") as h5:
        del h5["events"]
    capsys.readouterr()
    assert main(["report", str(store), "--out", str(tmp_path / "qc")]) == 0
    text = (tmp_path / "qc" / "report.html").read_text()
    assert text.count("<img class='gating'") == 1
    assert text.count("no events stored for this sample") == 1
    assert "no stored events" in capsys.readouterr().err


def test_empty_store_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "store" / "samples").mkdir(parents=True)
    assert main(["report", str(tmp_path / "store"), "--out", str(tmp_path / "qc")]) == 2
    err = capsys.readouterr().err
    assert "holds no samples" in err and "Traceback" not in err
    assert not (tmp_path / "qc").exists()


def test_report_renders_in_headless_chromium(reported, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    from PIL import Image

    shot, pdf = tmp_path / "report.png", tmp_path / "report.pdf"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    url = reported["report"].as_uri()
    subprocess.run(common + ["--window-size=1400,3000", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120, check=True)
    image = Image.open(shot).convert("L")
    assert image.size == (1400, 3000)
    low, high = image.getextrema()
    assert high - low > 200  # text and figures, not a blank page
    subprocess.run(common + ["--no-pdf-header-footer", f"--print-to-pdf={pdf}", url], capture_output=True,
                   timeout=180, check=True)
    pages = len(re.findall(rb"/Type\s*/Page[^s]", pdf.read_bytes()))
    assert pages > 14  # the print stylesheet starts each of the 14 samples on a new page


def test_every_check_run_is_itemized_with_its_outcome(reported):
    """Passed checks are listed too, with what they measured; the worst outcome heads the section."""
    store = reported["store"]
    sections = _sections(reported["html"])
    seen = 0
    for result in store.results():
        if result.get("status") != "ok":
            continue
        section = sections[result["file"].rsplit("/", 1)[-1]]
        ran = result["checks"]
        assert [c["check"] for c in ran] == ["stop_rule", "lymphosum", "cd4_cd8_sum", "saturated_events",
                                             "flow_interrupted"]
        for check in ran:
            row = re.search(rf"<span class='check-(\w+)'>\w+</span></td><td>{check['population']}</td>"
                            rf"<td>{check['check']}</td><td>([^<]*)</td>", section)
            assert row, f"{result['file']}: check {check['check']} not in the report"
            assert row.group(1) == check["outcome"]
            assert f"limit {check['limit']}".replace(">", "&gt;").replace("<", "&lt;") in row.group(2)
        flagged = {f["population"] for f in result["flags"]}
        for name in result["populations"]:
            if name not in flagged:
                assert re.search(rf"<td>{name}</td><td>gate checks</td>", section), name
        # a passed check that raised no flag cannot carry one
        codes = {(f["population"], f["code"]) for f in result["flags"]}
        for check in ran:
            assert ((check["population"], check["check"]) in codes) == (check["outcome"] in ("flag", "fail"))
        seen += 1
    assert seen == 14
