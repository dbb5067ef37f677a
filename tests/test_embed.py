"""Tests of `stl10_keras.embed`: projector served by a real TensorBoard, kNN
scores recomputed with scikit-learn, stratified sampling, sprite limits, CLI."""

import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, subprocess_env
from stl10_keras import embed as embed_lib
from stl10_keras import projector
from stl10_keras.config import preset

LAYERS = ["pixels", "stage1", "stage2", "stage3", "stage4", "stage5", "fc1"]


def _tensor_name(layer):
    return f"{layer}/.ATTRIBUTES/VARIABLE_VALUE"


def _knn_reference(features, labels, seed=0):
    """10-NN accuracy, 5-fold stratified CV: written here, not taken from embed."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return cross_val_score(KNeighborsClassifier(n_neighbors=10),
                           features.reshape(len(features), -1), labels,
                           cv=folds).mean()


# --- a trained digits run, embedded once ---------------------------------------

@pytest.fixture(scope="module")
def splits():
    from stl10_keras.data import load_splits

    return load_splits("digits", seed=0)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, splits):
    """The smoke network, wider, trained 4 epochs: about 92 % test accuracy."""
    from stl10_keras.train import train

    config = preset("smoke", "digits", "baseline")
    config.model.widths = (16, 32, 32, 64, 64)
    config.model.fc_units = 64
    config.model.dropout = 0.1
    config.train.learning_rate = 0.05
    config.train.epochs = 4
    run = tmp_path_factory.mktemp("embed") / "run"
    train(config, run, export_dir=None, verbose=0, splits=splits)
    return run


@pytest.fixture(scope="module")
def embedded(digits_run, splits):
    """All 300 test images, every layer, no t-SNE (the slow part; tested apart)."""
    result = embed_lib.embed(digits_run, split="test", max_points=2000, seed=0,
                             tsne=False, progress=False, splits=splits, threads=1)
    return digits_run, result


@pytest.fixture(scope="module")
def model(digits_run):
    from stl10_keras.model import load_model

    return load_model(digits_run / "model.keras")


# --- TensorBoard ----------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.headers.get("Content-Type", ""), response.read()


@pytest.fixture(scope="module")
def tensorboard(embedded):
    run, _ = embedded
    exe = Path(sys.executable).parent / "tensorboard"
    if not exe.exists():
        pytest.skip(f"no tensorboard console script beside {sys.executable}")
    port = _free_port()
    log = open(run / "tensorboard.log", "w")
    proc = subprocess.Popen(
        [str(exe), "--logdir", str(run / "logs"), "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(),
    )
    base = f"http://127.0.0.1:{port}/data/plugin/projector"
    try:
        # The server answers before its first scan of the logdir is done: wait
        # until the projector plugin lists the run.
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                log.flush()
                pytest.fail("tensorboard exited: "
                            + (run / "tensorboard.log").read_text()[-2000:])
            try:
                if json.loads(_get(f"{base}/runs", timeout=5)[1]):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("tensorboard listed no projector run within 90 s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_tensorboard_serves_every_layer_with_metadata_and_sprite(
        tensorboard, embedded, splits, model):
    import keras
    from PIL import Image

    run, _ = embedded
    _, body = _get(f"{tensorboard}/runs")
    assert json.loads(body) == ["projector"]
    _, body = _get(f"{tensorboard}/info?run=projector")
    info = {e["tensorName"]: e for e in json.loads(body)["embeddings"]}
    assert set(info) == {_tensor_name(n) for n in LAYERS}

    # Every point of the test split (300 < --max-points), in the split's order.
    n = len(splits.y_test)
    expected_dims = {"pixels": int(np.prod(splits.image_shape)), "fc1": 64}
    for s in range(1, 6):
        shape = model.get_layer(f"stage{s}_pool").output.shape[1:]
        expected_dims[f"stage{s}"] = min(int(np.prod(shape)), 4096)
    tensors = {}
    for layer in LAYERS:
        name = urllib.parse.quote(_tensor_name(layer))
        kind, body = _get(f"{tensorboard}/tensor?run=projector&name={name}")
        assert kind == "application/octet-stream"
        assert len(body) == n * expected_dims[layer] * 4, layer
        assert [int(d) for d in info[_tensor_name(layer)]["tensorShape"]] == \
            [n, expected_dims[layer]]
        tensors[layer] = np.frombuffer(body, np.float32).reshape(n, -1)
    np.testing.assert_allclose(
        tensors["pixels"], splits.x_test.reshape(n, -1).astype(np.float32) / 255.0,
        atol=1e-7)
    fc1 = keras.Model(model.input, model.get_layer("fc1").output)
    np.testing.assert_allclose(
        tensors["fc1"], fc1.predict(splits.x_test.astype("float32"), verbose=0),
        rtol=1e-4, atol=1e-4)

    name = urllib.parse.quote(_tensor_name("stage3"))
    _, body = _get(f"{tensorboard}/metadata?run=projector&name={name}")
    lines = body.decode().splitlines()
    assert lines[0] == "label\tclass" and len(lines) == n + 1
    labels = np.array([int(line.split("\t")[0]) for line in lines[1:]])
    np.testing.assert_array_equal(labels, splits.y_test)
    assert [line.split("\t")[1] for line in lines[1:]] == \
        [splits.class_names[y] for y in splits.y_test]

    kind, body = _get(f"{tensorboard}/sprite_image?run=projector&name={name}")
    assert kind == "image/png"
    sprite = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    per_row = math.ceil(math.sqrt(n))
    dim = info[_tensor_name("stage3")]["sprite"]["singleImageDim"]
    assert dim == [32, 32]  # digits are 32x32 and 18 of them fit in 8192
    assert sprite.shape == (per_row * 32, per_row * 32, 3)
    for i in (0, 1, per_row, n - 1):  # row-major: point i at (i // 18, i % 18)
        r, c = divmod(i, per_row)
        np.testing.assert_array_equal(
            sprite[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32], splits.x_test[i])


# --- scores ---------------------------------------------------------------------

def test_fc1_separates_classes_better_than_raw_pixels(embedded, splits, model):
    import keras

    _, result = embedded
    scores = {r["name"]: r["knn_accuracy"] for r in result["layers"]}
    x = splits.x_test
    pixels = _knn_reference(x.astype(np.float32) / 255.0, splits.y_test)
    fc1_model = keras.Model(model.input, model.get_layer("fc1").output)
    fc1 = _knn_reference(fc1_model.predict(x.astype("float32"), verbose=0),
                         splits.y_test)
    assert scores["pixels"] == pytest.approx(pixels, abs=1e-4)
    assert scores["fc1"] == pytest.approx(fc1, abs=1e-4)
    assert fc1 > pixels
    assert result["per_class"] == {name: 30 for name in splits.class_names}


def test_tsne_figures_and_scores(digits_run, splits, tmp_path):
    from PIL import Image

    run = tmp_path / "run"  # a copy, so the projector TensorBoard reads stays put
    run.mkdir()
    for name in ("config.json", "model.keras"):
        shutil.copy(digits_run / name, run / name)
    result = embed_lib.embed(run, layers="pixels,fc1", max_points=100,
                             perplexity=15, tsne=True, progress=False,
                             splits=splits, threads=1)
    names = [r["name"] for r in result["layers"]]
    assert names == ["pixels", "fc1"]
    for row in result["layers"]:
        assert 0.1 < row["tsne_knn_accuracy"] <= 1.0
    for figure in ("tsne_pixels.png", "tsne_fc1.png", "tsne_grid.png",
                   "embed_knn.png"):
        with Image.open(run / "figures" / figure) as image:
            assert image.format == "PNG" and min(image.size) > 200
    on_disk = json.loads((run / "embed.json").read_text())
    assert on_disk["per_class"] == {name: 10 for name in splits.class_names}
    assert [r["tsne_knn_accuracy"] for r in on_disk["layers"]] == \
        [r["tsne_knn_accuracy"] for r in result["layers"]]


# --- any depth, through the command line ----------------------------------------

def test_seven_conv_model_through_main(tmp_path, splits, capsys):
    import tensorflow as tf

    from stl10_keras.model import build_model

    config = preset("smoke", "digits", "baseline")
    config.model.widths = (4, 8, 8, 12, 12)
    config.model.convs_per_stage = (1, 1, 2, 2, 1)
    config.model.fc_units = 16
    run = tmp_path / "run7"
    run.mkdir()
    (run / "config.json").write_text(config.to_json())
    build_model(config, splits.image_shape).save(run / "model.keras")

    code = embed_lib.main(["--run-dir", str(run), "--no-tsne", "--max-points", "55",
                           "--pool", "avg", "--threads", "1"])
    assert code == 0
    assert "| fc1 | 16 |" in capsys.readouterr().out
    result = json.loads((run / "embed.json").read_text())
    dims = {r["name"]: r["stored_dims"] for r in result["layers"]}
    assert dims == {"pixels": 32 * 32 * 3, "stage1": 4, "stage2": 8, "stage3": 8,
                    "stage4": 12, "stage5": 12, "fc1": 16}
    # 55 of 10 classes x 30: 5 or 6 per class, counted from the metadata file.
    projector = run / "logs" / "projector"
    rows = (projector / "metadata.tsv").read_text().splitlines()
    counts = np.bincount([int(r.split("\t")[0]) for r in rows[1:]], minlength=10)
    assert sorted(counts.tolist()) == [5] * 5 + [6] * 5
    reader = tf.train.load_checkpoint(str(projector))
    for name, d in dims.items():
        assert reader.get_variable_to_shape_map()[_tensor_name(name)] == [55, d]


# --- sampling and sprite layout -------------------------------------------------

def test_stratified_sample_is_equal_per_class_as_far_as_possible():
    labels = np.repeat([0, 1, 2, 3], [3, 40, 100, 7])
    np.random.default_rng(5).shuffle(labels)
    chosen = embed_lib.stratified_sample(labels, 40, seed=1)
    assert len(np.unique(chosen)) == 40 and np.all(np.diff(chosen) > 0)
    # Classes 0 and 3 give all they have (3 + 7), the other 30 split evenly.
    assert np.bincount(labels[chosen]).tolist() == [3, 15, 15, 7]

    balanced = np.repeat(np.arange(10), 30)
    counts = np.bincount(balanced[embed_lib.stratified_sample(balanced, 105, 0)])
    assert sorted(counts.tolist()) == [10] * 5 + [11] * 5
    assert len(embed_lib.stratified_sample(balanced, 5000, 0)) == 300
    a, b = (embed_lib.stratified_sample(balanced, 100, s) for s in (0, 1))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, embed_lib.stratified_sample(balanced, 100, 0))


@pytest.mark.parametrize("n", [1, 2, 300, 2000, 8192, 100_000, 4_000_000, 8192 ** 2])
@pytest.mark.parametrize("height, width", [(96, 96), (32, 32), (20, 40)])
def test_sprite_stays_within_8192_pixels(n, height, width):
    layout = projector.sprite_layout(n, height, width)
    per_row = layout.per_row
    assert per_row * per_row >= n > (per_row - 1) ** 2  # square, no empty row
    assert layout.width <= 8192 and layout.height <= 8192
    assert layout.thumb_height >= 1 and layout.thumb_width >= 1
    if per_row * max(height, width) <= 8192:
        assert (layout.thumb_height, layout.thumb_width) == (height, width)
    else:  # shrunk, aspect kept to within a pixel
        assert layout.thumb_width * height == pytest.approx(
            layout.thumb_height * width, abs=max(height, width))


def test_sprite_of_100000_stl10_images_uses_25_pixel_thumbnails():
    layout = projector.sprite_layout(100_000, 96, 96)
    assert (layout.per_row, layout.thumb_height, layout.width) == (317, 25, 7925)


def test_too_many_points_for_any_sprite_is_an_error():
    with pytest.raises(embed_lib.EmbedError, match="--max-points"):
        projector.sprite_layout(8192 ** 2 + 1, 32, 32)


# --- command-line errors --------------------------------------------------------

def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "stl10_keras.embed", *args], cwd=ROOT,
        env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )


def _one_sentence_error(proc):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_run_dir_without_model_says_train_first(tmp_path):
    message = _one_sentence_error(_cli("--run-dir", str(tmp_path)))
    assert "train first: python -m stl10_keras.train" in message


def _placeholder_run(run_dir):
    """A run dir whose model.keras is an empty file (enough to reach the checks)."""
    run_dir.mkdir(exist_ok=True)
    (run_dir / "model.keras").write_bytes(b"")
    (run_dir / "config.json").write_text(preset("smoke", "digits").to_json())
    return run_dir


def test_a_model_that_does_not_load_is_the_only_line_on_stderr(tmp_path):
    # The error comes after keras (and TensorFlow) are loaded: TensorFlow's C++
    # start-up lines ("WARNING: All log messages before absl::InitializeLog()
    # ...", "cudart_stub.cc:31] Could not find cuda drivers") used to come first.
    message = _one_sentence_error(_cli("--run-dir", str(_placeholder_run(tmp_path)),
                                       "--no-tsne"))
    assert message.startswith(f"error: Cannot load {tmp_path / 'model.keras'} (")


def test_a_perplexity_above_the_points_is_the_only_line_on_stderr(tmp_path):
    message = _one_sentence_error(_cli("--run-dir", str(_placeholder_run(tmp_path)),
                                       "--max-points", "60", "--perplexity", "100"))
    assert "--perplexity (100) must be below the number of points (60)" in message


def test_unknown_layer_lists_the_valid_ones(digits_run):
    message = _one_sentence_error(
        _cli("--run-dir", str(digits_run), "--layers", "pixels,stage9"))
    assert "'stage9'" in message
    assert "pixels, stage1, stage2, stage3, stage4, stage5, fc1" in message


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_numpy_cannot_take_is_refused_before_any_work(tmp_path, seed):
    # The check comes before the data and the model are loaded, so a run dir
    # with a placeholder model.keras is enough.
    (tmp_path / "model.keras").write_bytes(b"")
    (tmp_path / "config.json").write_text(preset("smoke", "digits").to_json())
    with pytest.raises(embed_lib.EmbedError, match="--seed must be"):
        embed_lib.embed(tmp_path, seed=seed, progress=False)
    with pytest.raises(ValueError):  # the reference: what numpy does with it
        np.random.default_rng(seed).permutation(3) if seed < 0 else \
            np.random.RandomState(seed)


@pytest.mark.parametrize("value", ["0", "-3", "49"])
def test_bad_max_points_is_refused(digits_run, value):
    message = _one_sentence_error(
        _cli("--run-dir", str(digits_run), "--max-points", value))
    assert "--max-points must be at least 50" in message
