"""The Python API a notebook user meets: top-level names, tables, short reprs (issue 14, item 4)."""
import pytest

import cytometry


def test_the_entry_points_are_importable_from_the_package():
    for name in ("read_fcs", "gate_file", "analyze_file", "run_batch", "ResultStore", "AnalysisOptions"):
        assert callable(getattr(cytometry, name)), name
    assert set(cytometry.__all__) >= {"read_fcs", "gate_file", "analyze_file", "run_batch", "ResultStore"}
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        cytometry.no_such_name


def test_tables_agree_with_the_gating_and_the_result(sample_dir):
    options = cytometry.AnalysisOptions(beads_per_test=50120, sample_volume_ul=50)
    gated = cytometry.gate_file(sample_dir / "S01_screening_TBNK.fcs", options)
    events = gated.to_dataframe()
    assert len(events) == gated.data.shape[0]
    assert {"CD3", "CD19", "FSC-A"} <= set(events.columns)
    for population in gated.gating.populations:
        assert events[population].dtype == bool
        assert int(events[population].sum()) == gated.gating.events(population)
    result = cytometry.analyze_gated(gated, options=options)
    stats = gated.stats(result)
    assert list(stats.index) == gated.gating.populations
    for population, row in stats.iterrows():
        entry = result["populations"][population]
        assert row["events"] == entry["events"] and row["parent"] == entry["parent"]
        assert row["cells_per_ul"] == pytest.approx(entry["cells_per_ul"])
        assert row["pct_of_total"] == pytest.approx(100 * entry["events"] / gated.data.shape[0])
        if entry["pct_of_parent"] is not None:
            assert row["pct_of_parent"] == pytest.approx(entry["pct_of_parent"], abs=1e-3)


def test_reprs_are_short(sample_dir):
    gated = cytometry.gate_file(sample_dir / "S01_day010_CAR.fcs")
    for thing in (gated, gated.sample, gated.gating):
        text = repr(thing)
        assert len(text) < 300, text
    assert "S01_day010_CAR.fcs" in repr(gated) and "car" in repr(gated)


def test_anndata_export_or_a_clear_message(sample_dir):
    gated = cytometry.gate_file(sample_dir / "S01_screening_TBNK.fcs")
    try:
        import anndata  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'cytometry-counts\[anndata\]'"):
            gated.to_anndata()
        return
    adata = gated.to_anndata()
    assert adata.n_obs == gated.data.shape[0] and int(adata.obs["b_cells"].sum()) == gated.gating.events("b_cells")
