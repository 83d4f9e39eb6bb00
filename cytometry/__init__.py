"""Absolute counts of CD19+ B cells and CAR+ T cells from FCS files.

The package turns flow cytometry FCS files into cells/uL with exact 95%
intervals, QC flags and an eligibility verdict. See ``README.md``.

The main entry points are importable from here:

>>> import cytometry
>>> gated = cytometry.gate_file("sample_fcs/S01_screening_TBNK.fcs")
>>> int(gated.stats().loc["b_cells", "events"]) > 0
True
"""
from cytometry._version import __version__

#: Public name → the module that defines it (imported on first use, so that
#: ``import cytometry`` stays light).
_EXPORTS = {
    "read_fcs": "cytometry.loading.fcs",
    "read_manifest": "cytometry.loading.manifest",
    "AnalysisOptions": "cytometry.analysis",
    "GatedSample": "cytometry.analysis",
    "gate_file": "cytometry.analysis",
    "analyze_file": "cytometry.analysis",
    "analyze_gated": "cytometry.analysis",
    "car_reference_of": "cytometry.analysis",
    "with_car_reference": "cytometry.analysis",
    "run_batch": "cytometry.batch.run",
    "ResultStore": "cytometry.batch.store",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cytometry' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
