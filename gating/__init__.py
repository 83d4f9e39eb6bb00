"""Automatic gating of transformed event matrices (depends on :mod:`gpu`).

Works on a compensated, transformed event matrix plus a map of marker →
column; knows nothing of files, the command line or the results store.
Panels and their gating plans are data (:mod:`gating.panels`, JSON files in
``gating/panel_files/``); :mod:`gating.engine` runs a plan and checks every gate.
"""
from .auto import GatingParams, GatingResult, auto_gate
from .flags import Flag
from .geometry import Gate
from .panels import GatingPanel, load_panel, load_panels

#: Stable population names used in every output.
POPULATIONS = ("leukocytes", "lymphocytes", "monocytes", "granulocytes", "t_cells", "cd4_t", "cd8_t",
               "b_cells", "nk_cells", "car_t")

__all__ = ["auto_gate", "Flag", "Gate", "GatingPanel", "GatingParams", "GatingResult", "POPULATIONS", "load_panel",
           "load_panels"]
