"""Density and mixture kernels on data with known structure."""
import numpy as np
import pytest

from gpu import (DeviceError, find_peaks_1d, fit_gaussian_mixture, gaussian_smooth_1d, get_array_module,
                 histogram_1d, robust_location_scale, valley_between)


def test_histogram_matches_numpy():
    rng = np.random.default_rng(1)
    values = rng.normal(0.5, 0.2, 10000)
    ours, edges = histogram_1d(values, 64, (0.0, 1.0))
    theirs, their_edges = np.histogram(values, 64, (0.0, 1.0))
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(edges, their_edges)


def test_smoothing_keeps_mass():
    counts = np.zeros(50)
    counts[[10, 30]] = [100.0, 40.0]
    smoothed = gaussian_smooth_1d(counts, 2.0)
    assert smoothed.shape == counts.shape
    assert smoothed.sum() == pytest.approx(140.0)


def test_peaks_and_valley_of_a_bimodal_density():
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(0.25, 0.03, 8000), rng.normal(0.7, 0.05, 2000)])
    counts, edges = histogram_1d(values, 200, (0.0, 1.0))
    density = gaussian_smooth_1d(counts, 2.0)
    peaks = find_peaks_1d(density, 0.05)
    centers = 0.5 * (edges[1:] + edges[:-1])
    assert len(peaks) == 2
    assert centers[peaks[0]] == pytest.approx(0.25, abs=0.02)
    assert centers[peaks[1]] == pytest.approx(0.70, abs=0.02)
    valley = centers[valley_between(density, *peaks)]
    assert 0.35 < valley < 0.6


def test_unimodal_density_has_one_peak():
    rng = np.random.default_rng(3)
    counts, _ = histogram_1d(rng.normal(0.5, 0.05, 5000), 200, (0.0, 1.0))
    assert len(find_peaks_1d(gaussian_smooth_1d(counts, 2.0), 0.05)) == 1


def test_robust_location_scale_ignores_outliers():
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.normal(10, 2, 10000), np.full(300, 1000.0)])
    center, scale = robust_location_scale(values)
    assert center == pytest.approx(10, abs=0.2)
    assert scale == pytest.approx(2, rel=0.1)


def _three_clusters(seed=0):
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0], [5.0, 1.0], [1.0, 6.0]])
    sizes = [3000, 1000, 300]
    data = np.vstack([rng.multivariate_normal(m, [[1.0, 0.3], [0.3, 0.5]], n) for m, n in zip(means, sizes)])
    truth = np.repeat([0, 1, 2], sizes)
    return data, truth, means


def test_mixture_recovers_known_clusters():
    data, truth, means = _three_clusters()
    fit = fit_gaussian_mixture(data, 3, seed=0)
    labels = fit.predict(data)
    # Map each fitted component to the nearest true mean, then count agreement.
    mapping = {j: int(np.argmin(((means - fit.means[j]) ** 2).sum(axis=1))) for j in range(3)}
    agreement = np.mean(np.array([mapping[label] for label in labels]) == truth)
    assert agreement > 0.98
    assert sorted(np.round(fit.weights * 4300).astype(int)) == pytest.approx([300, 1000, 3000], rel=0.05)


def test_mixture_is_deterministic_for_a_seed():
    data, _, _ = _three_clusters(1)
    a = fit_gaussian_mixture(data, 3, seed=5)
    b = fit_gaussian_mixture(data, 3, seed=5)
    np.testing.assert_array_equal(a.predict(data), b.predict(data))
    np.testing.assert_array_equal(a.means, b.means)


def test_mixture_refuses_nan_and_handles_tiny_input():
    data, _, _ = _three_clusters(2)
    data[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_gaussian_mixture(data, 3)
    single = fit_gaussian_mixture(np.array([[1.0, 2.0]]), 1)
    np.testing.assert_allclose(single.means[0], [1.0, 2.0])
    # More components than distinct points still returns finite parameters.
    few = fit_gaussian_mixture(np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]), 3, seed=0)
    assert np.all(np.isfinite(few.means))


def test_device_selection(monkeypatch):
    xp, name = get_array_module("cpu")
    assert xp is np and name == "cpu"
    with pytest.raises(DeviceError, match="unknown device"):
        get_array_module("tpu")
    monkeypatch.setenv("CYTOMETRY_DEVICE", "cpu")
    assert get_array_module(None)[1] == "cpu"


def test_gpu_request_without_device_is_a_clear_error():
    from gpu.device import _cupy_if_usable

    if _cupy_if_usable() is not None:
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="CuPy"):
        get_array_module("gpu")


@pytest.mark.gpu
def test_gpu_matches_numpy():
    cupy = pytest.importorskip("cupy")
    data, _, _ = _three_clusters(3)
    cpu = fit_gaussian_mixture(data, 3, seed=0)
    gpu = fit_gaussian_mixture(cupy.asarray(data), 3, seed=0)
    np.testing.assert_allclose(cupy.asnumpy(gpu.means), cpu.means, rtol=1e-6, atol=1e-8)
    counts_gpu, _ = histogram_1d(cupy.asarray(data[:, 0]), 64, (-4, 10))
    counts_cpu, _ = histogram_1d(data[:, 0], 64, (-4, 10))
    np.testing.assert_array_equal(cupy.asnumpy(counts_gpu), counts_cpu)
