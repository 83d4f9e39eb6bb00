"""Tests of the seeded FCS simulator (the project's accuracy oracle)."""
import csv
import doctest
import json
from pathlib import Path

import flowio
import flowkit
import numpy as np
import pytest

from cytometry.simulation import simulate
from cytometry.simulation.simulate import (
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
# less ideal tubes (opt-in realism options)
# ---------------------------------------------------------------------------

def _compensated(tube):
    raw, s, names = _fluor(tube)
    return raw @ np.linalg.inv(s), names


def _robust_sd(values):
    low, high = np.percentile(values, [15.87, 84.13])
    return (high - low) / 2


def _labels(tube, *names):
    return np.isin(tube.labels, [CODE[n] for n in names])


def test_photon_noise_spreads_bright_t_cells_after_compensation():
    spread = {}
    for photon_noise in (False, True):
        tube = simulate_tube("tbnk", seed=31, blood_volume_ul=3.0, photon_noise=photon_noise)
        comp, names = _compensated(tube)
        pe, apc = names.index("PE-A"), names.index("APC-A")
        t = _labels(tube, "cd4_t", "cd8_t")
        spread[photon_noise] = {
            # CD16+56 (PE) of CD3 FITC-bright T cells vs CD3- CD16/56- B cells
            "pe_t": _robust_sd(comp[t, pe]), "pe_b": _robust_sd(comp[_labels(tube, "b_cell"), pe]),
            # CD19 (APC) of CD8 APC-Cy7-bright T cells vs CD8- (CD4) T cells
            "apc_cd8": _robust_sd(comp[_labels(tube, "cd8_t"), apc]),
            "apc_cd4": _robust_sd(comp[_labels(tube, "cd4_t"), apc]),
            "apc_t": _robust_sd(comp[t, apc]),
            "pe_t_median": float(np.median(comp[t, pe])),
        }
    off, on = spread[False], spread[True]
    # without photon statistics every negative is electronic noise + autofluorescence
    assert off["pe_t"] < 1.15 * off["pe_b"]
    assert off["apc_cd8"] < 1.1 * off["apc_cd4"]
    # with it, the T cells' compensated negatives are broad where their light spills
    assert on["pe_t"] > 1.7 * on["pe_b"], on
    assert on["pe_t"] > 2.5 * off["pe_t"]
    assert on["apc_cd8"] > 1.15 * on["apc_cd4"], on
    assert on["apc_t"] > 3 * off["apc_t"]
    # spreading widens, it does not shift: compensation stays unbiased
    assert abs(on["pe_t_median"] - off["pe_t_median"]) < 40


def test_photon_noise_is_poisson_in_photoelectrons():
    gains = {"PE": 2.0}
    tube = simulate_tube("tbnk", seed=32, blood_volume_ul=2.0, photon_noise=True, gains=gains,
                         photoelectrons_per_unit={"FITC": 0.1})
    comp, names = _compensated(tube)
    yields = tube.truth["realism"]["photoelectrons_per_unit"]
    assert yields["FITC-A"] == pytest.approx(0.1)          # override
    assert yields["PE-A"] == pytest.approx(simulate.PHOTOELECTRONS_PER_UNIT["PE"] / 2.0)  # after the gain
    # beads: residual variance in a detector = its light / yield + electronic noise^2
    raw, s, _ = _fluor(tube)
    beads = tube.labels == CODE["bead"]
    expected_light = (tube.signal @ s)[beads]
    for j, name in enumerate(names):
        resid = raw[beads, j] - expected_light[:, j]
        predicted = np.sqrt(expected_light[:, j].mean() / yields[name] + tube.truth["noise_sd"][name] ** 2)
        assert resid.std() == pytest.approx(predicted, rel=0.15), name
        assert abs(resid.mean()) < 4 * predicted / np.sqrt(beads.sum())
    assert tube.truth["realism"]["photon_noise"] is True
    assert simulate_tube("tbnk", seed=32, blood_volume_ul=0.2).truth["realism"]["photoelectrons_per_unit"] is None


def test_nkt_cells_are_t_cells_not_nk_in_truth(tmp_path):
    plain = simulate_tube("tbnk", seed=33, blood_volume_ul=4.0)
    tube = simulate_tube("tbnk", seed=33, blood_volume_ul=4.0, nkt_fraction=0.05)
    write_tube(tube, tmp_path / "nkt.fcs")
    truth = json.loads((tmp_path / "truth" / "nkt.json").read_text())
    c, se, counts = truth["concentrations_per_ul"], truth["singlet_events"], truth["label_counts"]
    # taken out of the T cells, not added: t_cells and lymphocytes unchanged
    assert c["t_cells"] == pytest.approx(plain.truth["concentrations_per_ul"]["t_cells"])
    assert c["nkt_cells"] == pytest.approx(0.05 * c["t_cells"])
    assert c["nkt_cd8_t"] > c["nkt_cd4_t"] > 0              # mostly CD8+
    nkt = counts["nkt_cd4_t"] + counts["nkt_cd8_t"]
    assert nkt > 50 and se["nkt_cells"] == nkt
    assert se["t_cells"] == counts["cd4_t"] + counts["cd8_t"] + nkt
    assert se["cd8_t"] == counts["cd8_t"] + counts["nkt_cd8_t"]
    assert se["nk_cells"] == counts["nk_cell"]
    for label in ("nkt_cd4_t", "nkt_cd8_t"):
        assert {"t_cells", "lymphocytes", "leukocytes"} <= set(truth["label_populations"][label])
        assert "nk_cells" not in truth["label_populations"][label]
    assert truth["label_populations"]["nkt_cd4_t"].count("cd4_t") == 1
    # phenotype: CD3+ like T cells and CD16/56+ like NK cells
    comp, names = _compensated(tube)
    is_nkt, t = _labels(tube, "nkt_cd4_t", "nkt_cd8_t"), _labels(tube, "cd4_t", "cd8_t")
    cd3, cd16 = names.index("FITC-A"), names.index("PE-A")
    assert np.median(comp[is_nkt, cd3]) > 0.5 * np.median(comp[t, cd3])
    assert np.median(comp[is_nkt, cd16]) > 5 * np.percentile(comp[t, cd16], 95)
    with pytest.raises(ValueError, match="nkt_fraction"):
        simulate_tube("tbnk", nkt_fraction=0.5)


def test_nk_continuum_has_cd56_bright_and_cd8_dim_subsets():
    share_dim, cd8_share = {}, {}
    for continuum in (False, True):
        tube = simulate_tube("tbnk", seed=34, blood_volume_ul=5.0, nk_continuum=continuum,
                             concentrations=default_concentrations("tbnk", nk_cells=300))
        assert tube.truth["realism"]["nk_continuum"] is continuum
        comp, names = _compensated(tube)
        nk = comp[tube.labels == CODE["nk_cell"]]
        cd16 = nk[:, names.index("PE-A")]
        share_dim[continuum] = float(np.mean(cd16 < 2500))        # CD56-bright CD16-dim lie here
        cd8_share[continuum] = float(np.mean(nk[:, names.index("APC-Cy7-A")] > 700))
    assert share_dim[False] < 0.05 and 0.08 < share_dim[True] < 0.25, share_dim
    assert 0.2 < cd8_share[True] < 0.45                          # a CD8-dim subset remains


def test_rbc_ghosts_cd45_negative_with_lymphocyte_scatter():
    tube = simulate_tube("tbnk", seed=35, blood_volume_ul=2.0, rbc_ghost_fraction=0.4)
    truth = tube.truth
    ghosts = tube.labels == CODE["rbc_ghost"]
    assert 0.33 < ghosts.mean() < 0.43                           # ~40 % of events (doublets take some)
    assert truth["label_counts"]["debris"] / tube.n_events == pytest.approx(0.05, abs=0.015)
    assert truth["singlet_events"]["debris"] == ghosts.sum() + truth["label_counts"]["debris"]
    assert truth["singlet_events"]["leukocytes"] == sum(
        truth["label_counts"][lab] for lab in truth["population_labels"]["leukocytes"])
    assert "leukocytes" not in truth["label_populations"]["rbc_ghost"]
    comp, names = _compensated(tube)
    cd45 = comp[:, names.index("PerCP-Cy5-5-A")]
    lymph = _labels(tube, "cd4_t", "cd8_t", "b_cell", "nk_cell")
    assert np.median(cd45[ghosts]) < 0.05 * np.median(cd45[lymph])   # CD45-negative
    assert np.percentile(cd45[ghosts], 95) < np.percentile(cd45[lymph], 1)
    # ... but their scatter overlaps the lymphocytes' (unlike the small debris)
    fsc, ssc = (tube.events[:, tube.pnn.index(n)] for n in ("FSC-A", "SSC-A"))

    def inside_lymphocyte_box(mask):
        f_lo, f_hi = np.percentile(fsc[lymph], [5, 95])
        s_lo, s_hi = np.percentile(ssc[lymph], [5, 95])
        return np.mean((fsc[mask] > f_lo) & (fsc[mask] < f_hi) & (ssc[mask] > s_lo) & (ssc[mask] < s_hi))

    # a CD45-negative cluster about a third the size of the lymphocytes inside their scatter region
    assert inside_lymphocyte_box(ghosts) * ghosts.sum() > 0.2 * inside_lymphocyte_box(lymph) * lymph.sum()
    assert inside_lymphocyte_box(tube.labels == CODE["debris"]) < 0.05
    assert np.percentile(ssc[ghosts], 95) > np.percentile(ssc[tube.labels == CODE["monocyte"]], 10)


def test_basophils_and_eosinophils_phenotype_and_truth():
    conc = default_concentrations("tbnk", basophils=150, eosinophils=600, granulocytes=2600)
    tube = simulate_tube("tbnk", seed=36, blood_volume_ul=3.0, concentrations=conc)
    truth, c = tube.truth, tube.truth["concentrations_per_ul"]
    assert c["leukocytes"] == pytest.approx(c["lymphocytes"] + c["monocytes"] + c["granulocytes"] + 150)
    assert c["granulocytes"] == 2600 and c["eosinophils"] == 600     # eosinophils are granulocytes
    lp = truth["label_populations"]
    assert "leukocytes" in lp["basophil"] and not {"lymphocytes", "granulocytes"} & set(lp["basophil"])
    assert {"leukocytes", "granulocytes"} <= set(lp["eosinophil"]) and "lymphocytes" not in lp["eosinophil"]
    se, counts = truth["singlet_events"], truth["label_counts"]
    assert se["granulocytes"] == counts["granulocyte"] + counts["eosinophil"]
    # neutrophil particles are the granulocytes less the eosinophils
    assert truth["particles"]["granulocyte"] == pytest.approx(2000 * 3.0, rel=0.1)

    comp, names = _compensated(tube)
    col = {m: names.index(detector_name(f)) for m, _, f in PANELS["tbnk"]}
    ssc = tube.events[:, tube.pnn.index("SSC-A")]
    baso, eos = tube.labels == CODE["basophil"], tube.labels == CODE["eosinophil"]
    lymph, neut = _labels(tube, "cd4_t", "cd8_t", "b_cell", "nk_cell"), tube.labels == CODE["granulocyte"]
    t = _labels(tube, "cd4_t", "cd8_t")
    med = lambda mask, marker: float(np.median(comp[mask, col[marker]]))  # noqa: E731
    # basophils: CD45 dimmer than lymphocytes, low SSC like them, CD3- CD19- CD16/56-
    assert med(baso, "CD45") < 0.6 * med(lymph, "CD45")
    assert np.median(ssc[baso]) < 1.6 * np.median(ssc[lymph])
    assert med(baso, "CD3") < 0.1 * med(t, "CD3")
    assert med(baso, "CD19") < 0.1 * med(tube.labels == CODE["b_cell"], "CD19")
    assert med(baso, "CD16+56") < 0.1 * med(tube.labels == CODE["nk_cell"], "CD16+56")
    # eosinophils: SSC above neutrophils, CD45 brighter than neutrophils, CD16-negative
    assert np.median(ssc[eos]) > 1.2 * np.median(ssc[neut])
    assert med(eos, "CD45") > 1.5 * med(neut, "CD45")
    assert med(eos, "CD16+56") < 0.1 * med(neut, "CD16+56")


def test_marker_continua_bridge_positive_and_negative_modes():
    between = {}
    for continua in (False, True):
        tube = simulate_tube("tbnk", seed=37, blood_volume_ul=3.0, marker_continua=continua)
        comp, names = _compensated(tube)
        cd8 = comp[tube.labels == CODE["cd8_t"], names.index("APC-Cy7-A")]
        cd4 = comp[tube.labels == CODE["cd4_t"], names.index("PE-Cy7-A")]
        cd19 = comp[tube.labels == CODE["b_cell"], names.index("APC-A")]
        cd16_mono = comp[tube.labels == CODE["monocyte"], names.index("PE-A")]
        between[continua] = (np.mean((cd8 > 800) & (cd8 < 5000)), np.mean((cd4 > 800) & (cd4 < 4500)),
                             np.mean((cd19 > 500) & (cd19 < 3500)), np.mean(cd16_mono > 1500))
    off, on = between[False], between[True]
    assert on[0] > 0.12 and off[0] < 0.03       # CD8-dim T
    assert on[1] > 0.03 and off[1] < 0.01       # CD4-dim T
    assert on[2] > 0.06 and off[2] < 0.02       # CD19-dim B
    assert on[3] > 0.07 and off[3] < 0.01       # CD16+ monocytes


def test_realism_options_are_seeded_and_validated():
    kw = dict(blood_volume_ul=0.5, photon_noise=True, nk_continuum=True, nkt_fraction=0.04,
              rbc_ghost_fraction=0.2, marker_continua=True,
              concentrations=default_concentrations("car", basophils=30, eosinophils=100))
    a, b = simulate_tube("car", seed=38, **kw), simulate_tube("car", seed=38, **kw)
    np.testing.assert_array_equal(a.events, b.events)
    assert a.truth == b.truth
    with pytest.raises(ValueError, match="rbc_ghost_fraction"):
        simulate_tube("tbnk", debris_fraction=0.6, rbc_ghost_fraction=0.4)
    with pytest.raises(ValueError, match="photon_noise"):
        simulate_tube("tbnk", photoelectrons_per_unit={"PE": 0.1})
    with pytest.raises(ValueError, match="fluorochrome"):
        simulate_tube("tbnk", photon_noise=True, photoelectrons_per_unit={"BV421": 0.1})
    with pytest.raises(ValueError, match="eosinophils"):
        default_concentrations("tbnk", granulocytes=100, eosinophils=200) and simulate_tube(
            "tbnk", concentrations=default_concentrations("tbnk", granulocytes=100, eosinophils=200))


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
    # The realism options are opt-in: the defaults still write the committed
    # sample set byte for byte, with the same event labels.
    committed = Path(__file__).resolve().parents[1] / "sample_fcs"
    for p in paths:
        assert p.read_bytes() == (committed / p.name).read_bytes(), p.name
        np.testing.assert_array_equal(np.load(tmp_path / "truth" / f"{p.stem}.labels.npy"),
                                      np.load(committed / "truth" / f"{p.stem}.labels.npy"))


def test_cli_tube(tmp_path):
    out = tmp_path / "cli.fcs"
    assert simulate.main(["tube", str(out), "--panel", "tbnk", "--b-cells", "12", "--seed", "3",
                          "--blood-volume", "0.5", "--detector-style", "fl"]) == 0
    truth = json.loads((tmp_path / "truth" / "cli.json").read_text())
    assert truth["concentrations_per_ul"]["b_cells"] == 12.0 and truth["seed"] == 3
    assert "FL5-A" in flowkit.Sample(out).pnn_labels
    assert truth["realism"]["photon_noise"] is False
    real = tmp_path / "real.fcs"
    assert simulate.main(["tube", str(real), "--seed", "3", "--blood-volume", "0.5", "--photon-noise",
                          "--nkt-fraction", "0.05", "--rbc-ghost-fraction", "0.3", "--basophils", "50"]) == 0
    truth = json.loads((tmp_path / "truth" / "real.json").read_text())
    assert truth["realism"]["photon_noise"] and truth["realism"]["nkt_fraction"] == 0.05
    assert truth["label_counts"]["rbc_ghost"] > 0 and truth["concentrations_per_ul"]["basophils"] == 50


def test_docstring_examples():
    result = doctest.testmod(simulate, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 5
