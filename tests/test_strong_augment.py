"""StrongAugment's ops against PIL (ImageOps, ImageEnhance) and numpy."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

from stl10_keras import strong_augment as sa  # noqa: E402


def to_numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 12, 10, 3)).astype(np.uint8)
    x[1] = np.clip(x[1], 40, 200)  # a low-contrast image for autocontrast
    return x


def pil_each(images, fn) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(im))) for im in images])


def run_op(op, images, *params) -> np.ndarray:
    out = op(keras.ops.convert_to_tensor(images.astype(np.float32)),
             *(np.asarray(p, np.float32) for p in params))
    return to_numpy(out)


# PIL rounds (or truncates) to uint8 after each op; ours stays float.
@pytest.mark.parametrize("op,enhancer", [(sa.brightness, ImageEnhance.Brightness),
                                         (sa.color, ImageEnhance.Color),
                                         (sa.contrast, ImageEnhance.Contrast)])
@pytest.mark.parametrize("factor", [0.05, 0.6, 1.0, 1.7])
def test_enhance_ops_match_pil(images, op, enhancer, factor):
    want = pil_each(images, lambda im: enhancer(im).enhance(factor)).astype(float)
    got = run_op(op, images, np.full(len(images), factor))
    # Contrast: PIL rounds the gray mean to an integer first (<= 0.5 level,
    # times the factor).
    assert np.abs(got - want).max() <= 1.0 + 0.5 * abs(1 - factor)


@pytest.mark.parametrize("threshold", [0, 77, 128, 256])
def test_solarize_matches_pil(images, threshold):
    want = pil_each(images, lambda im: ImageOps.solarize(im, threshold))
    got = run_op(sa.solarize, images, np.full(len(images), threshold))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_posterize_matches_pil(images, bits):
    want = pil_each(images, lambda im: ImageOps.posterize(im, bits))
    got = run_op(sa.posterize, images, np.full(len(images), bits))
    np.testing.assert_array_equal(got, want)


def test_autocontrast_matches_pil_where_on_and_is_identity_where_off(images):
    want = pil_each(images, ImageOps.autocontrast).astype(float)
    got = run_op(sa.autocontrast, images, [1, 0, 1, 1])
    for i in (0, 2, 3):
        assert np.abs(got[i] - want[i]).max() <= 1.0  # PIL truncates its table
    low = images[1].astype(float)
    np.testing.assert_array_equal(got[1], low)
    stretched = run_op(sa.autocontrast, images[1:2], [1])[0]
    assert stretched.min() == 0 and stretched.max() == pytest.approx(255, abs=1e-3)
    assert np.abs(stretched - want[1]).max() <= 1.0


def test_cutout_fills_the_clipped_square_as_numpy_slicing_does(images):
    x = images.astype(np.float32)
    cy, cx = np.array([0, 5, 11, 6]), np.array([0, 4, 9, 5])
    got = to_numpy(sa.cutout(x, cy, cx, 4, fill=128.0))
    want = x.copy()
    for i in range(len(x)):
        y0, x0 = cy[i] - 2, cx[i] - 2
        want[i, max(y0, 0):max(y0 + 4, 0), max(x0, 0):max(x0 + 4, 0)] = 128.0
    np.testing.assert_array_equal(got, want)


def test_integer_translation_is_a_shift_with_gray_fill():
    from stl10_keras.augment import warp_affine

    x = np.random.default_rng(1).uniform(0, 255, (1, 8, 9, 2)).astype(np.float32)
    zero = np.zeros(1, np.float32)
    t = sa.geometric_transforms(zero, zero, zero, np.array([2.0], np.float32),
                                np.array([-1.0], np.float32), 8, 9)
    got = to_numpy(warp_affine(x, t, fill_mode="constant", fill_value=sa.GRAY))
    want = np.full_like(x, sa.GRAY)
    want[0, :-1, 2:] = x[0, 1:, :-2]  # content moves 2 right and 1 up
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_rotation_by_90_degrees_about_the_centre_is_numpy_rot90():
    from stl10_keras.augment import warp_affine

    x = np.random.default_rng(2).uniform(0, 255, (1, 7, 7, 1)).astype(np.float32)
    zero = np.zeros(1, np.float32)
    t = sa.geometric_transforms(np.array([90.0], np.float32), zero, zero, zero,
                                zero, 7, 7)
    got = to_numpy(warp_affine(x, t, fill_mode="constant"))
    # Counter-clockwise as displayed, like RandomAffine and np.rot90.
    np.testing.assert_allclose(got[0, ..., 0], np.rot90(x[0, ..., 0]), atol=1e-3)


def test_shear_x_moves_each_row_by_shear_times_its_offset_from_the_centre():
    from stl10_keras.augment import warp_affine

    x = np.zeros((1, 5, 9, 1), np.float32)
    x[0, :, 4] = 255.0  # a vertical line through the centre column
    zero = np.zeros(1, np.float32)
    t = sa.geometric_transforms(zero, np.array([1.0], np.float32), zero, zero, zero,
                                5, 9)
    got = to_numpy(warp_affine(x, t, fill_mode="constant"))[0, ..., 0]
    # Output (x, y) reads input x + (y - 2): the line lands at column 4 - (y - 2).
    for row in range(5):
        assert np.argmax(got[row]) == 4 - (row - 2)


def test_layer_is_identity_with_no_ops_and_no_cutout_and_in_inference(images):
    layer = sa.StrongAugment(num_ops=0, cutout=0.0, seed=1)
    np.testing.assert_allclose(to_numpy(layer(images, training=True)), images,
                               atol=1e-3)
    busy = sa.StrongAugment(num_ops=3, seed=1)
    np.testing.assert_array_equal(to_numpy(busy(images, training=False)), images)


def test_layer_compiles_with_xla_stays_in_range_and_round_trips_its_config(images):
    import tensorflow as tf

    layer = sa.StrongAugment(num_ops=2, magnitude=1.0, cutout=0.5, seed=3)
    out = to_numpy(tf.function(lambda x: layer(x, training=True),
                               jit_compile=True)(tf.constant(images)))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255
    # Cutout: a 5x5 (0.5 * 10) square of gray (clipped at the border) per image.
    gray = np.all(out == sa.GRAY, axis=-1)
    assert all(9 <= gray[i].sum() for i in range(len(out)))
    clone = sa.StrongAugment.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    with pytest.raises(ValueError, match="magnitude"):
        sa.StrongAugment(magnitude=2.0)
