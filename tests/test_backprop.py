"""Tests of the lab's hand-derived backward passes in `stl10_keras.backprop`.

Every analytic gradient is compared with independent references: TensorFlow
autodiff of the forward pass written plainly with tf ops, central finite
differences of a numpy float64 forward pass, and the lab's closed forms
evaluated in numpy.
"""

import numpy as np
import pytest
import tensorflow as tf

from stl10_keras import backprop
from stl10_keras.layers import ManualBatchNorm

EPS = 1e-3
SHAPES = [(6, 3), (4, 3, 3, 2), (2, 5, 4, 1)]  # dense (N, C), conv (N, H, W, C)
DAG_SHAPES = [(5,), (4, 3), (2, 3, 3, 2)]


def _axes(shape):
    return tuple(range(len(shape) - 1))


def _np(t):
    return np.asarray(t, dtype=np.float64)


def _tape_grads(loss_fn, *arrays):
    """TensorFlow autodiff of a scalar loss w.r.t. every argument."""
    tensors = [tf.constant(a) for a in arrays]
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        loss = loss_fn(*tensors)
    return [_np(g) for g in tape.gradient(loss, tensors)]


def _central_differences(loss_fn, arrays, wrt, step=1e-6):
    """Finite differences of a numpy float64 scalar loss w.r.t. arrays[wrt]."""
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    flat = arrays[wrt].reshape(-1)
    grad = np.empty_like(flat)
    for i in range(flat.size):
        v = flat[i]
        flat[i] = v + step
        plus = loss_fn(*arrays)
        flat[i] = v - step
        minus = loss_fn(*arrays)
        flat[i] = v
        grad[i] = (plus - minus) / (2 * step)
    return grad.reshape(arrays[wrt].shape)


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_bn(x, gamma, beta, axes, eps=EPS):
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    return gamma * (x - mu) / np.sqrt(var + eps) + beta


def _tf_bn_explicit(x, mu, var, gamma, beta, eps=EPS):
    return gamma * (x - mu) / tf.sqrt(var + eps) + beta


def _tf_bn_of_mu(x, mu, gamma, beta, axes, eps=EPS):
    var = tf.reduce_mean(tf.square(x - mu), axis=axes, keepdims=True)
    return _tf_bn_explicit(x, mu, var, gamma, beta, eps)


def _tf_bn(x, gamma, beta, axes, eps=EPS):
    mu = tf.reduce_mean(x, axis=axes, keepdims=True)
    return _tf_bn_of_mu(x, mu, gamma, beta, axes, eps)


def _bn_inputs(rng, shape, offset=0.0, scale=1.0):
    c = shape[-1]
    x = offset + scale * rng.normal(rng.normal(size=c), rng.uniform(0.5, 2.0, c), shape)
    return x, rng.uniform(0.5, 1.5, c), rng.normal(size=c), rng.normal(size=shape)


def _analytic_bn(x, gamma, dy, mean=None, var=None):
    axes = _axes(x.shape)
    if mean is None:
        mean, var = backprop.batch_norm_moments(tf.constant(x), axes)
    bshape = (1,) * len(axes) + (x.shape[-1],)
    g = backprop.batch_norm_backward(
        tf.constant(dy), tf.constant(x), tf.constant(mean), tf.constant(var),
        tf.constant(gamma.reshape(bshape)), EPS, axes,
    )
    return backprop.BatchNormGradients(*[_np(v) for v in g])


# --- The module DAG -----------------------------------------------------------


@pytest.mark.parametrize("shape", DAG_SHAPES)
def test_dag_backward_matches_autodiff_and_finite_differences(shape):
    rng = np.random.default_rng(1)
    x1, x2, dy = (rng.normal(0, 2, shape) for _ in range(3))
    g = backprop.dag_backward(tf.constant(dy), tf.constant(x1), tf.constant(x2))

    def plain(a, b):
        s1, s2 = tf.sigmoid(a), tf.sigmoid(b)
        return tf.reduce_sum(dy * (tf.maximum(s1, s2) + tf.minimum(s1, s2)))

    def np_loss(a, b):
        s1, s2 = _np_sigmoid(a), _np_sigmoid(b)
        return np.sum(dy * (np.maximum(s1, s2) + np.minimum(s1, s2)))

    ref = _tape_grads(plain, x1, x2)
    for i, analytic in enumerate((g.dx1, g.dx2)):
        np.testing.assert_allclose(_np(analytic), ref[i], rtol=1e-12, atol=1e-15)
        fd = _central_differences(np_loss, [x1, x2], i)
        np.testing.assert_allclose(_np(analytic), fd, rtol=1e-6, atol=1e-9)
    # The lab's closed form dE/dx_i = dE/dy s_i (1 - s_i).
    for x, analytic in ((x1, g.dx1), (x2, g.dx2)):
        s = _np_sigmoid(x)
        np.testing.assert_allclose(_np(analytic), dy * s * (1 - s), rtol=1e-12)


