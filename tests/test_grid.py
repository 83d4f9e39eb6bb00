"""2-D grid kernels: binning against np.histogram2d, smoothing, watershed, contours."""
import numpy as np
import pytest
from skimage.measure import points_in_poly

from gpu.grid import (bin_indices_2d, density_contour, histogram_2d, labels_to_events, segment_events_2d, smooth_2d,
                      watershed_density)


def _blobs(specs, seed=0):
    """Events from round 2-D Gaussians ``(n, mean_x, mean_y, sd)``, and each event's blob."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(mx, sd, n) for n, mx, _, sd in specs])
    y = np.concatenate([rng.normal(my, sd, n) for n, _, my, sd in specs])
    truth = np.repeat(np.arange(len(specs)), [s[0] for s in specs])
    return x, y, truth


def _adjusted_rand_index(a, b):
    """Adjusted Rand index of two labellings (sklearn is not a dependency)."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)

    def pairs(v):
        return float(np.sum(v * (v - 1) / 2))

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([a.size]))
    expected = rows * cols / total
    return (index - expected) / (0.5 * (rows + cols) - expected)


# --- binning -------------------------------------------------------------------------------------------------------

def test_histogram_equals_numpy_with_top_edge_and_outside_values():
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.3, 1.3, 20000)
    y = rng.normal(0.5, 0.3, 20000)
    x[:50], y[50:100] = 1.0, 2.0  # on the top edge of x; on the top edge of y
    x[100:110], y[110:120] = 0.0, -1.0  # on the bottom edges
    x[120:125], y[125:130] = np.inf, -np.inf  # far outside
    ranges = [(0.0, 1.0), (-1.0, 2.0)]
    ours, x_edges, y_edges = histogram_2d(x, y, (64, 48), *ranges)
    theirs, their_x, their_y = np.histogram2d(x, y, (64, 48), ranges)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(x_edges, their_x)
    np.testing.assert_array_equal(y_edges, their_y)
    assert ours.dtype == np.float64 and ours.shape == (64, 48)


def test_histogram_equals_numpy_on_the_data_range():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=30000), rng.exponential(size=30000)
    ours, x_edges, y_edges = histogram_2d(x, y)  # 256 bins, min to max
    theirs, their_x, their_y = np.histogram2d(x, y, 256)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(x_edges, their_x)
    np.testing.assert_array_equal(y_edges, their_y)
    assert ours.sum() == 30000  # the maxima are on the top edges and counted


@pytest.mark.parametrize("bins", [10, 7, 200, (3, 100)])
def test_histogram_equals_numpy_for_values_on_bin_edges(bins):
    # Decimal data land on (or within a rounding error of) the edges, where
    # floor((v - lo) * scale) alone would disagree with the edge comparisons.
    rng = np.random.default_rng(3)
    x = np.round(rng.uniform(-1, 1, 20000), 2)
    y = np.round(rng.uniform(0, 1, 20000), 1)
    ours, _, _ = histogram_2d(x, y, bins, (-1.0, 1.0), (0.0, 1.0))
    theirs, _, _ = np.histogram2d(x, y, bins, [(-1.0, 1.0), (0.0, 1.0)])
    np.testing.assert_array_equal(ours, theirs)


def test_histogram_equals_numpy_for_float32_and_integer_events():
    rng = np.random.default_rng(4)
    offset = 12345.0  # far from zero: float32 data with a narrow range
    x = (offset + np.round(rng.uniform(-1, 1, 20000), 2)).astype(np.float32)
    y = rng.integers(0, 1024, 20000)
    ranges = [(offset - 0.5, offset + 0.5), (0.0, 1000.0)]
    ours, _, _ = histogram_2d(x, y, (100, 250), *ranges)
    theirs, _, _ = np.histogram2d(x.astype(np.float64), y.astype(np.float64), (100, 250), ranges)
    np.testing.assert_array_equal(ours, theirs)


