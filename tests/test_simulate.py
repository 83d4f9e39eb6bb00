"""Tests of the seeded FCS simulator (the project's accuracy oracle)."""
import csv
import doctest
import json

import flowio
import flowkit
import numpy as np
import pytest

from cytometry import simulate
from cytometry.simulate import (
    LABEL_NAMES,
    PANELS,
    default_concentrations,
    detector_name,
    make_sample_set,
    marker_label,
    simulate_tube,
    write_tube,
)

CODE = {name: i for i, name in enumerate(LABEL_NAMES)}


def _fluor(tube):
    """Raw fluorescence columns in spillover-keyword order, and the matrix."""
    names = tube.truth["spillover"]["channels"]
    cols = [tube.pnn.index(n) for n in names]
    return tube.events[:, cols].astype(float), np.array(tube.truth["spillover"]["matrix"]), names


def _flowio_events(path):
    fd = flowio.FlowData(str(path))
    return fd, np.asarray(fd.events, dtype=np.float32).reshape(-1, fd.channel_count)


# ---------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------

def test_same_seed_same_tube_and_bytes(tmp_path):
    kw = dict(blood_volume_ul=1.0, shuffle_channels=True, gain_range=(0.8, 1.2))
    a = simulate_tube("car", seed=11, **kw)
    b = simulate_tube("car", seed=11, **kw)
    np.testing.assert_array_equal(a.events, b.events)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.pnn == b.pnn and a.metadata == b.metadata and a.truth == b.truth
    pa = write_tube(a, tmp_path / "a" / "x.fcs")
    pb = write_tube(b, tmp_path / "b" / "x.fcs")
    assert pa.read_bytes() == pb.read_bytes()
    assert (pa.parent / "truth" / "x.json").read_bytes() == (pb.parent / "truth" / "x.json").read_bytes()
    assert (pa.parent / "truth" / "x.labels.npy").read_bytes() == \
        (pb.parent / "truth" / "x.labels.npy").read_bytes()


def test_different_seed_different_tube():
    a = simulate_tube("tbnk", seed=1, blood_volume_ul=1.0)
    b = simulate_tube("tbnk", seed=2, blood_volume_ul=1.0)
    assert a.events.shape != b.events.shape or not np.array_equal(a.events, b.events)
    assert a.truth["spillover"] != b.truth["spillover"]


def test_naming_options_do_not_change_events():
    a = simulate_tube("tbnk", seed=4, blood_volume_ul=1.0)
    b = simulate_tube("tbnk", seed=4, blood_volume_ul=1.0, marker_style="dash",
                      detector_style="attune", shuffle_channels=True, spill_keyword="SPILL",
                      write_vol=False)
    np.testing.assert_array_equal(a.labels, b.labels)
    # same data, channels only renamed and reordered
    bd_to_fluor = {v: k for k, v in simulate._DETECTOR_NAMES["bd"].items()}
    non_fluor = ("FSC-A", "FSC-H", "SSC-A", "Time")

    def attune_name(n):
        return n if n in non_fluor else detector_name(bd_to_fluor[n], "attune")

    a_by_name = {attune_name(n): a.events[:, i] for i, n in enumerate(a.pnn)}
    assert sorted(a_by_name) == sorted(b.pnn) and a.pnn != b.pnn
    for i, n in enumerate(b.pnn):
        np.testing.assert_array_equal(b.events[:, i], a_by_name[n])


