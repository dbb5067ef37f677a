import importlib.util
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from conftest import FAST_XLA, ROOT, subprocess_env
from stl10_keras.config import preset
from stl10_keras.layers import ManualBatchNorm
from stl10_keras.model import build_model, build_training_model, feature_extractor


def test_default_model_shapes_and_names():
    config = preset("default", "stl10")
    model = build_model(config, (96, 96, 3))
    assert model.input_shape == (None, 96, 96, 3)
    assert model.output_shape == (None, 10)
    for s, width in enumerate((64, 128, 256, 512, 512), start=1):
        conv = model.get_layer(f"stage{s}_conv")
        assert conv.kernel.shape == (3, 3, conv.input.shape[-1], width)
        assert isinstance(model.get_layer(f"stage{s}_bn"), ManualBatchNorm)
        model.get_layer(f"stage{s}_relu")
        model.get_layer(f"stage{s}_pool")
    # 96 / 2^5 = 3: the classifier sees 3 x 3 x 512 features.
    assert model.get_layer("flatten").output.shape[-1] == 3 * 3 * 512
    assert model.get_layer("fc1").units == 512
    assert model.get_layer("logits").units == 10


def test_seven_conv_variant_and_keras_bn_option():
    config = preset("smoke", "digits")
    config.model.convs_per_stage = (1, 1, 2, 2, 1)
    config.model.batch_norm = "keras"
    model = build_model(config, (32, 32, 3))
    convs = [l.name for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert convs == ["stage1_conv", "stage2_conv", "stage3_conv1", "stage3_conv2",
                     "stage4_conv1", "stage4_conv2", "stage5_conv"]
    assert isinstance(model.get_layer("stage3_bn2"), keras.layers.BatchNormalization)


def test_rescale_maps_0_255_to_unit_interval():
    model = build_model(preset("smoke", "digits"), (32, 32, 3))
    rescale = model.get_layer("rescale")
    np.testing.assert_allclose(rescale(np.array([0.0, 127.5, 255.0])), [-1, 0, 1])


def test_feature_extractor_outputs_every_stage():
    config = preset("smoke", "digits")
    model = build_model(config, (32, 32, 3))
    feats = feature_extractor(model)(np.zeros((2, 32, 32, 3), "float32"))
    assert list(feats) == [f"stage{s}_pool" for s in range(1, 6)] + ["fc1"]
    sizes = [32 // 2 ** s for s in range(1, 6)]
    for s, (size, width) in enumerate(zip(sizes, config.model.widths), start=1):
        assert tuple(feats[f"stage{s}_pool"].shape) == (2, size, size, width)
    # The features are the model's own activations: the logits follow from fc1.
    logits = model.get_layer("logits")(feats["fc1"])
    np.testing.assert_allclose(logits, model(np.zeros((2, 32, 32, 3))), rtol=1e-5,
                               atol=1e-6)


def test_training_model_shares_weights_and_applies_augmentation_in_training_only():
    model = build_model(preset("smoke", "digits"), (32, 32, 3))

    class Invert(keras.layers.Layer):
        def call(self, x, training=False):
            return 255.0 - x if training else x

    train_model = build_training_model(model, Invert())
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(train_model(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(train_model.trainable_weights) == len(model.trainable_weights)
    assert build_training_model(model, None) is model


@pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                    reason="jax is not installed (it is an optional dev dependency)")
def test_model_trains_under_the_jax_backend():
    script = textwrap.dedent("""
        import keras, numpy as np
        assert keras.backend.backend() == "jax"
        import sys
        from stl10_keras.config import preset
        from stl10_keras.augment import RandomAffine
        from stl10_keras.model import build_model, build_training_model
        inference = build_model(preset("smoke", "digits"), (32, 32, 3))
        # The full training model: augmentation on the device, jit-compiled.
        model = build_training_model(inference, RandomAffine(seed=0))
        model.compile(
            jit_compile=True, optimizer=keras.optimizers.SGD(0.05, momentum=0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (64, 32, 32, 3)).astype("uint8")
        y = rng.integers(0, 10, 64)
        h = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        assert np.all(np.isfinite(h.history["loss"]))
        assert "tensorflow" not in sys.modules, "the core imported tensorflow"
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          env=subprocess_env(KERAS_BACKEND="jax", XLA_FLAGS=FAST_XLA),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_core_modules_never_import_tensorflow():
    # Static check of the import statements: the backend-agnostic core (and the
    # stl10_keras modules it imports) must run where TensorFlow is absent.
    import ast

    core = ["layers", "model", "augment", "kmeans"]
    seen, todo = set(), list(core)
    while todo:
        name = todo.pop()
        path = ROOT / "stl10_keras" / f"{name}.py"
        if name in seen or not path.exists():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] != "tensorflow", f"{name}.py imports {mod}"
                if mod.startswith("stl10_keras."):
                    todo.append(mod.split(".")[1])
    assert {"layers", "model", "backprop", "config"} <= seen