def test_histogram_weights_equal_numpy():
    rng = np.random.default_rng(5)
    x, y, w = rng.uniform(size=5000), rng.uniform(size=5000), rng.uniform(size=5000)
    ours, _, _ = histogram_2d(x, y, 32, (0.0, 1.0), (0.0, 1.0), weights=w)
    theirs, _, _ = np.histogram2d(x, y, 32, [(0.0, 1.0), (0.0, 1.0)], weights=w)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_bin_indices_agree_with_the_edges():
    rng = np.random.default_rng(6)
    x, y = rng.uniform(-0.5, 1.5, 10000), rng.uniform(-0.5, 1.5, 10000)
    flat, inside = bin_indices_2d(x, y, (20, 30), (0.0, 1.0), (0.0, 1.0))
    ix = np.searchsorted(np.linspace(0, 1, 21), x, side="right") - 1
    iy = np.searchsorted(np.linspace(0, 1, 31), y, side="right") - 1
    expected_inside = (x >= 0) & (x <= 1) & (y >= 0) & (y <= 1)
    np.testing.assert_array_equal(inside, expected_inside)
    np.testing.assert_array_equal(flat[inside], (ix * 30 + iy)[expected_inside])
    assert (flat[~inside] == 20 * 30).all()
    assert flat.dtype == np.intp


# --- smoothing -----------------------------------------------------------------------------------------------------

def test_smoothing_keeps_mass_and_symmetry():
    rng = np.random.default_rng(7)
    counts = rng.poisson(3.0, (64, 64)).astype(float)
    counts[0, :5] = 50.0  # mass against the edges must come back
    counts[-1, -1] = 80.0
    smoothed = smooth_2d(counts, 2.5)
    assert smoothed.sum() == pytest.approx(counts.sum(), rel=1e-9)
    assert (smoothed >= 0).all()
    # A symmetric kernel: transposing or flipping commutes with smoothing.
    np.testing.assert_allclose(smooth_2d(counts.T, 2.5), smoothed.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(smooth_2d(counts[::-1, ::-1], 2.5), smoothed[::-1, ::-1], rtol=1e-12, atol=1e-12)
    symmetric = counts + counts.T
    out = smooth_2d(symmetric, 2.5)
    np.testing.assert_allclose(out, out.T, rtol=1e-12, atol=1e-12)
    # Unequal sigmas along x and y; a grid smaller than the kernel; sigma 0 copies.
    assert smooth_2d(counts, (1.0, 4.0)).sum() == pytest.approx(counts.sum(), rel=1e-9)
    assert smooth_2d(counts[:3, :3], 5.0).sum() == pytest.approx(counts[:3, :3].sum(), rel=1e-9)
    np.testing.assert_array_equal(smooth_2d(counts, 0.0), counts)
    with pytest.raises(ValueError):
        smooth_2d(counts, -1.0)


# --- watershed -----------------------------------------------------------------------------------------------------

def _check_blobs_separated(x, y, truth, **kwargs):
    labels, grid_labels, x_edges, y_edges, density = segment_events_2d(x, y, **kwargs)
    assert labels.shape == x.shape and labels.dtype == np.int32
    found = labels > 0
    assert found.mean() > 0.99  # background: a few events in the far tails only
    blobs = np.unique(truth)
    majority = []
    for blob in blobs:
        member_labels = labels[found & (truth == blob)]
        label = np.bincount(member_labels).argmax()
        assert np.mean(member_labels == label) >= 0.99  # purity of the blob's events
        majority.append(label)
    assert len(set(majority)) == len(blobs)  # each blob its own basin
    assert _adjusted_rand_index(truth[found], labels[found]) >= 0.95
    return labels, grid_labels


def test_watershed_separates_two_blobs_of_different_sizes():
    x, y, truth = _blobs([(60000, 0.0, 0.0, 1.0), (15000, 6.0, 4.0, 0.5)])
    labels, grid_labels = _check_blobs_separated(x, y, truth)
    assert grid_labels.max() == 2
    # Labels count from the highest peak: the narrow blob is denser at its peak.
    assert np.bincount(labels[truth == 1]).argmax() == 1


def test_watershed_separates_three_blobs_of_different_sizes():
    x, y, truth = _blobs([(50000, 0.0, 0.0, 1.0), (20000, 6.0, 1.0, 0.7), (8000, 2.0, 7.0, 0.5)], seed=1)
    _, grid_labels = _check_blobs_separated(x, y, truth, bins=128)
    assert grid_labels.max() == 3


def test_a_single_blob_is_a_single_basin():
    rng = np.random.default_rng(8)
    for n in (5000, 50000):
        x = rng.normal(0, 1, n)
        y = 0.6 * x + rng.normal(0, 0.8, n)  # correlated, elongated
        labels, grid_labels, *_ = segment_events_2d(x, y)
        assert grid_labels.max() == 1
        assert (labels == 1).mean() > 0.98


def test_shallow_peaks_merge_by_prominence():
    i, j = np.meshgrid(np.arange(80), np.arange(60), indexing="ij")
    # A shoulder: the second peak rises only a little above the saddle.
    density = np.exp(-((i - 30) ** 2 + (j - 30) ** 2) / 60.0) + 0.3 * np.exp(-((i - 45) ** 2 + (j - 30) ** 2) / 20.0)
    assert watershed_density(density, min_prominence=0.0).max() == 2
    assert watershed_density(density, min_prominence=0.1).max() == 1
    # Well-separated peaks stay apart at any reasonable prominence.
    apart = np.exp(-((i - 15) ** 2 + (j - 30) ** 2) / 20.0) + 0.3 * np.exp(-((i - 60) ** 2 + (j - 30) ** 2) / 20.0)
    assert watershed_density(apart, min_prominence=0.2).max() == 2
    assert watershed_density(apart, min_rise=0.5).max() == 1  # the second peak is below its floor: background


def test_watershed_background_markers_and_empty_density():
    i, j = np.meshgrid(np.arange(50), np.arange(50), indexing="ij")
    density = np.exp(-((i - 25) ** 2 + (j - 25) ** 2) / 30.0)
    labels = watershed_density(density, background_rel=0.01)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels > 0, density > 0.01)
    seeds = np.zeros(density.shape, dtype=int)
    seeds[25, 18], seeds[25, 32] = 7, 9  # given markers are kept as they are
    split = watershed_density(density, markers=seeds, background_rel=0.01)
    assert set(np.unique(split).tolist()) == {0, 7, 9}
    assert split[25, 20] == 7 and split[25, 30] == 9
    np.testing.assert_array_equal(split > 0, labels > 0)
    assert not watershed_density(np.zeros((10, 10))).any()


