"""StrongAugment: FixMatch's strong view (RandAugment-style ops + Cutout), fused.

Each image draws `num_ops` ops (with replacement, as RandAugment does) from
identity, auto-contrast, brightness, colour, contrast, posterize, solarize,
rotate, shear x/y and translate x/y, each with its own strength drawn
uniformly in `[0, magnitude]` of the op's range, then gets a Cutout square.
Keras' `RandAugment` picks one op per batch branch with `switch`; here every
op is written so that its "off" parameter is the identity (factor 1,
threshold 256, 8 bits, angle 0): all images run through all ops with
per-image parameters, the geometric ones composed into one `warp_affine`.
Nothing branches on data, so XLA compiles it on every backend.

Ops are applied in a fixed order (geometry, then colour ops, then Cutout),
not in the drawn order; equalize and sharpness are left out.

Backend-agnostic: imports keras, numpy and `stl10_keras.augment` (never
tensorflow).
"""

from __future__ import annotations

import math

import keras
from keras import ops

from stl10_keras.augment import about_centre, warp_affine

OPS = ("identity", "autocontrast", "brightness", "color", "contrast", "posterize",
       "solarize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")
# Ranges at full strength (FixMatch's RandAugment pool, fixmatch_augment_pool).
MAX_FACTOR_CHANGE = 0.95  # brightness / colour / contrast factors in 1 +- this
MAX_ROTATION_DEG = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATION = 0.3  # of the size
MIN_POSTERIZE_BITS = 4
GRAY = 128.0  # fill of the warp and of Cutout, as FixMatch's reference


def _per_image(x):
    """`(B,)` -> `(B, 1, 1, 1)`, to broadcast over an image batch."""
    return ops.reshape(x, (-1, 1, 1, 1))


def grayscale(images):
    """ITU-R 601-2 luma, as PIL's `convert("L")`: `(R*299 + G*587 + B*114) / 1000`."""
    if images.shape[-1] == 1:
        return images
    weights = ops.convert_to_tensor([0.299, 0.587, 0.114], images.dtype)
    return ops.sum(images * weights, axis=-1, keepdims=True)


def blend(degenerate, images, factor):
    """PIL's `ImageEnhance`: `degenerate + factor * (images - degenerate)`, clipped."""
    out = degenerate + _per_image(factor) * (images - degenerate)
    return ops.clip(out, 0.0, 255.0)


def brightness(images, factor):
    """`ImageEnhance.Brightness`: blend with black."""
    return blend(ops.zeros_like(images), images, factor)


def color(images, factor):
    """`ImageEnhance.Color`: blend with the grayscale image (saturation)."""
    return blend(grayscale(images), images, factor)


def contrast(images, factor):
    """`ImageEnhance.Contrast`: blend with the image's mean gray level."""
    mean = ops.mean(grayscale(images), axis=(1, 2, 3), keepdims=True)
    return blend(ops.broadcast_to(mean, ops.shape(images)), images, factor)


def solarize(images, threshold):
    """`ImageOps.solarize`: invert pixels at or above `threshold` (256: none)."""
    return ops.where(images >= _per_image(threshold), 255.0 - images, images)


def posterize(images, bits):
    """`ImageOps.posterize`: keep the top `bits` bits of each 0..255 value."""
    step = _per_image(ops.power(2.0, 8.0 - ops.cast(bits, images.dtype)))
    return ops.floor(images / step) * step


def autocontrast(images, amount):
    """`ImageOps.autocontrast` (cutoff 0) where `amount` is 1, identity where 0.

    Each channel is stretched so its minimum maps to 0 and its maximum to 255;
    a constant channel is left as it is.
    """
    lo = ops.min(images, axis=(1, 2), keepdims=True)
    hi = ops.max(images, axis=(1, 2), keepdims=True)
    span = hi - lo
    stretched = ops.where(span > 0, (images - lo) * (255.0 / ops.maximum(span, 1e-6)),
                          images)
    return ops.where(_per_image(amount) > 0, stretched, images)


def cutout(images, centre_y, centre_x, size: int, fill: float = GRAY):
    """Fill a `size` x `size` square centred at (`centre_y`, `centre_x`) per image.

    The square is clipped at the borders, as FixMatch's reference does.

    Args:
        images: `(B, H, W, C)`.
        centre_y, centre_x: `(B,)` integer pixel coordinates of the centre.
        size: the square's side in pixels (0: none).
        fill: the value written into the square.
    """
    height, width = int(images.shape[1]), int(images.shape[2])
    y0 = ops.cast(centre_y, "int32") - size // 2
    x0 = ops.cast(centre_x, "int32") - size // 2
    rows = ops.reshape(ops.arange(height, dtype="int32"), (1, height, 1, 1))
    cols = ops.reshape(ops.arange(width, dtype="int32"), (1, 1, width, 1))
    y0, x0 = _per_image(y0), _per_image(x0)
    inside = (rows >= y0) & (rows < y0 + size) & (cols >= x0) & (cols < x0 + size)
    return ops.where(inside, ops.cast(fill, images.dtype), images)


