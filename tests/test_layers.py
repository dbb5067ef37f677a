import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, subprocess_env
from stl10_keras.layers import ManualBatchNorm

SHAPES = [(16, 5), (4, 6, 7, 3)]


def _pair(momentum=0.9, epsilon=1e-5):
    return (ManualBatchNorm(momentum=momentum, epsilon=epsilon),
            keras.layers.BatchNormalization(momentum=momentum, epsilon=epsilon))


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_keras_batch_normalization(shape):
    rng = np.random.default_rng(0)
    manual, ref = _pair()
    for step in range(3):  # several updates of the moving statistics
        x = (rng.normal(size=shape) * 3 + 2).astype("float32")
        np.testing.assert_allclose(manual(x, training=True), ref(x, training=True),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(manual.moving_mean.numpy(), ref.moving_mean.numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(manual.moving_variance.numpy(),
                               ref.moving_variance.numpy(), rtol=1e-5)
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(manual(x, training=False), ref(x, training=False),
                               rtol=1e-5, atol=1e-5)


def _plain_bn(x, gamma, beta, eps, axes):
    mean = tf.reduce_mean(x, axis=axes, keepdims=True)
    var = tf.reduce_mean(tf.square(x - mean), axis=axes, keepdims=True)
    return (x - mean) / tf.sqrt(var + eps) * gamma + beta


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_gradients_equal_autodiff_of_the_plain_formula(shape, offset):
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=shape) * 2 + offset, dtype=tf.float64)
    w = tf.constant(rng.normal(size=shape), dtype=tf.float64)  # E = sum(w * y)
    layer = ManualBatchNorm(epsilon=1e-5, dtype="float64")
    layer.build(shape)
    layer.gamma.assign(rng.uniform(0.5, 2.0, size=shape[-1]))
    layer.beta.assign(rng.normal(size=shape[-1]))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(w * layer(x, training=True))
    dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
    gamma = tf.constant(layer.gamma.numpy())
    beta = tf.constant(layer.beta.numpy())
    axes = tuple(range(len(shape) - 1))
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        ref_loss = tf.reduce_sum(w * _plain_bn(x, gamma, beta, 1e-5, axes))
    rdx, rdgamma, rdbeta = tape.gradient(ref_loss, [x, gamma, beta])
    for got, want in [(dx, rdx), (dgamma, rdgamma), (dbeta, rdbeta)]:
        np.testing.assert_allclose(got, want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())


def test_the_layer_does_not_use_autodiff_of_its_forward():
    # A wrong hand-written backward must show up in the gradient: patch it.
    from stl10_keras import backprop

    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(8, 3)), tf.float32)
    w = tf.constant(rng.normal(size=(8, 3)), tf.float32)
    layer = ManualBatchNorm()
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * w)
    good = tape.gradient(loss, x)
    original = backprop.batch_norm_backward

    def doubled(*args, **kwargs):
        g = original(*args, **kwargs)
        return g._replace(dx=g.dx * 2.0)

    backprop.batch_norm_backward = doubled
    try:
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * w)
        bad = tape.gradient(loss, x)
    finally:
        backprop.batch_norm_backward = original
    np.testing.assert_allclose(bad, 2 * good, rtol=1e-6, atol=1e-6)


def test_batch_of_one_is_finite():
    layer = ManualBatchNorm(epsilon=1e-3)
    y = layer(np.full((1, 4), 7.0, "float32"), training=True)
    np.testing.assert_allclose(y, np.zeros((1, 4)), atol=1e-6)  # = beta


def test_large_offset_tiny_spread_has_no_cancellation():
    rng = np.random.default_rng(3)
    x = (1e4 + 1e-2 * rng.normal(size=(64, 2))).astype("float64")
    layer = ManualBatchNorm(epsilon=1e-12, dtype="float64")
    y = np.asarray(layer(x, training=True))
    ref = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-12)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_keep_float32_statistics(dtype):
    rng = np.random.default_rng(4)
    x32 = (rng.normal(size=(32, 4)) * 2 + 5).astype("float32")
    layer = ManualBatchNorm(momentum=0.0, dtype=f"mixed_{dtype}")
    y = layer(tf.cast(x32, dtype), training=True)
    assert y.dtype == dtype
    assert layer.moving_mean.dtype == "float32"
    x_low = tf.cast(tf.cast(x32, dtype), tf.float32).numpy()
    np.testing.assert_allclose(layer.moving_mean.numpy(), x_low.mean(0), rtol=1e-5)
    ref = (x_low - x_low.mean(0)) / np.sqrt(x_low.var(0) + 1e-3)
    np.testing.assert_allclose(tf.cast(y, tf.float32), ref, atol=0.05)


def test_mixed_precision_policy():
    layer = ManualBatchNorm(dtype="mixed_bfloat16")
    y = layer(np.ones((4, 3), "float32"), training=True)
    assert y.dtype == "bfloat16" and layer.gamma.dtype == "float32"


def test_serialization_round_trip(tmp_path):
    inputs = keras.Input((5,))
    outputs = ManualBatchNorm(momentum=0.8, epsilon=1e-4, name="bn")(inputs)
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(5).normal(size=(10, 5)).astype("float32")
    model(x, training=True)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.get_layer("bn"), ManualBatchNorm)
    assert loaded.get_layer("bn").get_config()["momentum"] == 0.8
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        ManualBatchNorm(epsilon=0)
    with pytest.raises(ValueError, match="momentum"):
        ManualBatchNorm(momentum=2)


def test_fit_under_mirrored_strategy_on_two_cpu_devices():
    script = textwrap.dedent("""
        import numpy as np, tensorflow as tf, keras
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from stl10_keras.layers import ManualBatchNorm
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        with strategy.scope():
            inputs = keras.Input((6,))
            x = ManualBatchNorm(name="bn")(keras.layers.Dense(8)(inputs))
            model = keras.Model(inputs, keras.layers.Dense(2)(x))
            model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(True))
        rng = np.random.default_rng(0)
        h = model.fit(rng.normal(size=(64, 6)).astype("float32") + 3,
                      rng.integers(0, 2, 64), batch_size=16, epochs=2, verbose=0)
        assert np.all(np.isfinite(h.history["loss"]))
        bn = model.get_layer("bn")
        mm = bn.moving_mean.numpy()
        assert np.all(np.isfinite(mm)) and np.any(mm != 0)
        # Each replica sees other images; the moving statistics are averaged
        # across replicas at every update (aggregation "mean"), so every
        # replica's copy is the same and in-fit validation equals the saved model.
        for var in (bn.moving_mean, bn.moving_variance):
            copies = [v.numpy() for v in var.value.values]
            assert len(copies) == 2
            np.testing.assert_allclose(copies[0], copies[1], rtol=1e-6, atol=1e-7)
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
