"""k-means kernel: known clusters, agreement with scikit-learn, chunking, edge cases."""
import numpy as np
import pytest

import importlib

# The package re-exports the function `kmeans`, which shadows the module attribute.
kmeans_module = importlib.import_module("gpu.kmeans")
from gpu.kmeans import (KMeansResult, _argmin_columns, _assign, _block_sums_numpy, _block_sums_xp, _column_mean,
                        _screen_data, assign_labels, kmeans, kmeans_plus_plus)


def _blobs(seed=0, sizes=(4000, 2000, 1000, 500, 200), d=10, spread=1.0, separation=12.0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, separation, (len(sizes), d))
    data = np.vstack([rng.normal(m, spread, (n, d)) for m, n in zip(means, sizes)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    order = rng.permutation(len(truth))
    return data[order], truth[order]


def _overlapping(seed=1, n=20000, d=5):
    """Touching clusters: Lloyd needs many iterations and labels at the borders matter."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) + rng.integers(0, 4, size=(n, 1)) * 1.5


def _brute_force_labels(data, centers):
    dist = ((data[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
    return dist.argmin(axis=1), dist.min(axis=1)


# --------------------------------------------------------------------------
# Clustering quality and agreement with scikit-learn


def _agreement(truth, labels):
    """Fraction of events in the majority label of their true cluster, if that map is one-to-one."""
    table = np.zeros((truth.max() + 1, labels.max() + 1), dtype=np.int64)
    np.add.at(table, (truth, labels), 1)
    majority = table.argmax(axis=1)
    if len(set(majority.tolist())) < len(majority):
        return 0.0
    return table.max(axis=1).sum() / len(truth)


def test_recovers_well_separated_blobs():
    data, truth = _blobs()
    fit = kmeans(data, 5, seed=0)
    assert isinstance(fit, KMeansResult)
    assert fit.centers.shape == (5, 10) and fit.labels.shape == (len(truth),)
    assert fit.labels.dtype == np.int64
    assert fit.converged and fit.n_iter < 100
    assert _agreement(truth, fit.labels) >= 0.999
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert sklearn_metrics.adjusted_rand_score(truth, fit.labels) >= 0.99


def test_blobs_far_from_origin():
    """Centering the distance expansion keeps labels right for large offsets."""
    data, truth = _blobs(seed=3)
    fit = kmeans(data + 1e6, 5, seed=0)
    assert _agreement(truth, fit.labels) >= 0.999


@pytest.mark.parametrize("weighted", [False, True])
def test_matches_scikit_learn_from_the_same_start(weighted):
    cluster = pytest.importorskip("sklearn.cluster")
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    data = _overlapping()
    weights = np.random.default_rng(5).uniform(0.5, 2.0, len(data)) if weighted else None
    init = kmeans_plus_plus(data, 8, np.random.default_rng(2), sample_weight=weights)
    ours = kmeans(data, 8, init=init, max_iter=300, tol=1e-4, sample_weight=weights)
    theirs = cluster.KMeans(n_clusters=8, init=init, n_init=1, max_iter=300, tol=1e-4,
                            algorithm="lloyd").fit(data, sample_weight=weights)
    assert ours.n_iter > 5  # a real run, not an immediate stop
    assert sklearn_metrics.adjusted_rand_score(theirs.labels_, ours.labels) >= 0.999
    np.testing.assert_allclose(ours.centers, theirs.cluster_centers_, rtol=1e-6, atol=1e-9)
    assert ours.inertia == pytest.approx(theirs.inertia_, rel=1e-9)
    assert ours.n_iter == theirs.n_iter_


def test_inertia_and_labels_are_those_of_the_returned_centers():
    data = _overlapping(n=3000)
    fit = kmeans(data, 6, seed=4, max_iter=3, tol=0)
    labels, dist = _brute_force_labels(data, fit.centers)
    np.testing.assert_array_equal(fit.labels, labels)
    assert fit.inertia == pytest.approx(dist.sum(), rel=1e-12)
    assert not fit.converged and fit.n_iter == 3


def test_stops_when_the_partition_repeats():
    data, _ = _blobs(sizes=(300, 300, 300))
    fit = kmeans(data, 3, seed=0, tol=0, max_iter=50)
    assert fit.converged and fit.n_iter < 50


# --------------------------------------------------------------------------
# Determinism and chunking


def test_same_seed_same_result():
    data = _overlapping(n=5000)
    first = kmeans(data, 7, seed=11)
    second = kmeans(data, 7, seed=11)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.centers, second.centers)
    assert first.inertia == second.inertia
    seeds = [kmeans_plus_plus(data, 7, np.random.default_rng(s)) for s in range(3)]
    assert not np.array_equal(seeds[0], seeds[1]) or not np.array_equal(seeds[0], seeds[2])


def test_chunk_size_does_not_change_the_result():
    data = _overlapping(n=4000)
    default = kmeans(data, 6, seed=3)
    tiny = kmeans(data, 6, seed=3, chunk_size=7)
    np.testing.assert_array_equal(default.labels, tiny.labels)
    np.testing.assert_array_equal(default.centers, tiny.centers)
    assert default.n_iter == tiny.n_iter
    labels_a, dist_a = assign_labels(data, default.centers)
    labels_b, dist_b = assign_labels(data, default.centers, chunk_size=7)
    np.testing.assert_array_equal(labels_a, labels_b)
    np.testing.assert_array_equal(dist_a, dist_b)


def test_n_init_keeps_the_best_run():
    data = _overlapping(n=3000)
    one = kmeans(data, 9, seed=5, n_init=1)
    several = kmeans(data, 9, seed=5, n_init=4)
    assert several.inertia <= one.inertia


# --------------------------------------------------------------------------
# Building blocks


def test_assign_labels_matches_brute_force():
    rng = np.random.default_rng(8)
    data = rng.normal(size=(2500, 6)) * [1, 2, 3, 1, 1, 5] + 40.0
    centers = data[rng.choice(len(data), 13, replace=False)] + rng.normal(0, 0.1, (13, 6))
    labels, dist = assign_labels(data, centers, chunk_size=100)
    expected_labels, expected_dist = _brute_force_labels(data, centers)
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_allclose(dist, expected_dist, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 7, 130])
def test_argmin_columns_matches_numpy_including_ties(k):
    rng = np.random.default_rng(k)
    block = rng.integers(0, 4, size=(k, 500)).astype(np.float64)  # many exact ties
    out = np.empty(500, dtype=np.int64)
    _argmin_columns(np, block, out)
    np.testing.assert_array_equal(out, block.argmin(axis=0))


def _screen_cases():
    rng = np.random.default_rng(12)
    blobs, _ = _blobs(sizes=(3000, 1000, 500))
    grid = rng.integers(0, 4, size=(4000, 3)).astype(np.float64)  # duplicates and exact ties
    far = _overlapping(n=4000) * 1e-3 + 1e5
    return [
        (blobs, blobs[rng.choice(len(blobs), 12, replace=False)]),
        (grid, np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2], [0, 2, 0], [1, 1, 1], [3, 0, 1.5]], dtype=float)),
        (far, far[:9] + 1e-4),
        (_overlapping(n=3000).astype(np.float32), _overlapping(n=3000)[:130]),
    ]


@pytest.mark.parametrize("case", range(4))
def test_float32_screen_gives_the_float64_labels(case):
    """The screened assignment (CPU iterations) labels exactly like the float64 one."""
    data, centers = _screen_cases()[case]
    data = np.asarray(data)
    screen = _screen_data(data, _column_mean(np, data))
    plain = np.empty(len(data), dtype=np.int64)
    screened = np.empty(len(data), dtype=np.int64)
    _assign(np, data, centers, 97, plain)
    _assign(np, data, centers, 97, screened, screen=screen)
    np.testing.assert_array_equal(screened, plain)
    # Against exact distances, wherever the nearest center is not (nearly) tied.
    exact = ((data.astype(np.float64)[:, None, :] - centers[None]) ** 2).sum(axis=2)
    ordered = np.sort(exact, axis=1)
    clear = ordered[:, 1] - ordered[:, 0] > 1e-9 * (1 + ordered[:, 1])
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(plain[clear], exact.argmin(axis=1)[clear])


def test_kmeans_with_and_without_the_screen(monkeypatch):
    data = _overlapping(n=6000)
    screened = kmeans(data, 9, seed=1, tol=0)
    monkeypatch.setattr(kmeans_module, "_SCREEN", False)
    plain = kmeans(data, 9, seed=1, tol=0)
    np.testing.assert_array_equal(screened.labels, plain.labels)
    np.testing.assert_array_equal(screened.centers, plain.centers)
    assert screened.n_iter == plain.n_iter


def test_sparse_and_bincount_cluster_sums_agree():
    """The CPU's sparse-product sums and the generic (GPU) bincount sums."""
    rng = np.random.default_rng(9)
    data = rng.normal(size=(7000, 4)).astype(np.float32)
    labels = rng.integers(0, 5, len(data))
    weights = rng.uniform(0, 3, len(data))
    for w in (None, weights):
        sparse = _block_sums_numpy(data, labels, w, 6)
        assert sparse.shape == (6, 4) and sparse.dtype == np.float64
        np.testing.assert_allclose(sparse, _block_sums_xp(np, data, labels, w, 6), rtol=1e-10)
        assert (sparse[5] == 0).all()


def test_kmeans_plus_plus_picks_data_rows_in_every_blob():
    data, truth = _blobs(sizes=(500, 400, 300, 200, 100))
    for trials in (None, 1):
        centers = kmeans_plus_plus(data, 5, np.random.default_rng(0), n_local_trials=trials)
        rows = [int(np.flatnonzero((data == c).all(axis=1))[0]) for c in centers]
        assert sorted(truth[rows]) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(kmeans_plus_plus(data, 5, 4), kmeans_plus_plus(data, 5, np.random.default_rng(4)))


def test_integer_weights_act_like_repeated_rows():
    rng = np.random.default_rng(10)
    data = _overlapping(n=1500)
    counts = rng.integers(1, 4, len(data))
    init = data[:5].copy()
    weighted = kmeans(data, 5, init=init, sample_weight=counts, tol=0)
    repeated = kmeans(np.repeat(data, counts, axis=0), 5, init=init, tol=0)
    np.testing.assert_allclose(weighted.centers, repeated.centers, rtol=1e-10)
    assert weighted.inertia == pytest.approx(repeated.inertia, rel=1e-10)


# --------------------------------------------------------------------------
# Empty clusters and edge cases


def test_empty_cluster_is_reseeded():
    data, _ = _blobs(sizes=(400, 300, 200))
    init = np.vstack([data[:3], np.full((1, 10), 1e3)])  # the last center attracts nothing
    fit = kmeans(data, 4, init=init, max_iter=100)
    counts = np.bincount(fit.labels, minlength=4)
    assert (counts > 0).all()


def test_empty_cluster_relocation_matches_scikit_learn():
    cluster = pytest.importorskip("sklearn.cluster")
    data, _ = _blobs(sizes=(400, 300, 200))
    init = np.vstack([data[:3], np.full((1, 10), 1e3)])
    fit = kmeans(data, 4, init=init, max_iter=100)
    theirs = cluster.KMeans(n_clusters=4, init=init, n_init=1, max_iter=100, algorithm="lloyd").fit(data)
    np.testing.assert_array_equal(fit.labels, theirs.labels_)
    assert fit.inertia == pytest.approx(theirs.inertia_, rel=1e-9)


def test_single_event():
    fit = kmeans(np.array([[1.0, 2.0, 3.0]]), 1)
    np.testing.assert_array_equal(fit.centers, [[1.0, 2.0, 3.0]])
    assert fit.labels.tolist() == [0] and fit.inertia == 0.0 and fit.converged


def test_more_clusters_than_distinct_points():
    data = np.repeat(np.array([[0.0, 0.0], [5.0, 5.0], [9.0, 0.0]]), 4, axis=0)
    fit = kmeans(data, 5, seed=0)
    assert fit.centers.shape == (5, 2)
    assert fit.inertia == 0.0
    # every center is a data point; the three distinct points are all centers
    assert {tuple(c) for c in fit.centers} == {(0.0, 0.0), (5.0, 5.0), (9.0, 0.0)}
    assert len(np.unique(fit.labels)) == 3
    np.testing.assert_array_equal(fit.centers[fit.labels], data)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused(bad):
    data = np.random.default_rng(0).normal(size=(50, 3))
    data[[4, 9], 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite values in 2 of 50 rows"):
        kmeans(data, 2)
    with pytest.raises(ValueError, match="data contains NaN"):
        assign_labels(data, data[:2])


@pytest.mark.parametrize("k", [0, -1, 11])
def test_bad_cluster_counts_are_refused(k):
    data = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(ValueError, match="n_clusters must be between 1 and the number of events"):
        kmeans(data, k)


def test_malformed_input_is_refused():
    data = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(ValueError, match="2-D"):
        kmeans(data[:, 0], 2)
    with pytest.raises(ValueError, match="integer"):
        kmeans(data, 2.0)
    with pytest.raises(ValueError, match="no events"):
        kmeans(np.empty((0, 2)), 1)
    with pytest.raises(ValueError, match="init centers must have shape"):
        kmeans(data, 2, init=data[:3])
    with pytest.raises(ValueError, match="init must be"):
        kmeans(data, 2, init="kmeans")
    with pytest.raises(ValueError, match="sample_weight"):
        kmeans(data, 2, sample_weight=-np.ones(10))
    with pytest.raises(ValueError, match="chunk_size"):
        kmeans(data, 2, chunk_size=0)
    with pytest.raises(ValueError, match="magnitude"):
        kmeans(data * 1e200, 2)


def test_float32_input_agrees_with_float64():
    data32 = _overlapping(n=5000).astype(np.float32)
    data64 = data32.astype(np.float64)
    fit32 = kmeans(data32, 6, seed=2, chunk_size=333)
    fit64 = kmeans(data64, 6, seed=2, chunk_size=333)
    assert fit32.centers.dtype == np.float64
    np.testing.assert_array_equal(fit32.labels, fit64.labels)
    np.testing.assert_allclose(fit32.centers, fit64.centers, rtol=1e-12)
    assert fit32.inertia == pytest.approx(fit64.inertia, rel=1e-12)


def test_integer_input_is_converted():
    data = np.repeat(np.array([[0, 0], [10, 10]]), 5, axis=0)
    fit = kmeans(data, 2)
    assert sorted(fit.centers[:, 0].tolist()) == [0.0, 10.0]


# --------------------------------------------------------------------------
# GPU


class _NumpyInDisguise:
    """NumPy under another identity: runs the code paths written for CuPy (``xp is not numpy``)."""

    def __getattr__(self, name):
        return getattr(np, name)


def test_the_generic_device_path_matches_the_cpu_path():
    """One block, no threads, no float32 screen, bincount sums and argmin: as on a GPU."""
    xp = _NumpyInDisguise()
    data = _overlapping(n=6000)
    k = 7
    init = kmeans_plus_plus(data, k, np.random.default_rng(3))
    generic_init = kmeans_module._seed_plus_plus(xp, data, k, np.random.default_rng(3), 2 + int(np.log(k)),
                                                 None, kmeans_module._chunk_rows(xp, None, len(data), k, 5), None)
    np.testing.assert_allclose(generic_init, init, rtol=1e-12)
    init[-1] = 1e3  # an empty cluster to relocate
    cpu = kmeans(data, k, init=init, tol=1e-4)
    tol_abs = kmeans_module._data_tolerance(np, data, 1e-4, _column_mean(np, data))
    generic = kmeans_module._lloyd(xp, data, init.copy(), None, 100, tol_abs,
                                   kmeans_module._chunk_rows(xp, None, len(data), k, 5), None)
    np.testing.assert_array_equal(generic.labels, cpu.labels)
    np.testing.assert_allclose(generic.centers, cpu.centers, rtol=1e-10)
    assert generic.n_iter == cpu.n_iter and (np.bincount(generic.labels, minlength=k) > 0).all()
    weights = np.random.default_rng(4).uniform(0, 2, len(data))
    cpu = kmeans(data, k, init=init, sample_weight=weights)
    generic = kmeans_module._lloyd(xp, data, init.copy(), weights, 100, tol_abs,
                                   kmeans_module._chunk_rows(xp, None, len(data), k, 5), None)
    np.testing.assert_array_equal(generic.labels, cpu.labels)
    np.testing.assert_allclose(generic.centers, cpu.centers, rtol=1e-10)


@pytest.mark.gpu
def test_cupy_matches_numpy():
    cp = pytest.importorskip("cupy")
    data = _overlapping(n=20000)
    init = kmeans_plus_plus(data, 8, np.random.default_rng(1))
    init_gpu = kmeans_plus_plus(cp.asarray(data), 8, np.random.default_rng(1))
    np.testing.assert_allclose(cp.asnumpy(init_gpu), init, rtol=1e-12)
    cpu = kmeans(data, 8, init=init, tol=0, max_iter=300)  # stops when the partition repeats
    gpu = kmeans(cp.asarray(data), 8, init=cp.asarray(init), tol=0, max_iter=300)
    assert isinstance(gpu.labels, cp.ndarray) and isinstance(gpu.centers, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(gpu.labels), cpu.labels)
    np.testing.assert_allclose(cp.asnumpy(gpu.centers), cpu.centers, rtol=1e-6, atol=1e-9)
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-9)
    assert gpu.n_iter == cpu.n_iter
    labels, dist = assign_labels(cp.asarray(data.astype(np.float32)), cp.asarray(cpu.centers))
    expected_labels, expected_dist = assign_labels(data.astype(np.float32), cpu.centers)
    np.testing.assert_array_equal(cp.asnumpy(labels), expected_labels)
    np.testing.assert_allclose(cp.asnumpy(dist), expected_dist, rtol=1e-9, atol=1e-12)
    seeded = kmeans(cp.asarray(data), 8, seed=3)
    reference = kmeans(data, 8, seed=3)
    np.testing.assert_array_equal(cp.asnumpy(seeded.labels), reference.labels)
