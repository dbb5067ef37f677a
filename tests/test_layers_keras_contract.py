"""ManualBatchNorm as keras.layers.BatchNormalization: frozen = inference,
masks (forward and gradients), every constructor argument, synchronized, renorm.

The reference is keras' own BatchNormalization, its gradients taken by
TensorFlow autodiff of its forward pass (ManualBatchNorm's come from the
hand-written backward pass).
"""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, subprocess_env
from stl10_keras.layers import RENORM_REFUSED, ManualBatchNorm


def _same_weights(manual, ref, rng, channels):
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        value = rng.uniform(0.5, 2.0, channels).astype("float32")
        getattr(manual, name).assign(value)
        getattr(ref, name).assign(value)


def _statistics(layer):
    return np.concatenate([layer.moving_mean.numpy(), layer.moving_variance.numpy()])


def test_frozen_layer_runs_in_inference_mode_like_keras():
    # keras' test_trainable_behavior, with keras' layer as the reference.
    rng = np.random.default_rng(0)
    shape = (200, 4, 4, 3)
    manual = ManualBatchNorm(axis=-1, momentum=0.8, epsilon=1e-7)
    ref = keras.layers.BatchNormalization(axis=-1, momentum=0.8, epsilon=1e-7)
    for layer in (manual, ref):
        layer.build(shape)
    _same_weights(manual, ref, rng, 3)
    x = rng.normal(5.0, 10.0, shape).astype("float32")
    before = _statistics(manual)

    manual.trainable = ref.trainable = False
    assert len(manual.trainable_weights) == 0
    assert len(manual.non_trainable_weights) == 4
    frozen = manual(x, training=True)
    np.testing.assert_allclose(frozen, ref(x, training=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(frozen, manual(x, training=False), rtol=1e-6)
    np.testing.assert_array_equal(_statistics(manual), before)  # nothing updated

    manual.trainable = ref.trainable = True
    assert len(manual.trainable_weights) == 2
    for _ in range(3):
        out = manual(x, training=True)
        np.testing.assert_allclose(out, ref(x, training=True), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_statistics(manual), _statistics(ref), rtol=1e-5)
    assert not np.allclose(_statistics(manual), before)


def test_frozen_layer_in_fit_updates_nothing():
    rng = np.random.default_rng(1)
    inputs = keras.Input((4,))
    bn = ManualBatchNorm(name="bn")
    outputs = keras.layers.Dense(1)(bn(keras.layers.Dense(4)(inputs)))
    model = keras.Model(inputs, outputs)
    bn.moving_mean.assign([1.0, 2.0, 3.0, 4.0])
    bn.trainable = False
    model.compile("sgd", "mse")
    weights = [w.numpy().copy() for w in bn.weights]
    model.fit(rng.normal(size=(32, 4)), rng.normal(size=(32, 1)), epochs=2,
              batch_size=8, verbose=0)
    for before, after in zip(weights, bn.weights):
        np.testing.assert_array_equal(before, after.numpy())


def _masked_data(rng, shape=(6, 5, 3)):
    x = (rng.normal(size=shape) * 2 + 3).astype("float64")
    lengths = np.array([5, 3, 1, 4, 2, 0])  # the last sequence fully padded
    mask = np.arange(shape[1])[None, :] < lengths[:, None]
    return x, mask


def _grads(layer, x, mask, dy):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, mask=tf.constant(mask))
        loss = tf.reduce_sum(y * dy)
    return [y.numpy()] + [g.numpy() for g in tape.gradient(
        loss, [x, layer.gamma.value, layer.beta.value])]


@pytest.mark.parametrize("fully_masked", [False, True])
def test_masked_values_and_gradients_match_keras_autodiff(fully_masked):
    rng = np.random.default_rng(2)
    x, mask = _masked_data(rng)
    if fully_masked:
        mask[:] = False
    dy = rng.normal(size=x.shape)
    manual = ManualBatchNorm(momentum=0.0, dtype="float64")
    ref = keras.layers.BatchNormalization(momentum=0.0, dtype="float64")
    for layer in (manual, ref):
        layer.build(x.shape)
    _same_weights(manual, ref, rng, x.shape[-1])
    for got, want in zip(_grads(manual, x, mask, dy), _grads(ref, x, mask, dy)):
        # keras divides by (m + 1e-7) where ManualBatchNorm divides by m.
        np.testing.assert_allclose(got, want, rtol=1e-6,
                                   atol=1e-6 * np.max(np.abs(want)))
    np.testing.assert_allclose(_statistics(manual), _statistics(ref), rtol=1e-6,
                               atol=1e-9)
    if not fully_masked:  # the statistics are the unmasked values' (numpy)
        unmasked = x[mask]
        np.testing.assert_allclose(
            _statistics(manual),
            np.concatenate([unmasked.mean(0), unmasked.var(0)]), rtol=1e-10)


def test_masked_positions_do_not_move_the_statistics():
    rng = np.random.default_rng(3)
    x, mask = _masked_data(rng)
    layer = ManualBatchNorm(momentum=0.0)
    layer(x.astype("float32"), training=True, mask=mask)
    first = _statistics(layer)
    x[~mask] = 1e6  # whatever sits in the padding
    y = layer(x.astype("float32"), training=True, mask=mask)
    np.testing.assert_allclose(_statistics(layer), first, rtol=1e-6)
    assert np.all(np.isfinite(y))


def test_mask_of_the_wrong_rank_is_refused_as_keras_does():
    layer = ManualBatchNorm()
    with pytest.raises(ValueError, match="one dimension less than the inputs"):
        layer(np.ones((2, 3, 4), "float32"), mask=np.ones((2, 3, 4)), training=True)


def test_every_argument_acts_as_in_keras():
    rng = np.random.default_rng(4)
    kwargs = dict(
        axis=1, momentum=0.7, epsilon=1e-4,
        beta_initializer=keras.initializers.Constant(0.3),
        gamma_initializer=keras.initializers.Constant(1.7),
        moving_mean_initializer=keras.initializers.Constant(-2.0),
        moving_variance_initializer=keras.initializers.Constant(3.0),
        beta_regularizer=keras.regularizers.L2(0.1),
        gamma_regularizer=keras.regularizers.L1(0.2),
        beta_constraint=keras.constraints.MaxNorm(0.1),
        gamma_constraint=keras.constraints.NonNeg(),
    )
    manual = ManualBatchNorm(**kwargs)
    ref = keras.layers.BatchNormalization(**kwargs)
    x = rng.normal(2.0, 3.0, (8, 3, 5)).astype("float32")
    for training in (False, True, False):
        np.testing.assert_allclose(manual(x, training=training),
                                   ref(x, training=training), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_statistics(manual), _statistics(ref), rtol=1e-5)
    np.testing.assert_allclose(sum(manual.losses), sum(ref.losses), rtol=1e-6)
    assert manual.gamma.constraint is not None and manual.beta.constraint is not None
    # Each one's config builds the other, to the same layer.
    def without_name(config):
        return {k: v for k, v in config.items() if k != "name"}

    config = without_name(manual.get_config())
    assert without_name(
        ManualBatchNorm.from_config(ref.get_config()).get_config()) == config
    twin = keras.layers.BatchNormalization.from_config(manual.get_config())
    assert {k: v for k, v in twin.get_config().items() if k in config} == config


def test_center_and_scale_false_have_no_weights_as_in_keras():
    manual = ManualBatchNorm(center=False, scale=False)
    manual.build((None, 4))
    assert manual.gamma is None and manual.beta is None
    assert [w.name for w in manual.weights] == ["moving_mean", "moving_variance"]
    x = np.random.default_rng(5).normal(size=(16, 4)).astype("float32")
    ref = keras.layers.BatchNormalization(center=False, scale=False)
    np.testing.assert_allclose(manual(x, training=True), ref(x, training=True),
                               rtol=1e-5, atol=1e-5)


def test_axis_list_normalises_per_pair_of_channels():
    rng = np.random.default_rng(6)
    x = rng.normal(3.0, 2.0, (7, 2, 5, 3))
    layer = ManualBatchNorm(axis=[1, -1], momentum=0.0, epsilon=1e-3,
                            dtype="float64")
    y = layer(x, training=True)
    assert layer.gamma.shape == (2, 3)
    mean = x.mean(axis=(0, 2), keepdims=True)
    var = x.var(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3), rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean[0, :, 0, :],
                               rtol=1e-12)
    restored = ManualBatchNorm.from_config(layer.get_config())
    assert restored.get_config()["axis"] == [1, -1]
    with pytest.raises(ValueError, match="out of bounds"):
        ManualBatchNorm(axis=4)(x)


