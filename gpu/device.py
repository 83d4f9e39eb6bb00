"""Choosing where kernels run: NumPy on the CPU or CuPy on a CUDA device."""
from __future__ import annotations

import os

import numpy as np

DEVICE_CHOICES = ("auto", "cpu", "gpu")


class DeviceError(RuntimeError):
    """The requested device cannot be used (for example ``gpu`` without CuPy)."""


def _cupy_if_usable():
    try:
        import cupy
    except Exception:  # ImportError, or a CUDA library failing to load
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


def get_array_module(device=None):
    """The array namespace for ``device`` and the name of the device used.

    Parameters
    ----------
    device : {"auto", "cpu", "gpu"} or None
        ``None`` reads the environment variable ``CYTOMETRY_DEVICE``
        (default ``auto``). ``auto`` takes CuPy when it imports and a CUDA
        device answers, NumPy otherwise; ``gpu`` insists on CuPy.

    Returns
    -------
    xp : module
        ``numpy`` or ``cupy``.
    name : str
        ``"cpu"`` or ``"gpu"``, to record with results.

    Raises
    ------
    DeviceError
        For ``gpu`` without a usable CuPy, or an unknown device name.

    Examples
    --------
    >>> xp, name = get_array_module("cpu")
    >>> xp.__name__, name
    ('numpy', 'cpu')
    """
    if device is None:
        device = os.environ.get("CYTOMETRY_DEVICE", "auto") or "auto"
    device = str(device).lower()
    if device not in DEVICE_CHOICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if device == "cpu":
        return np, "cpu"
    cupy = _cupy_if_usable()
    if cupy is not None:
        return cupy, "gpu"
    if device == "gpu":
        raise DeviceError("device 'gpu' requested but CuPy or a CUDA device is not available "
                          "(install the 'gpu' extra, or use --device cpu)")
    return np, "cpu"


def to_numpy(array):
    """A NumPy copy of a NumPy or CuPy array (no copy for NumPy input)."""
    if hasattr(array, "get"):
        return array.get()
    return np.asarray(array)
