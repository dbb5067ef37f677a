"""Tests of stl10_keras.kmeans (and its figures in stl10_keras.visualize).

References are independent of the code under test: planted patterns, numpy
slicing and sums, a ZCA matrix computed here from `np.cov`, Keras' own
`glorot_uniform` draws and training-mode batch norm.
"""

from __future__ import annotations

import json
import os

import keras
import matplotlib.image
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from stl10_keras import kmeans as km
from stl10_keras import patches as patch_lib
from stl10_keras.config import ConfigError, KMeansConfig, preset
from stl10_keras.model import build_model
from stl10_keras.visualize import save_centroid_grid, save_filter_grid


def smooth_images(n, size=16, seed=0):
    """uint8 images of blurred noise: correlated neighbouring pixels."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.standard_normal((n, size, size, 3)), sigma=(0, 1.5, 1.5, 0))
    x = 128 + 60 * x / x.std()
    return np.clip(x, 0, 255).astype(np.uint8)


def batches_of(images, batch_size):
    for s in range(0, len(images), batch_size):
        yield images[s:s + batch_size]


def smoke_config(**kmeans):
    config = preset("smoke", variant="kmeans12")  # widths (8, 16, ...)
    for key, value in kmeans.items():
        setattr(config.kmeans, key, value)
    return config


# --- patch sampling ----------------------------------------------------------


def test_patches_are_crops_of_their_image_inside_bounds():
    h = w = 12
    k, per_image, n = 3, 7, 10
    yy, xx = np.mgrid[:h, :w]
    images = np.empty((n, h, w, 3), np.uint8)
    images[..., 0] = yy * 16 + xx  # encodes the position
    images[..., 1] = 255 - images[..., 0]
    images[..., 2] = np.arange(n)[:, None, None]  # encodes the image
    patches, read = patch_lib.sample_patches(
        batches_of(images, 4), k, per_image, n, seed=0, progress=False
    )
    assert read == n and patches.shape == (n * per_image, k * k * 3)
    starts = []
    for i, p in enumerate(patches.reshape(-1, k, k, 3)):
        image = i // per_image
        y0, x0 = divmod(int(p[0, 0, 0]), 16)
        assert 0 <= y0 <= h - k and 0 <= x0 <= w - k
        np.testing.assert_array_equal(p, images[image, y0:y0 + k, x0:x0 + k])
        starts.append((y0, x0))
    assert len(set(starts)) > 30  # positions are spread, not one fixed crop


def test_stream_is_read_lazily_up_to_num_images():
    pulled = {"images": 0, "batches": 0}

    def endless(batch_size=8):
        rng = np.random.default_rng(0)
        while True:
            pulled["images"] += batch_size
            pulled["batches"] += 1
            yield rng.integers(0, 256, (batch_size, 10, 10, 3), dtype=np.uint8)

    patches, read = patch_lib.sample_patches(endless(), 3, 5, 20, seed=0, progress=False)
    assert read == 20 and len(patches) == 100
    assert pulled["batches"] == 3  # 8 + 8 + 4 of the third; never a fourth batch

    with pytest.warns(UserWarning, match="ended after 6"):
        patches, read = patch_lib.sample_patches(
            batches_of(smooth_images(6), 4), 3, 5, 20, seed=0, progress=False
        )
    assert read == 6 and len(patches) == 30


# --- clustering --------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_recovers_planted_patterns(normalize):
    """Images are single 3x3 tiles of 4 known zero-mean patterns plus noise."""
    rng = np.random.default_rng(1)
    patterns = rng.standard_normal((4, 27))
    patterns -= patterns.mean(axis=1, keepdims=True)
    patterns /= np.abs(patterns).max(axis=1, keepdims=True)
    which = rng.integers(0, 4, 400)
    images = 128 + 60 * patterns[which] + rng.normal(0, 6, (400, 27))
    images = np.clip(images, 0, 255).astype(np.uint8).reshape(400, 3, 3, 3)
    kconfig = KMeansConfig(num_images=400, patches_per_image=1, normalize=normalize,
                           whiten=False, batch_size=128, max_iter=50)
    centroids, info = km.image_patch_centroids(
        batches_of(images, 64), kconfig, num_clusters=4, seed=0, progress=False
    )
    assert centroids.shape == (4, 27) and info["num_patches"] == 400
    cos = (patterns / np.linalg.norm(patterns, axis=1, keepdims=True)) @ (
        centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    ).T
    assert cos.max(axis=1).min() >= 0.95
    assert sorted(cos.argmax(axis=1)) == [0, 1, 2, 3]  # a centroid per pattern


# --- kernel ------------------------------------------------------------------


def test_kernel_layout_is_channels_last_k_k_c():
    rng = np.random.default_rng(2)
    centroids = rng.standard_normal((5, 3 * 3 * 3))
    kernel, bias = km.kmeans_conv_kernel(centroids, 3, 3, target_norm=None)
    assert kernel.shape == (3, 3, 3, 5)
    np.testing.assert_array_equal(bias, 0)
    image = rng.standard_normal((1, 8, 8, 3)).astype(np.float32)
    out = keras.ops.convert_to_numpy(keras.ops.conv(image, kernel, padding="valid"))
    ref = np.array([[[np.sum(image[0, y:y + 3, x:x + 3] * c.reshape(3, 3, 3))
                      for c in centroids] for x in range(6)] for y in range(6)])
    np.testing.assert_allclose(out[0], ref, rtol=1e-5, atol=1e-5)

    # A patch equal to centroid j excites filter j most (equal filter norms).
    kernel, _ = km.kmeans_conv_kernel(centroids, 3, 3)
    for j, c in enumerate(centroids):
        image = rng.standard_normal((1, 7, 7, 3)).astype(np.float32) * 0.1
        image[0, 2:5, 1:4] = c.reshape(3, 3, 3)
        out = keras.ops.convert_to_numpy(keras.ops.conv(image, kernel, padding="valid"))
        assert out[0, 2, 1].argmax() == j


def test_filters_have_glorot_uniform_norm():
    rng = np.random.default_rng(3)
    centroids = rng.standard_normal((64, 27)) * rng.uniform(0.01, 10, (64, 1))
    kernel, _ = km.kmeans_conv_kernel(centroids, 3, 3)
    draws = [keras.ops.convert_to_numpy(
        keras.initializers.GlorotUniform(seed=s)((3, 3, 3, 64))) for s in range(10)]
    expected_sq = np.mean([np.sum(d.reshape(27, 64) ** 2, axis=0) for d in draws])
    norms_sq = np.sum(kernel.reshape(27, 64) ** 2, axis=0)
    np.testing.assert_allclose(norms_sq, expected_sq, rtol=0.03)


@pytest.mark.parametrize("normalize", [False, True])
def test_folded_whitening_equals_explicit_whitening(normalize):
    eps_zca = 0.01
    images = smooth_images(50, size=12, seed=4)
    rescaled = images.astype(np.float64) / 127.5 - 1
    patches, _ = patch_lib.sample_patches(batches_of(rescaled, 25), 3, 40, 50, seed=0,
                                   progress=False)
    raw = patches.astype(np.float64)
    z, prep = km.preprocess_patches(patches, normalize, True, eps_zca)

    # Reference preprocessing, written out with numpy.
    if normalize:
        centred = raw - raw.mean(axis=1, keepdims=True)
        var = np.mean(centred**2, axis=1)
        contrast = np.sqrt(var + km.CONTRAST_EPSILON * var.mean())
        normed, s_bar = centred / contrast[:, None], contrast.mean()
    else:
        normed, s_bar = raw, 1.0
    mu = normed.mean(axis=0)
    lam, u = np.linalg.eigh(np.cov(normed, rowvar=False, bias=True))
    zca = u @ np.diag(1 / np.sqrt(lam + eps_zca)) @ u.T
    np.testing.assert_allclose(z, (normed - mu) @ zca, atol=2e-3)

    centroids = np.random.default_rng(5).standard_normal((6, 27))
    kernel, bias = km.kmeans_conv_kernel(centroids, 3, 3, prep, target_norm=None)
    image = rescaled[:1].astype(np.float32)
    out = keras.ops.convert_to_numpy(
        keras.ops.conv(image, kernel, padding="valid") + bias
    )[0]
    # The layer on raw input = centroid . whitened patch (contrast: the sample's s_bar).
    for y in range(10):
        for x in range(10):
            p = rescaled[0, y:y + 3, x:x + 3].reshape(-1)
            p = (p - p.mean()) / s_bar if normalize else p
            np.testing.assert_allclose(out[y, x], centroids @ (zca @ (p - mu)),
                                       rtol=1e-3, atol=1e-3)


# --- initialiser -------------------------------------------------------------


def test_initializer_puts_kernel_in_built_model_and_checks_shape():
    kernel = np.random.default_rng(6).standard_normal((3, 3, 3, 8)).astype(np.float32)
    init = {"stage1_conv": km.KMeansInitializer(kernel)}
    model = build_model(smoke_config(), (16, 16, 3), kernel_initializers=init)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model.get_layer("stage1_conv").kernel), kernel)
    with pytest.raises(ValueError, match=r"shape \(3, 3, 3, 8\).*\(3, 3, 3, 16\)"):
        km.KMeansInitializer(kernel)((3, 3, 3, 16))


def test_initializer_serializes_and_survives_keras_file(tmp_path):
    kernel = np.random.default_rng(7).standard_normal((3, 3, 3, 8)).astype(np.float32)
    init = km.KMeansInitializer(kernel)
    again = km.KMeansInitializer.from_config(json.loads(json.dumps(init.get_config())))
    np.testing.assert_array_equal(again.values, kernel)
    revived = keras.initializers.deserialize(keras.initializers.serialize(init))
    assert isinstance(revived, km.KMeansInitializer)

    model = build_model(smoke_config(), (16, 16, 3),
                        kernel_initializers={"stage1_conv": init})
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("stage1_conv")
    assert isinstance(layer.kernel_initializer, km.KMeansInitializer)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel), kernel)
    x = smooth_images(2).astype(np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(model(x)), atol=1e-5)


# --- stages 1 and 2 on a model -----------------------------------------------


@pytest.mark.parametrize("batch_norm, layer, size", [
    ("manual", "stage2_conv", 16), ("keras", "stage2_conv", 16),
    ("manual", "stage3_conv", 32),
])
def test_deeper_patches_are_windows_of_training_mode_forward(batch_norm, layer, size):
    """Reference: Keras' own forward pass with batch statistics, whole images."""
    config = smoke_config()
    config.model.batch_norm = batch_norm
    model = build_model(config, (size, size, 3))
    rng = np.random.default_rng(8)
    for bn in ("stage1_bn", "stage2_bn"):
        width = model.get_layer(bn).gamma.shape[0]
        model.get_layer(bn).gamma.assign(rng.uniform(0.5, 2, width))
        model.get_layer(bn).beta.assign(rng.normal(0, 0.5, width))
    # More images than one step of the statistics pass, fewer than BN_STATS_IMAGES.
    images = smooth_images(20, size)
    assert patch_lib._MAP_CHUNK < 20 <= patch_lib.BN_STATS_IMAGES
    reference = keras.Model(model.input, model.get_layer(layer).input)(
        images.astype(np.float32), training=True)
    reference = keras.ops.convert_to_numpy(reference)
    channels = reference.shape[-1]
    patches, read = patch_lib.sample_patches(
        batches_of(images, 8), 3, 5, 20, seed=0,
        layers=patch_lib.prefix_layers(model, layer), progress=False)
    assert read == 20 and patches.shape == (100, 9 * channels)
    for image, per_image in zip(reference, patches.reshape(20, 5, 3, 3, channels)):
        windows = np.lib.stride_tricks.sliding_window_view(image, (3, 3), axis=(0, 1))
        windows = windows.transpose(0, 1, 3, 4, 2)  # (y, x, 3, 3, C)
        for patch in per_image:
            error = np.abs(windows - patch).max(axis=(2, 3, 4))
            assert error.min() < 1e-4 * max(1.0, np.abs(patch).max())


