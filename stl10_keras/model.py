"""The lab's network as a Keras functional model.

`build_model(config)` is the inference model: images (0..255, any float or
integer dtype) -> rescale -> N stages of [conv -> BN -> ReLU -> max-pool] ->
flatten -> dropout -> fc1 (ReLU) -> dropout -> logits. `build_training_model`
puts the augmentation layer in front of it, so augmentation runs on the
accelerator and stays out of the exported model.

Backend-agnostic: keras only, never tensorflow.
"""

from __future__ import annotations

from typing import Sequence

import keras

from stl10_keras.config import Config, ModelConfig
from stl10_keras.layers import ManualBatchNorm


def conv_layer_names(model_config: ModelConfig) -> list[list[str]]:
    """Names of the conv layers, stage by stage: `stage3_conv` or `stage3_conv2`."""
    names = []
    for s, n in enumerate(model_config.convs_per_stage, start=1):
        if n == 1:
            names.append([f"stage{s}_conv"])
        else:
            names.append([f"stage{s}_conv{j}" for j in range(1, n + 1)])
    return names


def build_model(
    config: Config,
    input_shape: Sequence[int],
    kernel_initializers: dict[str, keras.initializers.Initializer] | None = None,
    name: str = "stl10_cnn",
) -> keras.Model:
    """Build the lab's inference network.

    Args:
        config: the run's config (`config.model` shapes the network).
        input_shape: `(H, W, C)` of the images.
        kernel_initializers: optional per-conv-layer-name initializers (the
            k-means initialisers of stage 1 and 2); others use Keras' default
            (Glorot uniform).
        name: the model's name.

    Returns:
        A functional `keras.Model` from images in 0..255 to `num_classes`
        logits. Layers are named `rescale`, `stageN_conv`, `stageN_bn`,
        `stageN_relu`, `stageN_pool`, `flatten`, `fc1`, `logits`.
    """
    m = config.model
    kernel_initializers = kernel_initializers or {}
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    # Images arrive as 0..255 (uint8 on the wire); map to [-1, 1] on the device.
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(inputs)
    for s, (width, names) in enumerate(zip(m.widths, conv_layer_names(m)), start=1):
        for conv_name in names:
            suffix = conv_name[len(f"stage{s}_conv"):]
            x = keras.layers.Conv2D(
                width,
                m.kernel_size,
                padding="same",
                # A bias is redundant before BN but harmless; k-means folds
                # its whitening offset into it, so every conv keeps one.
                use_bias=True,
                kernel_initializer=kernel_initializers.get(conv_name, "glorot_uniform"),
                name=conv_name,
            )(x)
            x = _batch_norm(m, f"stage{s}_bn{suffix}")(x)
            x = keras.layers.ReLU(name=f"stage{s}_relu{suffix}")(x)
        x = keras.layers.MaxPooling2D(2, padding="same", name=f"stage{s}_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(m.dropout, name="dropout1")(x)
    x = keras.layers.Dense(m.fc_units, activation="relu", name="fc1")(x)
    x = keras.layers.Dropout(m.dropout, name="dropout2")(x)
    # Logits stay float32 under mixed precision so the loss is computed accurately.
    outputs = keras.layers.Dense(m.num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


def _batch_norm(m: ModelConfig, name: str) -> keras.layers.Layer:
    kind = ManualBatchNorm if m.batch_norm == "manual" else \
        keras.layers.BatchNormalization
    return kind(momentum=m.bn_momentum, epsilon=m.bn_epsilon,
                synchronized=m.sync_batch_norm, name=name)


def build_training_model(
    model: keras.Model, augmentation: keras.layers.Layer | None
) -> keras.Model:
    """Wrap the inference model with an augmentation layer in front.

    Args:
        model: the inference model from `build_model`.
        augmentation: a layer applied to the images in training only (e.g.
            `RandomAffine`), or None.

    Returns:
        A model sharing `model`'s weights; `model` itself is what gets exported.
    """
    if augmentation is None:
        return model
    inputs = keras.Input(shape=model.input_shape[1:], name="images")
    x = augmentation(inputs)
    outputs = model(x)
    return keras.Model(inputs, outputs, name=f"{model.name}_train")


def stage_output_names(model: keras.Model) -> list[str]:
    """Names of each stage's output layer (its max-pool), in order."""
    return [layer.name for layer in model.layers if layer.name.endswith("_pool")]


def feature_extractor(model: keras.Model, include_fc: bool = True) -> keras.Model:
    """A model returning every stage's activation (and fc1's) for the same input.

    Args:
        model: an inference model from `build_model`.
        include_fc: also return the penultimate fully connected layer (`fc1`).

    Returns:
        A `keras.Model` whose outputs are a dict `{layer_name: activation}`,
        stages in order (`stage1_pool`, ...), then `fc1`.
    """
    names = stage_output_names(model) + (["fc1"] if include_fc else [])
    outputs = {n: model.get_layer(n).output for n in names}
    return keras.Model(model.input, outputs, name=f"{model.name}_features")


def load_model(path) -> keras.Model:
    """Load a saved `model.keras`, registering this package's custom layers first."""
    import importlib
    import importlib.util

    for name in ("layers", "augment", "kmeans"):  # each registers its classes
        if importlib.util.find_spec(f"stl10_keras.{name}"):
            importlib.import_module(f"stl10_keras.{name}")
    return keras.models.load_model(path)
