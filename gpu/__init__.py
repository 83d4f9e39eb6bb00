"""Clustering and density kernels for event matrices, on NumPy or CuPy.

Every kernel takes plain arrays and is written once against an array
namespace ``xp`` (``numpy`` or ``cupy``), chosen by :func:`get_array_module`.
Nothing here knows about flow cytometry: it clusters and bins matrices.
CuPy is optional; without it everything runs on NumPy.
"""
from .device import DeviceError, get_array_module, to_numpy
from .density import find_peaks_1d, gaussian_smooth_1d, histogram_1d, robust_location_scale, valley_between
from .mixture import GaussianMixtureResult, fit_gaussian_mixture

__all__ = [
    "DeviceError",
    "get_array_module",
    "to_numpy",
    "histogram_1d",
    "gaussian_smooth_1d",
    "find_peaks_1d",
    "valley_between",
    "robust_location_scale",
    "fit_gaussian_mixture",
    "GaussianMixtureResult",
]
