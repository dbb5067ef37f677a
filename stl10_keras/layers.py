"""ManualBatchNorm: batch normalisation whose backward pass is the lab's derivation.

A drop-in for `keras.layers.BatchNormalization` (keras' own tests of that
layer pass against it, batch renormalisation aside). Backend-agnostic: imports
keras only (never tensorflow), so the model that uses it trains under
TensorFlow, JAX or PyTorch.
"""

from __future__ import annotations

import sys

import keras
from keras import constraints, initializers, ops, regularizers

from stl10_keras.backprop import batch_norm_forward, batch_norm_train

RENORM_REFUSED = (
    "ManualBatchNorm does not implement renorm=True (batch renormalization's "
    "backward pass is not the lab's derivation); use "
    "keras.layers.BatchNormalization(renorm=True) instead."
)


def _replica_sum():
    """Sums a tensor across the replicas of a tf.distribute strategy, or None.

    None outside a replica context or with one replica: the statistics are
    then the local batch's, as keras' `ops.moments(synchronized=True)` does.
    """
    # synchronized=True is refused on every other backend, and on TensorFlow
    # keras has loaded it already: use that module; the core imports no
    # TensorFlow, so it runs where TensorFlow is absent.
    tf = sys.modules["tensorflow"]
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return lambda t: context.all_reduce(tf.distribute.ReduceOp.SUM, t)


