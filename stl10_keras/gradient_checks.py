"""The checks `python -m stl10_keras.gradcheck` runs, and their references.

Every analytic gradient of `stl10_keras.backprop` (the module DAG and batch
norm, term by term) is compared, on seeded random float64 inputs, with two
independent references:

- autodiff of the forward pass written plainly with `keras.ops` (no custom
  gradients), by the active backend (TensorFlow, JAX or PyTorch);
- central finite differences of that forward pass in float64.

The loss is `E = sum(dE/dy * y)` for a random `dE/dy`, so the gradient of `E`
is the backward pass given `dE/dy`. The errors are normwise: `max abs err =
max |analytic - reference|` and `max rel err = max abs err / max |reference|`.

The intermediates of the batch-norm derivation need their own references,
because autodiff of `y(x)` only gives dE/dx:

- dE/dsigma^2 is the derivative of `f(x, mu, var) = gamma (x - mu) /
  sqrt(var + eps) + beta` w.r.t. `var` with `x` and `mu` held fixed: in the
  lab's graph `var` feeds `y` directly and nothing else.
- dE/dmu is the derivative of `g(x, mu) = f(x, mu, var(x, mu))`, with
  `var(x, mu) = sum_k (x_k - mu)^2 / m`, w.r.t. `mu` with `x` held fixed: the
  total derivative through both of mu's explicit paths (mu -> y and
  mu -> sigma^2 -> y). Treating `mu` and `var` as independent inputs of `f`
  instead gives only the first term of the lab's dE/dmu; the two agree at
  `mu = mean(x)` because the second term, `dE/dsigma^2 * sum_k -2 (x_k - mu) /
  m`, is zero there (centred values sum to zero). The check also evaluates
  dE/dmu at a `mu` moved off the mean, where that term is not zero, and
  compares the second term with `dg/dmu - df/dmu` there.

Edge cases run the library's layer path (`ManualBatchNorm`,
`batch_norm_train`) against numpy float64: a batch of one (variance 0),
float16 and bfloat16 inputs (statistics in float32), and a large offset with a
tiny spread (variance from centred values).

The masked derivation (statistics over the unmasked positions, docs/backprop.md)
gets every batch-norm check again, with the mask as `weights`: padded
sequences `(batch, 5, channels)` and a fully masked batch, against the masked
forward pass written plainly, and `ManualBatchNorm(x, mask=...)` against numpy.

One check per quantity of the derivation, in the order of the table it
prints; the module (about 650 lines) is kept whole so that the checks read in
the derivation's order next to their references.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from stl10_keras.errors import ConfigError
from stl10_keras.io_utils import filtered_startup_logs

with filtered_startup_logs():  # the backend's native start-up logs
    import keras

import numpy as np
from keras import ops

from stl10_keras import backprop
from stl10_keras.backprop import (
    BatchNormGradients,
    DagGradients,
    batch_norm_moments,
    batch_norm_train,
    dag_forward,
)
from stl10_keras.layers import ManualBatchNorm

EPSILON = 1e-3  # ManualBatchNorm's default.
FD_STEP = 1e-6
MU_SHIFT = 0.5  # How far dE/dmu's off-mean check moves mu from the mean.
LARGE_OFFSET, TINY_SCALE, LARGE_OFFSET_EPSILON = 1e4, 1e-4, 1e-12
LARGE_OFFSET_TOLERANCE = 1e-6
FLOAT32_TOLERANCE = 1e-6
# Output rounding of a low-precision dtype is at most half its machine epsilon.
LOW_PRECISION_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}
STATS_TOLERANCE = 1e-5  # float32 statistics; float16 ones would be ~1e-3 off.
MASKED_STEPS = 5  # Time steps of the masked (N, T, C) sequences.

BnBackward = Callable[..., BatchNormGradients]
DagBackward = Callable[..., DagGradients]


@dataclass(frozen=True)
class CheckResult:
    """One row of the table: an analytic quantity against one reference."""

    quantity: str
    reference: str
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    passed: bool


def compare(
    quantity: str,
    reference: str,
    analytic,
    expected,
    tolerance: float,
    scale: float = 0.0,
    extra_ok: bool = True,
) -> CheckResult:
    """Compares `analytic` with `expected` normwise.

    Args:
        quantity: what is checked (first column).
        reference: where `expected` comes from (second column).
        analytic: the value under test.
        expected: the reference value (same number of elements).
        tolerance: the largest relative error that passes.
        scale: a floor for the relative error's denominator, for references
            that are (close to) zero: the size of the terms that cancel.
        extra_ok: an extra condition of the row (e.g. the output dtype).

    Returns:
        A `CheckResult`; it fails on a non-finite value or a shape mismatch.
    """
    a = np.asarray(analytic, dtype=np.float64)
    r = np.asarray(expected, dtype=np.float64)
    if a.size != r.size:
        return CheckResult(quantity, reference, np.inf, np.inf, tolerance, False)
    a, r = a.reshape(-1), r.reshape(-1)
    abs_err = float(np.max(np.abs(a - r))) if a.size else 0.0
    denom = max(float(np.max(np.abs(r))) if r.size else 0.0, scale)
    rel_err = abs_err / denom if denom > 0 else abs_err
    finite = bool(np.all(np.isfinite(a)))
    passed = finite and extra_ok and rel_err <= tolerance
    return CheckResult(quantity, reference, abs_err, rel_err, tolerance, passed)


# --- References -------------------------------------------------------------


def autodiff(loss_fn: Callable, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Gradients of a scalar `loss_fn(*inputs)` by the active backend's autodiff.

    Args:
        loss_fn: a function of backend tensors returning a scalar.
        inputs: numpy arrays (their dtype is kept).

    Returns:
        One numpy float64 array per input (zeros where unconnected).
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(a) for a in inputs]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            loss = loss_fn(*tensors)
        grads = tape.gradient(
            loss, tensors, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
    elif backend == "jax":
        import jax

        tensors = [jax.numpy.asarray(a) for a in inputs]
        grads = jax.grad(loss_fn, argnums=tuple(range(len(inputs))))(*tensors)
    elif backend == "torch":
        import torch

        tensors = [ops.convert_to_tensor(a).requires_grad_() for a in inputs]
        grads = torch.autograd.grad(loss_fn(*tensors), tensors, allow_unused=True)
        grads = [
            torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)
        ]
    else:
        raise ConfigError(
            f"gradcheck needs a backend with autodiff, not {backend!r}: set "
            "KERAS_BACKEND to tensorflow, jax or torch."
        )
    return [np.asarray(ops.convert_to_numpy(g), dtype=np.float64) for g in grads]


def central_differences(
    loss_fn: Callable, inputs: Sequence[np.ndarray], wrt: int, step: float = FD_STEP
) -> np.ndarray:
    """`(E(v + h) - E(v - h)) / 2h` for every element `v` of `inputs[wrt]`.

    Args:
        loss_fn: a function of backend tensors returning a scalar.
        inputs: float64 numpy arrays.
        wrt: the index of the input to differentiate.
        step: `h`.

    Returns:
        The gradient estimate, shaped like `inputs[wrt]`.
    """
    args = [np.array(a, dtype=np.float64) for a in inputs]
    flat = args[wrt].reshape(-1)  # a view: writing it perturbs args[wrt]
    grad = np.empty_like(flat)

    def loss() -> float:
        value = loss_fn(*[ops.convert_to_tensor(a) for a in args])
        if keras.backend.standardize_dtype(value.dtype) != "float64":
            raise RuntimeError("finite differences must run in float64.")
        return float(ops.convert_to_numpy(value))

    for i in range(flat.size):
        original = flat[i]
        flat[i] = original + step
        plus = loss()
        flat[i] = original - step
        minus = loss()
        flat[i] = original
        grad[i] = (plus - minus) / (2.0 * step)
    return grad.reshape(args[wrt].shape)


def weighted_sum(forward: Callable, dy: np.ndarray) -> Callable:
    """The loss `E = sum(dy * forward(*args))`, so that dE/dy = `dy`."""
    return lambda *args: ops.sum(forward(*args) * ops.convert_to_tensor(dy))


# The forward passes written plainly (keras.ops, no custom gradient).


def plain_mean(x, axes, w=None):
    """Mean over `axes`; with a numpy mask `w`, over the positions where w = 1.

    The mask's count is a constant (numpy), at least 1: a fully masked
    batch's statistics are 0, as keras' BatchNormalization gives.
    """
    # ops.mean would compute float64 in float32 on JAX and PyTorch.
    if w is None:
        m = int(np.prod([x.shape[a] for a in axes]))
        return ops.sum(x, axis=axes, keepdims=True) / m
    m = np.maximum(np.sum(w, axis=axes, keepdims=True), 1.0)
    return ops.sum(x * w, axis=axes, keepdims=True) / m


def plain_dag(x1, x2):
    s1, s2 = ops.sigmoid(x1), ops.sigmoid(x2)
    return ops.maximum(s1, s2) + ops.minimum(s1, s2)


def plain_sigmoid_sum(x1, x2):
    return ops.sigmoid(x1) + ops.sigmoid(x2)


def plain_bn_explicit(x, mu, var, gamma, beta, epsilon=EPSILON):
    """`f(x, mu, var)`: batch norm with `mu` and `var` as free inputs."""
    return gamma * (x - mu) / ops.sqrt(var + epsilon) + beta


def plain_bn_of_mu(x, mu, gamma, beta, axes, epsilon=EPSILON, w=None):
    """`g(x, mu) = f(x, mu, var(x, mu))`, `var(x, mu) = mean((x - mu)^2)`."""
    var = plain_mean(ops.square(x - mu), axes, w)
    return plain_bn_explicit(x, mu, var, gamma, beta, epsilon)


def plain_bn(x, gamma, beta, axes, epsilon=EPSILON, w=None):
    """Batch norm of `x` in training mode, the whole forward pass.

    With a mask `w` the statistics are over the unmasked positions and every
    position is normalised with them (keras' BatchNormalization).
    """
    mu = plain_mean(x, axes, w)
    return plain_bn_of_mu(x, mu, gamma, beta, axes, epsilon, w)


# --- Deliberately wrong backward passes (for --inject-bug and tests) ---------


def _bn_drop_dvar_term(dy, x, mean, var, gamma, epsilon, axes):
    """dE/dx without its `dE/dsigma^2 * 2 (x_k - mu) / m` term."""
    g = backprop.batch_norm_backward(dy, x, mean, var, gamma, epsilon, axes)
    m = int(np.prod([ops.shape(x)[a] for a in axes]))
    return g._replace(dx=g.dx - g.dvar * 2.0 * (x - mean) / m)


def _bn_mask_ignored(dy, x, mean, var, gamma, epsilon, axes, weights=None):
    """The unmasked backward applied to a masked forward pass: every position
    is treated as if it entered the statistics (m = all positions)."""
    return backprop.batch_norm_backward(dy, x, mean, var, gamma, epsilon, axes)


def _dag_ties_to_x1(dy, x1, x2):
    """Both max and min send the gradient to x1 at a tie (tf.minimum's rule)."""
    g = backprop.dag_backward(dy, x1, x2)
    tie = ops.equal(ops.sigmoid(x1), ops.sigmoid(x2))
    return g._replace(
        dx1=ops.where(tie, 2.0 * g.dx1, g.dx1),
        dx2=ops.where(tie, ops.zeros_like(g.dx2), g.dx2),
    )


#: `--inject-bug NAME` -> (the backward pass it replaces, the wrong one); the
#: command lists the names as `gradcheck.BUG_NAMES`, before keras loads.
INJECTABLE_BUGS: dict[str, tuple[str, Callable]] = {
    "drop-dvar-term": ("bn", _bn_drop_dvar_term),
    "mask-ignored": ("masked_bn", _bn_mask_ignored),
    "ties-to-x1": ("dag", _dag_ties_to_x1),
}


# --- The checks -------------------------------------------------------------


def check_dag(
    rng: np.random.Generator, shape: tuple, tol: float, backward: DagBackward
) -> list[CheckResult]:
    """The DAG's dE/dx1, dE/dx2 (also at ties) against autodiff and FD."""
    results = []
    x1 = rng.normal(0.0, 2.0, size=shape)
    dy = rng.normal(size=shape)
    cases = [("", rng.normal(0.0, 2.0, size=shape), plain_dag, "max(s1,s2)+min(s1,s2)")]
    # At a tie max and min are not differentiable: each backend's autodiff of
    # plain max/min picks its own convention, so the reference is the smooth
    # equivalent s1 + s2 (finite differences of the DAG itself agree).
    cases.append((" tie x1==x2", x1.copy(), plain_sigmoid_sum, "s1+s2"))
    for label, x2, plain, formula in cases:
        t1, t2 = ops.convert_to_tensor(x1), ops.convert_to_tensor(x2)
        g = backward(ops.convert_to_tensor(dy), t1, t2)
        ref_ad = autodiff(weighted_sum(plain, dy), [x1, x2])
        through_modules = autodiff(weighted_sum(dag_forward, dy), [x1, x2])
        for i, (name, analytic) in enumerate((("dx1", g.dx1), ("dx2", g.dx2))):
            analytic = ops.convert_to_numpy(analytic)
            fd = central_differences(weighted_sum(plain_dag, dy), [x1, x2], i)
            results += [
                compare(f"DAG{label} dE/{name}", f"autodiff {formula}", analytic,
                        ref_ad[i], tol),
                compare(f"DAG{label} dE/{name}", "central differences", analytic,
                        fd, tol),
                compare(f"DAG{label} dE/{name} via dag_forward",
                        f"autodiff {formula}", through_modules[i], ref_ad[i], tol),
            ]
    return results


def check_batch_norm(
    rng: np.random.Generator,
    shape: tuple,
    layout: str,
    tol: float,
    backward: BnBackward,
    mask: np.ndarray | None = None,
) -> list[CheckResult]:
    """Every term of the batch-norm derivation against autodiff and FD.

    With `mask` (one dimension less than `shape`, 1 where a position enters
    the statistics, keras' convention) the masked derivation is checked: the
    backward pass gets the mask as `weights`, the references use the plain
    masked forward pass.
    """
    axes = tuple(range(len(shape) - 1))
    channels = shape[-1]
    bshape = (1,) * len(axes) + (channels,)
    x = rng.normal(rng.normal(size=channels), rng.uniform(0.5, 2.0, channels), shape)
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.normal(size=channels)
    dy = rng.normal(size=shape)
    w = None if mask is None else np.broadcast_to(mask[..., None], shape) * 1.0
    count = (float(np.prod([shape[a] for a in axes])) if w is None
             else np.maximum(w.sum(axis=axes, keepdims=True), 1.0))

    def np_mean(a):  # numpy mean over the positions that count
        return (a if w is None else a * w).sum(axis=axes, keepdims=True) / count

    mu = np_mean(x)
    var = np_mean((x - mu) ** 2)

    t = ops.convert_to_tensor
    masked = {} if w is None else {"weights": t(w)}
    mean_t, var_t = batch_norm_moments(t(x), axes, **masked)
    g = backward(t(dy), t(x), mean_t, var_t, t(gamma.reshape(bshape)), EPSILON, axes,
                 **masked)
    g = {k: ops.convert_to_numpy(v) for k, v in g._asdict().items()}

    whole = weighted_sum(lambda x_, g_, b_: plain_bn(x_, g_, b_, axes, w=w), dy)
    of_mu = weighted_sum(
        lambda x_, m_: plain_bn_of_mu(x_, m_, gamma, beta, axes, w=w), dy
    )
    explicit = weighted_sum(
        lambda x_, m_, v_: plain_bn_explicit(x_, m_, v_, gamma, beta), dy
    )
    ad_whole = autodiff(whole, [x, gamma, beta])  # dx, dgamma, dbeta
    ad_dmu = autodiff(of_mu, [x, mu])[1]
    ad_dmu_explicit, ad_dvar = autodiff(explicit, [x, mu, var])[1:]

    p = f"BN {layout} "
    ad_y = "autodiff y(x, gamma, beta)"
    # (quantity, analytic, autodiff reference and its name, loss for FD, its
    # inputs, which input)
    terms = [
        ("dE/dx", g["dx"], ad_whole[0], ad_y, whole, [x, gamma, beta], 0),
        ("dE/dmu", g["dmu"], ad_dmu, "autodiff g(x, mu), total", of_mu, [x, mu], 1),
        ("dE/dsigma^2", g["dvar"], ad_dvar, "autodiff f(x, mu, var)", explicit,
         [x, mu, var], 2),
        ("dE/dgamma", g["dgamma"], ad_whole[1], ad_y, whole, [x, gamma, beta], 1),
        ("dE/dbeta", g["dbeta"], ad_whole[2], ad_y, whole, [x, gamma, beta], 2),
    ]
    # f's curvature in sigma^2 grows as (sigma^2 + eps)^-2: a fully masked
    # batch (sigma^2 = 0) needs a step that small relative to eps, or the
    # truncation error of the differences alone is ~6e-7.
    var_step = FD_STEP * min(1.0, float(np.min(var)) + EPSILON)
    results = []
    for name, analytic, ref, ref_name, loss, inputs, wrt in terms:
        step = var_step if name == "dE/dsigma^2" else FD_STEP
        fd = central_differences(loss, inputs, wrt, step)
        results.append(compare(p + name, ref_name, analytic, ref, tol))
        results.append(compare(p + name, "central differences", analytic, fd, tol))

    # The lab's second term of dE/dmu: zero at the mean, measured against the
    # size of the first term.
    results.append(compare(
        p + "dE/dmu 2nd term", "0 (centred values sum to 0)",
        g["dmu_second_term"], np.zeros_like(mu), tol,
        scale=float(np.max(np.abs(ad_dmu_explicit))),
    ))
    # Off the mean the second term is not zero: check it, and dE/dmu, there.
    mu_off = mu + MU_SHIFT
    var_off = np_mean((x - mu_off) ** 2)
    g_off = backward(t(dy), t(x), t(mu_off), t(var_off), t(gamma.reshape(bshape)),
                     EPSILON, axes, **masked)
    ad_off_total = autodiff(of_mu, [x, mu_off])[1]
    ad_off_explicit = autodiff(explicit, [x, mu_off, var_off])[1]
    results += [
        compare(p + f"dE/dmu, mu = mean+{MU_SHIFT:g}", "autodiff g(x, mu), total",
                ops.convert_to_numpy(g_off.dmu), ad_off_total, tol),
        compare(p + f"dE/dmu 2nd term, mu = mean+{MU_SHIFT:g}",
                "autodiff dg/dmu - df/dmu",
                ops.convert_to_numpy(g_off.dmu_second_term),
                ad_off_total - ad_off_explicit, tol),
    ]

    # The wiring that ManualBatchNorm trains with: keras custom_gradient.
    def trained(x_, g_, b_):
        return batch_norm_train(x_, ops.reshape(g_, bshape), ops.reshape(b_, bshape),
                                EPSILON, axes, **masked)[0]

    via_train = autodiff(weighted_sum(trained, dy), [x, gamma, beta])
    for name, got, ref in zip(("dx", "dgamma", "dbeta"), via_train, ad_whole):
        results.append(compare(f"{p}dE/{name} via batch_norm_train", ad_y, got, ref,
                               tol))
    return results


def check_batch_of_one(rng: np.random.Generator, channels: int) -> list[CheckResult]:
    """A batch of one dense row: variance 0, `y = beta` whatever x and gamma.

    Epsilon keeps `1 / sqrt(sigma^2 + eps)` finite.
    """
    gamma = rng.uniform(0.5, 1.5, channels).astype("float32")
    beta = rng.normal(size=channels).astype("float32")
    x1 = rng.normal(size=(1, channels)).astype("float32")
    dy1 = rng.normal(size=(1, channels)).astype("float32")
    layer = ManualBatchNorm(epsilon=EPSILON)
    layer.build((1, channels))
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    y1 = ops.convert_to_numpy(layer(x1, training=True))
    dx, dgamma, dbeta = autodiff(
        weighted_sum(
            lambda x_, g_, b_: batch_norm_train(
                x_, g_[None], b_[None], EPSILON, (0,))[0], dy1),
        [x1, gamma, beta],
    )
    cancelling = float(np.max(np.abs(dy1 * gamma))) / np.sqrt(EPSILON)
    return [
        compare("batch of 1 (f32): y", "numpy: y = beta", y1, beta[None],
                FLOAT32_TOLERANCE),
        compare("batch of 1 (f32): dE/dx", "0: y does not depend on x", dx,
                np.zeros_like(dx), FLOAT32_TOLERANCE, scale=cancelling),
        compare("batch of 1 (f32): dE/dgamma, dE/dbeta", "numpy: 0, sum_k dE/dy_k",
                np.concatenate([dgamma, dbeta]),
                np.concatenate([np.zeros(channels), dy1.sum(axis=0)]),
                FLOAT32_TOLERANCE),
    ]


def check_low_precision(rng: np.random.Generator, shape: tuple) -> list[CheckResult]:
    """float16/bfloat16 inputs: statistics in float32, output in the input dtype."""
    results = []
    channels = shape[-1]
    axes = tuple(range(len(shape) - 1))
    for dtype, eps in LOW_PRECISION_EPS.items():
        layer = ManualBatchNorm(epsilon=EPSILON, momentum=0.0, dtype=f"mixed_{dtype}")
        layer.build(shape)
        layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
        layer.beta.assign(rng.normal(size=channels))
        x = ops.cast(rng.normal(3.0, 2.0, shape).astype("float32"), dtype)
        y = layer(x, training=True)
        same_dtype = keras.backend.standardize_dtype(y.dtype) == dtype
        x64 = ops.convert_to_numpy(ops.cast(x, "float32")).astype(np.float64)
        mu = x64.mean(axis=axes)
        var = x64.var(axis=axes)
        gamma = layer.gamma.numpy().astype(np.float64)
        beta = layer.beta.numpy().astype(np.float64)
        y64 = gamma * (x64 - mu) / np.sqrt(var + EPSILON) + beta
        y32 = ops.convert_to_numpy(ops.cast(y, "float32"))
        stats = np.concatenate(
            [layer.moving_mean.numpy(), layer.moving_variance.numpy()]
        )
        results += [
            compare(f"{dtype} in: y ({dtype} out)", "numpy f64 on the same inputs",
                    y32, y64, eps, extra_ok=same_dtype),
            compare(f"{dtype} in: batch mean, sigma^2 (f32)",
                    "numpy f64 on the same inputs", stats,
                    np.concatenate([mu, var]), STATS_TOLERANCE),
        ]
    return results


def check_large_offset(rng: np.random.Generator, shape: tuple) -> list[CheckResult]:
    """Offset 1e4, spread 1e-4, float64: no catastrophic cancellation.

    `E[x^2] - mu^2` would lose every digit (x^2 ~ 1e8, sigma^2 ~ 1e-8); the
    variance of centred values keeps them.
    """
    channels = shape[-1]
    axes = tuple(range(len(shape) - 1))
    x = LARGE_OFFSET + TINY_SCALE * rng.normal(size=shape)
    dy = rng.normal(size=shape)
    layer = ManualBatchNorm(epsilon=LARGE_OFFSET_EPSILON, momentum=0.0, dtype="float64")
    y = ops.convert_to_numpy(layer(x, training=True))
    var_layer = layer.moving_variance.numpy()
    ones = np.ones((1,) * len(axes) + (channels,))
    zeros = np.zeros_like(ones)
    dx = autodiff(
        weighted_sum(lambda x_, g_, b_: batch_norm_train(
            x_, g_, b_, LARGE_OFFSET_EPSILON, axes)[0], dy), [x, ones, zeros])[0]
    mu, var = x.mean(axis=axes), x.var(axis=axes)  # numpy: two-pass, pairwise sum
    std = np.sqrt(var + LARGE_OFFSET_EPSILON)
    x_hat = (x - mu) / std
    # The compact form of dE/dx, derived independently of the lab's terms.
    dx_ref = (dy - dy.mean(axis=axes) - x_hat * (dy * x_hat).mean(axis=axes)) / std
    label = f"offset {LARGE_OFFSET:g}, scale {TINY_SCALE:g} (f64)"
    return [
        compare(f"{label}: sigma^2", "numpy f64 var", var_layer, var,
                LARGE_OFFSET_TOLERANCE),
        compare(f"{label}: y", "numpy f64", y, x_hat, LARGE_OFFSET_TOLERANCE),
        compare(f"{label}: dE/dx", "numpy f64 compact formula", dx, dx_ref,
                LARGE_OFFSET_TOLERANCE),
    ]


def sequence_mask(rng: np.random.Generator, batch: int) -> np.ndarray:
    """A padding mask `(batch, MASKED_STEPS)`: each sequence keeps a random
    length, the first all its steps and the last none (a fully padded one)."""
    lengths = rng.integers(1, MASKED_STEPS + 1, size=batch)
    lengths[0], lengths[-1] = MASKED_STEPS, 0
    return (np.arange(MASKED_STEPS)[None, :] < lengths[:, None]).astype(np.float64)


def check_masked_layer(
    rng: np.random.Generator, mask: np.ndarray, channels: int, label: str
) -> list[CheckResult]:
    """`ManualBatchNorm(x, mask=...)` in float64 against numpy: the output and
    the batch statistics (momentum 0) over the unmasked positions only."""
    shape = mask.shape + (channels,)
    x = rng.normal(2.0, 3.0, shape)
    layer = ManualBatchNorm(epsilon=EPSILON, momentum=0.0, dtype="float64")
    layer.build(shape)
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.normal(size=channels)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    y = ops.convert_to_numpy(layer(x, training=True, mask=mask > 0))
    unmasked = x[mask > 0]  # (number of unmasked positions, channels)
    if len(unmasked):
        mu, var = unmasked.mean(axis=0), unmasked.var(axis=0)
    else:  # keras' BatchNormalization: statistics 0
        mu = var = np.zeros(channels)
    expected = gamma * (x - mu) / np.sqrt(var + EPSILON) + beta
    stats = np.concatenate([layer.moving_mean.numpy(), layer.moving_variance.numpy()])
    return [
        compare(f"{label}: y (f64)", "numpy f64, unmasked statistics", y, expected,
                FLOAT32_TOLERANCE),
        compare(f"{label}: batch mean, sigma^2", "numpy f64 of unmasked x", stats,
                np.concatenate([mu, var]), FLOAT32_TOLERANCE),
    ]


def check_masks(
    rng: np.random.Generator,
    batch: int,
    channels: int,
    tol: float,
    backward: BnBackward,
) -> list[CheckResult]:
    """The masked derivation: padded sequences and a fully masked batch."""
    shape = (batch, MASKED_STEPS, channels)
    padded = sequence_mask(rng, batch)
    nothing = np.zeros((batch, MASKED_STEPS))
    results = []
    for name, mask in (("masked (N,T,C)", padded), ("fully masked", nothing)):
        results += check_batch_norm(rng, shape, name, tol, backward, mask=mask)
        results += check_masked_layer(rng, mask, channels, f"{name} layer")
    return results


def naive_variance_error(rng: np.random.Generator, shape: tuple) -> float:
    """Relative error of `E[x^2] - mu^2` at a large offset (for contrast)."""
    axes = tuple(range(len(shape) - 1))
    x = LARGE_OFFSET + TINY_SCALE * rng.normal(size=shape)
    naive = (x**2).mean(axis=axes) - x.mean(axis=axes) ** 2
    return float(np.max(np.abs(naive / x.var(axis=axes) - 1.0)))


def run_checks(
    seed: int = 0,
    batch: int = 8,
    channels: int = 3,
    height: int = 4,
    width: int = 4,
    tolerance: float = 1e-6,
    bn_backward: BnBackward = backprop.batch_norm_backward,
    dag_backward: DagBackward = backprop.dag_backward,
    masked_bn_backward: BnBackward = backprop.batch_norm_backward,
) -> list[CheckResult]:
    """Runs every check on seeded random inputs.

    Args:
        seed: seeds the inputs.
        batch, channels: dense inputs are `(batch, channels)`.
        height, width: convolutional inputs are `(batch, height, width,
            channels)`; 0 and 0 skip them.
        tolerance: the largest relative error of a float64 gradient check.
        bn_backward: the batch-norm backward pass under test (signature of
            `backprop.batch_norm_backward`).
        dag_backward: the DAG backward pass under test (signature of
            `backprop.dag_backward`).
        masked_bn_backward: the batch-norm backward pass the masked checks
            run (it also takes `weights=`); padded sequences
            `(batch, MASKED_STEPS, channels)` and a fully masked batch.

    Returns:
        One `CheckResult` per row.
    """
    _enable_float64()
    rng = np.random.default_rng(seed)
    dense = (batch, channels)
    layouts = [("dense", dense)]
    if height and width:
        layouts.append(("conv", (batch, height, width, channels)))
    results = check_dag(rng, dense, tolerance, dag_backward)
    for name, shape in layouts:
        results += check_batch_norm(rng, shape, name, tolerance, bn_backward)
    results += check_batch_of_one(rng, channels)
    results += check_low_precision(rng, layouts[-1][1])
    results += check_large_offset(rng, layouts[-1][1])
    results += check_masks(rng, batch, channels, tolerance, masked_bn_backward)
    return results


def _enable_float64() -> None:
    # JAX computes in float32 unless told otherwise; the checks need float64.
    if keras.backend.backend() == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