def test_renorm_is_refused_with_one_sentence():
    with pytest.raises(ValueError) as info:
        ManualBatchNorm(renorm=True)
    assert str(info.value) == RENORM_REFUSED
    assert "keras.layers.BatchNormalization(renorm=True)" in RENORM_REFUSED
    # A BatchNormalization config without renorm loads.
    config = keras.layers.BatchNormalization(momentum=0.5).get_config()
    assert ManualBatchNorm.from_config(config).momentum == 0.5


def test_synchronized_is_refused_on_jax_with_keras_own_error():
    script = textwrap.dedent("""
        import keras
        from stl10_keras.layers import ManualBatchNorm
        messages = []
        for cls in (keras.layers.BatchNormalization, ManualBatchNorm):
            try:
                cls(synchronized=True)
            except ValueError as error:
                messages.append(str(error))
        assert len(messages) == 2 and messages[0] == messages[1], messages
        print("OK", messages[0])
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          env=subprocess_env(KERAS_BACKEND="jax"),
                          capture_output=True, text=True, timeout=300)
    if "No module named 'jax'" in proc.stderr:
        pytest.skip("jax is not installed (requirements-dev.txt)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK Argument synchronized=True" in proc.stdout


SYNCHRONIZED = """
import numpy as np, tensorflow as tf, keras
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from stl10_keras.layers import ManualBatchNorm

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
rng = np.random.default_rng(0)
shape = (2, 6, 3, 4)  # replicas, batch per replica, steps, channels
x = (rng.normal(size=shape) * 2 + 3).astype("float32")
x[1] += 5.0  # the replicas' batches differ: local statistics would be wrong
dy = rng.normal(size=shape).astype("float32")
mask = rng.random(shape[:3]) > 0.3
gamma = rng.uniform(0.5, 1.5, 4).astype("float32")
beta = rng.normal(size=4).astype("float32")


def build(cls, **kwargs):
    layer = cls(momentum=0.0, **kwargs)
    layer.build((None, 3, 4))
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    return layer


def per_replica(a):
    return strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(a[ctx.replica_id_in_sync_group]))


