import os
import select
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

ROOT = Path(__file__).resolve().parents[1]

# XLA's CPU compiler spends most of a tiny JAX run optimising (12 s of 17 s
# before the first step, mostly compiling the random initialisers);
# unoptimised code computes the same values. For JAX subprocesses in tests.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
sys.path.insert(0, str(ROOT))


def subprocess_env(**extra):
    """Environment for running `python -m stl10_keras...` from the repo root.

    Without the TF_CPP_MIN_LOG_LEVEL set above: a command runs with its own
    default, as it does for a user (pass it in `extra` to set one).
    """
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def saved_model_vs_keras(version_dir, model_path):
    """In a fresh process, the digits validation images through a SavedModel's
    `serving_default` and through `model.keras`: the largest difference of their
    probabilities and the SavedModel's accuracy.
    """
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        from stl10_keras.data import load_splits
        from stl10_keras.model import load_model
        s = load_splits("digits", seed=0)
        fn = tf.saved_model.load({str(version_dir)!r}).signatures["serving_default"]
        probs = fn(images=tf.constant(s.x_val))["probabilities"].numpy()
        model = load_model({str(model_path)!r})
        logits = model.predict(s.x_val.astype("float32"), verbose=0)
        print(np.abs(probs - tf.nn.softmax(logits).numpy()).max(),
              np.mean(probs.argmax(1) == s.y_val))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diff, accuracy = map(float, out.stdout.split()[-2:])
    return diff, accuracy


def assert_same_run(got: dict, want: dict) -> None:
    """Two runs' metrics.json agree epoch by epoch and in their final accuracies.

    The tolerance (a few float32 ulps) only allows a multi-threaded CPU kernel
    summing in another order; the resume bugs these tests guard against moved
    the loss by more than 1e-3.
    """
    import pytest

    for g, w in zip(got["history"], want["history"], strict=True):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9), (
                g["epoch"], key)
    assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=1e-9)
    assert got["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=1e-9)


@contextmanager
def rest_server(repository, **server_args):
    """An in-process REST `ModelServer` on a free port over a started
    `repository`; yields the started server, then stops it, stops the
    repository and checks that the serving thread ended."""
    from stl10_keras.serving.rest import ModelServer

    server = ModelServer(repository, "127.0.0.1", 0, **server_args)
    try:
        with server:
            yield server
    finally:
        repository.stop()
    assert server.wait(timeout=0)


@contextmanager
def serve_cli(*args, with_process=False):
    """`python -m stl10_keras.serve ARGS` in a subprocess: yields its first
    stdout line (the "Serving ..." line, once it listens; bounded wait), or
    `(line, process)` with `with_process`, then stops it with Ctrl-C and checks
    that it stopped cleanly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stl10_keras.serve", *args], cwd=ROOT,
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert select.select([proc.stdout], [], [], 180)[0], "no output in 180 s"
        line = proc.stdout.readline()
        yield (line, proc) if with_process else line
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "Stopped." in stderr


def export_sharp_model(folder, name: str):
    """The smoke preset's digits network with its logits scaled 30x (sharper
    classes, so that a served class does not flip on float noise), exported as
    TF Serving's `folder/name/1`. Returns `(model, base path)`."""
    import keras

    from stl10_keras.config import preset
    from stl10_keras.export import export_saved_model
    from stl10_keras.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(preset("smoke", "digits"), (32, 32, 3))
    logits = model.get_layer("logits")
    kernel, bias = logits.get_weights()
    logits.set_weights([kernel * 30.0, bias])
    base = Path(folder) / name
    export_saved_model(model, base, [f"class{i}" for i in range(10)])
    return model, base


def predict_request(signature="", name="digits", **inputs):
    """A TF Serving `PredictRequest` for model `name` with `inputs` as tensors."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request