# ---------------------------------------------------------------------------
# the written file
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("marker_style", ["plain", "space", "dash"])
@pytest.mark.parametrize("detector_style", ["bd", "fl", "attune"])
def test_file_round_trip_naming_styles(tmp_path, marker_style, detector_style):
    panel = "car" if detector_style == "attune" else "tbnk"
    tube = simulate_tube(panel, seed=7, blood_volume_ul=0.3, marker_style=marker_style,
                         detector_style=detector_style, shuffle_channels=(marker_style == "dash"))
    path = write_tube(tube, tmp_path / "t.fcs")

    expected = {}
    for marker, dye, det in PANELS[panel]:
        expected[detector_name(det, detector_style)] = marker_label(marker, dye, marker_style)
    for n in ("FSC-A", "FSC-H", "SSC-A", "Time"):
        expected[n] = ""

    sample = flowkit.Sample(path)
    assert sample.event_count == tube.n_events
    assert list(sample.pnn_labels) == tube.pnn
    assert dict(zip(sample.pnn_labels, sample.pns_labels)) == expected
    raw = sample.get_events(source="raw")
    not_time = [i for i, n in enumerate(tube.pnn) if n != "Time"]
    # flowkit scales Time by $TIMESTEP; everything else is the stored float32
    np.testing.assert_array_equal(raw[:, not_time].astype(np.float32), tube.events[:, not_time])

    fd, ev = _flowio_events(path)
    np.testing.assert_array_equal(ev, tube.events)
    assert fd.text["fil"] == "t.fcs"
    assert fd.text["tube name"] == ("CAR" if panel == "car" else "TBNK")
    for key in ("cyt", "date", "btim", "etim", "src", "spillover", "vol"):
        assert key in fd.text
    assert all(fd.text[f"p{i + 1}r"] == "262144" for i in range(len(tube.pnn)))

    # expected marker names in each style
    if marker_style == "plain":
        assert "CD3" in expected.values()
    elif marker_style == "space":
        assert "CD3 FITC" in expected.values()
    else:
        assert "CD3-FITC" in expected.values()
    if panel == "car":
        assert {"plain": "Viability", "space": "Viability 7-AAD",
                "dash": "Viability-7-AAD"}[marker_style] in expected.values()


@pytest.mark.parametrize("keyword,read_name", [("$SPILLOVER", "spillover"), ("SPILL", "spill"),
                                               ("$COMP", "comp")])
def test_spill_keyword_written_under_chosen_name(tmp_path, keyword, read_name):
    tube = simulate_tube("car", seed=3, blood_volume_ul=0.3, spill_keyword=keyword,
                         shuffle_channels=True)
    path = write_tube(tube, tmp_path / "s.fcs")
    text = path.read_bytes()[:4000]
    assert f"/{keyword}/".encode() in text
    others = {"spillover", "spill", "comp"} - {read_name}
    fd, ev = _flowio_events(path)
    np.testing.assert_array_equal(ev, tube.events)  # the $COMP rename kept offsets right
    assert read_name in fd.text and not others & set(fd.text)
    assert fd.text[read_name] == tube.metadata[keyword]
    sample = flowkit.Sample(path)
    assert sample.metadata[read_name] == tube.metadata[keyword]
    # the matrix parses with flowkit and equals the truth, in file order
    names = tube.truth["spillover"]["channels"]
    m = flowkit.Matrix(fd.text[read_name], detectors=names)
    np.testing.assert_array_equal(m.matrix, np.array(tube.truth["spillover"]["matrix"]))
    fl_in_file = [n for n in tube.pnn if n not in ("FSC-A", "FSC-H", "SSC-A", "Time")]
    assert names == fl_in_file


def test_vol_optional(tmp_path):
    with_vol = simulate_tube("tbnk", seed=1, blood_volume_ul=0.5)
    no_vol = simulate_tube("tbnk", seed=1, blood_volume_ul=0.5, write_vol=False)
    fd1, _ = _flowio_events(write_tube(with_vol, tmp_path / "v.fcs"))
    fd2, _ = _flowio_events(write_tube(no_vol, tmp_path / "nv.fcs"))
    # 0.5 uL blood x (50 + 20 + 450) / 50 x 1000 nL/uL
    assert float(fd1.text["vol"]) == pytest.approx(0.5 * 10.4 * 1000)
    assert "vol" not in fd2.text
    assert no_vol.truth["vol_nl"] is None


def test_bad_keyword_value_refused():
    tube = simulate_tube("tbnk", seed=1, blood_volume_ul=0.2, source="lab/")
    with pytest.raises(ValueError, match="SRC"):
        simulate._encode_fcs(tube.events, tube.pnn, tube.pns, tube.metadata)


