"""RandomAffine: the lab's four augmentations fused into one affine warp.

The lab augments each training image with a horizontal flip, a rotation of up
to +-15 degrees, a zoom-in by a factor in [1, 1.4] and a shift of up to 0.2 of
the image size. Keras' `RandomRotation`, `RandomZoom` and `RandomTranslation`
each resample the image and set `supports_jit=False`, so inside a model they
switch off XLA. `RandomAffine` draws all four per image, composes them into one
affine map about the image centre and resamples once, with a bilinear sampler
written in `keras.ops` gathers that XLA compiles.

Backend-agnostic: imports keras, numpy and `stl10_keras.config` (never tensorflow).
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

from stl10_keras.config import FILL_MODES, AugmentConfig

INTERPOLATIONS = ("bilinear", "nearest")
RESAMPLERS = ("gather", "affine_transform")


def affine_matrices(flip, angle_deg, scale, tx, ty, height: int, width: int):
    """Per-image transforms in `keras.ops.image.affine_transform`'s convention.

    The forward map (input pixel `p` to output pixel `q`, `(x, y)` = (column,
    row), pixel centres at integers, centre `c = ((W - 1) / 2, (H - 1) / 2)`)
    is `q = c + t + s * R(angle) * F * (p - c)`: flip, then rotate, then zoom,
    all about the centre, then shift. `F = diag(-1, 1)` when flipping, so
    column `x` goes to `W - 1 - x` exactly. A positive angle turns the content
    counter-clockwise as displayed (row 0 at the top), like
    `keras.layers.RandomRotation` and `scipy.ndimage.rotate`.

    The rows returned are the inverse (output to input) map that
    `affine_transform` and `warp_affine` take:
    `[a0, a1, a2, b0, b1, b2, 0, 0]` with `x_in = a0 x + a1 y + a2` and
    `y_in = b0 x + b1 y + b2`.

    Args:
        flip: `(B,)` bool or 0/1; mirror left-right where true.
        angle_deg: `(B,)` rotation in degrees, counter-clockwise positive.
        scale: `(B,)` zoom factor; `> 1` magnifies (zooms in).
        tx: `(B,)` shift right in pixels.
        ty: `(B,)` shift down in pixels.
        height: image height `H`.
        width: image width `W`.

    Returns:
        A float32 `(B, 8)` tensor of transforms.
    """
    sign = 1.0 - 2.0 * ops.cast(flip, "float32")
    theta = ops.cast(angle_deg, "float32") * (math.pi / 180.0)
    inv_s = 1.0 / ops.cast(scale, "float32")
    cos = ops.cos(theta) * inv_s
    sin = ops.sin(theta) * inv_s
    # Inverse linear part A = F * R(angle)^-1 / s, where R(angle)^-1 in (x, y)
    # with y pointing down is [[cos, -sin], [sin, cos]].
    return about_centre(((sign * cos, -sign * sin), (sin, cos)), tx, ty, height,
                        width)


def about_centre(linear, tx, ty, height: int, width: int):
    """The transform rows of `p = A (q - c - t) + c`: `A` about the centre `c`.

    Args:
        linear: the inverse linear part `A` as `((a0, a1), (b0, b1))`, each `(B,)`.
        tx, ty: `(B,)` shift right and down in pixels.
        height, width: the image size.

    Returns:
        A float32 `(B, 8)` tensor `[a0, a1, a2, b0, b1, b2, 0, 0]`.
    """
    (a0, a1), (b0, b1) = linear
    cx = (width - 1) / 2.0
    cy = (height - 1) / 2.0
    # p = A (q - c - t) + c, so the offset is c - A (c + t).
    ux = cx + ops.cast(tx, "float32")
    uy = cy + ops.cast(ty, "float32")
    a2 = cx - (a0 * ux + a1 * uy)
    b2 = cy - (b0 * ux + b1 * uy)
    zeros = ops.zeros_like(a0)
    return ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=-1)


def sample_parameters(
    batch_size,
    height: int,
    width: int,
    seed,
    flip: bool = True,
    max_rotation_deg: float = 15.0,
    scale_range: tuple[float, float] = (1.0, 1.4),
    max_translation: float = 0.2,
) -> dict[str, Any]:
    """Draw the per-image parameters of `affine_matrices`.

    All draws come from one `keras.random.uniform` call of shape `(B, 5)`, so
    a seed generator advances once per batch.

    Args:
        batch_size: `B` (a Python int or a scalar tensor).
        height: image height, for the vertical shift in pixels.
        width: image width, for the horizontal shift in pixels.
        seed: a `keras.random.SeedGenerator` or an int.
        flip: draw a flip with p=0.5 (else never flip).
        max_rotation_deg: angle drawn uniformly in `[-max, max]` degrees.
        scale_range: zoom factor drawn uniformly in `[min, max]`.
        max_translation: shifts drawn uniformly in `[-max, max]` times the
            width (x) and the height (y).

    Returns:
        A dict of `(B,)` tensors: `flip` (bool), `angle_deg`, `scale`, `tx`,
        `ty` (pixels).
    """
    u = keras.random.uniform((batch_size, 5), dtype="float32", seed=seed)
    lo, hi = float(scale_range[0]), float(scale_range[1])
    flip_draw = u[:, 0] < 0.5
    if not flip:
        flip_draw = ops.zeros_like(flip_draw)
    return {
        "flip": flip_draw,
        "angle_deg": (2.0 * u[:, 1] - 1.0) * float(max_rotation_deg),
        "scale": lo + (hi - lo) * u[:, 2],
        "tx": (2.0 * u[:, 3] - 1.0) * (float(max_translation) * width),
        "ty": (2.0 * u[:, 4] - 1.0) * (float(max_translation) * height),
    }


def _fold_coordinate(x, size: int, fill_mode: str):
    """Map continuous pixel coordinates into the range the sampler reads.

    `reflect` mirrors about the outer pixel edges (`d c b a | a b c d | d c b
    a`, period `2 * size`) and `nearest` clamps, both into `[0, size - 1]`;
    `wrap` folds into `[0, size)`; `constant` shifts into an image padded by
    one fill pixel per side and clamps to it, so far points read the fill.
    Clamping after the fold is exact: a point in the half pixel beyond the
    last centre has both bilinear neighbours equal to the last pixel.
    """
    if fill_mode == "reflect":
        period = 2.0 * size
        m = ops.mod(x + 0.5, period) - 0.5
        m = ops.where(m > size - 0.5, period - 1.0 - m, m)
        return ops.clip(m, 0.0, size - 1.0)
    if fill_mode == "wrap":
        return ops.mod(x, float(size))
    if fill_mode == "nearest":
        return ops.clip(x, 0.0, size - 1.0)
    return ops.clip(x + 1.0, 0.0, size + 1.0)


def warp_affine(
    images,
    transforms,
    interpolation: str = "bilinear",
    fill_mode: str = "reflect",
    fill_value: float = 0.0,
):
    """Resample images with per-image affine transforms, in jit-able keras.ops.

    Same convention and fill modes as `keras.ops.image.affine_transform`
    (`transforms` rows `[a0, a1, a2, b0, b1, b2, c0, c1]` map an output pixel
    `(x, y)` to the input point `(a0 x + a1 y + a2, b0 x + b1 y + b2)`; `c0`,
    `c1` must be 0), but built from a gather, so XLA compiles it on every
    backend: TensorFlow's `ImageProjectiveTransformV3` has no XLA kernel.
    `reflect`, `nearest` and `constant` give TensorFlow's results; `wrap` is
    the documented `a b c d | a b c d` (TensorFlow's kernel differs near the
    edges).

    Args:
        images: `(B, H, W, C)` float images, channels last.
        transforms: `(B, 8)` transforms, as from `affine_matrices`.
        interpolation: `bilinear` or `nearest`.
        fill_mode: `reflect`, `wrap`, `nearest` or `constant`.
        fill_value: the value outside the image for `constant`.

    Returns:
        The warped images, same shape and dtype as `images`.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {INTERPOLATIONS}, got '{interpolation}'."
        )
    if fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode must be one of {FILL_MODES}, got '{fill_mode}'.")
    if len(images.shape) != 4:
        raise ValueError(
            f"warp_affine needs (B, H, W, C) images; got shape {tuple(images.shape)}."
        )
    height, width = int(images.shape[1]), int(images.shape[2])
    channels = int(images.shape[3])
    batch = ops.shape(images)[0]
    transforms = ops.cast(transforms, "float32")
    # Output pixel grid, broadcast against the per-image coefficients.
    ys = ops.reshape(ops.arange(height, dtype="float32"), (1, height, 1))
    xs = ops.reshape(ops.arange(width, dtype="float32"), (1, 1, width))
    t = [ops.reshape(transforms[:, k], (-1, 1, 1)) for k in range(6)]
    x_in = _fold_coordinate(t[0] * xs + t[1] * ys + t[2], width, fill_mode)
    y_in = _fold_coordinate(t[3] * xs + t[4] * ys + t[5], height, fill_mode)

    source = images
    if fill_mode == "constant":
        pad = ((0, 0), (1, 1), (1, 1), (0, 0))
        source = ops.pad(images, pad, constant_values=fill_value)
    src_h, src_w = int(source.shape[1]), int(source.shape[2])
    # Each image's first pixel in the flattened batch.
    base = ops.reshape(ops.arange(batch, dtype="int32") * (src_h * src_w), (-1, 1, 1))
    out_shape = (batch, height, width, channels)

    if interpolation == "nearest":
        # Round half up, as floor(x + 0.5); wrap can round up to the size.
        xi = ops.cast(ops.floor(x_in + 0.5), "int32")
        yi = ops.cast(ops.floor(y_in + 0.5), "int32")
        if fill_mode == "wrap":
            xi, yi = ops.mod(xi, src_w), ops.mod(yi, src_h)
        index = ops.reshape(base + yi * src_w + xi, (-1,))
        values = ops.take(ops.reshape(source, (-1, channels)), index, axis=0)
        return ops.reshape(values, out_shape)

    x0f = ops.floor(x_in)
    y0f = ops.floor(y_in)
    wx = ops.expand_dims(ops.cast(x_in - x0f, images.dtype), -1)
    wy = ops.expand_dims(ops.cast(y_in - y0f, images.dtype), -1)
    x0 = ops.cast(x0f, "int32")
    y0 = ops.cast(y0f, "int32")
    # After the fold, only the +1 neighbour can leave the source: it wraps to
    # 0 or stays on the last pixel (its weight is 0 there, or it is the same
    # pixel, as the fold already mirrored or clamped the point).
    if fill_mode == "wrap":
        x1, y1 = ops.mod(x0 + 1, src_w), ops.mod(y0 + 1, src_h)
    else:
        x1, y1 = ops.minimum(x0 + 1, src_w - 1), ops.minimum(y0 + 1, src_h - 1)
    flat = ops.reshape(source, (-1, channels))
    row0 = base + y0 * src_w
    row1 = base + y1 * src_w

    def read(rows, cols):
        # Four gathers of C values beat one gather of a stacked 2x2
        # neighbourhood (4C values) on a CPU: the stacking costs more.
        values = ops.take(flat, ops.reshape(rows + cols, (-1,)), axis=0)
        return ops.reshape(values, out_shape)

    v00, v01 = read(row0, x0), read(row0, x1)
    v10, v11 = read(row1, x0), read(row1, x1)
    top = v00 + wx * (v01 - v00)
    bottom = v10 + wx * (v11 - v10)
    return top + wy * (bottom - top)


