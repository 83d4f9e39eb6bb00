"""Real instrument tubes with an expert answer (``shared/data/real/`` beside the project).

The ranges are those of ``shared/data/real/README.md``: what moving each
expert border within its valley gives. Nothing in the gating knows these
files; the tests run the command a user would run.
"""
import json

import numpy as np
import pytest

from cytometry.outputs.cli import main

from conftest import SHARED_DATA

REAL = SHARED_DATA / "real"
FACSCANTO = REAL / "facscanto_tbnk_1.fcs"
FLOWSOM = REAL / "flowsom_68983" / "68983.fcs"
WORKSPACE = REAL / "flowsom_68983" / "gating.wsp"

#: README ranges, events (FACSCanto: widened by ~5% for the lymphocyte border).
FACSCANTO_RANGES = {"lymphocytes": (4180, 5080), "t_cells": (2640, 3060), "b_cells": (715, 810),
                    "nk_cells": (790, 1070), "cd4_t": (1560, 1790), "cd8_t": (820, 980)}
FLOWSOM_RANGES = {"t_cells": (10500, 12100), "b_cells": (2290, 2630), "cd4_t": (6960, 8010), "cd8_t": (1270, 1550)}


def _need(path):
    if not path.exists():
        pytest.skip(f"{path} not present beside the project")


def _analyze_json(capsys, path):
    code = main(["analyze", str(path), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    (sample,) = json.loads(out)["samples"]
    assert sample["status"] == "ok", sample["error"]
    return sample


@pytest.fixture(scope="module")
def facscanto():
    _need(FACSCANTO)
    from cytometry.analysis import analyze_file

    return analyze_file(FACSCANTO)


@pytest.mark.parametrize("population", sorted(FACSCANTO_RANGES))
def test_facscanto_population_inside_reference_range(facscanto, population):
    low, high = FACSCANTO_RANGES[population]
    entry = facscanto["populations"][population]
    assert low <= entry["events"] <= high, f"{population}: {entry['events']} events, reference {low}-{high}"
    assert entry["reliable"], entry["unreliable_reasons"]
    assert entry["cells_per_ul"] is None and entry["count_reason"]  # no beads in the tube


def test_facscanto_from_the_command_line(capsys):
    """What a user runs: ``cytometry analyze FILE --json``: events and % of parent, no count, no failure."""
    _need(FACSCANTO)
    sample = _analyze_json(capsys, FACSCANTO)
    populations = sample["populations"]
    lymph_low, lymph_high = FACSCANTO_RANGES["lymphocytes"]
    for name in ("t_cells", "b_cells", "nk_cells"):
        # % of lymphocytes, within what the README's event ranges allow.
        low, high = FACSCANTO_RANGES[name]
        assert populations[name]["parent"] == "lymphocytes"
        assert 100 * low / lymph_high <= populations[name]["pct_of_parent"] <= 100 * high / lymph_low, name
    lymphosum = sum(populations[p]["pct_of_parent"] for p in ("t_cells", "b_cells", "nk_cells"))
    assert abs(lymphosum - 100) <= 10  # the reviewer's rule (QcRules.lymphosum_tolerance_pct)
    codes = {f["code"] for f in sample["flags"]}
    assert "no_fsc_h" in codes  # no singlet gate possible, and said so
    assert not [f for f in sample["flags"] if f["severity"] == "fail"]


def test_facscanto_debris_is_not_named_lymphocytes(facscanto):
    """About 40% of events are CD45-negative ghosts with high scatter: outside the leukocytes."""
    leukocytes = facscanto["populations"]["leukocytes"]["events"]
    assert 0.55 * facscanto["events_total"] < leukocytes < 0.75 * facscanto["events_total"]
    assert facscanto["populations"]["granulocytes"]["events"] > facscanto["populations"]["monocytes"]["events"] > 0


@pytest.fixture(scope="module")
def flowsom():
    _need(FLOWSOM)
    from cytometry.analysis import gate_file

    return gate_file(FLOWSOM)


@pytest.mark.parametrize("population", sorted(FLOWSOM_RANGES))
def test_flowsom_population_inside_reference_range(flowsom, population):
    low, high = FLOWSOM_RANGES[population]
    events = flowsom.gating.events(population)
    assert low <= events <= high, f"{population}: {events} events, reference {low}-{high}"
    assert population not in flowsom.gating.unreliable


def test_flowsom_from_the_command_line(capsys):
    """``cytometry analyze 68983.fcs --json``: every reference population inside its range, none unreliable."""
    _need(FLOWSOM)
    sample = _analyze_json(capsys, FLOWSOM)
    for population, (low, high) in FLOWSOM_RANGES.items():
        entry = sample["populations"][population]
        assert low <= entry["events"] <= high and entry["reliable"], (population, entry)
    assert sample["populations"]["b_cells"]["parent"] == "lymphocytes"
    assert not [f for f in sample["flags"] if f["severity"] == "fail"]


def test_flowsom_lymphocyte_only_file_is_not_carved_into_three(flowsom):
    """The file was exported from the expert's lymphocyte gate: no monocytes or granulocytes in it."""
    masks = flowsom.gating.masks
    assert masks["lymphocytes"].sum() > 0.97 * masks["leukocytes"].sum()
    assert masks["monocytes"].sum() == 0 and masks["granulocytes"].sum() == 0
    assert any(f.code == "lymphocytes_only" for f in flowsom.gating.flags)


@pytest.fixture(scope="module")
def expert_gates():
    _need(FLOWSOM)
    flowkit = pytest.importorskip("flowkit")
    workspace = flowkit.Workspace(str(WORKSPACE), fcs_samples=str(FLOWSOM))
    sample_id = workspace.get_sample_ids()[0]
    workspace.analyze_samples(sample_id=sample_id)

    def member(name):
        return np.asarray(workspace.get_gate_membership(sample_id, name), dtype=bool)

    # The expert's T cells exclude the NK1.1+ NKT cells; CD3+ cells are both.
    return {"t_cells": member("T cells") | member("NK T cells"), "b_cells": member("B cells"),
            "cd4_t": member("CD4 T cells"), "cd8_t": member("CD8 T cells")}


@pytest.mark.parametrize("population", ["t_cells", "b_cells", "cd4_t", "cd8_t"])
def test_flowsom_event_level_f1_against_expert_flowjo_gates(flowsom, expert_gates, population):
    ours = flowsom.gating.masks[population]
    expert = expert_gates[population]
    assert ours.shape == expert.shape
    f1 = 2 * np.sum(ours & expert) / (ours.sum() + expert.sum())
    assert f1 >= 0.93, f"{population}: F1 {f1:.3f} against the expert's gate"
