"""Gaussian mixture EM: agreement with scikit-learn, BIC, weights, chunking."""
import numpy as np
import pytest

from gpu.mixture import fit_gaussian_mixture, select_n_components


def blobs(seed=0, n=(3000, 1500, 600), d=4):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 6, (len(n), d))
    parts, truth = [], []
    for j, size in enumerate(n):
        a = rng.normal(size=(d, d)) * 0.4
        parts.append(rng.multivariate_normal(means[j], a @ a.T + 0.3 * np.eye(d), size))
        truth.append(np.full(size, j))
    return np.vstack(parts), np.concatenate(truth), means


def test_agrees_with_scikit_learn_from_the_same_start():
    sklearn_mixture = pytest.importorskip("sklearn.mixture")
    data, _, _ = blobs()
    init = data[[0, 3000, 4500]] + 0.5
    ours = fit_gaussian_mixture(data, 3, init_means=init, max_iter=200, tol=1e-10, reg_covar=1e-6)
    theirs = sklearn_mixture.GaussianMixture(3, covariance_type="full", means_init=init, max_iter=200, tol=1e-10,
                                             reg_covar=1e-6).fit(data)
    np.testing.assert_allclose(ours.means, theirs.means_, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.covariances, theirs.covariances_, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(ours.weights, theirs.weights_, atol=1e-5)
    assert np.array_equal(ours.predict(data), theirs.predict(data))


def test_recovers_truth():
    metrics = pytest.importorskip("sklearn.metrics")
    data, truth, _ = blobs(1)
    fit = fit_gaussian_mixture(data, 3, seed=3)
    assert metrics.adjusted_rand_score(truth, fit.predict(data)) > 0.99


def test_chunking_does_not_change_the_fit():
    data, _, _ = blobs(2)
    init = data[[0, 3000, 4500]]
    a = fit_gaussian_mixture(data, 3, init_means=init, max_iter=20, tol=0)
    b = fit_gaussian_mixture(data, 3, init_means=init, max_iter=20, tol=0, chunk_size=333)
    np.testing.assert_allclose(a.means, b.means, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.covariances, b.covariances, rtol=1e-9, atol=1e-12)


def test_weights_equal_repeated_rows():
    rng = np.random.default_rng(4)
    points = np.vstack([rng.normal(0, 1, (200, 2)), rng.normal(5, 1, (200, 2))])
    counts = rng.integers(1, 4, len(points))
    init = points[[0, 399]]
    weighted = fit_gaussian_mixture(points, 2, init_means=init, weights=counts, max_iter=50, tol=0)
    repeated = fit_gaussian_mixture(np.repeat(points, counts, axis=0), 2, init_means=init, max_iter=50, tol=0)
    np.testing.assert_allclose(weighted.means, repeated.means, rtol=1e-9)
    np.testing.assert_allclose(weighted.covariances, repeated.covariances, rtol=1e-8)


def test_bic_picks_the_true_number_of_components():
    data, _, _ = blobs(5, n=(1500, 1000, 800), d=2)
    best, scores = select_n_components(data, [1, 2, 3, 4, 5], seed=0)
    assert best.means.shape[0] == 3
    assert min(scores, key=scores.get) == 3
    assert best.bic() == pytest.approx(scores[3])


def test_refuses_bad_input():
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_gaussian_mixture(np.array([[0.0, np.inf], [1.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="init_means"):
        fit_gaussian_mixture(np.zeros((10, 2)), 2, init_means=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="weights"):
        fit_gaussian_mixture(np.zeros((10, 2)), 1, weights=-np.ones(10))