def geometric_transforms(angle_deg, shear_x, shear_y, tx, ty, height: int,
                         width: int):
    """Rotation, shears and shift about the centre as `warp_affine` transforms.

    The output-to-input map is `p = c + L (q - c - t)` with
    `L = Shear_x(shear_x) Shear_y(shear_y) R(angle)`; all zero is the identity.

    Returns:
        A float32 `(B, 8)` tensor.
    """
    theta = ops.cast(angle_deg, "float32") * (math.pi / 180.0)
    cos, sin = ops.cos(theta), ops.sin(theta)
    sx, sy = ops.cast(shear_x, "float32"), ops.cast(shear_y, "float32")
    # [[1, sx], [0, 1]] @ [[1, 0], [sy, 1]] @ [[cos, -sin], [sin, cos]]
    m00, m01, m10, m11 = 1.0 + sx * sy, sx, sy, ops.ones_like(sy)
    return about_centre(
        ((m00 * cos + m01 * sin, -m00 * sin + m01 * cos),
         (m10 * cos + m11 * sin, -m10 * sin + m11 * cos)), tx, ty, height, width)


@keras.saving.register_keras_serializable(package="stl10_keras")
class StrongAugment(keras.layers.Layer):
    """FixMatch's strong augmentation: `num_ops` random ops per image + Cutout.

    Args:
        num_ops: ops drawn per image (with replacement) from `OPS`.
        magnitude: largest strength, a fraction in `[0, 1]` of each op's
            range; each image and op draws its strength in `[0, magnitude]`
            and a random sign for the signed ops.
        cutout: side of the Cutout square, a fraction of the image size
            (0: no Cutout).
        seed: int seed of the layer's `keras.random.SeedGenerator`.
        **kwargs: base layer arguments.

    Input shape:
        `(B, H, W, C)` images in 0..255, float or uint8.

    Output shape:
        Same, in the compute dtype; in inference the images pass through.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 1.0, cutout: float = 0.5,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if int(num_ops) < 0:
            raise ValueError(f"num_ops must be 0 or more, got {num_ops}.")
        if not 0.0 <= float(magnitude) <= 1.0:
            raise ValueError(f"magnitude must be in [0, 1], got {magnitude}.")
        if not 0.0 <= float(cutout) < 1.0:
            raise ValueError(f"cutout must be in [0, 1), got {cutout}.")
        self.num_ops = int(num_ops)
        self.magnitude = float(magnitude)
        self.cutout = float(cutout)
        self.seed = None if seed is None else int(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.supports_jit = True

    def build(self, input_shape):
        if len(input_shape) != 4 or any(d is None for d in input_shape[1:]):
            raise ValueError("StrongAugment needs (batch, height, width, channels) "
                             f"images of known size; got shape {tuple(input_shape)}.")

    def call(self, inputs, training=True):
        if not training:
            return ops.cast(inputs, self.compute_dtype)
        images = ops.cast(inputs, "float32")
        height, width = int(images.shape[1]), int(images.shape[2])
        batch = ops.shape(images)[0]
        chosen = self._chosen_ops(batch)
        u = keras.random.uniform((batch, len(OPS)), seed=self.seed_generator)
        flip = keras.random.uniform((batch, len(OPS)), seed=self.seed_generator)
        sign = ops.sign(flip - 0.5)
        strength = u * self.magnitude

        def amount(name, signed=False):
            k = OPS.index(name)
            value = strength[:, k] * (sign[:, k] if signed else 1.0)
            return value * chosen[:, k]

        transforms = geometric_transforms(
            amount("rotate", True) * MAX_ROTATION_DEG,
            amount("shear_x", True) * MAX_SHEAR, amount("shear_y", True) * MAX_SHEAR,
            amount("translate_x", True) * MAX_TRANSLATION * width,
            amount("translate_y", True) * MAX_TRANSLATION * height, height, width)
        x = warp_affine(images, transforms, fill_mode="constant", fill_value=GRAY)
        x = autocontrast(x, chosen[:, OPS.index("autocontrast")])
        x = brightness(x, 1.0 + amount("brightness", True) * MAX_FACTOR_CHANGE)
        x = color(x, 1.0 + amount("color", True) * MAX_FACTOR_CHANGE)
        x = contrast(x, 1.0 + amount("contrast", True) * MAX_FACTOR_CHANGE)
        x = posterize(x, 8.0 - ops.round(amount("posterize")
                                         * (8 - MIN_POSTERIZE_BITS)))
        x = solarize(x, 256.0 - amount("solarize") * 256.0)
        size = int(round(self.cutout * min(height, width)))
        if size > 0:
            centre = keras.random.uniform((batch, 2), seed=self.seed_generator)
            x = cutout(x, ops.floor(centre[:, 0] * height),
                       ops.floor(centre[:, 1] * width), size)
        return ops.cast(x, self.compute_dtype)

    def _chosen_ops(self, batch):
        """`(B, len(OPS))` 0/1: whether each image drew each op at least once."""
        if self.num_ops == 0:
            return ops.zeros((batch, len(OPS)))
        draws = keras.random.randint((batch, self.num_ops), 0, len(OPS),
                                     seed=self.seed_generator)
        counts = ops.sum(ops.one_hot(draws, len(OPS)), axis=1)
        return ops.cast(counts > 0, "float32")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"num_ops": self.num_ops, "magnitude": self.magnitude,
                       "cutout": self.cutout, "seed": self.seed})
        return config
