"""The fast logicle kernel against flowutils (the reference implementation)."""
import numpy as np
import pytest
from flowutils.transforms import logicle as reference_logicle
from flowutils.transforms import logicle_inverse as reference_inverse

from gpu.logicle import logicle, logicle_inverse, logicle_parameters

PARAMETER_SETS = [(262144, 0.5, 4.5, 0.0), (1024, 0.1, 3.0, 0.5), (10000, 1.0, 4.0, 1.0), (262144, 0.0, 4.5, 0.0),
                  (4096, 0.8, 4.0, -0.3)]


def reference(values, t, w, m, a):
    flat = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    return reference_logicle(flat, [0], t=t, m=m, w=w, a=a).reshape(np.shape(values))


@pytest.mark.parametrize("t,w,m,a", PARAMETER_SETS)
def test_matches_flowutils_over_the_full_range(t, w, m, a):
    rng = np.random.default_rng(int(t + 10 * w))
    values = np.concatenate([
        np.linspace(-t, t, 20001),                                  # the whole linear range, negatives included
        rng.normal(0, t / 200, 20000),                              # the dense region around zero
        np.exp(rng.uniform(np.log(1e-6), np.log(t * 8), 20000)),    # every decade, past the top
        -np.exp(rng.uniform(np.log(1e-6), np.log(t), 20000)),
    ])
    np.testing.assert_allclose(logicle(values, t, w, m, a), reference(values, t, w, m, a), rtol=0, atol=1e-6)


def test_edge_values():
    edge = np.array([0.0, -0.0, 1e-300, -1e-300, 5e-324, 262144.0, 262143.0, -262144.0, 1e12, -1e12, 2.0 ** 41])
    np.testing.assert_allclose(logicle(edge), reference(edge, 262144, 0.5, 4.5, 0), atol=1e-6)
    special = logicle(np.array([np.nan, np.inf, -np.inf]))
    assert np.isnan(special[0]) and special[1] == np.inf and special[2] == -np.inf


def test_shape_dtype_and_chunking_do_not_change_values():
    rng = np.random.default_rng(1)
    data = rng.normal(500, 3000, size=(1000, 7))
    whole = logicle(data)
    assert whole.shape == data.shape and whole.dtype == np.float64
    np.testing.assert_array_equal(logicle(data, chunk_size=97), whole)
    np.testing.assert_allclose(logicle(data.astype(np.float32)), logicle(data.astype(np.float32).astype(np.float64)))


def test_monotonic():
    values = np.linspace(-5000, 300000, 200001)
    assert np.all(np.diff(logicle(values)) > 0)


@pytest.mark.parametrize("t,w,m,a", PARAMETER_SETS)
def test_inverse_round_trip_and_matches_flowutils(t, w, m, a):
    scaled = np.linspace(-0.3, 1.1, 5001)
    ours = logicle_inverse(scaled, t, w, m, a)
    theirs = reference_inverse(scaled.reshape(-1, 1), [0], t=t, m=m, w=w, a=a).ravel()
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9 * t)
    data = np.linspace(-t / 2, t, 3001)
    np.testing.assert_allclose(logicle_inverse(logicle(data, t, w, m, a), t, w, m, a), data, rtol=1e-5,
                               atol=1e-5 * t)


def test_parameters_validated():
    with pytest.raises(ValueError, match="invalid logicle parameters"):
        logicle_parameters(262144, 3.0, 4.5, 0)
    with pytest.raises(ValueError):
        logicle(np.zeros(3), t=-1)


@pytest.mark.gpu
def test_gpu_matches_numpy():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(2)
    data = rng.normal(0, 5000, size=(100000, 8))
    np.testing.assert_allclose(cupy.asnumpy(logicle(cupy.asarray(data))), logicle(data), rtol=0, atol=1e-12)
    scaled = rng.uniform(-0.2, 1.0, 1000)
    np.testing.assert_allclose(cupy.asnumpy(logicle_inverse(cupy.asarray(scaled))), logicle_inverse(scaled),
                               rtol=1e-12)
