"""Patches as a conv layer sees them: crops of the images or of earlier stages' output.

k-means initialisation (`stl10_keras.kmeans`) clusters `k x k` patches of the
input of the layer it initialises. For stage 1 that input is the image; for
stage `n >= 2` it is the output of the already initialised stages `1..n-1`.
`sample_patches` crops the receptive field of each patch from the image and
runs it through those stages (`prefix_layers`), so only the windows needed are
computed, never whole feature maps of every image; batch norms on the way use
the statistics of the first `BN_STATS_IMAGES` images (training mode).

Backend-agnostic: keras, numpy and tqdm; never tensorflow.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import keras
import numpy as np
from keras import ops
from tqdm.auto import tqdm

from stl10_keras.backprop import batch_norm_forward, batch_norm_moments
from stl10_keras.config import ConfigError
from stl10_keras.layers import ManualBatchNorm

# Batch norms in front of the layer being initialised normalise with the mean
# and variance of their input over the first this many images of the stream
# (whole maps): training-mode batch norm with a batch of this size.
BN_STATS_IMAGES = 64

# Images per step of the whole-map forward pass (bounds its memory).
_MAP_CHUNK = 16
# Receptive-field windows per step of the window forward pass.
_WINDOW_CHUNK = 4096
_BATCH_NORMS = (ManualBatchNorm, keras.layers.BatchNormalization)


def prefix_layers(model: keras.Model, layer_name: str) -> list[keras.layers.Layer]:
    """The layers in front of `layer_name` in a chain such as `build_model`'s.

    Args:
        model: a functional model whose layers each take the previous
            layer's output.
        layer_name: the layer whose input is wanted, e.g. `stage2_conv`.

    Returns:
        The layers from the input up to (not including) `layer_name`.
    """
    prefix: list[keras.layers.Layer] = []
    previous = model.inputs[0]
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if layer.input is not previous:
            raise ValueError(
                f"Layer '{layer.name}' does not take the previous layer's output; "
                "k-means initialisation needs a chain of layers like build_model's."
            )
        if layer.name == layer_name:
            return prefix
        prefix.append(layer)
        previous = layer.output
    raise ValueError(f"The model has no layer named '{layer_name}'.")


def sample_patches(
    batches: Iterable,
    patch_size: int,
    patches_per_image: int,
    num_images: int,
    seed: int | Sequence[int],
    layers: Sequence[keras.layers.Layer] = (),
    progress: bool = True,
    desc: str = "k-means patches",
) -> tuple[np.ndarray, int]:
    """Crop random square patches of a layer's input from a stream of images.

    Reads batches until `num_images` images have been seen and then stops
    pulling from the stream (the last batch may be used only in part), so a
    100,000-image split is never held in memory.

    With `layers` (the layers in front of a conv, e.g. rescale, conv, batch
    norm, ReLU, max-pool), the patches are `k x k` windows of their output.
    Only each window's receptive field is computed, with "valid" convs and
    pools, so windows whose receptive field would reach into a conv's zero
    padding are not drawn (for stage 2 on 96x96 images: the outermost ring of
    positions). Batch norms use the statistics of their input over the first
    `BN_STATS_IMAGES` images (whole maps), as training-mode batch norm does,
    and leave the moving statistics alone.

    Args:
        batches: iterable of `(B, H, W, C)` batches (numpy, or anything
            `np.asarray` accepts), e.g. uint8 images in 0..255.
        patch_size: side `k` of the square patches.
        patches_per_image: patches cropped from each image, at positions drawn
            uniformly among the allowed ones.
        num_images: images to read.
        seed: seeds the positions (an int or a sequence of ints).
        layers: a chain of `Rescaling`, `Conv2D` (stride 1, "same"), batch
            norm, `ReLU`/`Activation` and `MaxPooling2D` layers; `()` crops the
            images themselves.
        progress: show a tqdm progress bar.
        desc: the progress bar's label.

    Returns:
        `(patches, images_read)`: float32 `(images_read * patches_per_image,
        k * k * C)`, each patch flattened in `(k, k, C)` order (the order of a
        Keras kernel's first three axes), and the number of images read.
    """
    if patch_size < 1 or patches_per_image < 1 or num_images < 1:
        raise ValueError(
            "patch_size, patches_per_image and num_images must all be positive."
        )
    layers = list(layers)
    for layer in layers:
        _check_supported(layer)
    rng = np.random.default_rng(seed)
    stream = _first_images(batches, num_images)
    # The batch-norm statistics need the first images before any window.
    pending: list[np.ndarray] = []
    stats: dict[str, tuple] = {}
    if any(isinstance(layer, _BATCH_NORMS) for layer in layers):
        for batch in stream:
            pending.append(batch)
            if sum(len(b) for b in pending) >= BN_STATS_IMAGES:
                break
        if pending:
            first = np.concatenate(pending)[:BN_STATS_IMAGES]
            stats = _batch_norm_statistics(layers, first.astype(np.float32))
    out: np.ndarray | None = None
    plan = None
    read = 0
    with tqdm(total=num_images, desc=desc, unit="img", disable=not progress,
              leave=False) as bar:
        for batch in itertools.chain(pending, stream):
            if plan is None:
                image_hw = batch.shape[1:3]
                plan = _window_plan(layers, patch_size, image_hw)
            elif batch.shape[1:3] != image_hw:
                raise ValueError(
                    f"All unlabeled images must have one size; got {image_hw} "
                    f"and then {batch.shape[1:3]}. Resize them in the data pipeline."
                )
            b, per = len(batch), patches_per_image
            ys = rng.integers(plan.low[0], plan.high[0] + 1, size=(b, per))
            xs = rng.integers(plan.low[1], plan.high[1] + 1, size=(b, per))
            windows = _crop(batch, ys * plan.stride + plan.offset,
                            xs * plan.stride + plan.offset, plan.size)
            patches = _forward_windows(layers, windows, stats).reshape(b * per, -1)
            if out is None:
                out = np.empty((num_images * per, patches.shape[1]), np.float32)
            out[read * per:(read + b) * per] = patches
            read += b
            bar.update(b)
    if out is None:
        raise ValueError("The unlabeled image stream is empty; check the data split.")
    if read < num_images:
        warnings.warn(
            f"The unlabeled stream ended after {read} of {num_images} images; "
            "k-means uses those (lower --kmeans-images to silence this).",
            stacklevel=2,
        )
        out = out[: read * patches_per_image].copy()
    return out, read


def _first_images(batches: Iterable, num_images: int) -> Iterator[np.ndarray]:
    """Yield the stream's batches up to `num_images` images; pull no further."""
    read = 0
    for batch in batches:
        batch = np.asarray(batch)
        if batch.ndim != 4:
            raise ValueError(
                f"Expected batches of images shaped (B, H, W, C), got shape "
                f"{batch.shape}; batch the unlabeled stream."
            )
        batch = batch[: num_images - read]
        if not len(batch):
            continue
        read += len(batch)
        yield batch
        if read >= num_images:
            return


@dataclass
class _WindowPlan:
    """Position `y` of a patch reads image rows `stride * y + offset` onwards,
    `size` of them; `low..high` are the allowed positions (rows, columns)."""

    stride: int
    offset: int
    size: int
    low: tuple[int, int]
    high: tuple[int, int]


def _window_plan(layers, patch_size: int, image_hw) -> _WindowPlan:
    # Follow a window back from the target to the image, layer by layer, and
    # keep it inside every layer's input (no zero padding reached).
    sizes = [tuple(int(s) for s in image_hw)]
    for layer in layers:
        sizes.append(tuple(layer.compute_output_shape((1, *sizes[-1], 1))[1:3]))
    k = patch_size
    if sizes[-1][0] < k or sizes[-1][1] < k:
        raise ConfigError(
            f"The layer input is {sizes[-1][0]}x{sizes[-1][1]}, smaller than the "
            f"{k}x{k} patches; use a smaller --kmeans-patch-size or larger images."
        )
    stride, offset, size = 1, 0, k
    low = [0, 0]
    high = [sizes[-1][0] - k, sizes[-1][1] - k]
    for layer, hw in zip(reversed(layers), reversed(sizes[:-1])):
        if isinstance(layer, keras.layers.Conv2D):
            r = (layer.kernel_size[0] - 1) // 2
            offset, size = offset - r, size + 2 * r
        elif isinstance(layer, keras.layers.MaxPooling2D):
            s, p = layer.strides[0], layer.pool_size[0]
            stride, offset, size = stride * s, offset * s, s * (size - 1) + p
        for axis in (0, 1):
            # Need stride * y + offset >= 0 and stride * y + offset + size <= hw.
            low[axis] = max(low[axis], -(offset // stride))
            high[axis] = min(high[axis], (hw[axis] - size - offset) // stride)
    if low[0] > high[0] or low[1] > high[1]:
        raise ConfigError(
            f"Images of {sizes[0][0]}x{sizes[0][1]} are too small for patches whose "
            "receptive field avoids the convs' zero padding; use larger images."
        )
    return _WindowPlan(stride, offset, size, (low[0], low[1]), (high[0], high[1]))


def _check_supported(layer: keras.layers.Layer) -> None:
    ok = isinstance(layer, (keras.layers.Rescaling, keras.layers.ReLU,
                            keras.layers.Activation))
    if isinstance(layer, keras.layers.Conv2D):
        k = layer.kernel_size
        ok = (type(layer) is keras.layers.Conv2D and layer.padding == "same"
              and tuple(layer.strides) == (1, 1)
              and tuple(layer.dilation_rate) == (1, 1)
              and k[0] == k[1] and k[0] % 2 == 1 and layer.groups == 1
              and layer.data_format == "channels_last")
    elif isinstance(layer, keras.layers.MaxPooling2D):
        ok = (tuple(layer.pool_size) == tuple(layer.strides)
              and layer.pool_size[0] == layer.pool_size[1]
              and layer.data_format == "channels_last")
    elif isinstance(layer, _BATCH_NORMS):
        ok = layer.axis in (-1, 3)
    if not ok:
        raise ValueError(
            f"k-means initialisation cannot run through layer '{layer.name}' "
            f"({type(layer).__name__}); it supports build_model's rescale, "
            "stride-1 'same' convs, channels-last batch norm, ReLU and max-pool."
        )


def _crop(images: np.ndarray, top: np.ndarray, left: np.ndarray, size: int):
    """`(B, P)` corners -> `(B * P, size, size, C)` float32 crops."""
    b, per = top.shape
    offsets = np.arange(size)
    crops = images[
        np.arange(b)[:, None, None, None],
        (top[:, :, None] + offsets)[:, :, :, None],
        (left[:, :, None] + offsets)[:, :, None, :],
    ]
    return crops.reshape(b * per, size, size, images.shape[-1]).astype(np.float32)


def _apply(layer: keras.layers.Layer, x, stats: dict, valid: bool):
    """One layer: batch norm with `stats`; with `valid`, convs and pools unpadded."""
    if isinstance(layer, _BATCH_NORMS):
        mean, var = stats[layer.name]
        gamma = 1.0 if layer.gamma is None else ops.cast(layer.gamma, "float32")
        beta = 0.0 if layer.beta is None else ops.cast(layer.beta, "float32")
        return batch_norm_forward(ops.cast(x, "float32"), gamma, beta, mean, var,
                                  layer.epsilon)
    if valid and isinstance(layer, keras.layers.Conv2D):
        x = ops.conv(x, ops.cast(layer.kernel, x.dtype), strides=1, padding="valid")
        if layer.use_bias:
            x = x + ops.cast(layer.bias, x.dtype)
        return layer.activation(x)
    if valid and isinstance(layer, keras.layers.MaxPooling2D):
        return ops.max_pool(x, layer.pool_size, layer.strides, padding="valid")
    return layer(x, training=False)


def _forward_windows(layers, windows: np.ndarray, stats: dict) -> np.ndarray:
    if not layers:
        return windows
    outs = []
    for s in range(0, len(windows), _WINDOW_CHUNK):
        x = ops.convert_to_tensor(windows[s:s + _WINDOW_CHUNK])
        for layer in layers:
            x = _apply(layer, x, stats, valid=True)
        outs.append(ops.convert_to_numpy(ops.cast(x, "float32")))
    return np.concatenate(outs)


def _batch_norm_statistics(layers, images: np.ndarray) -> dict[str, tuple]:
    """Mean and variance of each batch norm's input over `images` (whole maps).

    Batch norm `j` sees its input normalised by the statistics already found
    for batch norms `1..j-1`: training-mode batch norm over one batch.
    """
    stats: dict[str, tuple] = {}
    for j, layer in enumerate(layers):
        if not isinstance(layer, _BATCH_NORMS):
            continue
        count, mean, m2 = 0, 0.0, 0.0
        for s in range(0, len(images), _MAP_CHUNK):
            x = ops.convert_to_tensor(images[s:s + _MAP_CHUNK])
            for earlier in layers[:j]:
                x = _apply(earlier, x, stats, valid=False)
            x = ops.cast(x, "float32")
            n = int(np.prod(x.shape[:-1]))
            m, v = (ops.convert_to_numpy(t).astype(np.float64)
                    for t in batch_norm_moments(x, (0, 1, 2)))
            # Chan et al.'s pairwise update: exact moments of the union.
            delta = m - mean
            total = count + n
            mean = mean + delta * n / total
            m2 = m2 + v * n + delta**2 * count * n / total
            count = total
        stats[layer.name] = (ops.convert_to_tensor(mean.astype(np.float32)),
                             ops.convert_to_tensor((m2 / count).astype(np.float32)))
    return stats
