"""Gaussian mixture models fitted by EM, written once for NumPy and CuPy."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .density import _xp


@dataclass
class GaussianMixtureResult:
    """A fitted mixture (arrays live on the device of the input).

    Attributes
    ----------
    weights : array, shape (k,)
    means : array, shape (k, d)
    covariances : array, shape (k, d, d)
    log_likelihood : float
        Mean log-likelihood per event at convergence.
    n_iter : int
    converged : bool
    """

    weights: object
    means: object
    covariances: object
    log_likelihood: float
    n_iter: int
    converged: bool

    def log_responsibilities(self, data):
        """Log posterior of each component for each row of ``data``, shape (n, k)."""
        log_prob = _component_log_prob(data, self.weights, self.means, self.covariances)
        return log_prob - _logsumexp(log_prob, axis=1)[:, None]

    def predict(self, data):
        """Index of the most probable component per row."""
        return self.log_responsibilities(data).argmax(axis=1)


def _logsumexp(a, axis):
    xp = _xp(a)
    top = a.max(axis=axis, keepdims=True)
    top = xp.where(xp.isfinite(top), top, 0.0)
    return xp.log(xp.exp(a - top).sum(axis=axis)) + xp.squeeze(top, axis=axis)


def _component_log_prob(data, weights, means, covariances):
    """log(weight_k) + log N(x | mean_k, cov_k) for every row and component."""
    xp = _xp(data)
    n, d = data.shape
    k = means.shape[0]
    out = xp.empty((n, k), dtype=xp.float64)
    for j in range(k):
        chol = xp.linalg.cholesky(covariances[j])
        diff = (data - means[j]).T
        # Solve L z = diff; the Mahalanobis distance is |z|^2.
        z = _solve_lower(chol, diff)
        maha = (z * z).sum(axis=0)
        log_det = 2.0 * xp.log(xp.diagonal(chol)).sum()
        out[:, j] = xp.log(weights[j]) - 0.5 * (d * np.log(2 * np.pi) + log_det + maha)
    return out


def _solve_lower(lower, rhs):
    xp = _xp(lower)
    if xp is np:
        from scipy.linalg import solve_triangular

        return solve_triangular(lower, rhs, lower=True, check_finite=False)
    from cupyx.scipy.linalg import solve_triangular

    return solve_triangular(lower, rhs, lower=True)


def _kmeans_plus_plus(data, k, rng):
    """k-means++ seeding: deterministic for a given ``rng``."""
    xp = _xp(data)
    n = data.shape[0]
    first = int(rng.integers(n))
    centers = [data[first]]
    closest = ((data - centers[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:
            index = int(rng.integers(n))
        else:
            cumulative = np.cumsum(np.asarray(closest.get() if hasattr(closest, "get") else closest))
            index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1]))
            index = min(index, n - 1)
        centers.append(data[index])
        closest = xp.minimum(closest, ((data - data[index]) ** 2).sum(axis=1))
    return xp.stack(centers)


def fit_gaussian_mixture(data, n_components, *, init_means=None, max_iter=100, tol=1e-5,
                         reg_covar=1e-6, seed=0, weights=None):
    """Fit a full-covariance Gaussian mixture by expectation–maximisation.

    Responsibilities are computed in log space (no underflow for far
    events); ``reg_covar`` is added to every covariance diagonal so a
    component collapsing onto a few identical events stays invertible.

    Parameters
    ----------
    data : array, shape (n, d)
        NumPy or CuPy; the fit runs on that device. NaN rows are refused.
    n_components : int
    init_means : array, shape (k, d), optional
        Starting means (for a reproducible, meaningful start); otherwise
        k-means++ seeding with ``seed``.
    max_iter : int
    tol : float
        Stop when the mean log-likelihood improves by less than this.
    reg_covar : float
    seed : int
    weights : array, shape (n,), optional
        Per-row weights (for pre-binned data).

    Returns
    -------
    GaussianMixtureResult

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.vstack([rng.normal(0, 1, (500, 2)), rng.normal(6, 1, (500, 2))])
    >>> fit = fit_gaussian_mixture(x, 2, seed=1)
    >>> sorted(int(round(float(m))) for m in fit.means[:, 0])
    [0, 6]
    """
    xp = _xp(data)
    data = xp.asarray(data, dtype=xp.float64)
    if data.ndim != 2:
        raise ValueError("data must be a 2-D array (events × dimensions)")
    n, d = data.shape
    if n == 0:
        raise ValueError("cannot fit a mixture to zero events")
    if bool(xp.isnan(data).any()):
        raise ValueError("data contains NaN rows; remove or impute them before clustering")
    if n_components < 1:
        raise ValueError("n_components must be at least 1")
    w = xp.ones(n, dtype=xp.float64) if weights is None else xp.asarray(weights, dtype=xp.float64)
    total_weight = float(w.sum())
    rng = np.random.default_rng(seed)
    if init_means is None:
        means = _kmeans_plus_plus(data, n_components, rng)
    else:
        means = xp.asarray(init_means, dtype=xp.float64).copy()
    k = means.shape[0]
    # Weighted, biased covariance: defined even for a single event (then only reg_covar).
    centred = data - (w @ data) / total_weight
    global_cov = (centred * w[:, None]).T @ centred / total_weight + reg_covar * xp.eye(d)
    covariances = xp.stack([global_cov.copy() for _ in range(k)])
    mix = xp.full(k, 1.0 / k)
    previous = -np.inf
    converged = False
    iteration = 0
    for iteration in range(1, max_iter + 1):
        log_prob = _component_log_prob(data, mix, means, covariances)
        norm = _logsumexp(log_prob, axis=1)
        log_likelihood = float((norm * w).sum()) / total_weight
        resp = xp.exp(log_prob - norm[:, None]) * w[:, None]
        mass = resp.sum(axis=0) + 1e-12
        mix = mass / mass.sum()
        means = (resp.T @ data) / mass[:, None]
        for j in range(k):
            diff = data - means[j]
            covariances[j] = (resp[:, j, None] * diff).T @ diff / mass[j] + reg_covar * xp.eye(d)
        if abs(log_likelihood - previous) < tol:
            converged = True
            break
        previous = log_likelihood
    return GaussianMixtureResult(weights=mix, means=means, covariances=covariances,
                                 log_likelihood=log_likelihood, n_iter=iteration, converged=converged)
