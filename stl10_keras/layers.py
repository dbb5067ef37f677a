"""ManualBatchNorm: batch normalisation whose backward pass is the lab's derivation.

Backend-agnostic: imports keras only (never tensorflow), so the model that uses
it trains under TensorFlow, JAX or PyTorch.
"""

from __future__ import annotations

import keras
from keras import ops

from stl10_keras.backprop import batch_norm_forward, batch_norm_train


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

    Statistics and the normalisation are computed in float32 (or float64 for
    float64 inputs) even under mixed precision; the output has the input's
    dtype.

    Args:
        axis: the channel axis (normalised per channel).
        momentum: moving-average momentum.
        epsilon: added to the variance inside the square root; it also keeps a
            batch of one (variance 0) finite.
        center: learn the shift `beta` (the lab's shift variable).
        scale: learn the scale `gamma`.
        **kwargs: base layer arguments (`name`, `dtype`, ...).
    """

    def __init__(
        self,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
        if epsilon <= 0.0:
            raise ValueError(f"epsilon must be positive, got {epsilon}.")
        self.axis = int(axis)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = center
        self.scale = scale
        self.supports_masking = True

    def build(self, input_shape):
        ndim = len(input_shape)
        axis = self.axis % ndim
        channels = input_shape[axis]
        if channels is None:
            raise ValueError("ManualBatchNorm needs a known channel dimension.")
        self._axis = axis
        self._reduction_axes = tuple(i for i in range(ndim) if i != axis)
        self._broadcast_shape = tuple(channels if i == axis else 1 for i in range(ndim))
        shape = (channels,)
        self.gamma = self.add_weight(
            shape=shape, name="gamma", initializer="ones", trainable=self.scale,
            autocast=False,
        )
        self.beta = self.add_weight(
            shape=shape, name="beta", initializer="zeros", trainable=self.center,
            autocast=False,
        )
        self.moving_mean = self.add_weight(
            shape=shape, name="moving_mean", initializer="zeros", trainable=False,
            autocast=False, aggregation="mean",
        )
        self.moving_variance = self.add_weight(
            shape=shape, name="moving_variance", initializer="ones", trainable=False,
            autocast=False, aggregation="mean",
        )

    def call(self, inputs, training=False):
        # standardize_dtype: a torch dtype never compares equal to a string.
        is_f64 = keras.backend.standardize_dtype(inputs.dtype) == "float64"
        compute_dtype = "float64" if is_f64 else "float32"
        x = ops.cast(inputs, compute_dtype)
        gamma = ops.reshape(ops.cast(self.gamma, compute_dtype), self._broadcast_shape)
        beta = ops.reshape(ops.cast(self.beta, compute_dtype), self._broadcast_shape)
        if training:
            y, mean, var = batch_norm_train(
                x, gamma, beta, self.epsilon, self._reduction_axes
            )
            mean = ops.cast(ops.reshape(mean, (-1,)), self.moving_mean.dtype)
            var = ops.cast(ops.reshape(var, (-1,)), self.moving_variance.dtype)
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
            self.moving_variance.assign(self.moving_variance * m + var * (1.0 - m))
        else:
            mean = ops.reshape(
                ops.cast(self.moving_mean, compute_dtype), self._broadcast_shape
            )
            var = ops.reshape(
                ops.cast(self.moving_variance, compute_dtype), self._broadcast_shape
            )
            y = batch_norm_forward(x, gamma, beta, mean, var, self.epsilon)
        return ops.cast(y, inputs.dtype)

    def compute_output_shape(self, input_shape):
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
            }
        )
        return config