@keras.saving.register_keras_serializable(package="stl10_keras")
class RandomAffine(keras.layers.Layer):
    """Random flip, rotation, zoom and shift, fused into one resampling.

    For each image it draws a flip (p=0.5), an angle in
    `[-max_rotation_deg, max_rotation_deg]`, a zoom factor in `scale_range`
    and shifts in `[-max_translation, max_translation]` times the width and
    the height, composes them into one affine map about the image centre
    (see `affine_matrices`) and resamples once (`warp_affine`). With the
    default `resampler` the layer is jit-compatible (`supports_jit=True`), so
    it can be the first layer of a model that trains under XLA.

    In inference (`training=False`), or when every transform is off, it
    returns the inputs unchanged (cast to the compute dtype). Like Keras'
    random preprocessing layers, a direct call without `training` augments.

    Args:
        flip: random horizontal flip with p=0.5.
        max_rotation_deg: largest rotation, degrees, in `[0, 180]`.
        scale_range: `(min, max)` zoom factor, `0 < min <= max`; `> 1` zooms in.
        max_translation: largest shift as a fraction of the size, in `[0, 1)`.
        fill_mode: `reflect`, `wrap`, `nearest` or `constant`: how points
            outside the input are filled.
        interpolation: `bilinear` or `nearest`.
        seed: int seed of the layer's `keras.random.SeedGenerator`.
        fill_value: the value outside the image for `fill_mode="constant"`.
        resampler: `gather` (`warp_affine`: jit-compatible, the default) or
            `affine_transform` (`keras.ops.image.affine_transform`: on
            TensorFlow a fused CPU kernel, faster in a non-compiled tf.data
            map, but XLA cannot compile it, so `supports_jit` is False).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Input shape:
        `(B, H, W, C)` images (channels last) in 0..255, float or uint8.

    Output shape:
        Same as the input, in the layer's compute dtype.
    """

    def __init__(
        self,
        flip: bool = True,
        max_rotation_deg: float = 15.0,
        scale_range: tuple[float, float] = (1.0, 1.4),
        max_translation: float = 0.2,
        fill_mode: str = "reflect",
        interpolation: str = "bilinear",
        seed: int | None = None,
        fill_value: float = 0.0,
        resampler: str = "gather",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(flip, (bool, np.bool_)):
            raise ValueError(f"flip must be True or False, got {flip!r}.")
        if not 0.0 <= float(max_rotation_deg) <= 180.0:
            raise ValueError(
                f"max_rotation_deg must be in [0, 180], got {max_rotation_deg}."
            )
        try:
            lo, hi = (float(v) for v in scale_range)
        except (TypeError, ValueError):
            raise ValueError(
                f"scale_range must be two numbers (min, max), got {scale_range!r}."
            ) from None
        if not 0.0 < lo <= hi:
            raise ValueError(
                f"scale_range must satisfy 0 < min <= max, got {scale_range!r}."
            )
        if not 0.0 <= float(max_translation) < 1.0:
            raise ValueError(
                f"max_translation must be in [0, 1), got {max_translation}."
            )
        if fill_mode not in FILL_MODES:
            raise ValueError(
                f"fill_mode must be one of {FILL_MODES}, got '{fill_mode}'."
            )
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got '{interpolation}'."
            )
        if resampler not in RESAMPLERS:
            raise ValueError(
                f"resampler must be one of {RESAMPLERS}, got '{resampler}'."
            )
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be an int or None, got {seed!r}.")
        self.flip = bool(flip)
        self.max_rotation_deg = float(max_rotation_deg)
        self.scale_range = (lo, hi)
        self.max_translation = float(max_translation)
        self.fill_mode = fill_mode
        self.interpolation = interpolation
        self.seed = None if seed is None else int(seed)
        self.fill_value = float(fill_value)
        self.resampler = resampler
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.supports_jit = resampler == "gather"

    @property
    def is_identity(self) -> bool:
        """True when every transform is off, so training passes images through."""
        return (
            not self.flip
            and self.max_rotation_deg == 0.0
            and self.scale_range == (1.0, 1.0)
            and self.max_translation == 0.0
        )

    def build(self, input_shape):
        if len(input_shape) != 4 or any(d is None for d in input_shape[1:]):
            raise ValueError(
                "RandomAffine needs (batch, height, width, channels) images with "
                f"known height, width and channels; got shape {tuple(input_shape)}."
            )

    def call(self, inputs, training=True):
        if not training or self.is_identity:
            return ops.cast(inputs, self.compute_dtype)
        height, width = int(inputs.shape[1]), int(inputs.shape[2])
        params = sample_parameters(
            ops.shape(inputs)[0],
            height,
            width,
            self.seed_generator,
            flip=self.flip,
            max_rotation_deg=self.max_rotation_deg,
            scale_range=self.scale_range,
            max_translation=self.max_translation,
        )
        transforms = affine_matrices(height=height, width=width, **params)
        # Interpolate in at least float32: bfloat16 cannot hold 0..255 with
        # fractional weights without visible banding.
        work_dtype = "float64" if self.compute_dtype == "float64" else "float32"
        options = {
            "interpolation": self.interpolation,
            "fill_mode": self.fill_mode,
            "fill_value": self.fill_value,
        }
        images = ops.cast(inputs, work_dtype)
        if self.resampler == "gather":
            warped = warp_affine(images, transforms, **options)
        else:
            warped = ops.image.affine_transform(
                images, transforms, data_format="channels_last", **options
            )
        return ops.cast(warped, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "flip": self.flip,
                "max_rotation_deg": self.max_rotation_deg,
                "scale_range": list(self.scale_range),
                "max_translation": self.max_translation,
                "fill_mode": self.fill_mode,
                "interpolation": self.interpolation,
                "seed": self.seed,
                "fill_value": self.fill_value,
                "resampler": self.resampler,
            }
        )
        return config


def random_affine_from_config(
    augment_config: AugmentConfig, seed: int | None = None
) -> RandomAffine | None:
    """Build the training-time augmentation layer from an `AugmentConfig`.

    Args:
        augment_config: a `stl10_keras.config.AugmentConfig`.
        seed: the layer's seed (the run's `train.seed`).

    Returns:
        A `RandomAffine` named `augment`, or None when `enabled` is False.
    """
    if not augment_config.enabled:
        return None
    return RandomAffine(
        flip=augment_config.flip,
        max_rotation_deg=augment_config.max_rotation_deg,
        scale_range=(augment_config.scale_min, augment_config.scale_max),
        max_translation=augment_config.max_translation,
        fill_mode=augment_config.fill_mode,
        seed=seed,
        name="augment",
    )