def on_replicas(layer, masked):
    def step(xs, dys, ms):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = layer(xs, training=True, mask=ms if masked else None)
            loss = tf.reduce_sum(y * dys)
        return (y, *tape.gradient(loss, [xs, layer.gamma.value, layer.beta.value]))

    out = strategy.run(tf.function(step),
                       args=(per_replica(x), per_replica(dy), per_replica(mask)))
    y, dx, dg, db = [np.concatenate(strategy.experimental_local_results(o))
                     for o in out]
    # Variable gradients: the optimizer sums the replicas' shares.
    return y, dx, dg.reshape(2, 4).sum(0), db.reshape(2, 4).sum(0)


def whole_batch(masked):
    layer = build(keras.layers.BatchNormalization)
    xg = tf.constant(x.reshape(12, 3, 4))
    with tf.GradientTape() as tape:
        tape.watch(xg)
        y = layer(xg, training=True,
                  mask=tf.constant(mask.reshape(12, 3)) if masked else None)
        loss = tf.reduce_sum(y * dy.reshape(12, 3, 4))
    grads = tape.gradient(loss, [xg, layer.gamma.value, layer.beta.value])
    return [y.numpy()] + [g.numpy() for g in grads]


def close(got, want):
    return all(np.allclose(g.reshape(w.shape), w, rtol=1e-4, atol=1e-4)
               for g, w in zip(got, want))


for masked in (False, True):
    with strategy.scope():
        layer = build(ManualBatchNorm, synchronized=True)
        local = build(ManualBatchNorm)
    reference = whole_batch(masked)
    assert close(on_replicas(layer, masked), reference), masked
    assert not close(on_replicas(local, masked)[:2], reference[:2]), masked
    copies = [v.numpy() for v in layer.moving_mean.value.values]
    unmasked = x[mask] if masked else x.reshape(-1, 4)
    for copy in copies:
        np.testing.assert_allclose(copy, unmasked.mean(0), rtol=1e-5)
# keras' own synchronized layer (it synchronises unmasked batches only).
with strategy.scope():
    layer = build(ManualBatchNorm, synchronized=True)
    keras_sync = build(keras.layers.BatchNormalization, synchronized=True)
assert close(on_replicas(layer, False), on_replicas(keras_sync, False))
print("OK")
"""


def test_synchronized_statistics_and_gradients_span_the_replicas():
    """Two replicas with synchronized=True equal keras' BatchNormalization on
    the whole batch (autodiff), masked or not; without it they do not."""
    proc = subprocess.run([sys.executable, "-c", SYNCHRONIZED], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
