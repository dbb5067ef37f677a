"""`python -m stl10_keras.predict` on image files Pillow writes, against the SavedModel.

References: `serving_default` (loaded with `tf.saved_model.load`) on the pixels of
a lossless PNG at the model's size, and the `serving_bytes` signature itself for
files the graph must resize or that are lossy.
"""

import json
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import ROOT, subprocess_env
from stl10_keras.config import preset
from stl10_keras.export import export_saved_model
from stl10_keras.model import build_model
from stl10_keras.predict import main

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
           "nine"]


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    model = build_model(preset("smoke", "digits"), (32, 32, 3))
    logits = model.get_layer("logits")  # well separated classes
    kernel, bias = logits.get_weights()
    logits.set_weights([kernel * 30.0, bias])
    return model


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("predict") / "digits"
    export_saved_model(model, base, CLASSES)
    return base


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    pixels = {
        "exact.png": rng.integers(0, 256, (32, 32, 3)).astype("uint8"),
        "wide.png": rng.integers(0, 256, (40, 57, 3)).astype("uint8"),
        "photo.jpg": np.kron(rng.integers(0, 256, (8, 8, 3)),
                             np.ones((4, 4, 1))).astype("uint8"),
    }
    for name, image in pixels.items():
        Image.fromarray(image).save(folder / name)
    (folder / "notes.png").write_text("not an image\n")
    # A valid PNG header, pixels cut off: only decoding finds it out.
    (folder / "cut.png").write_bytes((folder / "exact.png").read_bytes()[:200])
    return folder, pixels


def expected_top(outputs, k):
    """(name, probability) of the k most probable classes of a batch of one."""
    p = outputs["probabilities"].numpy()[0]
    return [(CLASSES[i], float(p[i])) for i in np.argsort(-p)[:k]]


def parse_blocks(stdout):
    """{image path: [(name, probability), ...]} from the command's output."""
    blocks, current = {}, None
    for line in stdout.splitlines()[1:]:  # the first line names the model
        match = re.fullmatch(r"  (\d+)\. (.+?)\s{2,}([0-9.]+)", line)
        if match:
            blocks[current].append((match[2], float(match[3])))
        else:
            current = line
            blocks[current] = []
    return blocks


def assert_top_matches(printed, expected):
    assert [name for name, _ in printed] == [name for name, _ in expected]
    np.testing.assert_allclose([p for _, p in printed], [p for _, p in expected],
                               atol=5.1e-5)  # printed with 4 decimals