def test_labels_to_events_round_trip():
    grid_labels = np.arange(12, dtype=np.int32).reshape(3, 4) + 1
    grid_labels[1, 2] = 0
    rng = np.random.default_rng(9)
    x, y = rng.uniform(-0.5, 3.5, 5000), rng.uniform(-0.5, 4.5, 5000)
    flat, inside = bin_indices_2d(x, y, (3, 4), (0.0, 3.0), (0.0, 4.0))
    labels = labels_to_events(grid_labels, flat)
    ix, iy = np.floor(x).astype(int), np.floor(y).astype(int)
    np.testing.assert_array_equal(labels[inside], grid_labels[ix[inside], iy[inside]])
    assert (labels[~inside] == 0).all()
    assert (~inside).any() and (labels[inside] == 0).any()
    # With another marking of outside events, ``inside`` says which they are.
    np.testing.assert_array_equal(labels_to_events(grid_labels, np.where(inside, flat, 0), inside), labels)


# --- contours ------------------------------------------------------------------------------------------------------

def _round_density(size=101, sd=10.0):
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    centre = (size - 1) / 2
    return np.exp(-((i - centre) ** 2 + (j - centre) ** 2) / (2 * sd ** 2)), centre


def test_half_maximum_contour_of_a_round_gaussian():
    density, centre = _round_density()
    expected = 10.0 * np.sqrt(2 * np.log(2))  # bins
    edges = np.linspace(0.0, 101.0, 102)  # one data unit per bin; bin i's centre at i + 0.5
    [polygon] = density_contour(density, 0.5, edges, edges)
    assert polygon.shape[1] == 2 and len(polygon) > 20
    np.testing.assert_array_equal(polygon[0], polygon[-1])  # closed
    radius = np.hypot(polygon[:, 0] - (centre + 0.5), polygon[:, 1] - (centre + 0.5))
    assert abs(radius.mean() - expected) < 2.0
    assert radius.std() < 0.5
    # The same contour on a shifted and (unequally) scaled data range moves and scales with it.
    x_edges = np.linspace(-3000.0, 7100.0, 102)  # 100 units per bin
    y_edges = np.linspace(0.25, 0.25 + 101 * 0.02, 102)  # 0.02 units per bin
    [moved] = density_contour(density, 0.5, x_edges, y_edges)
    np.testing.assert_allclose(moved[:, 0], -3000.0 + 100.0 * polygon[:, 0], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(moved[:, 1], 0.25 + 0.02 * polygon[:, 1], rtol=1e-12, atol=1e-12)
    x_centre, y_centre = -3000.0 + 100.0 * (centre + 0.5), 0.25 + 0.02 * (centre + 0.5)
    radius = np.hypot((moved[:, 0] - x_centre) / 100.0, (moved[:, 1] - y_centre) / 0.02)
    assert abs(radius.mean() - expected) < 2.0


def test_contour_reaching_the_edge_closes_along_the_range():
    density, _ = _round_density(size=60, sd=10.0)
    density = density[:, 30:]  # the peak sits on the lower y edge
    x_edges, y_edges = np.linspace(10.0, 70.0, 61), np.linspace(-5.0, 25.0, 31)
    [polygon] = density_contour(density, 0.5, x_edges, y_edges)
    np.testing.assert_array_equal(polygon[0], polygon[-1])
    assert polygon[:, 1].min() == -5.0  # along the grid's outer boundary, in data units
    assert polygon[:, 0].min() >= 10.0 and polygon[:, 0].max() <= 70.0
    assert density_contour(density, 2.0, x_edges, y_edges) == []


def test_contours_of_segmented_events_enclose_their_blobs():
    x, y, truth = _blobs([(40000, 0.0, 0.0, 1.2), (20000, 6.0, 4.0, 0.5)], seed=2)
    labels, grid_labels, x_edges, y_edges, density = segment_events_2d(x, y, bins=128)
    polygons = density_contour(density, 0.5 * float(density.max()), x_edges, y_edges)
    assert len(polygons) >= 1
    points = np.column_stack([x, y])
    inside_any = np.zeros(len(x), dtype=bool)
    for polygon in polygons:
        inside_any |= points_in_poly(points, polygon)
    # Only the densest blob reaches half the maximum; its core is inside.
    core = np.hypot(x - 6.0, y - 4.0) < 0.3
    assert inside_any[core].mean() > 0.95
    assert not inside_any[np.hypot(x, y) < 0.3].any()


# --- edge cases ----------------------------------------------------------------------------------------------------

def test_empty_input():
    counts, x_edges, y_edges = histogram_2d(np.array([]), np.array([]), 16)
    assert counts.shape == (16, 16) and counts.sum() == 0
    np.testing.assert_array_equal(x_edges, np.linspace(0, 1, 17))
    flat, inside = bin_indices_2d([], [], 4, None, None)
    assert flat.shape == (0,) and inside.shape == (0,)
    labels, grid_labels, _, _, density = segment_events_2d(np.array([]), np.array([]), bins=16)
    assert labels.shape == (0,) and not grid_labels.any() and not density.any()


def test_constant_values_widen_the_range():
    x, y = np.full(1000, 3.0), np.full(1000, -2.0)
    counts, x_edges, y_edges = histogram_2d(x, y, 8)
    theirs, their_x, their_y = np.histogram2d(x, y, 8)
    np.testing.assert_array_equal(counts, theirs)
    np.testing.assert_array_equal(x_edges, their_x)
    assert (x_edges[0], x_edges[-1]) == (2.5, 3.5)
    labels, grid_labels, *_ = segment_events_2d(x, y, bins=8, sigma_bins=1.0)
    assert grid_labels.max() == 1 and (labels == 1).all()


def test_single_event():
    labels, grid_labels, x_edges, y_edges, density = segment_events_2d(np.array([5.0]), np.array([7.0]), bins=32)
    assert labels.tolist() == [1]
    assert density.sum() == pytest.approx(1.0)
    counts, _, _ = histogram_2d([0.5], [0.5], 4, (0.0, 1.0), (0.0, 1.0))
    assert counts[2, 2] == 1 and counts.sum() == 1


def test_refused_inputs():
    with pytest.raises(ValueError, match="NaN"):
        histogram_2d(np.array([0.0, np.nan]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="NaN"):
        segment_events_2d(np.array([0.0, 1.0]), np.array([np.nan, 1.0]), x_range=(0, 1), y_range=(0, 1))
    with pytest.raises(ValueError, match="not finite"):
        histogram_2d(np.array([0.0, np.inf]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="same length"):
        histogram_2d(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        histogram_2d(np.zeros(3), np.zeros(3), 8, (1.0, 0.0))
    with pytest.raises(ValueError):
        histogram_2d(np.zeros(3), np.zeros(3), 0)
    # Infinite values are fine with a given range: they are outside it.
    counts, _, _ = histogram_2d(np.array([0.5, np.inf, -np.inf]), np.array([0.5, 0.5, 0.5]), 2, (0, 1), (0, 1))
    assert counts.sum() == 1


# --- GPU -----------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_matches_numpy():
    cupy = pytest.importorskip("cupy")
    x, y, _ = _blobs([(200000, 0.0, 0.0, 1.0), (80000, 6.0, 4.0, 0.6), (30000, 2.0, 8.0, 0.5)], seed=3)
    x[:100] = np.round(x[:100], 1)  # values on bin edges
    x[100:110], y[110:120] = 9.0, -3.0  # on the top and bottom edges of the ranges below
    x_gpu, y_gpu = cupy.asarray(x), cupy.asarray(y)
    ranges = dict(x_range=(-3.0, 9.0), y_range=(-3.0, 11.0))

    counts, x_edges, _ = histogram_2d(x, y, 200, **ranges)
    counts_gpu, x_edges_gpu, _ = histogram_2d(x_gpu, y_gpu, 200, **ranges)
    assert isinstance(counts_gpu, cupy.ndarray)
    np.testing.assert_array_equal(counts, counts_gpu.get())
    np.testing.assert_array_equal(x_edges, x_edges_gpu)

    flat, inside = bin_indices_2d(x, y, 200, ranges["x_range"], ranges["y_range"])
    flat_gpu, inside_gpu = bin_indices_2d(x_gpu, y_gpu, 200, ranges["x_range"], ranges["y_range"])
    np.testing.assert_array_equal(flat, flat_gpu.get())
    np.testing.assert_array_equal(inside, inside_gpu.get())

    labels, grid_labels, seg_x_edges, seg_y_edges, density = segment_events_2d(x, y, **ranges)
    labels_gpu, grid_labels_gpu, _, _, density_gpu = segment_events_2d(x_gpu, y_gpu, **ranges)
    assert isinstance(labels_gpu, cupy.ndarray) and isinstance(grid_labels_gpu, cupy.ndarray)
    np.testing.assert_allclose(density, density_gpu.get(), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(grid_labels, grid_labels_gpu.get())
    np.testing.assert_array_equal(labels, labels_gpu.get())
    assert grid_labels.max() == 3

    level = 0.5 * float(density.max())
    polygons = density_contour(density, level, seg_x_edges, seg_y_edges)
    polygons_gpu = density_contour(density_gpu, level, seg_x_edges, seg_y_edges)
    assert len(polygons) == len(polygons_gpu)
    for polygon, polygon_gpu in zip(polygons, polygons_gpu):
        np.testing.assert_allclose(polygon, polygon_gpu, rtol=1e-9, atol=1e-9)