def test_dag_intermediate_gradients_match_autodiff():
    rng = np.random.default_rng(2)
    x1, x2, dy = (rng.normal(0, 2, (4, 3)) for _ in range(3))
    s1, s2 = _np_sigmoid(x1), _np_sigmoid(x2)
    g = backprop.dag_backward(tf.constant(dy), tf.constant(x1), tf.constant(x2))
    ds1, ds2 = _tape_grads(
        lambda a, b: tf.reduce_sum(dy * (tf.maximum(a, b) + tf.minimum(a, b))), s1, s2
    )
    np.testing.assert_allclose(_np(g.ds1), ds1, rtol=1e-12)
    np.testing.assert_allclose(_np(g.ds2), ds2, rtol=1e-12)
    # The sum module passes dE/dy to both the max and the min module.
    np.testing.assert_array_equal(_np(g.dmax), dy)
    np.testing.assert_array_equal(_np(g.dmin), dy)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dag_forward_runs_the_modules_backward_passes(dtype):
    rng = np.random.default_rng(3)
    x1, x2, dy = (rng.normal(0, 2, (3, 4)).astype(dtype) for _ in range(3))
    y = backprop.dag_forward(tf.constant(x1), tf.constant(x2))
    s1, s2 = _np_sigmoid(_np(x1)), _np_sigmoid(_np(x2))
    tol = 1e-6 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(_np(y), s1 + s2, rtol=tol)
    dx1, dx2 = _tape_grads(
        lambda a, b: tf.reduce_sum(dy * backprop.dag_forward(a, b)), x1, x2
    )
    np.testing.assert_allclose(dx1, dy * s1 * (1 - s1), rtol=tol, atol=tol)
    np.testing.assert_allclose(dx2, dy * s2 * (1 - s2), rtol=tol, atol=tol)


def test_tie_routes_max_to_first_and_min_to_second_branch():
    a = tf.constant([0.5, 0.2, 0.9], tf.float64)
    b = tf.constant([0.5, 0.7, 0.1], tf.float64)  # a tie, then b larger, a larger
    dy = tf.constant([1.0, 2.0, 3.0], tf.float64)
    da, db = backprop.max_backward(dy, a, b)
    np.testing.assert_array_equal(_np(da), [1.0, 0.0, 3.0])
    np.testing.assert_array_equal(_np(db), [0.0, 2.0, 0.0])
    da, db = backprop.min_backward(dy, a, b)
    np.testing.assert_array_equal(_np(da), [0.0, 2.0, 0.0])
    np.testing.assert_array_equal(_np(db), [1.0, 0.0, 3.0])
    # The custom-gradient modules route the same way.
    ga, gb = _tape_grads(lambda p, q: tf.reduce_sum(dy * backprop.max_module(p, q)),
                         _np(a), _np(b))
    np.testing.assert_array_equal(ga, [1.0, 0.0, 3.0])
    ga, gb = _tape_grads(lambda p, q: tf.reduce_sum(dy * backprop.min_module(p, q)),
                         _np(a), _np(b))
    np.testing.assert_array_equal(gb, [1.0, 0.0, 3.0])


