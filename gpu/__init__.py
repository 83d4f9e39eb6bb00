"""Clustering and density kernels for event matrices, on NumPy or CuPy.

Every kernel takes plain arrays and is written once against an array
namespace ``xp`` (``numpy`` or ``cupy``), chosen by :func:`get_array_module`
or simply by the kind of array passed in. Nothing here knows about flow
cytometry: it clusters, bins and transforms matrices. CuPy is optional;
without it everything runs on NumPy, which is also the tested reference.

- :mod:`gpu.device` — device selection (``auto``/``cpu``/``gpu``, ``CYTOMETRY_DEVICE``).
- :mod:`gpu.density` — 1-D histograms, smoothing, peaks and valleys.
- :mod:`gpu.grid` — 2-D histograms, smoothing, watershed, labels back to events, contours.
- :mod:`gpu.mixture` — full-covariance Gaussian mixtures by EM, BIC.
- :mod:`gpu.kmeans` — k-means++ and chunked Lloyd iterations.
- :mod:`gpu.logicle` — table-lookup logicle transform and its inverse.
"""
from .density import find_peaks_1d, gaussian_smooth_1d, histogram_1d, robust_location_scale, valley_between
from .device import DeviceError, get_array_module, to_numpy
from .grid import (bin_indices_2d, density_contour, histogram_2d, labels_to_events, segment_events_2d, smooth_2d,
                   watershed_density)
from .kmeans import KMeansResult, assign_labels, kmeans, kmeans_plus_plus
from .logicle import logicle, logicle_inverse, logicle_parameters
from .mixture import GaussianMixtureResult, fit_gaussian_mixture, select_n_components

__all__ = [
    "DeviceError",
    "get_array_module",
    "to_numpy",
    "histogram_1d",
    "gaussian_smooth_1d",
    "find_peaks_1d",
    "valley_between",
    "robust_location_scale",
    "bin_indices_2d",
    "histogram_2d",
    "smooth_2d",
    "watershed_density",
    "labels_to_events",
    "density_contour",
    "segment_events_2d",
    "kmeans",
    "kmeans_plus_plus",
    "assign_labels",
    "KMeansResult",
    "fit_gaussian_mixture",
    "select_n_components",
    "GaussianMixtureResult",
    "logicle",
    "logicle_inverse",
    "logicle_parameters",
]
