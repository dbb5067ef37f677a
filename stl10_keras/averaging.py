"""The weights' moving average that holds at any run length, and its statistics.

Methods that learn from unlabeled images evaluate and export a moving average
of the weights (keras' `use_ema`). keras averages with a fixed momentum from
the second step on, so an average with decay 0.999 remembers about 1,000
steps: a run of a few hundred steps ended with the initial weights still
weighing in, and exported a broken model. `EMAWarmupSGD` instead uses, at
update `t` (0-based), the momentum of TensorFlow's
`ExponentialMovingAverage(num_updates=t)`:

    momentum_t = min(decay, (1 + t) / (10 + t))

so the average follows the weights closely early on and reaches `decay`
after about `10 / (1 - decay)` steps: it never weights any step by more than
a plain running mean would, whatever the run's length. (A decay derived from
the run's total steps would also work, but would change the meaning of
`--ema-decay` with the run's length; the warm-up keeps it a ceiling.)

keras averages the trainable weights only: batch normalisation's moving
statistics stay those of the raw weights. `recalibrate_batch_norm` computes
them again for the weights the model holds (the average, after `fit`), as the
mean of per-batch statistics over the training images ("precise BN").

Backend-agnostic: imports keras only.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

#: TF's ExponentialMovingAverage warm-up: momentum_t = min(decay, (1+t)/(10+t)).
WARMUP_OFFSET = 10.0


def warmup_momentum(decay: float, step):
    """The average's momentum at update `step` (0-based; 0 at the first update,
    which copies the weights, as keras does)."""
    t = ops.cast(step, "float32")
    ramp = (1.0 + t) / (WARMUP_OFFSET + t)
    return ops.where(t > 0, ops.minimum(ops.cast(decay, "float32"), ramp), 0.0)


@keras.saving.register_keras_serializable(package="stl10_keras")
class EMAWarmupSGD(keras.optimizers.SGD):
    """keras' SGD whose weight average (`use_ema`) warms up as TF's does.

    Args:
        As `keras.optimizers.SGD`; `ema_momentum` is the decay the average
        reaches (`min(ema_momentum, (1 + t) / (10 + t))` at update `t`).
    """

    def _update_model_variables_moving_average(self, trainable_variables):
        # keras' own (base_optimizer.py) with its fixed momentum replaced.
        if not self.use_ema:
            return
        momentum = warmup_momentum(self.ema_momentum, self.iterations)
        for var, average in zip(trainable_variables,
                                self._model_variables_moving_average):
            if average is not None:
                m = ops.cast(momentum, var.dtype)
                average.assign(m * average + (1 - m) * var)


def batch_norm_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer of `model` that keeps moving batch statistics."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if hasattr(layer, "moving_mean") and hasattr(layer, "momentum")]


def recalibrate_batch_norm(model: keras.Model, images: np.ndarray,
                           batch_size: int = 256, max_batches: int = 50) -> int:
    """Recompute the moving statistics of `model`'s batch norms for its weights.

    Each batch of `images` goes through the model in training mode with the
    layers' momentum set so that the moving mean (and variance) become the
    plain mean of the batches' means (and variances); the weights are not
    changed (no gradient step), dropout's randomness is irrelevant (no batch
    norm follows it in this network).

    Args:
        model: an inference model (images 0..255 -> logits).
        images: uint8 training images (no augmentation).
        batch_size: images per batch.
        max_batches: the most batches used (enough for stable statistics).

    Returns:
        The number of batches used (0: no batch norm, nothing done).
    """
    layers = batch_norm_layers(model)
    if not layers or len(images) == 0:
        return 0
    momenta = [layer.momentum for layer in layers]
    starts = range(0, len(images), batch_size)[:max_batches]
    try:
        for k, start in enumerate(starts):
            for layer in layers:
                layer.momentum = k / (k + 1.0)  # running mean of k + 1 batches
            model(images[start:start + batch_size].astype("float32"), training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return len(starts)