@pytest.mark.e2e
def test_cli_prints_top_k_per_image_and_reports_bad_files(exported, files):
    folder, pixels = files
    paths = [folder / "exact.png", folder / "notes.png", folder / "wide.png",
             folder / "missing.jpg", folder / "cut.png", folder / "photo.jpg"]
    proc = subprocess.run(
        [sys.executable, "-m", "stl10_keras.predict", "--model", str(exported),
         *map(str, paths), "--top-k", "3"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == f"model {exported / '1'} (version 1)"
    blocks = parse_blocks(proc.stdout)
    good = [folder / "exact.png", folder / "wide.png", folder / "photo.jpg"]
    assert list(blocks) == [str(p) for p in good]  # in order, bad ones skipped

    signatures = tf.saved_model.load(str(exported / "1")).signatures
    # Lossless at the model's size: the PNG's pixels through serving_default.
    exact = signatures["serving_default"](images=tf.constant(pixels["exact.png"][None]))
    assert_top_matches(blocks[str(good[0])], expected_top(exact, 3))
    for path in good[1:]:  # resized or lossy: the encoded-image signature
        want = signatures["serving_bytes"](image_bytes=tf.constant([path.read_bytes()]))
        assert_top_matches(blocks[str(path)], expected_top(want, 3))

    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]  # nothing else
    assert errors == [
        f"error: {folder / 'notes.png'} is not a JPEG, PNG, GIF, BMP or WebP image.",
        f"error: cannot read {folder / 'missing.jpg'} (No such file or directory).",
        f"error: {folder / 'cut.png'} could not be decoded (a corrupt or truncated "
        "image).",
        "error: 3 of 6 images could not be classified.",
    ]
    assert "Traceback" not in proc.stderr


def test_a_version_that_is_no_saved_model_is_the_only_line_on_stderr(tmp_path):
    # The error comes after TensorFlow is loaded: its C++ start-up lines
    # ("cudart_stub.cc:31] Could not find cuda drivers", "failed call to
    # cuInit") used to come first.
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "saved_model.pb").write_bytes(b"not a protobuf")
    proc = subprocess.run(
        [sys.executable, "-m", "stl10_keras.predict", "--model", str(tmp_path / "m"),
         str(tmp_path / "x.png")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: cannot load {tmp_path / 'm' / '1'} (")


def test_top_k_and_version_flags(exported, files, capsys):
    folder, pixels = files
    image = str(folder / "exact.png")
    assert main(["--model", str(exported), "--version", "1", "--top-k", "20",
                 image]) == 0
    blocks = parse_blocks(capsys.readouterr().out)
    signature = tf.saved_model.load(str(exported / "1")).signatures["serving_default"]
    # --top-k larger than the classes prints every class, most probable first.
    assert_top_matches(blocks[image], expected_top(
        signature(images=tf.constant(pixels["exact.png"][None])), 10))

    assert main(["--model", str(exported), "--version", "7", image]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {exported} has no version 7; it has 1."
    assert main(["--model", str(exported.parent / "nothing"), image]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["--model", str(exported), "--top-k", "0", image])
    assert stop.value.code == 2


def test_an_export_without_serving_bytes_is_decoded_the_same_way(
        model, exported, files, tmp_path, capsys):
    """Versions exported before `serving_bytes` (and class_names.txt) existed."""
    folder, _ = files
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(images):
        probabilities = tf.nn.softmax(model(tf.cast(images, tf.float32)), axis=-1)
        class_ids = tf.argmax(probabilities, axis=-1)
        return {"probabilities": probabilities, "class_ids": class_ids,
                "class_names": tf.gather(tf.constant(CLASSES), class_ids)}

    archive.add_endpoint("serving_default", serve, input_signature=[
        tf.TensorSpec([None, 32, 32, 3], tf.uint8, name="images")])
    archive.write_out(str(tmp_path / "old" / "1"), verbose=False)

    image = folder / "wide.png"  # resized: the same decoding must run
    assert main(["--model", str(tmp_path / "old"), "--top-k", "3", str(image)]) == 0
    printed = parse_blocks(capsys.readouterr().out)[str(image)]
    new = tf.saved_model.load(str(exported / "1")).signatures["serving_bytes"]
    want = expected_top(new(image_bytes=tf.constant([image.read_bytes()])), 3)
    # Only the top class's name is known without class_names.txt.
    assert printed[0][0] == want[0][0]
    assert [n for n, _ in printed[1:]] == [f"class {CLASSES.index(n)}"
                                           for n, _ in want[1:]]
    np.testing.assert_allclose([p for _, p in printed], [p for _, p in want],
                               atol=5.1e-5)


@pytest.mark.parametrize("what", ["run", "version", "run without export"])
def test_a_run_or_version_folder_gets_the_base_path_to_use(exported, tmp_path,
                                                           capsys, what):
    # It said to export a model first, while the model was in the run's base path.
    run = tmp_path / "runs" / "digits"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.json").write_text(json.dumps(
        {"export_path": None if what == "run without export"
         else str(exported / "1")}))
    model = exported / "1" if what == "version" else run
    assert main(["--model", str(model), "x.png"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    if what == "run without export":
        assert err == (f"error: {run} is a training run with no exported model; "
                       f"export it with python -m stl10_keras.export --run-dir {run}, "
                       "then pass --model with the base path it prints.\n")
    else:
        assert err.endswith(f"pass --model {exported}"
                            + (", the folder that holds the versions.\n"
                               if what == "version" else ".\n"))
