"""The bounded-memory path (issue 15, defect 10): float32 events, one array per tube, the same counts.

The reference is the float64 pipeline the package ran before: flowkit's
float64 raw events, compensated, transformed and gated in float64. The CLI's
path (``read_fcs`` → float32, transformed in place, gated on float32) must
give every population the same events and the same result. Memory itself is
measured by ``benchmarks/bench_memory.py``, not asserted here.
"""
import dataclasses
import warnings

import flowkit
import numpy as np
import pytest
from conftest import SHARED_DATA

import cytometry.analysis as analysis
from cytometry.analysis import AnalysisOptions, analyze_gated, gate_file
from cytometry.loading.fcs import EVENT_DTYPE, read_fcs

OPTIONS = AnalysisOptions(beads_per_test=50120, sample_volume_ul=50)
TUBES = ["S01_screening_TBNK.fcs", "S03_screening_TBNK.fcs", "S01_day010_CAR.fcs"]


def _flowkit_raw(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flowkit.Sample(str(path), subsample=0).get_events(source="raw")


def _float64_gated(path, monkeypatch):
    """``path`` gated as before: float64 events from flowkit, float64 throughout."""

    def read_float64(p, *args, **kwargs):
        sample = read_fcs(p, *args, **kwargs)
        return dataclasses.replace(sample, events=np.asarray(_flowkit_raw(p), dtype=np.float64))

    with monkeypatch.context() as patch:
        patch.setattr(analysis, "read_fcs", read_float64)
        gated = gate_file(path, OPTIONS)
    assert gated.data.dtype == np.float64
    return gated


def test_events_are_float32_and_flowkits_values(sample_dir):
    path = sample_dir / "S01_screening_TBNK.fcs"
    sample = read_fcs(path)
    reference = _flowkit_raw(path)
    assert EVENT_DTYPE == np.float32 and sample.events.dtype == np.float32
    assert sample.events.shape == reference.shape
    # Each value is flowkit's float64 value rounded once to float32.
    assert np.array_equal(sample.events, reference.astype(np.float32))


@pytest.mark.parametrize("name", ["facscanto_tbnk_1.fcs", "flowsom_68983/68983.fcs"])
def test_real_files_read_as_float32_of_flowkits_values(name):
    path = SHARED_DATA / "real" / name
    if not path.exists():
        pytest.skip("shared reference data not present beside the project")
    sample = read_fcs(path)
    assert sample.events.dtype == np.float32
    assert np.array_equal(sample.events, _flowkit_raw(path).astype(np.float32))


@pytest.mark.parametrize("name", TUBES)
def test_float32_path_gives_the_float64_counts(sample_dir, name, monkeypatch):
    path = sample_dir / name
    before = _float64_gated(path, monkeypatch)
    after = gate_file(path, OPTIONS, keep_raw=False)  # the CLI's path
    assert after.data.dtype == np.float32
    assert after.sample.events is None and after.sample.n_events == before.sample.n_events
    assert before.gating.populations == after.gating.populations
    for population, mask in before.gating.masks.items():
        assert np.array_equal(mask, after.gating.masks[population]), population
    old, new = analyze_gated(before, options=OPTIONS), analyze_gated(after, options=OPTIONS)
    for population, entry in old["populations"].items():
        for key in ("events", "cells_per_ul", "ci95", "below_lloq"):
            assert entry[key] == new["populations"][population][key], (population, key)
    assert old["qc_flags"] == new["qc_flags"]
    assert old["eligibility"] == new["eligibility"]


def test_keeping_raw_events_changes_nothing_but_keeps_them(sample_dir):
    path = sample_dir / "S01_day010_CAR.fcs"
    kept, released = gate_file(path), gate_file(path, keep_raw=False)
    assert kept.sample.events.dtype == np.float32
    assert np.array_equal(kept.sample.events, read_fcs(path).events)  # still raw
    assert released.sample.events is None
    assert np.array_equal(kept.data, released.data)
    assert np.array_equal(kept.saturated, released.saturated)
    assert {p: int(m.sum()) for p, m in kept.gating.masks.items()} == \
        {p: int(m.sum()) for p, m in released.gating.masks.items()}


def test_released_events_cannot_be_released_twice(sample_dir):
    sample = read_fcs(sample_dir / "S02_screening_TBNK.fcs")
    sample.release_events()
    with pytest.raises(ValueError, match="already released"):
        sample.release_events()
