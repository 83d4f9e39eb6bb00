"""Every gate checks itself: a gate on the wrong cluster or outside the data is ``unreliable``.

Each failure mode is produced by breaking one step of the real engine (a
step method wrapped to misbehave the way a fragile gating does) and running
the whole analysis, so the test sees what a user would: the population's
count shown with ``reliable: false`` and the reason, the verdict ``qc_fail``.
"""
from dataclasses import replace

import numpy as np
import pytest

from cytometry.analysis import AnalysisOptions, analyze_file, gate_file
from gating import engine
from gating.engine import StepMethod, positive_cut, significant_modes, smoothed_density, verify_gating
from gating.flags import Flag, unreliable_populations
from gating.geometry import Dimension

OPTIONS = AnalysisOptions(beads_per_test=50120.0, sample_volume_ul=50.0)


@pytest.fixture
def screening(sample_dir):
    return sample_dir / "S01_screening_TBNK.fcs"


def _wrap_step(monkeypatch, name, after):
    """Replace step method ``name`` by one that runs it and then calls ``after(context, step)``."""
    original = engine.STEP_METHODS[name]

    def broken(context, step):
        original.function(context, step)
        after(context, step)

    monkeypatch.setitem(engine.STEP_METHODS, name, StepMethod(broken, original.side))


def _replace_gate(context, name, gate):
    index = next(i for i, g in enumerate(context.gates) if g.name == name)
    context.gates[index] = gate
    context.masks[name] = engine.gate_contains(gate, context.data, context.channels, context.masks)


def test_good_tube_has_no_failing_check(screening):
    result = analyze_file(screening, options=OPTIONS)
    assert not [f for f in result["flags"] if f["severity"] == "fail"]
    assert all(entry["reliable"] for entry in result["populations"].values())
    assert result["eligibility"]["verdict"] == "eligible"


def test_swapped_lymphocyte_and_granulocyte_clusters_fail(monkeypatch, screening):
    """Population names by component order: the granulocyte cluster called lymphocytes."""
    def swap(context, step):
        lymph, gran = context.gate("lymphocytes"), context.gate("granulocytes")
        _replace_gate(context, "lymphocytes", replace(gran, name="lymphocytes"))
        _replace_gate(context, "granulocytes", replace(lymph, name="granulocytes"))

    _wrap_step(monkeypatch, "leukocyte_classes", swap)
    result = analyze_file(screening, options=OPTIONS)
    codes = {f["code"] for f in result["flags"] if f["severity"] == "fail" and f["population"] == "lymphocytes"}
    assert {"phenotype_position", "lymphocytes_miss_t_cells"} <= codes
    for name in ("lymphocytes", "t_cells", "b_cells", "cd4_t"):
        assert result["populations"][name]["reliable"] is False
        assert result["populations"][name]["unreliable_reasons"]
    assert result["populations"]["b_cells"]["events"] >= 0  # the count is still shown
    assert result["eligibility"]["verdict"] == "qc_fail"
    assert any("wrong cluster" in reason for reason in result["eligibility"]["reasons"])


def test_cut_above_every_event_fails(monkeypatch, screening):
    """A CD19 cut above every event (mean + k·SD of a spread-out reference) is caught."""
    def too_high(context, step):
        if step.population == "b_cells":
            gate = context.gate("b_cells")
            values = context.values("CD19")[context.masks["cd3_negative"]]
            dims = [Dimension("CD19", "logicle", float(values.max()) + 0.05, None)]
            _replace_gate(context, "b_cells", replace(gate, dimensions=dims))

    _wrap_step(monkeypatch, "positive", too_high)
    result = analyze_file(screening, options=OPTIONS)
    assert result["populations"]["b_cells"]["events"] == 0
    flags = [f for f in result["flags"] if f["population"] == "b_cells" and f["code"] == "cut_outside_data"]
    assert flags and flags[0]["severity"] == "fail"
    assert result["populations"]["b_cells"]["reliable"] is False
    assert any("cut" in reason for reason in result["populations"]["b_cells"]["unreliable_reasons"])
    # Populations above the bad gate keep their standing (the lymphosum check,
    # which this B-cell loss also trips, marks the lymphocytes' subtree).
    assert result["populations"]["leukocytes"]["reliable"] is True
    assert result["eligibility"]["verdict"] == "qc_fail"


def test_cut_below_the_negatives_mode_fails(screening):
    gated = gate_file(screening)
    masks, gates = dict(gated.gating.masks), list(gated.gating.gates)
    index = next(i for i, g in enumerate(gates) if g.name == "b_cells")
    values = gated.data[masks["cd3_negative"], gated.channels["CD19"]]
    gates[index] = replace(gates[index], dimensions=[Dimension("CD19", "logicle", float(np.min(values)), None)])
    codes = [f.code for f in verify_gating(gated.data, gated.channels, masks, gates) if f.population == "b_cells"]
    assert codes == ["cut_outside_data"]


def test_lymphocyte_gate_missing_most_t_cells_fails(monkeypatch, screening):
    """A lymphocyte gate drawn beside the T cells (here: only its CD3-negative part)."""
    def miss(context, step):
        gate = context.gate("lymphocytes")
        cd3 = context.values("CD3")[context.masks["lymphocytes"]]
        cut, _ = positive_cut(cd3)
        _replace_gate(context, "lymphocytes", replace(gate, dimensions=gate.dimensions +
                                                       [Dimension("CD3", "logicle", None, cut)]))

    _wrap_step(monkeypatch, "leukocyte_classes", miss)
    result = analyze_file(screening, options=OPTIONS)
    codes = {f["code"] for f in result["flags"] if f["severity"] == "fail"}
    assert "lymphocytes_miss_t_cells" in codes
    assert result["populations"]["b_cells"]["reliable"] is False
    assert result["eligibility"]["verdict"] == "qc_fail"