# ---------------------------------------------------------------------------
# truth
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("panel", ["tbnk", "car"])
def test_truth_consistent_with_labels(tmp_path, panel):
    tube = simulate_tube(panel, seed=21, blood_volume_ul=2.0)
    path = write_tube(tube, tmp_path / "x.fcs")
    truth = json.loads((tmp_path / "truth" / "x.json").read_text())
    labels = np.load(tmp_path / "truth" / "x.labels.npy")
    assert labels.dtype == np.uint8 and labels.shape == (tube.n_events,)
    np.testing.assert_array_equal(labels, tube.labels)
    assert truth["file"] == path.name and truth["panel"] == panel and truth["seed"] == 21
    assert truth["label_names"] == list(LABEL_NAMES)
    names = truth["label_names"]
    counts = {n: int((labels == i).sum()) for i, n in enumerate(names)}
    assert truth["label_counts"] == counts
    assert sum(counts.values()) == truth["n_events"] == tube.n_events

    se = truth["singlet_events"]
    assert se["b_cells"] == counts["b_cell"]
    assert se["nk_cells"] == counts["nk_cell"]
    assert se["cd4_t"] == counts["cd4_t"] + counts["car_cd4_t"]
    assert se["cd8_t"] == counts["cd8_t"] + counts["car_cd8_t"]
    assert se["t_cells"] == se["cd4_t"] + se["cd8_t"]
    assert se["lymphocytes"] == se["t_cells"] + se["b_cells"] + se["nk_cells"]
    assert se["leukocytes"] == se["lymphocytes"] + se["monocytes"] + se["granulocytes"]
    assert truth["bead_events_singlet"] == counts["bead"]
    assert truth["bead_events_doublet"] == counts["bead_doublet"]
    assert sum(truth["doublet_composition"].values()) == counts["doublet"] + counts["bead_doublet"]
    assert truth["doublet_composition"].get("bead+bead", 0) == counts["bead_doublet"]
    # every particle is either a singlet or half of a doublet
    assert sum(truth["particles"].values()) == tube.n_events + counts["doublet"] + counts["bead_doublet"]

    c = truth["concentrations_per_ul"]
    assert c["lymphocytes"] == pytest.approx(c["t_cells"] + c["b_cells"] + c["nk_cells"])
    assert c["t_cells"] == pytest.approx(c["cd4_t"] + c["cd8_t"])
    assert c["leukocytes"] == pytest.approx(c["lymphocytes"] + c["monocytes"] + c["granulocytes"])
    if panel == "car":
        assert se["car_t"] == counts["car_cd4_t"] + counts["car_cd8_t"]
        assert c["car_t"] == pytest.approx(c["car_cd4_t"] + c["car_cd8_t"])
        assert counts["dead_cell"] > 0
    else:
        assert "car_t" not in c and counts["dead_cell"] == 0 and counts["car_cd4_t"] == 0
    for key in ("beads_per_test", "sample_volume_ul", "blood_volume_ul", "dilution_factor",
                "doublet_rate", "gains", "marker_style", "detector_style"):
        assert key in truth


def test_concentration_validation():
    c = default_concentrations("tbnk")
    c["b_cells"] = 3.0  # lymphocytes no longer the sum of its parts
    with pytest.raises(ValueError, match="lymphocytes"):
        simulate_tube("tbnk", concentrations=c)
    with pytest.raises(ValueError, match="CAR"):
        default_concentrations("tbnk", car_t=5)
    leaves = {k: v for k, v in c.items() if k not in ("lymphocytes", "leukocytes", "t_cells")}
    tube = simulate_tube("tbnk", seed=1, blood_volume_ul=0.2, concentrations=leaves)
    assert tube.truth["concentrations_per_ul"]["b_cells"] == 3.0


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------

