import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import ROOT, subprocess_env
from stl10_keras.config import preset
from stl10_keras.export import (CLASS_NAMES_FILE, decode_image_bytes,
                                export_saved_model, next_version)
from stl10_keras.model import build_model

CLASSES = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="module")
def trained_model():
    keras.utils.set_random_seed(0)
    model = build_model(preset("smoke", "digits"), (32, 32, 3))
    # A few training steps so the BN moving statistics are not the identity.
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    model.fit(rng.integers(0, 256, (64, 32, 32, 3)).astype("uint8"),
              rng.integers(0, 10, 64), batch_size=16, epochs=1, verbose=0)
    return model


def test_reload_in_a_fresh_process_matches_predict(trained_model, tmp_path):
    path = export_saved_model(trained_model, tmp_path / "m", CLASSES)
    assert path == tmp_path / "m" / "1"
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 32, 32, 3)).astype("uint8")
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import json, numpy as np, tensorflow as tf
        images = np.load({str(tmp_path / "images.npy")!r})
        fn = tf.saved_model.load({str(path)!r}).signatures["serving_default"]
        out = {{}}
        for n in (7, 3):  # two batch sizes
            r = fn(images=tf.constant(images[:n]))
            out[n] = {{k: v.numpy().tolist() if v.dtype != tf.string
                      else [s.decode() for s in v.numpy()] for k, v in r.items()}}
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    logits = trained_model.predict(images.astype("float32"), verbose=0)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for n in ("7", "3"):
        k = int(n)
        np.testing.assert_allclose(served[n]["probabilities"], probs[:k], atol=1e-5)
        np.testing.assert_array_equal(served[n]["class_ids"], probs[:k].argmax(1))
        assert served[n]["class_names"] == [CLASSES[i] for i in probs[:k].argmax(1)]


