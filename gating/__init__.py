"""Automatic gating of transformed event matrices (depends on :mod:`gpu`).

Works on a compensated, transformed event matrix plus a map of marker →
column; knows nothing of files, the command line or the results store.
"""
from .auto import Gate, GatingParams, GatingResult, auto_gate

#: Stable population names used in every output.
POPULATIONS = ("leukocytes", "lymphocytes", "monocytes", "granulocytes", "t_cells", "cd4_t", "cd8_t",
               "b_cells", "nk_cells", "car_t")

__all__ = ["auto_gate", "Gate", "GatingParams", "GatingResult", "POPULATIONS"]