def test_event_counts_match_concentrations():
    p = 0.03
    singlet = (1 - p) / (1 + p)  # ~ 1 - 2p
    vol = 10.0
    conc = default_concentrations("car", b_cells=40, car_t=80)
    tube = simulate_tube("car", seed=5, blood_volume_ul=vol, concentrations=conc, doublet_rate=p,
                         beads_per_test=50000, sample_volume_ul=50)
    se = tube.truth["singlet_events"]
    for pop, observed in (("b_cells", se["b_cells"]), ("car_t", se["car_t"]),
                          ("lymphocytes", se["lymphocytes"])):
        expected = conc[pop] * vol * singlet
        # Poisson count, a little extra spread from the doublet draw
        assert abs(observed - expected) < 4.5 * np.sqrt(expected) + 2, (pop, observed, expected)
    beads_expected = 50000 / 50 * vol * singlet
    assert abs(tube.truth["bead_events_singlet"] - beads_expected) < 4.5 * np.sqrt(beads_expected)
    # the bead-ratio estimate recovers the concentration
    est = se["lymphocytes"] / tube.truth["bead_events_singlet"] * 50000 / 50
    assert est == pytest.approx(conc["lymphocytes"], rel=0.06)
    # debris is about debris_fraction of the events
    frac = tube.truth["label_counts"]["debris"] / tube.n_events
    assert 0.035 < frac < 0.065


def test_doublets_have_low_height_to_area():
    tube = simulate_tube("tbnk", seed=8, blood_volume_ul=3.0, doublet_rate=0.05)
    a = tube.events[:, tube.pnn.index("FSC-A")]
    h = tube.events[:, tube.pnn.index("FSC-H")]
    ratio = h / np.maximum(a, 1)
    cells = np.isin(tube.labels, [CODE["cd4_t"], CODE["cd8_t"], CODE["granulocyte"]])
    dbl = tube.labels == CODE["doublet"]
    assert np.median(ratio[cells]) == pytest.approx(0.9, abs=0.03)
    assert np.median(ratio[dbl]) < 0.75
    assert tube.truth["bead_events_doublet"] > 0
    assert 0.03 < dbl.mean() < 0.07


def test_beads_bright_and_tight():
    tube = simulate_tube("car", seed=9, blood_volume_ul=1.0)
    fl, _, _ = _fluor(tube)
    beads = fl[tube.labels == CODE["bead"]]
    med = np.median(beads, axis=0)
    assert np.all((med > 5e4) & (med < 1.5e5))
    cv = beads.std(axis=0) / beads.mean(axis=0)
    assert np.all(cv < 0.07)
    fsc = tube.events[:, tube.pnn.index("FSC-A")]
    lymph = np.isin(tube.labels, [CODE["cd4_t"], CODE["cd8_t"]])
    assert np.median(fsc[tube.labels == CODE["bead"]]) < 0.6 * np.median(fsc[lymph])


# ---------------------------------------------------------------------------
# spillover and noise
# ---------------------------------------------------------------------------

def test_compensation_undoes_spillover():
    k = len(PANELS["tbnk"])
    strong = np.eye(k)
    strong[4, 0] = 0.3   # APC (CD19) -> FITC (CD3): strong spill into FITC
    strong[0, 1] = 0.25  # FITC -> PE
    gains = {"FITC": 1.3, "APC": 0.8}
    tube = simulate_tube("tbnk", seed=12, blood_volume_ul=2.0, spillover=strong, gains=gains,
                         concentrations=default_concentrations("tbnk", b_cells=300),
                         shuffle_channels=True)
    raw, s, names = _fluor(tube)
    np.testing.assert_array_equal(s, tube.truth["spillover"]["matrix"])
    comp = raw @ np.linalg.inv(s)
    fitc = names.index("FITC-A")
    b = tube.labels == CODE["b_cell"]  # CD3- lymphocytes, bright in APC
    assert np.median(raw[b, fitc]) > 1500          # spill makes them look CD3+
    assert abs(np.median(comp[b, fitc])) < 600     # autofluorescence + noise after comp
    # exact: compensated = gain-scaled true signal + noise @ inv(S)
    unclipped = np.all(raw < 262143, axis=1)
    resid = comp[unclipped] - tube.signal[unclipped]
    assert np.all(np.abs(np.median(resid, axis=0)) < 10)
    assert np.all(resid.std(axis=0) < 150)
    assert tube.truth["gains"]["FITC"] == 1.3 and tube.truth["gains"]["PE"] == 1.0


