"""CAR detection reagents, viability dyes and NK markers by the names labs use, in three vendors' styles."""
import pytest

from cytometry.loading.panel import PanelError, resolve_panel

CAR_REAGENTS = ["CAR", "CD19 CAR", "CD19-CAR", "CD19 CAR Detection Reagent", "anti-FMC63", "FMC63 idiotype",
                "FMC63-id", "CD19-Fc", "CD19 Fc", "Protein L", "anti-CAR", "CAR19", "BCMA-CAR", "BCMA-Fc"]
VIABILITY_DYES = ["7-AAD", "L/D", "Live/Dead", "LIVE/DEAD Fixable Aqua", "Zombie NIR", "FVS780", "FVS510", "DAPI", "PI"]
NK_MARKERS = ["CD16+56", "CD16/56", "CD16+CD56", "CD56", "CD16"]


def _styled(marker, fluorochrome, detector, style):
    """($PnN, $PnS) of one channel as BD FACSDiva, Beckman CytoFLEX or Thermo Attune write them."""
    bd_names = {"FITC": "FITC-A", "PE": "PE-A", "PerCP-Cy5.5": "PerCP-Cy5-5-A", "PE-Cy7": "PE-Cy7-A",
                "APC": "APC-A", "APC-Cy7": "APC-Cy7-A", "BV421": "BV421-A"}
    if style == "bd":  # FACSDiva: detector named by fluorochrome, $PnS the bare reagent
        return bd_names[fluorochrome], marker
    if style == "cytoflex":  # CytExpert: FL channels, "marker fluorochrome"
        return f"FL{detector}-A", f"{marker} {fluorochrome}"
    return f"{'BL' if detector < 4 else 'RL'}{detector}-A", f"{marker}-{fluorochrome}"  # Attune: "marker-fluor"


def _car_tube(reagent, style, viability="7-AAD"):
    channels = [("CD45", "PerCP-Cy5.5", 3), ("CD3", "FITC", 1), ("CD19", "APC", 4), (reagent, "PE", 2),
                ("CD4", "PE-Cy7", 5), ("CD8", "APC-Cy7", 6), (viability, "BV421", 7)]
    pnn, pns = ["FSC-A", "FSC-H", "SSC-A"], ["", "", ""]
    for marker, fluorochrome, detector in channels:
        name, label = _styled(marker, fluorochrome, detector, style)
        pnn.append(name)
        pns.append(label)
    return pnn, pns


@pytest.mark.parametrize("style", ["bd", "cytoflex", "attune"])
@pytest.mark.parametrize("reagent", CAR_REAGENTS)
def test_car_reagent_is_the_car_and_the_antibody_is_cd19(reagent, style):
    pnn, pns = _car_tube(reagent, style)
    panel = resolve_panel(pnn, pns)
    assert panel.name == "car"
    assert pns[pnn.index(panel.markers["CAR"])].startswith(reagent)
    assert pns[pnn.index(panel.markers["CD19"])].startswith("CD19") and "CAR" not in pns[pnn.index(panel.markers["CD19"])].upper()


@pytest.mark.parametrize("style", ["bd", "cytoflex", "attune"])
@pytest.mark.parametrize("dye", VIABILITY_DYES)
def test_viability_dye_names(dye, style):
    pnn, pns = _car_tube("CD19-CAR", style, viability=dye)
    panel = resolve_panel(pnn, pns)
    assert pns[pnn.index(panel.markers["VIABILITY"])].startswith(dye)


@pytest.mark.parametrize("style", ["bd", "cytoflex", "attune"])
@pytest.mark.parametrize("nk", NK_MARKERS)
def test_nk_marker_names(nk, style):
    channels = [("CD45", "PerCP-Cy5.5", 3), ("CD3", "FITC", 1), ("CD19", "APC", 4), (nk, "PE", 2)]
    pnn, pns = ["FSC-A", "SSC-A"], ["", ""]
    for marker, fluorochrome, detector in channels:
        name, label = _styled(marker, fluorochrome, detector, style)
        pnn.append(name)
        pns.append(label)
    panel = resolve_panel(pnn, pns)
    assert panel.name == "tbnk" and pns[pnn.index(panel.markers["CD16+56"])].startswith(nk)


def test_two_cd19_antibodies_are_undecidable_and_the_error_says_how_to_choose():
    pnn, pns = _car_tube("CD19-CAR", "bd")
    pnn.append("BV605-A")
    pns.append("CD19")
    with pytest.raises(PanelError) as info:
        resolve_panel(pnn, pns)
    message = str(info.value)
    assert "CD19 is ambiguous" in message and "APC-A" in message and "BV605-A" in message
    assert "--panel" in message and "CD19,<channel>" in message
