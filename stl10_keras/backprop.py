"""The lab's part 1 as code: hand-derived backward passes.

Batch normalisation over a batch of `m` values per channel (the lab's notation,
with epsilon inside the square root, a learnable scale `gamma` and the shift
variable `beta`):

    mu      = sum_k x_k / m
    sigma^2 = sum_k (x_k - mu)^2 / m
    x_hat_k = (x_k - mu) / sqrt(sigma^2 + eps)
    y_k     = gamma * x_hat_k + beta

Backward, given dE/dy_k (`dy`), with dE/dx_hat_k = dE/dy_k * gamma:

    dE/dsigma^2 = sum_k dE/dx_hat_k (x_k - mu) (-1/2) (sigma^2 + eps)^(-3/2)
    dE/dmu      = sum_k -dE/dx_hat_k / sqrt(sigma^2 + eps)
                  + dE/dsigma^2 * sum_k -2 (x_k - mu) / m      (this term is 0)
    dE/dx_k     = dE/dx_hat_k / sqrt(sigma^2 + eps) + dE/dmu / m
                  + dE/dsigma^2 * 2 (x_k - mu) / m
    dE/dgamma   = sum_k dE/dy_k x_hat_k
    dE/dbeta    = sum_k dE/dy_k

The module DAG of the lab, `y = max(s1, s2) + min(s1, s2)` with
`s_i = sigmoid(x_i)` (so `y = s1 + s2`), is built from four modules, each with
its hand-written backward pass:

    sigmoid: ds/dx = s (1 - s)
    max(a, b): the gradient goes to the larger input (to `a` at a tie)
    min(a, b): the gradient goes to the smaller input (to `b` at a tie)
    sum(a, b): the gradient goes to both inputs unchanged

so `dE/dx_i = dE/dy * s_i (1 - s_i)`. At a tie `s1 == s2` max and min send the
gradient to different branches, so each branch still gets `dE/dy` once and the
sum's gradient stays exact (routing both to one branch would give it
`2 dE/dy` and the other nothing).

With a mask (weights `w_k` of 1 for the positions that count, 0 for the
others, as keras' BatchNormalization takes it) the statistics are over the
unmasked positions, `m = sum_k w_k` (`mu = sigma^2 = 0` when `m = 0`):

    mu      = sum_k w_k x_k / m
    sigma^2 = sum_k w_k (x_k - mu)^2 / m

and every output, masked or not, is normalised with them. The backward pass
is the lab's with the statistics' sums weighted by the mask; dE/dsigma^2 and
dE/dmu still sum over every output that the statistics reach:

    dE/dmu  = sum_k -dE/dx_hat_k / sqrt(sigma^2 + eps)
              + dE/dsigma^2 * sum_k -2 w_k (x_k - mu) / m  (this term is 0)
    dE/dx_k = dE/dx_hat_k / sqrt(sigma^2 + eps)
              + w_k (dE/dmu / m + dE/dsigma^2 * 2 (x_k - mu) / m)

(docs/backprop.md derives it). Synchronised batch norm takes the sums over
the replicas' batches: `all_reduce` sums a per-channel tensor across replicas
in the forward pass (the statistics) and in the backward pass (the sums in
dE/dsigma^2 and dE/dmu, because every replica's outputs depend on every
replica's inputs through the shared statistics).

These functions use `keras.ops` only, so they run on every backend. They are
the one implementation that `layers.ManualBatchNorm` uses for its gradient, and
`python -m stl10_keras.gradcheck` checks them against autodiff and finite
differences.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from keras import ops


def _upstream(args, upstream):
    """The incoming gradient of a `custom_gradient` backward function.

    TensorFlow and JAX pass it positionally, PyTorch as `upstream=`.
    """
    if upstream is None:
        upstream = args[0] if len(args) == 1 else args
    return upstream


# --- The module DAG: y = max(sigmoid(x1), sigmoid(x2)) + min(...) -------------


class DagGradients(NamedTuple):
    """Every gradient of the lab's module DAG, given dE/dy.

    `s1 = sigmoid(x1)`, `s2 = sigmoid(x2)`; `dmax` and `dmin` are the
    gradients at the outputs of the max and min modules (the sum module passes
    dE/dy to both).
    """

    dx1: object
    dx2: object
    ds1: object
    ds2: object
    dmax: object
    dmin: object


def sigmoid_backward(dy, s):
    """Backward of the sigmoid module: `dE/dx = dE/ds * s (1 - s)`.

    Args:
        dy: gradient at the module's output.
        s: the module's output `sigmoid(x)` (the derivative needs only `s`).

    Returns:
        The gradient at the module's input.
    """
    return dy * s * (1.0 - s)


def max_backward(dy, a, b):
    """Backward of `max(a, b)`: the gradient goes to the larger input.

    At a tie `a == b` it goes to `a` (the first input) only.

    Args:
        dy: gradient at the module's output.
        a, b: the module's inputs.

    Returns:
        `(da, db)`.
    """
    to_a = ops.greater_equal(a, b)
    zero = ops.zeros_like(dy)
    return ops.where(to_a, dy, zero), ops.where(to_a, zero, dy)


def min_backward(dy, a, b):
    """Backward of `min(a, b)`: the gradient goes to the smaller input.

    At a tie `a == b` it goes to `b` (the second input) only, the branch that
    `max_backward` leaves out, so `max(a, b) + min(a, b)` keeps the exact
    gradient `(dy, dy)` of `a + b` even at ties.

    Args:
        dy: gradient at the module's output.
        a, b: the module's inputs.

    Returns:
        `(da, db)`.
    """
    to_a = ops.less(a, b)
    zero = ops.zeros_like(dy)
    return ops.where(to_a, dy, zero), ops.where(to_a, zero, dy)


def sum_backward(dy):
    """Backward of `a + b`: both inputs get the output's gradient.

    Args:
        dy: gradient at the module's output.

    Returns:
        `(da, db)`, both `dy`.
    """
    return dy, dy


@ops.custom_gradient
def sigmoid_module(x):
    """`sigmoid(x)` whose gradient is `sigmoid_backward`."""
    s = ops.sigmoid(x)

    def grad(*args, upstream=None):
        return sigmoid_backward(_upstream(args, upstream), s)

    return s, grad


@ops.custom_gradient
def max_module(a, b):
    """`max(a, b)` elementwise, whose gradient is `max_backward`."""

    def grad(*args, upstream=None):
        return max_backward(_upstream(args, upstream), a, b)

    return ops.maximum(a, b), grad


@ops.custom_gradient
def min_module(a, b):
    """`min(a, b)` elementwise, whose gradient is `min_backward`."""

    def grad(*args, upstream=None):
        return min_backward(_upstream(args, upstream), a, b)

    return ops.minimum(a, b), grad


@ops.custom_gradient
def sum_module(a, b):
    """`a + b`, whose gradient is `sum_backward`."""

    def grad(*args, upstream=None):
        return sum_backward(_upstream(args, upstream))

    return a + b, grad


def dag_forward(x1, x2):
    """The lab's DAG `y = max(s1, s2) + min(s1, s2)`, `s_i = sigmoid(x_i)`.

    Built from the four modules, so autodiff of this function runs their
    hand-written backward passes (`dag_backward` is the same computation
    written out).

    Args:
        x1, x2: inputs of the same shape (elementwise).

    Returns:
        `y`, which equals `sigmoid(x1) + sigmoid(x2)`.
    """
    s1 = sigmoid_module(x1)
    s2 = sigmoid_module(x2)
    return sum_module(max_module(s1, s2), min_module(s1, s2))


def dag_backward(dy, x1, x2) -> DagGradients:
    """The lab's backward pass through the DAG, module by module.

    `dE/dx_i = dE/dy * s_i (1 - s_i)`; at a tie `s1 == s2` max sends its
    gradient to branch 1 and min to branch 2 (see `max_backward`,
    `min_backward`).

    Args:
        dy: dE/dy, same shape as `x1` and `x2`.
        x1, x2: the DAG's inputs.

    Returns:
        `DagGradients` (every field has the inputs' shape).
    """
    s1 = ops.sigmoid(x1)
    s2 = ops.sigmoid(x2)
    dmax, dmin = sum_backward(dy)
    ds1_max, ds2_max = max_backward(dmax, s1, s2)
    ds1_min, ds2_min = min_backward(dmin, s1, s2)
    ds1 = ds1_max + ds1_min
    ds2 = ds2_max + ds2_min
    return DagGradients(
        sigmoid_backward(ds1, s1), sigmoid_backward(ds2, s2), ds1, ds2, dmax, dmin
    )


# --- Batch normalisation ------------------------------------------------------


class BatchNormGradients(NamedTuple):
    """Every intermediate gradient of the lab's batch-norm derivation."""

    dx: object
    dmu: object
    dvar: object
    dgamma: object
    dbeta: object
    # The lab's second term of dE/dmu: `dE/dsigma^2 * sum_k -2 (x_k - mu) / m`.
    # Zero up to rounding because centred values sum to zero; kept so the
    # gradcheck can show it.
    dmu_second_term: object


def _count(x, axes: Sequence[int]):
    """The number of values reduced over `axes`, `m`, in `x`'s dtype."""
    m = 1
    for a in axes:
        m = m * ops.shape(x)[a]  # dynamic batch size under tf.function
    return ops.cast(m, x.dtype)


def _mean(x, axes: Sequence[int]):
    # Not ops.mean: on JAX and PyTorch it computes float64 in float32 (Keras'
    # type promotion maps 64-bit dtypes to 32-bit there); a sum keeps the dtype.
    return ops.sum(x, axis=axes, keepdims=True) / _count(x, axes)


def _identity(t):
    return t


class _Sums:
    """Per-channel sums over the batch: local, or across replicas.

    `count` is `m`, the number of values that enter the statistics (the
    unmasked ones, over every replica's batch when synchronised), at least 1
    so that a fully masked batch has statistics 0 rather than 0 / 0.
    """

    def __init__(self, x, axes, weights=None, all_reduce=None):
        self.axes = tuple(axes)
        self.weights = weights
        self.all_reduce = all_reduce or _identity
        if weights is None and all_reduce is None:
            self.count = _count(x, self.axes)
        else:
            local = (ops.sum(weights, axis=self.axes, keepdims=True)
                     if weights is not None else _count(x, self.axes))
            self.count = ops.maximum(self.all_reduce(local), 1.0)

    def local(self, t):
        """`sum_k t_k` over this replica's batch (every position)."""
        return ops.sum(t, axis=self.axes, keepdims=True)

    def total(self, t):
        """`sum_k t_k` over every replica's batch (every position)."""
        return self.all_reduce(self.local(t))

    def weighted(self, t):
        """`sum_k w_k t_k` over every replica's batch."""
        if self.weights is not None:
            t = t * self.weights
        return self.total(t)

    def mean(self, t):
        """`sum_k w_k t_k / m`: the mean over the positions that count."""
        return self.weighted(t) / self.count


def batch_norm_moments(x, axes: Sequence[int], weights=None, all_reduce=None):
    """Mean and biased variance over `axes`, the variance from centred values.

    Computing `E[(x - mu)^2]` rather than `E[x^2] - mu^2` avoids catastrophic
    cancellation when the values have a large offset (e.g. 1e4) and a tiny
    spread (e.g. 1e-4).

    Args:
        x: input tensor, float32 or float64 (computed in its dtype on every
            backend).
        axes: reduction axes (all but the channel axes).
        weights: optional mask, 1 where a value counts and 0 where not,
            shaped like `x` and in its dtype. With no value counting, both
            statistics are 0.
        all_reduce: optional function that sums a per-channel tensor across
            replicas (synchronised batch norm).

    Returns:
        `(mean, variance)` with the reduced axes kept (size 1).
    """
    sums = _Sums(x, axes, weights, all_reduce)
    mean = sums.mean(x)
    var = sums.mean(ops.square(x - mean))
    return mean, var


def batch_norm_forward(x, gamma, beta, mean, var, epsilon: float):
    """`y = gamma * (x - mean) / sqrt(var + epsilon) + beta` (broadcasting).

    Computed as `(x - mean) * scale + beta` with a per-channel `scale`: three
    passes over the tensor instead of four. (`x * scale + (beta - mean *
    scale)` would save one more but cancels catastrophically at large offsets.)
    """
    return (x - mean) * (gamma * ops.rsqrt(var + epsilon)) + beta


def batch_norm_backward(
    dy,
    x,
    mean,
    var,
    gamma,
    epsilon: float,
    axes: Sequence[int],
    centred=None,
    *,
    weights=None,
    all_reduce=None,
) -> BatchNormGradients:
    """The lab's batch-norm backward pass, term by term.

    Args:
        dy: dE/dy, same shape as `x`.
        x: the layer's input.
        mean, var: the batch statistics used in the forward pass (reduced axes
            kept, size 1), as returned by `batch_norm_moments`.
        gamma: scale, broadcastable to `x`.
        epsilon: the epsilon inside the square root.
        axes: the reduction axes.
        centred: `x - mean` if already computed.
        weights: the mask the statistics were computed with (see
            `batch_norm_moments`), or None.
        all_reduce: the cross-replica sum the statistics were computed with,
            or None.

    Returns:
        `BatchNormGradients`: dx has the shape of `x`; dmu, dvar have the
        shape of `mean`; dgamma and dbeta have the shape of `mean` too
        (reshape to the parameter's shape where needed). dgamma and dbeta are
        this replica's share; the optimizer sums them across replicas.
    """
    sums = _Sums(x, axes, weights, all_reduce)
    m = sums.count
    inv_std = ops.rsqrt(var + epsilon)
    if centred is None:
        centred = x - mean
    # dE/dx_hat_k = dE/dy_k * gamma, and gamma is constant over k, so it comes
    # out of every sum. The sums the derivation needs, taken over the tensor
    # once (sibling reductions of one input fuse into a single loop under XLA).
    # Every output depends on the statistics, so these two run over every
    # position (and every replica's batch); they are this replica's for
    # dgamma and dbeta.
    local_dy = sums.local(dy)
    local_dy_centred = sums.local(dy * centred)
    sum_dy = sums.all_reduce(local_dy)
    sum_dy_centred = sums.all_reduce(local_dy_centred)
    # Only the positions that count enter the statistics.
    sum_centred = sums.weighted(centred)
    # dE/dsigma^2 = sum_k dE/dx_hat_k (x_k - mu) (-1/2) (sigma^2 + eps)^(-3/2)
    dvar = gamma * sum_dy_centred * (-0.5) * inv_std**3
    # dE/dmu = sum_k -dE/dx_hat_k / sqrt(sigma^2 + eps)
    #          + dE/dsigma^2 * sum_k -2 w_k (x_k - mu) / m
    dmu_second = dvar * (-2.0) * sum_centred / m
    gamma_inv_std = gamma * inv_std  # one product for both uses: exact cancellation
    dmu = -sum_dy * gamma_inv_std + dmu_second
    # dE/dx_k = dE/dx_hat_k / sqrt(.) + w_k (dE/dmu / m + dE/dsigma^2 2 (x_k - mu) / m),
    # with the per-channel factors gathered first so that only three
    # element-wise passes touch the whole tensor.
    if weights is None:
        dx = dy * gamma_inv_std + centred * (dvar * 2.0 / m) + dmu / m
    else:  # the statistics' paths reach the unmasked positions only
        dx = dy * gamma_inv_std + (centred * (dvar * 2.0 / m) + dmu / m) * weights
    dgamma = local_dy_centred * inv_std  # sum_k dE/dy_k x_hat_k
    dbeta = local_dy  # sum_k dE/dy_k
    return BatchNormGradients(dx, dmu, dvar, dgamma, dbeta, dmu_second)


def batch_norm_train(
    x,
    gamma,
    beta,
    epsilon: float,
    axes: Sequence[int],
    weights=None,
    all_reduce=None,
):
    """Training-mode batch norm whose gradient is `batch_norm_backward`.

    Autodiff never differentiates the forward formula here: the gradient
    w.r.t. `x`, `gamma` and `beta` comes from the hand derivation through
    `keras.ops.custom_gradient`.

    Args:
        x: input (float32 or float64; cast lower precisions before calling).
        gamma, beta: scale and shift, broadcastable to `x` (reduced axes size 1).
        epsilon: the epsilon inside the square root.
        axes: the reduction axes.
        weights: optional mask, 1 where a value enters the statistics and 0
            where not, shaped like `x` and in its dtype (no gradient).
        all_reduce: optional function summing a per-channel tensor across
            replicas (synchronised batch norm); None for local statistics.

    Returns:
        `(y, mean, var)`; `mean` and `var` carry no gradient (they are for the
        moving averages).
    """
    axes = tuple(axes)

    # The statistics and the centred values are computed once, inside, and
    # reused by the backward pass; mean and var are also returned (for the
    # moving averages) and carry no gradient of their own.
    @ops.custom_gradient
    def _bn(x, gamma, beta):
        if weights is None and all_reduce is None:
            mean = _mean(x, axes)
            centred = x - mean
            var = _mean(ops.square(centred), axes)
        else:
            sums = _Sums(x, axes, weights, all_reduce)
            mean = sums.mean(x)
            centred = x - mean
            var = sums.mean(ops.square(centred))
        y = centred * (gamma * ops.rsqrt(var + epsilon)) + beta

        def grad(*args, upstream=None):
            upstream = _upstream(args, upstream)
            # TensorFlow passes one cotangent per output, JAX one tuple.
            dy = upstream[0] if isinstance(upstream, (tuple, list)) else upstream
            g = batch_norm_backward(
                dy, x, mean, var, gamma, epsilon, axes, centred=centred,
                weights=weights, all_reduce=all_reduce,
            )
            return (
                g.dx,
                ops.reshape(g.dgamma, ops.shape(gamma)),
                ops.reshape(g.dbeta, ops.shape(beta)),
            )

        return (y, mean, var), grad

    y, mean, var = _bn(x, gamma, beta)
    return y, ops.stop_gradient(mean), ops.stop_gradient(var)
