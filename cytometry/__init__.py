"""Absolute counts of CD19+ B cells and CAR+ T cells from FCS files.

The package turns flow cytometry FCS files into cells/uL with exact 95%
intervals, QC flags and an eligibility verdict. See ``README.md``.
"""
from ._version import __version__

__all__ = ["__version__"]