@keras.saving.register_keras_serializable(package="stl10_keras")
class ManualBatchNorm(keras.layers.Layer):
    """Batch normalisation with a hand-written backward pass.

    In training, normalises over every axis but `axis` with the batch's mean
    and (biased) variance, `y = gamma * (x - mu) / sqrt(sigma^2 + epsilon) +
    beta`, and updates moving statistics
    `moving = moving * momentum + batch * (1 - momentum)` as
    `keras.layers.BatchNormalization` does. At inference it uses the moving
    statistics. The gradient w.r.t. the input, `gamma` and `beta` is
    `stl10_keras.backprop.batch_norm_backward` (through
    `keras.ops.custom_gradient`), not autodiff of the forward formula.

    A frozen layer (`trainable = False`) runs in inference mode whatever
    `training` says and updates nothing, as keras' BatchNormalization does.
    With a mask (e.g. from `keras.layers.Masking`), the batch statistics are
    over the unmasked positions only (0 when none is unmasked), and the
    backward pass is the derivation with mask-weighted sums.

    Statistics and the normalisation are computed in float32 (or float64 for
    float64 inputs) even under mixed precision; the output has the input's
    dtype.

    Args:
        axis: the channel axis, or a list of axes (normalised per channel).
        momentum: moving-average momentum.
        epsilon: added to the variance inside the square root; it also keeps a
            batch of one (variance 0) finite.
        center: learn the shift `beta` (the lab's shift variable).
        scale: learn the scale `gamma`.
        beta_initializer, gamma_initializer: initializers of the weights.
        moving_mean_initializer, moving_variance_initializer: initializers of
            the moving statistics.
        beta_regularizer, gamma_regularizer: optional regularizers.
        beta_constraint, gamma_constraint: optional constraints.
        synchronized: TensorFlow backend only: under a distribution strategy,
            the batch statistics are over every replica's batch, and the
            backward pass sums across replicas accordingly.
        renorm: must be False: batch renormalization is refused (its backward
            pass is not the lab's derivation). `renorm_clipping` and
            `renorm_momentum` are accepted and ignored, as keras does without
            renorm, so a BatchNormalization config loads.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: input tensor of any rank.
        training: batch statistics (True) or moving statistics (False).
        mask: optional, one dimension less than `inputs`, True (or non-zero)
            where a position enters the batch statistics.
    """

    def __init__(
        self,
        axis: int | list[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized: bool = False,
        renorm: bool = False,
        renorm_clipping=None,
        renorm_momentum: float = 0.99,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if renorm:
            raise ValueError(RENORM_REFUSED)
        if synchronized and keras.backend.backend() != "tensorflow":
            # keras' BatchNormalization's own sentence.
            raise ValueError(
                "Argument synchronized=True is only supported "
                "with the TensorFlow backend."
            )
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
        if epsilon <= 0.0:
            raise ValueError(f"epsilon must be positive, got {epsilon}.")
        self.axis = [int(a) for a in axis] if isinstance(axis, (list, tuple)) else (
            int(axis)
        )
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(
            moving_variance_initializer
        )
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.synchronized = bool(synchronized)
        self.supports_masking = True
        self.gamma = None
        self.beta = None
        self.moving_mean = None
        self.moving_variance = None

    def _channel_axes(self, ndim: int) -> tuple[int, ...]:
        axes = self.axis if isinstance(self.axis, list) else [self.axis]
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"Axis {a} is out of bounds for an input of rank {ndim}. "
                    f"Received: axis={self.axis}"
                )
        normalised = sorted({a % ndim for a in axes})
        if len(normalised) != len(axes):
            raise ValueError(f"axis names an axis twice: {self.axis}.")
        return tuple(normalised)

    def build(self, input_shape):
        ndim = len(input_shape)
        channel_axes = self._channel_axes(ndim)
        shape = tuple(input_shape[a] for a in channel_axes)
        if None in shape:
            raise ValueError(
                f"ManualBatchNorm needs known sizes of the axis {self.axis}; "
                f"got input shape {tuple(input_shape)}."
            )
        self._reduction_axes = tuple(i for i in range(ndim) if i not in channel_axes)
        self._broadcast_shape = tuple(
            input_shape[i] if i in channel_axes else 1 for i in range(ndim)
        )
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer, constraint=self.gamma_constraint,
                trainable=True, autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta", initializer=self.beta_initializer,
                regularizer=self.beta_regularizer, constraint=self.beta_constraint,
                trainable=True, autocast=False,
            )
        # aggregation "mean": replicas' updates are averaged (MirroredStrategy).
        self.moving_mean = self.add_weight(
            shape=shape, name="moving_mean",
            initializer=self.moving_mean_initializer, trainable=False,
            autocast=False, aggregation="mean",
        )
        self.moving_variance = self.add_weight(
            shape=shape, name="moving_variance",
            initializer=self.moving_variance_initializer, trainable=False,
            autocast=False, aggregation="mean",
        )
        self.input_spec = keras.layers.InputSpec(
            ndim=ndim, axes={a: input_shape[a] for a in channel_axes}
        )

    def _parameter(self, weight, fill: float, dtype):
        if weight is None:  # center=False / scale=False: beta 0, gamma 1
            return ops.full(self._broadcast_shape, fill, dtype=dtype)
        return ops.reshape(ops.cast(weight, dtype), self._broadcast_shape)

    def _mask_weights(self, mask, x):
        """keras' broadcast: the mask gets a last axis of size 1."""
        mask = ops.broadcast_to(ops.expand_dims(mask, axis=-1), ops.shape(x))
        return ops.cast(ops.cast(mask, "bool"), x.dtype)

    def call(self, inputs, training=None, mask=None):
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            raise ValueError(
                "The mask provided should be one dimension less than the inputs. "
                f"Received: mask.shape={mask.shape}, inputs.shape={inputs.shape}"
            )
        # standardize_dtype: a torch dtype never compares equal to a string.
        is_f64 = keras.backend.standardize_dtype(inputs.dtype) == "float64"
        compute_dtype = "float64" if is_f64 else "float32"
        x = ops.cast(inputs, compute_dtype)
        gamma = self._parameter(self.gamma, 1.0, compute_dtype)
        beta = self._parameter(self.beta, 0.0, compute_dtype)
        # A frozen layer runs in inference mode (keras' contract for BN).
        if training and self.trainable:
            weights = None if mask is None else self._mask_weights(mask, x)
            all_reduce = _replica_sum() if self.synchronized else None
            y, mean, var = batch_norm_train(
                x, gamma, beta, self.epsilon, self._reduction_axes,
                weights=weights, all_reduce=all_reduce,
            )
            shape = self.moving_mean.shape
            mean = ops.cast(ops.reshape(mean, shape), self.moving_mean.dtype)
            var = ops.cast(ops.reshape(var, shape), self.moving_variance.dtype)
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
            self.moving_variance.assign(self.moving_variance * m + var * (1.0 - m))
        else:
            mean = self._parameter(self.moving_mean, 0.0, compute_dtype)
            var = self._parameter(self.moving_variance, 1.0, compute_dtype)
            y = batch_norm_forward(x, gamma, beta, mean, var, self.epsilon)
        return ops.cast(y, inputs.dtype)

    def compute_output_shape(self, input_shape):
        self._channel_axes(len(input_shape))
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "axis": self.axis,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "center": self.center,
                "scale": self.scale,
                "beta_initializer": initializers.serialize(self.beta_initializer),
                "gamma_initializer": initializers.serialize(self.gamma_initializer),
                "moving_mean_initializer": initializers.serialize(
                    self.moving_mean_initializer
                ),
                "moving_variance_initializer": initializers.serialize(
                    self.moving_variance_initializer
                ),
                "beta_regularizer": regularizers.serialize(self.beta_regularizer),
                "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
                "beta_constraint": constraints.serialize(self.beta_constraint),
                "gamma_constraint": constraints.serialize(self.gamma_constraint),
                "synchronized": self.synchronized,
            }
        )
        return config