@pytest.mark.parametrize("shape", [(5,), (2, 3, 3, 2)])
def test_dag_gradient_stays_exact_at_a_tie(shape):
    rng = np.random.default_rng(4)
    x, dy = rng.normal(0, 2, shape), rng.normal(size=shape)
    s = _np_sigmoid(x)
    expected = dy * s * (1 - s)

    def np_loss(a, b):
        s1, s2 = _np_sigmoid(a), _np_sigmoid(b)
        return np.sum(dy * (np.maximum(s1, s2) + np.minimum(s1, s2)))

    g = backprop.dag_backward(tf.constant(dy), tf.constant(x), tf.constant(x))
    through_modules = _tape_grads(
        lambda a, b: tf.reduce_sum(dy * backprop.dag_forward(a, b)), x, x.copy()
    )
    for i, analytic in enumerate((g.dx1, g.dx2)):
        np.testing.assert_allclose(_np(analytic), expected, rtol=1e-12)
        np.testing.assert_allclose(through_modules[i], expected, rtol=1e-12)
        fd = _central_differences(np_loss, [x, x.copy()], i)
        np.testing.assert_allclose(_np(analytic), fd, rtol=1e-6, atol=1e-9)


# --- Batch norm -----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_batch_norm_backward_matches_autodiff_and_finite_differences(shape):
    rng = np.random.default_rng(5)
    x, gamma, beta, dy = _bn_inputs(rng, shape)
    axes = _axes(shape)
    g = _analytic_bn(x, gamma, dy)
    ref_dx, ref_dgamma, ref_dbeta = _tape_grads(
        lambda x_, g_, b_: tf.reduce_sum(dy * _tf_bn(x_, g_, b_, axes)), x, gamma, beta
    )
    np.testing.assert_allclose(g.dx, ref_dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g.dgamma.reshape(-1), ref_dgamma, rtol=1e-10)
    np.testing.assert_allclose(g.dbeta.reshape(-1), ref_dbeta, rtol=1e-10)

    def np_loss(x_, g_, b_):
        return np.sum(dy * _np_bn(x_, g_, b_, axes))

    inputs = [x, gamma, beta]
    for i, analytic in enumerate((g.dx, g.dgamma, g.dbeta)):
        fd = _central_differences(np_loss, inputs, i)
        np.testing.assert_allclose(analytic.reshape(fd.shape), fd, rtol=1e-6,
                                   atol=1e-8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_dvar_and_dmu_are_the_lab_partial_derivatives(shape, shift):
    """dE/dsigma^2 = df/dvar of f(x, mu, var); dE/dmu = dg/dmu of g(x, mu).

    Also off the mean (`shift`), where the second term of dE/dmu is not zero.
    """
    rng = np.random.default_rng(6)
    x, gamma, beta, dy = _bn_inputs(rng, shape)
    axes = _axes(shape)
    mu = x.mean(axis=axes, keepdims=True) + shift
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    g = _analytic_bn(x, gamma, dy, mu, var)

    dvar = _tape_grads(
        lambda v: tf.reduce_sum(dy * _tf_bn_explicit(x, mu, v, gamma, beta)), var
    )[0]
    dmu = _tape_grads(
        lambda m: tf.reduce_sum(dy * _tf_bn_of_mu(x, m, gamma, beta, axes)), mu
    )[0]
    np.testing.assert_allclose(g.dvar, dvar, rtol=1e-10)
    np.testing.assert_allclose(g.dmu, dmu, rtol=1e-10, atol=1e-12)

    def np_loss_of_mu(m):
        v = ((x - m) ** 2).mean(axis=axes, keepdims=True)
        return np.sum(dy * (gamma * (x - m) / np.sqrt(v + EPS) + beta))

    fd = _central_differences(np_loss_of_mu, [mu], 0)
    np.testing.assert_allclose(g.dmu, fd, rtol=1e-6, atol=1e-8)
    # The second term, dE/dsigma^2 * sum_k -2 (x_k - mu) / m, in closed form:
    # sum_k (x_k - mu) / m = mean(x) - mu = -shift.
    np.testing.assert_allclose(g.dmu_second_term, dvar * 2.0 * shift, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_second_dmu_term_is_numerically_zero_at_the_mean(shape, offset):
    rng = np.random.default_rng(7)
    x, gamma, _, dy = _bn_inputs(rng, shape, offset=offset)
    g = _analytic_bn(x, gamma, dy)
    first_term = g.dmu - g.dmu_second_term
    assert np.max(np.abs(first_term)) > 0.1
    # sum_k (x_k - mu) is 0 up to the rounding of mu, ~ eps |mu|, which is
    # relative to the spread of x.
    rounding = 100 * np.finfo(np.float64).eps * np.max(np.abs(x)) / np.std(x)
    second = np.max(np.abs(g.dmu_second_term))
    assert second <= rounding * np.max(np.abs(first_term))


# --- ManualBatchNorm, the layer that trains with the derivation ------------------


def _layer_and_reference_grads(shape, dtype, offset, scale, epsilon):
    rng = np.random.default_rng(8)
    c = shape[-1]
    layer = ManualBatchNorm(epsilon=epsilon, dtype=dtype)
    layer.build(shape)
    layer.gamma.assign(rng.uniform(0.5, 1.5, c))
    layer.beta.assign(rng.normal(size=c))
    x = tf.constant((offset + scale * rng.normal(size=shape)).astype(dtype))
    dy = tf.constant(rng.normal(size=shape).astype(dtype))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * dy)
    got = tape.gradient(loss, [x, layer.gamma, layer.beta])

    axes = _axes(shape)
    ref = _tape_grads(
        lambda x_, g_, b_: tf.reduce_sum(dy * _tf_bn(x_, g_, b_, axes, epsilon)),
        x.numpy(), layer.gamma.numpy(), layer.beta.numpy(),
    )
    return [_np(g) for g in got], ref


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize(
    "dtype, offset, scale, epsilon",
    [
        ("float32", 0.0, 1.0, 1e-3),
        ("float32", 1e4, 1.0, 1e-3),  # large offset
        ("float64", 1e4, 1e-4, 1e-12),  # large offset, tiny spread
    ],
)
def test_manual_batch_norm_gradients_equal_autodiff(shape, dtype, offset, scale,
                                                    epsilon):
    got, ref = _layer_and_reference_grads(shape, dtype, offset, scale, epsilon)
    for g, r in zip(got, ref):  # dE/dx, dE/dgamma, dE/dbeta
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * np.max(np.abs(r)))


