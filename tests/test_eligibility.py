import pytest

from cytometry.counts import Count
from cytometry.decisions.eligibility import EligibilityRule, decide


def make(lo, hi, value=None, events=50):
    value = (lo + hi) / 2 if value is None else value
    return Count(events=events, cells_per_ul=value, ci95=(lo, hi), below_lloq=events < 25)


@pytest.mark.parametrize("lo,hi,verdict", [
    (5.01, 9.0, "eligible"),
    (5.0, 9.0, "indeterminate"),   # the lower bound touching 5 is not "wholly above"
    (3.0, 5.0, "not_eligible"),    # wholly at or below 5
    (3.0, 5.2, "indeterminate"),
    (0.0, 1.2, "not_eligible"),
])
def test_verdict_follows_interval(lo, hi, verdict):
    assert decide(make(lo, hi))["verdict"] == verdict


def test_indeterminate_says_what_would_settle_it():
    out = decide(make(3.5, 8.0, value=5.6, events=28))
    assert out["verdict"] == "indeterminate"
    assert any("events" in reason and "straddle" in reason for reason in out["reasons"])


def test_qc_problem_overrides_a_clear_count():
    out = decide(make(40, 60), qc_problems=["beads: 212 events < 1000 minimum"])
    assert out["verdict"] == "qc_fail"
    assert out["reasons"] == ["beads: 212 events < 1000 minimum"]
    assert out["value"] == 50


def test_rule_threshold_is_configurable():
    rule = EligibilityRule(threshold_cells_per_ul=10.0, criterion="CD19+ B cells > 10 cells/uL")
    out = decide(make(6, 9), rule)
    assert out["verdict"] == "not_eligible"
    assert out["criterion"] == "CD19+ B cells > 10 cells/uL"