def test_kmeans_init_stages_1_and_2_in_place():
    config = smoke_config(num_images=48, patches_per_image=10)
    model = build_model(config, (16, 16, 3))
    images = smooth_images(64)
    result = km.kmeans_init(model, config, lambda: batches_of(images, 16),
                            stages=(1, 2), progress=False)
    assert result["weights"]["stage1_conv"][0].shape == (3, 3, 3, 8)
    assert result["weights"]["stage2_conv"][0].shape == (3, 3, 8, 16)
    assert result["centroids"]["stage2_conv"].shape == (16, 3 * 3 * 8)
    for name, (kernel, bias) in result["weights"].items():
        layer = model.get_layer(name)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel), kernel)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.bias), bias)
    info = result["layers"]["stage2_conv"]
    assert info["num_images"] == 48 and info["num_patches"] == 480
    assert result["kmeans_seconds"] >= info["seconds"] > 0
    json.dumps(result["layers"])  # scalars only: ready for metrics.json
    bn = model.get_layer("stage1_bn")  # moving statistics untouched
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_mean), 0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn.moving_variance), 1)


def test_same_seed_same_kernels_other_seed_other_kernels():
    images = smooth_images(40)

    def run(seed):
        config = smoke_config(num_images=32, patches_per_image=8)
        config.train.seed = seed
        model = build_model(config, (16, 16, 3))
        return km.kmeans_init(model, config, lambda: batches_of(images, 16),
                              stages=(1, 2), progress=False)["weights"]

    a, b, c = run(0), run(0), run(1)
    for name in ("stage1_conv", "stage2_conv"):
        np.testing.assert_array_equal(a[name][0], b[name][0])
    assert not np.allclose(a["stage1_conv"][0], c["stage1_conv"][0])