def test_versions_increment_and_saved_model_cli_lists_the_signature(
        trained_model, tmp_path):
    base = tmp_path / "m"
    assert next_version(base) == 1
    export_saved_model(trained_model, base, CLASSES)
    export_saved_model(trained_model, base, CLASSES)
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]
    # The console script installed beside this interpreter by tensorflow.
    cli = str(Path(sys.executable).parent / "saved_model_cli")
    proc = subprocess.run([cli, "show", "--all", "--dir", str(base / "2")],
                          capture_output=True, text=True, timeout=300,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "signature_def['serving_default']" in out
    assert "DT_UINT8" in out and "(-1, 32, 32, 3)" in out
    for name in ("probabilities", "class_ids", "class_names"):
        assert f"outputs['{name}']" in out
    # The encoded-image signature: a string input, the same three outputs.
    sections = {part.split("']", 1)[0]: part
                for part in out.split("signature_def['")[1:]}
    assert "inputs['image_bytes']" in sections["serving_bytes"]
    assert "DT_STRING" in sections["serving_bytes"].split("outputs[")[0]
    for signature in ("serving_default", "serving_bytes"):
        for name in ("probabilities", "class_ids", "class_names"):
            assert f"outputs['{name}']" in sections[signature]
    assert (base / "2" / CLASS_NAMES_FILE).read_text().splitlines() == CLASSES


def test_failed_export_leaves_no_partial_version(trained_model, tmp_path, monkeypatch):
    base = tmp_path / "m"
    # ExportArchive() returns a backend-specific subclass: patch that one.
    archive_cls = type(keras.export.ExportArchive())
    original = archive_cls.write_out

    def write_then_fail(self, filepath, *args, **kwargs):
        original(self, filepath, *args, **kwargs)  # files are on disk...
        raise OSError("disk full")  # ...then the export fails

    monkeypatch.setattr(archive_cls, "write_out", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_saved_model(trained_model, base, CLASSES)
    assert list(base.iterdir()) == []
    assert next_version(base) == 1


def _encode(image, fmt, **kwargs):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_serving_bytes_matches_serving_default_on_independently_decoded_images(
        trained_model, tmp_path):
    import tensorflow as tf
    from PIL import Image

    path = export_saved_model(trained_model, tmp_path / "m", CLASSES)
    signatures = tf.saved_model.load(str(path)).signatures
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (32, 32, 3)).astype("uint8")
    grey = rng.integers(0, 256, (32, 32)).astype("uint8")
    alpha = rng.integers(0, 256, (32, 32, 1)).astype("uint8")
    big = rng.integers(0, 256, (64, 64, 3)).astype("uint8")
    # Resized as training resizes a folder's images: Pillow's bilinear filter
    # (antialiased: at 1/2 each pixel weighs 4 neighbours 1:3:3:1, not a 2x2 mean).
    halved = np.asarray(Image.fromarray(big).resize((32, 32),
                                                    Image.Resampling.BILINEAR))
    cases = [  # (encoded image, the uint8 image serving_default should see)
        (_encode(rgb, "PNG"), rgb),
        (_encode(rgb, "BMP"), rgb),
        (_encode(grey, "PNG"), np.repeat(grey[..., None], 3, axis=-1)),
        (_encode(np.concatenate([rgb, alpha], -1), "PNG"), rgb),  # alpha dropped
        (_encode(big, "PNG"), halved),
    ]
    got = signatures["serving_bytes"](image_bytes=tf.constant([c[0] for c in cases]))
    expected = np.stack([c[1] for c in cases])
    want = signatures["serving_default"](images=tf.constant(expected))
    np.testing.assert_allclose(got["probabilities"], want["probabilities"],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["class_ids"], want["class_ids"])
    np.testing.assert_array_equal(got["class_names"], want["class_names"])
    # JPEG: TensorFlow's and Pillow's decoders round the IDCT differently, so
    # compare the pixels the graph decodes with Pillow's, within a few levels.
    jpeg = _encode(rgb, "JPEG", quality=90)
    pillow = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
    decoded = decode_image_bytes(tf.constant(jpeg), 32, 32).numpy().astype(int)
    assert decoded.shape == (32, 32, 3)
    assert np.abs(decoded - pillow).mean() < 2 and np.abs(decoded - pillow).max() <= 16


def test_a_stale_temporary_folder_is_replaced_not_left_behind(trained_model,
                                                              tmp_path):
    # What an export killed before its rename leaves (SIGKILL runs no cleanup).
    base = tmp_path / "m"
    stale = base / ".tmp-1"
    (stale / "variables").mkdir(parents=True)
    (stale / "saved_model.pb").write_bytes(b"half written")
    path = export_saved_model(trained_model, base, CLASSES)
    assert path == base / "1" and sorted(p.name for p in base.iterdir()) == ["1"]
    assert (path / "saved_model.pb").read_bytes() != b"half written"


# --- python -m stl10_keras.export ------------------------------------------------

def _finished_run(model, run, class_names=CLASSES, export_path=None):
    """What a finished training run leaves that the export command reads."""
    run.mkdir()
    model.save(run / "model.keras")
    (run / "metrics.json").write_text(json.dumps(
        {"class_names": class_names, "export_path": export_path}))
    return run


def _export_cli(*args):
    return subprocess.run([sys.executable, "-m", "stl10_keras.export", *args],
                          cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)


def test_export_command_adds_the_next_version_equal_to_model_keras(trained_model,
                                                                   tmp_path):
    run = _finished_run(trained_model, tmp_path / "run")
    base = tmp_path / "models"
    export_saved_model(trained_model, base, CLASSES)  # version 1 is taken
    proc = _export_cli("--run-dir", str(run), "--export-dir", str(base))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"SavedModel: {base / '2'}" in proc.stdout
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]
    assert (base / "2" / CLASS_NAMES_FILE).read_text().splitlines() == CLASSES
    # Reloaded in a fresh process: both signatures against model.keras itself.
    images = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3)).astype("uint8")
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import io, json, numpy as np, tensorflow as tf
        from PIL import Image
        from stl10_keras.model import load_model
        images = np.load({str(tmp_path / "images.npy")!r})
        logits = load_model({str(run / "model.keras")!r}).predict(
            images.astype("float32"), verbose=0)
        signatures = tf.saved_model.load({str(base / "2")!r}).signatures
        default = signatures["serving_default"](images=tf.constant(images))
        pngs = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "PNG")
            pngs.append(buffer.getvalue())
        encoded = signatures["serving_bytes"](image_bytes=tf.constant(pngs))
        print(json.dumps({{"logits": logits.tolist(),
            "default": default["probabilities"].numpy().tolist(),
            "bytes": encoded["probabilities"].numpy().tolist(),
            "names": [n.decode() for n in default["class_names"].numpy()]}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    logits = np.array(got["logits"])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(got["default"], probs, atol=1e-5)
    np.testing.assert_allclose(got["bytes"], probs, atol=1e-5)
    assert got["names"] == [CLASSES[i] for i in probs.argmax(1)]


def test_export_command_defaults_to_the_runs_own_base_path(trained_model, tmp_path,
                                                           monkeypatch):
    from stl10_keras.export import run_export_inputs

    base = tmp_path / "saved" / "digits"
    run = _finished_run(trained_model, tmp_path / "run",
                        export_path=str(base / "3"))
    assert run_export_inputs(run, None) == (run / "model.keras", base, CLASSES)
    # A run trained with --no-export: saved_models/ and the run dir's name.
    other = _finished_run(trained_model, tmp_path / "digits_s0")
    monkeypatch.chdir(tmp_path)
    assert run_export_inputs(other, None)[1] == Path("saved_models") / "digits_s0"


def test_export_command_refuses_a_bad_run_dir_in_one_sentence(trained_model,
                                                              tmp_path, capsys):
    from stl10_keras.export import main

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    nameless = _finished_run(trained_model, tmp_path / "nameless", class_names=None)
    finished = _finished_run(trained_model, tmp_path / "run")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    cases = [
        (["--run-dir", str(tmp_path / "nowhere")], 2, "is not a directory"),
        (["--run-dir", str(a_file)], 2, "is not a directory"),
        (["--run-dir", str(unfinished)], 1,
         "holds no finished run (no model.keras or metrics.json)"),
        (["--run-dir", str(nameless)], 1, "does not record the class names"),
        (["--run-dir", str(finished), "--export-dir", str(a_file)], 2,
         f"--export-dir {a_file} is a file"),
    ]
    for argv, code, needle in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert needle in err, err
    assert a_file.read_text() == "mine"


def test_export_command_help_lists_its_flags():
    proc = _export_cli("--help")
    assert proc.returncode == 0 and "--run-dir" in proc.stdout
    assert "--export-dir" in proc.stdout
