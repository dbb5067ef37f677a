"""RandomAffine against independent references: numpy flips, scipy.ndimage,
keras' own affine_transform, and planted dots whose positions are measured.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.ndimage  # noqa: E402
import tensorflow as tf  # noqa: E402

from stl10_keras.augment import (  # noqa: E402
    RandomAffine,
    affine_matrices,
    random_affine_from_config,
    sample_parameters,
    warp_affine,
)
from stl10_keras.config import AugmentConfig  # noqa: E402


def to_numpy(x) -> np.ndarray:
    return keras.ops.convert_to_numpy(x)


def warp(images: np.ndarray, h: int, w: int, **params) -> np.ndarray:
    """Warp with exact parameters (scalars broadcast to the batch)."""
    b = len(images)
    full = {
        "flip": np.zeros(b, bool),
        "angle_deg": np.zeros(b),
        "scale": np.ones(b),
        "tx": np.zeros(b),
        "ty": np.zeros(b),
    }
    full.update({k: np.broadcast_to(np.asarray(v), (b,)) for k, v in params.items()})
    transforms = affine_matrices(height=h, width=w, **full)
    return to_numpy(warp_affine(images.astype("float32"), transforms))


def dots(h: int, w: int, points, sigma: float = 1.2) -> np.ndarray:
    """An (h, w, len(points)) image with one Gaussian dot per channel.

    `points` are (x, y) = (column, row); the dot's centroid is the point.
    """
    yy, xx = np.mgrid[:h, :w].astype("float64")
    chans = [
        255.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
        for x, y in points
    ]
    return np.stack(chans, axis=-1).astype("float32")


def centroids(image: np.ndarray) -> np.ndarray:
    """(C, 2) intensity-weighted (x, y) centroid of each channel."""
    h, w, c = image.shape
    yy, xx = np.mgrid[:h, :w]
    mass = image.sum(axis=(0, 1))
    cx = (image * xx[..., None]).sum(axis=(0, 1)) / mass
    cy = (image * yy[..., None]).sum(axis=(0, 1)) / mass
    return np.stack([cx, cy], axis=-1)


def forward(points, h, w, flip=False, angle_deg=0.0, scale=1.0, tx=0.0, ty=0.0):
    """Where a point goes: flip, rotate counter-clockwise (as displayed, y down),
    zoom, all about the centre ((w-1)/2, (h-1)/2), then shift. Written
    independently of the layer, from the geometric description."""
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    p = np.asarray(points, dtype="float64") - c
    if flip:
        p[:, 0] = -p[:, 0]
    a = np.deg2rad(angle_deg)
    # Counter-clockwise on screen with y pointing down: (1, 0) -> (cos, -sin).
    x = np.cos(a) * p[:, 0] + np.sin(a) * p[:, 1]
    y = -np.sin(a) * p[:, 0] + np.cos(a) * p[:, 1]
    return c + scale * np.stack([x, y], axis=-1) + [tx, ty]


def fit_affine(src: np.ndarray, dst: np.ndarray, h: int, w: int) -> dict:
    """Recover flip, angle, scale and shift from 3 point correspondences."""
    ones = np.ones((3, 1))
    sol = np.linalg.solve(np.hstack([src, ones]), dst)  # dst = [src 1] @ sol
    m, b = sol[:2].T, sol[2]
    det = np.linalg.det(m)
    flip = det < 0
    scale = np.sqrt(abs(det))
    r = m / scale
    if flip:
        r = r @ np.diag([-1.0, 1.0])
    angle = np.rad2deg(np.arctan2(-r[1, 0], r[0, 0]))
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    t = b + m @ c - c
    return {"flip": flip, "angle_deg": angle, "scale": scale, "tx": t[0], "ty": t[1]}


# --- the warp with exact parameters --------------------------------------------------


def test_flip_maps_column_c_to_w_minus_1_minus_c_exactly():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 7, 10, 3)).astype("float32")
    out = warp(images, 7, 10, flip=True)
    np.testing.assert_allclose(out, np.flip(images, axis=2), atol=1e-5, rtol=0)


def test_rotation_matches_scipy_rotate_away_from_borders():
    rng = np.random.default_rng(1)
    image = scipy.ndimage.gaussian_filter(rng.uniform(0, 255, (40, 48)), 1.5)
    image = image.astype("float32")
    for angle in (10.0, -23.0):
        out = warp(image[None, :, :, None], 40, 48, angle_deg=angle)[0, :, :, 0]
        # scipy.ndimage.rotate: positive angle is counter-clockwise as
        # displayed, about the centre ((n - 1) / 2), same shape.
        ref = scipy.ndimage.rotate(image, angle, reshape=False, order=1)
        inner = (slice(8, -8), slice(8, -8))
        np.testing.assert_allclose(out[inner], ref[inner], atol=1e-3, rtol=0)


def test_positive_angle_turns_a_dot_counter_clockwise():
    h, w = 41, 41
    image = dots(h, w, [(30.0, 20.0)])  # 10 px right of the centre (20, 20)
    out = warp(image[None], h, w, angle_deg=90.0)[0]
    # Counter-clockwise as displayed: right of the centre goes to above it.
    np.testing.assert_allclose(centroids(out)[0], [20.0, 10.0], atol=0.05)


@pytest.mark.parametrize(
    "params",
    [
        {"tx": 3.25, "ty": -5.5},
        {"scale": 1.3},
        {"flip": True, "angle_deg": 12.0, "scale": 1.2, "tx": -4.0, "ty": 2.5},
        {"flip": False, "angle_deg": -8.0, "scale": 1.05, "tx": 6.0, "ty": -3.0},
    ],
)
def test_dots_land_where_the_composed_transform_sends_them(params):
    h, w = 48, 56
    points = [(22.0, 20.0), (33.0, 25.0), (26.0, 30.0)]
    out = warp(dots(h, w, points)[None], h, w, **params)[0]
    expected = forward(points, h, w, **params)
    np.testing.assert_allclose(centroids(out), expected, atol=0.1)


def test_warp_matches_keras_affine_transform():
    rng = np.random.default_rng(2)
    b, h, w = 6, 13, 17
    images = rng.uniform(0, 255, (b, h, w, 2)).astype("float32")
    # Large shifts and zoom-outs reach far outside the image.
    transforms = affine_matrices(
        flip=rng.random(b) < 0.5,
        angle_deg=rng.uniform(-60, 60, b),
        scale=rng.uniform(0.4, 1.5, b),
        tx=rng.uniform(-25, 25, b),
        ty=rng.uniform(-25, 25, b),
        height=h,
        width=w,
    )
    for fill_mode in ("reflect", "nearest", "constant"):
        for interpolation in ("bilinear", "nearest"):
            ours = warp_affine(images, transforms, interpolation, fill_mode, 7.0)
            ref = keras.ops.image.affine_transform(
                images, transforms, interpolation, fill_mode, 7.0
            )
            np.testing.assert_allclose(
                to_numpy(ours), to_numpy(ref), atol=1e-2, rtol=0,
                err_msg=f"{fill_mode} {interpolation}",
            )


def test_wrap_matches_scipy_grid_wrap():
    rng = np.random.default_rng(3)
    h, w = 9, 11
    image = rng.uniform(0, 255, (h, w)).astype("float32")
    t = to_numpy(affine_matrices([True], [33.0], [0.6], [7.0], [-4.0], h, w))[0]
    out = to_numpy(warp_affine(image[None, :, :, None], t[None], fill_mode="wrap"))
    yy, xx = np.mgrid[:h, :w]
    x_in = t[0] * xx + t[1] * yy + t[2]
    y_in = t[3] * xx + t[4] * yy + t[5]
    ref = scipy.ndimage.map_coordinates(image, [y_in, x_in], order=1, mode="grid-wrap")
    np.testing.assert_allclose(out[0, :, :, 0], ref, atol=1e-2, rtol=0)


# --- the layer ------------------------------------------------------------------


def test_layer_flip_only_gives_each_image_or_its_mirror():
    rng = np.random.default_rng(4)
    images = rng.uniform(0, 255, (64, 6, 9, 3)).astype("float32")
    layer = RandomAffine(
        max_rotation_deg=0.0, scale_range=(1.0, 1.0), max_translation=0.0, seed=1
    )
    out = to_numpy(layer(images, training=True))
    same = np.all(np.abs(out - images) < 1e-4, axis=(1, 2, 3))
    mirrored = np.all(np.abs(out - images[:, :, ::-1]) < 1e-4, axis=(1, 2, 3))
    assert np.all(same ^ mirrored)
    assert 16 <= mirrored.sum() <= 48  # p = 0.5; P(outside) ~ 1e-4


def run_layer(layer, images, where: str) -> np.ndarray:
    """Apply `layer` in training mode eagerly, in tf.data, or XLA-compiled."""
    if where == "eager":
        return to_numpy(layer(images, training=True))
    if where == "tf.data":
        ds = tf.data.Dataset.from_tensors(images).map(lambda x: layer(x, training=True))
        return to_numpy(next(iter(ds)))
    fn = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    return to_numpy(fn(images))


@pytest.mark.parametrize("where", ["eager", "tf.data", "jit"])
def test_drawn_parameters_stay_within_their_ranges(where):
    # Non-square, so a swapped height and width would show in the shifts.
    b, h, w = 64, 64, 80
    points = np.array([(37.5, 28.0), (45.0, 33.0), (39.0, 37.0)])
    images = np.repeat(dots(h, w, points)[None], b, axis=0)
    layer = RandomAffine(fill_mode="constant", seed=7)
    out = run_layer(layer, images, where)
    est = [fit_affine(points, centroids(img), h, w) for img in out]
    angle = np.array([e["angle_deg"] for e in est])
    scale = np.array([e["scale"] for e in est])
    tx = np.array([e["tx"] for e in est])
    ty = np.array([e["ty"] for e in est])
    flips = np.array([e["flip"] for e in est])
    assert np.all(np.abs(angle) <= 15.0 + 0.5)
    assert np.all((scale >= 1.0 - 0.01) & (scale <= 1.4 + 0.01))
    assert np.all(np.abs(tx) <= 0.2 * w + 0.2)
    assert np.all(np.abs(ty) <= 0.2 * h + 0.2)
    # The draws cover their ranges (64 uniform draws), per axis.
    assert angle.min() < -10 and angle.max() > 10
    assert scale.min() < 1.1 and scale.max() > 1.3
    assert np.abs(tx).max() > 0.2 * h + 0.5  # x uses the width, not the height
    assert 16 <= flips.sum() <= 48


def test_sampled_shift_moves_a_dot_by_the_drawn_amount():
    h, w = 40, 50
    seed = keras.random.SeedGenerator(3)
    params = sample_parameters(
        4, h, w, seed, flip=False, max_rotation_deg=0.0, scale_range=(1.0, 1.0)
    )
    params = {k: to_numpy(v) for k, v in params.items()}
    assert np.all(np.abs(params["tx"]) <= 0.2 * w)
    assert np.all(np.abs(params["ty"]) <= 0.2 * h)
    image = dots(h, w, [(24.5, 19.5)])
    out = warp(np.repeat(image[None], 4, axis=0), h, w, **params)
    moved = np.array([centroids(o)[0] for o in out]) - [24.5, 19.5]
    np.testing.assert_allclose(moved[:, 0], params["tx"], atol=0.05)
    np.testing.assert_allclose(moved[:, 1], params["ty"], atol=0.05)


def test_identity_when_every_transform_is_off_and_at_inference():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (3, 8, 10, 3)).astype("uint8")
    off = RandomAffine(
        flip=False, max_rotation_deg=0, scale_range=(1, 1), max_translation=0
    )
    out = off(images, training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_array_equal(to_numpy(out), images.astype("float32"))
    on = RandomAffine(seed=0)
    np.testing.assert_array_equal(to_numpy(on(images, training=False)), images)
    assert not np.allclose(to_numpy(on(images, training=True)), images)


def test_same_seed_same_batch_and_draws_advance():
    rng = np.random.default_rng(6)
    images = rng.uniform(0, 255, (4, 12, 12, 3)).astype("float32")
    a, b = RandomAffine(seed=11), RandomAffine(seed=11)
    first = to_numpy(a(images))
    np.testing.assert_array_equal(first, to_numpy(b(images)))
    assert not np.allclose(first, to_numpy(a(images)))
    assert not np.allclose(first, to_numpy(RandomAffine(seed=12)(images)))


def test_same_seed_state_same_result_eager_in_tf_data_and_in_a_jit_model():
    rng = np.random.default_rng(7)
    images = rng.uniform(0, 255, (4, 16, 20, 3)).astype("float32")
    layer = RandomAffine(seed=5)
    model = keras.Sequential([keras.Input((16, 20, 3)), layer])
    start = to_numpy(layer.seed_generator.state)

    def run(fn):
        layer.seed_generator.state.assign(start)
        return fn()

    eager = run(lambda: run_layer(layer, images, "eager"))
    in_data = run(lambda: run_layer(layer, images, "tf.data"))
    np.testing.assert_allclose(in_data, eager, atol=1e-3, rtol=0)
    assert not np.allclose(eager, images)
    # TensorFlow's stateless RNG picks another algorithm under XLA, so compiled
    # draws differ from eager ones; compiled runs agree with each other.
    in_jit = run(lambda: run_layer(layer, images, "jit"))
    model_jit = tf.function(lambda x: model(x, training=True), jit_compile=True)
    in_model = run(lambda: to_numpy(model_jit(images)))
    np.testing.assert_allclose(in_model, in_jit, atol=1e-3, rtol=0)
    assert not np.allclose(in_jit, images)


def test_compiled_warp_equals_eager_warp():
    rng = np.random.default_rng(11)
    images = rng.uniform(0, 255, (3, 15, 19, 3)).astype("float32")
    transforms = affine_matrices(
        [True, False, True], [14.0, -9.0, 3.0], [1.0, 1.35, 1.2],
        [3.0, -2.5, 0.0], [-1.0, 2.0, 3.5], 15, 19,
    )
    jit = tf.function(warp_affine, jit_compile=True)
    np.testing.assert_allclose(
        to_numpy(jit(images, transforms)), to_numpy(warp_affine(images, transforms)),
        atol=1e-3, rtol=0,
    )


def test_trains_in_a_jit_compiled_model_unlike_keras_rotation():
    x = np.random.default_rng(8).uniform(0, 255, (4, 12, 12, 3)).astype("float32")
    y = np.zeros((4, 1), "float32")

    def fit(augment):
        model = keras.Sequential(
            [
                keras.Input((12, 12, 3)),
                augment,
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
        model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        return model.jit_compile

    assert fit(RandomAffine(seed=0)) is True
    with pytest.warns(UserWarning, match="jit_compile"):
        assert fit(keras.layers.RandomRotation(0.1)) is False


def test_affine_transform_resampler_agrees_with_gather():
    images = np.random.default_rng(9).uniform(0, 255, (3, 14, 18, 3)).astype("float32")
    gather = RandomAffine(seed=4)
    keras_kernel = RandomAffine(seed=4, resampler="affine_transform")
    assert gather.supports_jit and not keras_kernel.supports_jit
    np.testing.assert_allclose(
        to_numpy(gather(images)), to_numpy(keras_kernel(images)), atol=1e-2, rtol=0
    )


def test_mixed_precision_output_dtype():
    images = np.zeros((2, 8, 8, 3), "uint8")
    out = RandomAffine(seed=0, dtype="mixed_bfloat16")(images, training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"


def test_config_round_trip_and_saved_model(tmp_path):
    layer = RandomAffine(
        flip=False,
        max_rotation_deg=7.5,
        scale_range=(1.1, 1.2),
        max_translation=0.1,
        fill_mode="constant",
        interpolation="nearest",
        seed=3,
        fill_value=9.0,
        name="augment",
    )
    config = layer.get_config()
    clone = RandomAffine.from_config(config)
    assert clone.get_config() == config
    assert clone.scale_range == (1.1, 1.2)

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3)(layer(inputs)))
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # registered: no custom_objects needed
    restored = loaded.get_layer("augment")
    assert isinstance(restored, RandomAffine)
    assert restored.get_config() == config
    x = np.random.default_rng(10).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(loaded(x, training=False)), to_numpy(model(x, training=False)),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_rotation_deg": -1.0},
        {"max_rotation_deg": 200.0},
        {"scale_range": (1.4, 1.0)},
        {"scale_range": (0.0, 1.0)},
        {"scale_range": 1.2},
        {"max_translation": 1.0},
        {"max_translation": -0.1},
        {"fill_mode": "mirror"},
        {"interpolation": "bicubic"},
        {"resampler": "scipy"},
        {"flip": "yes"},
        {"seed": 1.5},
    ],
)
def test_invalid_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        RandomAffine(**kwargs)


def test_rejects_images_without_a_batch_axis():
    with pytest.raises(ValueError, match="height, width and channels"):
        RandomAffine()(np.zeros((8, 8, 3), "float32"))


def test_random_affine_from_config():
    assert random_affine_from_config(AugmentConfig(enabled=False)) is None
    config = AugmentConfig(
        flip=False, max_rotation_deg=10.0, scale_min=1.1, scale_max=1.3,
        max_translation=0.15, fill_mode="nearest",
    )
    layer = random_affine_from_config(config, seed=2)
    assert isinstance(layer, RandomAffine)
    assert (layer.flip, layer.max_rotation_deg, layer.scale_range) == (
        False, 10.0, (1.1, 1.3)
    )
    assert (layer.max_translation, layer.fill_mode, layer.seed) == (0.15, "nearest", 2)