def test_patch_size_must_match_first_kernel():
    config = smoke_config(patch_size=5, num_images=8)
    model = build_model(config, (16, 16, 3))
    with pytest.raises(ConfigError, match="--kmeans-patch-size 3"):
        km.kmeans_init(model, config, lambda: batches_of(smooth_images(8), 8),
                       stages=(1,), progress=False)


@pytest.mark.parametrize("kernel, stages, needle", [
    (17, (1,), "smaller than the 17x17 patches"),    # stage 1's input is 16x16
    (9, (1, 2), "smaller than the 9x9 patches"),     # stage 2's input is 8x8
])
def test_patches_larger_than_the_layer_input_are_a_config_error(kernel, stages,
                                                                 needle):
    # A user's flags (--kernel-size / --kmeans-patch-size too large for the
    # images) cause this, so the train command must report it as a ConfigError
    # (one sentence, exit code 2), not let a ValueError escape as a traceback.
    config = smoke_config(patch_size=kernel, num_images=8)
    config.model.kernel_size = kernel
    model = build_model(config, (16, 16, 3))
    with pytest.raises(ConfigError, match=needle):
        km.kmeans_init(model, config, lambda: batches_of(smooth_images(8), 8),
                       stages=stages, progress=False)


# --- figures -----------------------------------------------------------------


def test_figures_are_written_atomically_and_match_returned_array(tmp_path):
    rng = np.random.default_rng(9)
    path = os.path.join(tmp_path, "figs", "centroids.png")
    rgb = save_centroid_grid(rng.standard_normal((10, 7 * 7 * 3)), 7, 3, path)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    on_disk = matplotlib.image.imread(path)[..., :3]
    np.testing.assert_array_equal(np.round(on_disk * 255).astype(np.uint8), rgb)
    rgb = save_filter_grid(rng.standard_normal((3, 3, 3, 8)),
                           os.path.join(tmp_path, "figs", "filters.png"))
    assert rgb.dtype == np.uint8
    assert sorted(os.listdir(os.path.join(tmp_path, "figs"))) == [
        "centroids.png", "filters.png"]  # no temporary files left
    with pytest.raises(ValueError, match="1- or 3-channel"):
        save_centroid_grid(rng.standard_normal((4, 3 * 3 * 8)), 3, 8, path)
