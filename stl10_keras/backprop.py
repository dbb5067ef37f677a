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

These functions use `keras.ops` only, so they run on every backend. They are
the one implementation that `layers.ManualBatchNorm` uses for its gradient.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from keras import ops


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


def batch_norm_moments(x, axes: Sequence[int]):
    """Mean and biased variance over `axes`, the variance from centred values.

    Computing `E[(x - mu)^2]` rather than `E[x^2] - mu^2` avoids catastrophic
    cancellation when the values have a large offset (e.g. 1e4) and a tiny
    spread (e.g. 1e-4).

    Args:
        x: input tensor.
        axes: reduction axes (all but the channel axis).

    Returns:
        `(mean, variance)` with the reduced axes kept (size 1).
    """
    mean = ops.mean(x, axis=axes, keepdims=True)
    centred = x - mean
    var = ops.mean(ops.square(centred), axis=axes, keepdims=True)
    return mean, var


def batch_norm_forward(x, gamma, beta, mean, var, epsilon: float):
    """`y = gamma * (x - mean) / sqrt(var + epsilon) + beta` (broadcasting)."""
    return (x - mean) * ops.rsqrt(var + epsilon) * gamma + beta


def batch_norm_backward(
    dy, x, mean, var, gamma, epsilon: float, axes: Sequence[int]
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

    Returns:
        `BatchNormGradients`: dx has the shape of `x`; dmu, dvar have the
        shape of `mean`; dgamma and dbeta have the shape of `mean` too
        (reshape to the parameter's shape where needed).
    """
    m = 1
    for a in axes:
        m = m * ops.shape(x)[a]  # dynamic batch size under tf.function
    m = ops.cast(m, x.dtype)
    inv_std = ops.rsqrt(var + epsilon)
    centred = x - mean
    dx_hat = dy * gamma
    dvar = ops.sum(dx_hat * centred, axis=axes, keepdims=True) * (-0.5) * inv_std**3
    dmu_second = dvar * ops.sum(-2.0 * centred, axis=axes, keepdims=True) / m
    dmu = ops.sum(-dx_hat, axis=axes, keepdims=True) * inv_std + dmu_second
    dx = dx_hat * inv_std + dmu / m + dvar * 2.0 * centred / m
    dgamma = ops.sum(dy * centred * inv_std, axis=axes, keepdims=True)
    dbeta = ops.sum(dy, axis=axes, keepdims=True)
    return BatchNormGradients(dx, dmu, dvar, dgamma, dbeta, dmu_second)


def batch_norm_train(x, gamma, beta, epsilon: float, axes: Sequence[int]):
    """Training-mode batch norm whose gradient is `batch_norm_backward`.

    Autodiff never differentiates the forward formula here: the gradient
    w.r.t. `x`, `gamma` and `beta` comes from the hand derivation through
    `keras.ops.custom_gradient`.

    Args:
        x: input (float32 or float64; cast lower precisions before calling).
        gamma, beta: scale and shift, broadcastable to `x` (reduced axes size 1).
        epsilon: the epsilon inside the square root.
        axes: the reduction axes.

    Returns:
        `(y, mean, var)`; `mean` and `var` carry no gradient (they are for the
        moving averages).
    """
    axes = tuple(axes)
    mean, var = batch_norm_moments(x, axes)
    mean = ops.stop_gradient(mean)
    var = ops.stop_gradient(var)

    # mean and var are passed in (not closed over) so every backend's
    # custom-gradient mechanism sees them as inputs; their gradient is zero
    # because the hand-derived dx already flows through mu and sigma^2.
    @ops.custom_gradient
    def _bn(x, gamma, beta, mean, var):
        y = batch_norm_forward(x, gamma, beta, mean, var, epsilon)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            g = batch_norm_backward(upstream, x, mean, var, gamma, epsilon, axes)
            return (
                g.dx,
                ops.reshape(g.dgamma, ops.shape(gamma)),
                ops.reshape(g.dbeta, ops.shape(beta)),
                ops.zeros_like(mean),
                ops.zeros_like(var),
            )

        return y, grad

    return _bn(x, gamma, beta, mean, var), mean, var
