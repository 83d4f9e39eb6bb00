"""Panel resolution across vendor naming styles."""
import random

import pytest

from cytometry.loading.panel import PanelError, match_marker, read_panel_file, resolve_panel

SCATTER = (["FSC-A", "FSC-H", "SSC-A", "Time"], ["", "", "", ""])
TBNK = [("CD3", "FITC"), ("CD16+56", "PE"), ("CD45", "PerCP-Cy5.5"), ("CD4", "PE-Cy7"), ("CD19", "APC"),
        ("CD8", "APC-Cy7")]
DETECTORS = {
    "bd": ["FITC-A", "PE-A", "PerCP-Cy5-5-A", "PE-Cy7-A", "APC-A", "APC-Cy7-A"],
    "fl": ["FL1-A", "FL2-A", "FL3-A", "FL4-A", "FL5-A", "FL6-A"],
    "attune": ["BL1-A", "BL2-A", "BL3-A", "YL4-A", "RL1-A", "RL3-A"],
}
STYLES = {
    "plain": lambda m, f: m,
    "space": lambda m, f: f"{m} {f}",
    "dash": lambda m, f: f"{m}-{f}",
}


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("detectors", DETECTORS)
def test_resolves_every_style_in_any_order(style, detectors):
    pnn = SCATTER[0] + DETECTORS[detectors]
    pns = SCATTER[1] + [STYLES[style](m, f) for m, f in TBNK]
    order = list(range(len(pnn)))
    random.Random(f"{style}{detectors}").shuffle(order)
    panel = resolve_panel([pnn[i] for i in order], [pns[i] for i in order])
    assert panel.name == "tbnk"
    expected = dict(zip([m for m, _ in TBNK], DETECTORS[detectors]))
    assert panel.markers == expected
    assert panel.scatter == {"FSC-A": "FSC-A", "FSC-H": "FSC-H", "SSC-A": "SSC-A", "Time": "Time"}


def test_car_panel_recognised_from_markers():
    pnn = ["FSC-A", "SSC-A", "FL1-A", "FL2-A", "FL3-A", "FL4-A", "FL5-A", "FL6-A"]
    pns = ["", "", "CD3-FITC", "CAR-PE", "Viability-7-AAD", "CD45 V500-C", "CD19 APC", "CD4"]
    panel = resolve_panel(pnn, pns)
    assert panel.name == "car"
    assert panel.markers["CAR"] == "FL2-A"
    assert panel.markers["VIABILITY"] == "FL3-A"
    assert panel.markers["CD19"] == "FL5-A"


@pytest.mark.parametrize("label,marker", [
    ("CD38 PE", None), ("CD45RO", None), ("CD4", "CD4"), ("CD19-Fc PE", "CAR"), ("cd19 apc", "CD19"),
    ("CD16/56 PE", "CD16+56"), ("7-AAD", "VIABILITY"), ("", None), ("KI67", None),
])
def test_marker_matching_is_whole_word(label, marker):
    assert match_marker(label) == marker


def test_missing_marker_error_names_marker_and_channels():
    with pytest.raises(PanelError) as err:
        resolve_panel(["FSC-A", "SSC-A", "FL1-A", "FL2-A"], ["", "", "CD3 FITC", "CD45 PerCP"])
    message = str(err.value)
    assert "CD19" in message and "FL1-A='CD3 FITC'" in message
    assert "\n" not in message


def test_ambiguous_marker_is_an_error():
    with pytest.raises(PanelError, match=r"CD19 is ambiguous: channels FL3-A \('CD19 APC'\), FL4-A \('CD19-PE'\)"):
        resolve_panel(["FSC-A", "SSC-A", "FL1-A", "FL2-A", "FL3-A", "FL4-A"],
                      ["", "", "CD3", "CD45", "CD19 APC", "CD19-PE"])


def test_panel_file_overrides_and_resolves_ambiguity(tmp_path):
    panel_file = tmp_path / "panel.csv"
    panel_file.write_text("marker,channel\nCD19,FL4-A\nCAR,FL5-A\n")
    overrides = read_panel_file(panel_file)
    panel = resolve_panel(["FSC-A", "SSC-A", "FL1-A", "FL2-A", "FL3-A", "FL4-A", "FL5-A"],
                          ["", "", "CD3", "CD45", "CD19 APC", "CD19-PE", "KN5501 idiotype"], overrides)
    assert panel.markers["CD19"] == "FL4-A"
    assert panel.markers["CAR"] == "FL5-A"
    assert panel.name == "car"


def test_panel_file_with_unknown_channel(tmp_path):
    panel_file = tmp_path / "panel.csv"
    panel_file.write_text("marker,channel\nCD19,RL9-A\n")
    with pytest.raises(PanelError, match="RL9-A"):
        resolve_panel(["FSC-A", "SSC-A", "FL1-A", "FL2-A"], ["", "", "CD3", "CD45"], read_panel_file(panel_file))


def test_real_file_markers(real_fcs):
    """A real BD FACSAria file: CD3/CD4/CD8/CD19 found, CD45 absent is reported by name."""
    from cytometry.loading.fcs import read_fcs

    sample = read_fcs(real_fcs)
    with pytest.raises(PanelError, match="CD45 not found"):
        resolve_panel(sample.pnn, sample.pns)
    panel = resolve_panel(sample.pnn, sample.pns, {"CD45": "FSC-A"})
    assert panel.markers["CD3"] == "R780-A" and panel.markers["CD19"] == "G710-A"