def test_default_spill_moves_fitc_into_pe():
    tube = simulate_tube("tbnk", seed=13, blood_volume_ul=1.0)
    raw, s, names = _fluor(tube)
    assert 0.16 <= s[names.index("FITC-A"), names.index("PE-A")] <= 0.24
    comp = raw @ np.linalg.inv(s)
    t = np.isin(tube.labels, [CODE["cd4_t"], CODE["cd8_t"]])  # CD3 FITC+, CD16+56 PE-
    pe = names.index("PE-A")
    assert np.median(raw[t, pe]) > 1000
    assert np.median(comp[t, pe]) < 400


def test_values_near_zero_go_negative():
    tube = simulate_tube("tbnk", seed=14, blood_volume_ul=1.0)
    raw, _, _ = _fluor(tube)
    assert np.all((raw < 0).any(axis=0))   # every detector has some negative events
    assert raw.max() <= 262143
    scatter = tube.events[:, [tube.pnn.index(n) for n in ("FSC-A", "FSC-H", "SSC-A")]]
    assert scatter.min() >= 0
    time = tube.events[:, tube.pnn.index("Time")]
    assert np.all(np.diff(time) >= 0) and time[-1] > time[0]


def test_car_signal_overlaps_negatives():
    tube = simulate_tube("car", seed=15, blood_volume_ul=4.0,
                         concentrations=default_concentrations("car", car_t=300))
    raw, s, names = _fluor(tube)
    comp = raw @ np.linalg.inv(s)
    pe = names.index("PE-A")
    neg = comp[np.isin(tube.labels, [CODE["cd4_t"], CODE["cd8_t"]]), pe]
    pos = comp[np.isin(tube.labels, [CODE["car_cd4_t"], CODE["car_cd8_t"]]), pe]
    inside = np.mean(pos < np.percentile(neg, 99.5))
    assert 0.02 < inside < 0.15
    dead = tube.labels == CODE["dead_cell"]
    via = names.index("PerCP-Cy5-5-A")
    assert np.median(comp[dead, via]) > 20 * np.median(comp[~dead & (tube.labels >= 4), via])


# ---------------------------------------------------------------------------
# sample set, CLI, docstrings
# ---------------------------------------------------------------------------

def test_make_sample_set(tmp_path):
    paths = make_sample_set(tmp_path, seed=2026)
    assert len(paths) == 14
    with open(tmp_path / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["file", "subject_id", "visit", "study_day", "tube",
                             "beads_per_test", "sample_volume_ul", "comment"]
    assert [r["file"] for r in rows] == [p.name for p in paths]
    assert {r["tube"] for r in rows} == {"TBNK", "CAR"}
    keywords = set()
    for r in rows:
        truth = json.loads((tmp_path / "truth" / (r["file"][:-4] + ".json")).read_text())
        assert truth["beads_per_test"] == float(r["beads_per_test"])
        text = flowio.FlowData(str(tmp_path / r["file"])).text
        keywords |= {"spillover", "spill", "comp"} & set(text)
    assert keywords == {"spillover", "spill", "comp"}
    size = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert size <= 9_000_000


def test_cli_tube(tmp_path):
    out = tmp_path / "cli.fcs"
    assert simulate.main(["tube", str(out), "--panel", "tbnk", "--b-cells", "12", "--seed", "3",
                          "--blood-volume", "0.5", "--detector-style", "fl"]) == 0
    truth = json.loads((tmp_path / "truth" / "cli.json").read_text())
    assert truth["concentrations_per_ul"]["b_cells"] == 12.0 and truth["seed"] == 3
    assert "FL5-A" in flowkit.Sample(out).pnn_labels


def test_docstring_examples():
    result = doctest.testmod(simulate, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 5