@pytest.mark.parametrize("offset", [1e4, -3e4])
def test_moments_have_no_catastrophic_cancellation(offset):
    rng = np.random.default_rng(9)
    x = offset + 1e-4 * rng.normal(size=(64, 2))
    mean, var = backprop.batch_norm_moments(tf.constant(x), (0,))
    np.testing.assert_allclose(_np(var).reshape(-1), x.var(axis=0), rtol=1e-6)
    # E[x^2] - mu^2 would be far off here: the check above can fail.
    naive = (x**2).mean(axis=0) - x.mean(axis=0) ** 2
    assert np.max(np.abs(naive / x.var(axis=0) - 1)) > 1e-3


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_use_float32_statistics(dtype):
    rng = np.random.default_rng(10)
    shape = (8, 4, 4, 3)
    layer = ManualBatchNorm(momentum=0.0, dtype=f"mixed_{dtype}")
    x = tf.cast(rng.normal(3.0, 2.0, shape).astype("float32"), dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, "float32"))
    dx = tape.gradient(loss, x)
    assert y.dtype == dtype and dx.dtype == dtype
    assert np.all(np.isfinite(_np(tf.cast(dx, "float32"))))
    x64 = _np(tf.cast(x, "float32"))
    # momentum 0: the moving statistics are the batch statistics.
    np.testing.assert_allclose(layer.moving_mean.numpy(), x64.mean(axis=(0, 1, 2)),
                               rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               x64.var(axis=(0, 1, 2)), rtol=1e-5)
    expected = (x64 - x64.mean(axis=(0, 1, 2))) / np.sqrt(x64.var(axis=(0, 1, 2)) + EPS)
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]
    np.testing.assert_allclose(_np(tf.cast(y, "float32")), expected, rtol=0,
                               atol=eps * np.max(np.abs(expected)))


def test_batch_of_one_is_finite_and_outputs_beta():
    rng = np.random.default_rng(11)
    layer = ManualBatchNorm()
    layer.build((1, 4))
    beta = rng.normal(size=4)
    layer.gamma.assign(rng.uniform(0.5, 1.5, 4))
    layer.beta.assign(beta)
    x = tf.constant(rng.normal(size=(1, 4)), tf.float32)
    dy = tf.constant(rng.normal(size=(1, 4)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * dy)
    dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
    np.testing.assert_allclose(_np(y), beta[None], rtol=1e-6)
    # y = beta whatever x and gamma are.
    np.testing.assert_array_equal(_np(dx), np.zeros((1, 4)))
    np.testing.assert_array_equal(_np(dgamma), np.zeros(4))
    np.testing.assert_allclose(_np(dbeta), _np(dy)[0], rtol=1e-6)