def test_lymphocyte_gate_on_debris_fails(screening):
    """Lineage-negative events in the lymphocyte gate (debris named lymphocytes) are caught."""
    gated = gate_file(screening)
    masks = dict(gated.gating.masks)
    masks["lymphocytes"] = masks["cd45_negative"] | masks["lymphocytes"] & (np.arange(masks["lymphocytes"].size) % 10 == 0)
    codes = {f.code for f in verify_gating(gated.data, gated.channels, masks, gated.gating.gates)}
    assert "lymphocytes_lineage_negative" in codes


def test_unreliable_reaches_every_population_below():
    parents = {"leukocytes": "singlets", "singlets": None, "lymphocytes": "leukocytes", "t_cells": "lymphocytes",
               "cd3_negative": "lymphocytes", "b_cells": "cd3_negative", "monocytes": "leukocytes"}
    bad = unreliable_populations([Flag("lymphocytes", "x", "fail", "wrong"), Flag("monocytes", "y", "warning", "w")],
                                 parents)
    assert set(bad) == {"lymphocytes", "t_cells", "cd3_negative", "b_cells"}
    assert bad["b_cells"] == ["lymphocytes: wrong"]


def test_valley_significance_is_poisson_noise():
    """A dip that deep arises by chance: no valley; a real gap: a valley (same rule for any data)."""
    rng = np.random.default_rng(3)
    one_mode = rng.normal(0.3, 0.05, 20000)
    counts, centers, sigma = smoothed_density(one_mode)
    assert len(significant_modes(counts, sigma)[0]) == 1
    two = np.concatenate([one_mode, rng.normal(0.6, 0.05, 400)])
    counts, centers, sigma = smoothed_density(two)
    assert len(significant_modes(counts, sigma)[0]) == 2


def test_absent_positives_read_zero_not_the_upper_half_of_the_negatives():
    """"A threshold always splits something": without positives the cut lies in the negatives' own tail."""
    rng = np.random.default_rng(5)
    for n in (200, 2000, 20000):
        negatives = rng.normal(0.25, 0.04, n)
        cut, info = positive_cut(negatives)
        assert info["method"] == "negative tail"
        assert (negatives >= cut).sum() <= 2


def test_spillover_spread_negatives_do_not_hide_the_positives():
    """Negatives widened and two-lobed by spreading (as T cells in CD19 after compensation): the valley is used."""
    rng = np.random.default_rng(11)
    spread_negatives = np.concatenate([rng.normal(0.22, 0.06, 6000), rng.normal(0.34, 0.05, 2000)])
    positives = rng.normal(0.62, 0.04, 600)
    cut, info = positive_cut(np.concatenate([spread_negatives, positives]))
    assert info["method"] == "valley"
    assert (positives >= cut).mean() > 0.99 and (spread_negatives >= cut).mean() < 0.005


@pytest.mark.gpu
def test_population_finding_kernels_match_on_gpu():
    """The cuts and the 2-D myeloid split are the same on CuPy as on NumPy."""
    cupy = pytest.importorskip("cupy")
    from gating.engine import split_in_plane

    rng = np.random.default_rng(21)
    values = np.concatenate([rng.normal(0.25, 0.05, 8000), rng.normal(0.65, 0.05, 900)])
    cpu_cut, cpu_info = positive_cut(values)
    gpu_cut, gpu_info = positive_cut(values, xp=cupy)
    assert gpu_info["method"] == cpu_info["method"] == "valley"
    assert gpu_cut == pytest.approx(cpu_cut, abs=1e-9)
    tail = rng.normal(0.25, 0.05, 5000)
    assert positive_cut(tail, xp=cupy)[0] == pytest.approx(positive_cut(tail)[0], abs=1e-9)
    points = np.vstack([rng.normal([0.6, 0.2], 0.05, (3000, 2)), rng.normal([0.5, 0.6], 0.05, (6000, 2))])
    cpu_split, gpu_split = split_in_plane(points), split_in_plane(points, xp=cupy)
    np.testing.assert_allclose(gpu_split[0], cpu_split[0], rtol=1e-6)
    assert gpu_split[1] == pytest.approx(cpu_split[1], rel=1e-6)


def test_gating_on_the_cpu_device_is_deterministic(screening):
    """Same file, same counts, every run (the kernels are seeded and order-free)."""
    first, second = gate_file(screening), gate_file(screening)
    for name in first.gating.populations:
        assert np.array_equal(first.gating.masks[name], second.gating.masks[name]), name


def test_lymphocytes_without_a_lineage_anchor_are_unreliable(screening):
    """CD3 and CD19 stains failed: the lymphocytes cannot be named by phenotype, and say so."""
    from gating import auto_gate

    gated = gate_file(screening)
    data = gated.data.copy()
    rng = np.random.default_rng(0)
    for marker in ("CD3", "CD19"):
        data[:, gated.channels[marker]] = rng.normal(0.2, 0.03, len(data))
    result = auto_gate(data, gated.channels, gated.panel.definition)
    assert any(f.code == "no_lineage_anchor" and f.fails for f in result.flags)
    assert {"lymphocytes", "t_cells", "b_cells", "nk_cells"} <= set(result.unreliable)
