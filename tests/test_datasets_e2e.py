"""Fashion-MNIST IDX files and an image folder through every command, end to end.

train (k-means, augmentation) -> export -> predict, embed, ablation and the
pipeline, each as a user runs it, on data written here byte by byte: the
official Fashion-MNIST files are never needed.
"""

import contextlib
import gzip
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, subprocess_env
from test_fashion_mnist import write_fashion_mnist
from test_folder import write_folder
from stl10_keras.sources.fashion_mnist import CLASS_NAMES as FASHION_CLASSES

pytestmark = pytest.mark.e2e
TINY = ["--preset", "smoke", "--widths", "4,8", "--fc-units", "8",
        "--kmeans-images", "20", "--kmeans-patches-per-image", "4"]
FOLDER_CLASSES = ("cat", "dog", "emu")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("datasets")
    write_fashion_mnist(base / "fashion", per_class=12, test_per_class=2)
    write_folder(base / "images", classes=FOLDER_CLASSES, per_class=8,
                 test_per_class=2, unlabeled=6, size=(20, 24))
    return {
        "fashion_mnist": ["--dataset", "fashion_mnist", "--data-dir",
                          str(base / "fashion"), "--labeled-per-class", "6"],
        "folder": ["--dataset", "folder", "--data-dir", str(base / "images")],
        "base": base,
    }


def command(module, *args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def keras_top1(model_path, image):
    """The saved model.keras' class for one uint8 image (the reference)."""
    from stl10_keras.model import load_model

    model = load_model(model_path)
    return int(np.argmax(model.predict(image[None].astype("float32"), verbose=0)))


@pytest.mark.parametrize("name,classes,shape", [
    ("fashion_mnist", FASHION_CLASSES, (28, 28, 1)),
    ("folder", FOLDER_CLASSES, (20, 24, 3)),
])
def test_train_export_predict_embed(datasets, tmp_path, name, classes, shape):
    run, export = tmp_path / "run", tmp_path / "export"
    command("stl10_keras.train", *datasets[name], *TINY, "--variant", "kmeans12",
            "--run-dir", run, "--export-dir", export, "--verbose", "0")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"]["class_names"] == list(classes)
    assert tuple(metrics["data"]["image_shape"]) == shape
    assert (run / "figures" / "kmeans_centroids_3x3.png").exists()
    names = (export / "1" / "assets.extra" / "class_names.txt").read_text()
    assert names.splitlines() == list(classes)

    # predict decodes a PNG to the model's channels; its top class is the
    # keras model's on the same pixels.
    from stl10_keras.data import load_splits_for
    from stl10_keras.config import Config

    splits = load_splits_for(Config.from_file(run / "config.json"))
    image = splits.x_test[0]
    png = tmp_path / "one.png"
    Image.fromarray(image[..., 0] if shape[-1] == 1 else image).save(png)
    out = command("stl10_keras.predict", "--model", export, "--top-k", "1", png)
    top = out.strip().splitlines()[-1].split(maxsplit=1)[1].rsplit(maxsplit=1)[0]
    assert top == classes[keras_top1(run / "model.keras", image)]

    # The training split: 5 images per class, the fewest the kNN score takes.
    command("stl10_keras.embed", "--run-dir", run, "--split", "train", "--layers",
            "pixels,stage1,fc1", "--max-points", "50", "--perplexity", "5",
            "--threads", "1")
    metadata = next(run.rglob("metadata.tsv")).read_text().splitlines()
    assert metadata[0] == "label\tclass"
    assert {row.split("\t")[1] for row in metadata[1:]} <= set(classes)


def test_ablation_on_fashion_mnist(datasets, tmp_path):
    out = command("stl10_keras.ablation", *datasets["fashion_mnist"], *TINY,
                  "--seeds", "1", "--run-dir", tmp_path / "ab", "--verbose", "0")
    summary = json.loads((tmp_path / "ab" / "ablation.json").read_text())
    assert list(summary["variants"]) == ["augment", "baseline", "kmeans1", "kmeans12"] \
        or set(summary["variants"]) == {"baseline", "augment", "kmeans1", "kmeans12"}
    assert summary["protocol"]["splits"] == {"train": 50, "validation": 10,
                                             "test": 20, "unlabeled": 60}
    assert (tmp_path / "ab" / "figure8.png").exists() and "fashion_mnist" in out


def test_pipeline_reads_a_folder_and_its_fingerprint_covers_the_files(datasets,
                                                                     tmp_path):
    from pipelines import components as c
    from pipelines.pipeline import example_gen_parameters
    from pipelines.run import build_parser, main
    from stl10_keras.cli import config_from_args

    root, serving = tmp_path / "root", tmp_path / "serving"
    flags = [*datasets["folder"], *TINY, "--variant", "kmeans1",
             "--accuracy-threshold", "0", "--num-shards", "2", "--verbose", "0",
             "--pipeline-root", str(root), "--serving-dir", str(serving)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(flags)
    assert code == 0, err.getvalue()[-3000:]
    summary = json.loads((root / "pipeline_run.json").read_text())
    assert [row["status"] for row in summary["components"]] == ["ran"] * 5
    examples = c.read_artifact(summary["artifacts"]["ExampleGen"])
    assert examples.properties["class_names"] == list(FOLDER_CLASSES)
    assert examples.properties["counts"]["unlabeled"] == 6
    pushed = serving / "1" / "assets.extra" / "class_names.txt"
    assert pushed.read_text().splitlines() == list(FOLDER_CLASSES)

    # ExampleGen's fingerprint parameters change with the folder's files: one
    # more unlabeled image, or an image rewritten, makes a new Examples artifact.
    config = config_from_args(build_parser().parse_args(flags))
    before = example_gen_parameters(config, 2)
    assert example_gen_parameters(config, 2) == before
    extra = datasets["base"] / "images" / "unlabeled" / "new.png"
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(extra)
    try:
        added = example_gen_parameters(config, 2)
    finally:
        extra.unlink()
    assert added["files"] != before["files"]
    assert example_gen_parameters(config, 2) == before
    image = next((datasets["base"] / "images" / "train" / "dog").glob("*.png"))
    content = image.read_bytes()
    Image.fromarray(np.full((20, 24, 3), 9, np.uint8)).save(image)
    try:
        assert example_gen_parameters(config, 2)["files"] != before["files"]
    finally:
        image.write_bytes(content)


MESSY_CLASSES = {"T-shirt": 0, "big coat": 4, "\u00f1and\u00fa bag": 8, "sneaker": 7}
MESSY_FILES = [  # (mode, format, extension), in turn
    ("L", "PNG", "png"), ("RGB", "JPEG", "jpg"), ("RGBA", "PNG", "png"),
    ("P", "PNG", "png"), ("I;16", "PNG", "png"), ("CMYK", "JPEG", "jpg"),
    ("P", "GIF", "gif"), ("1", "BMP", "bmp"), ("RGB", "WEBP", "webp"),
    ("LA", "PNG", "png"), ("RGB", "JPEG progressive", "jpg")]
MESSY_SIZES = [(20, 20), (100, 80), (40, 30), (64, 64), (28, 28)]  # (W, H)


def write_messy_folder(root):
    """A folder as a new user brings it: Fashion-MNIST photos of 4 classes (one
    name with a space, one not ASCII, test/ written in NFD), PNG / JPEG / GIF /
    BMP / WebP of 20x20 to 100x80 in grey, RGB, RGBA, palette, 16-bit, CMYK
    and 1-bit modes, OS junk, a nested unlabeled/.

    Returns:
        `{test file: class name}`.
    """
    import unicodedata

    from test_images import make_image, store

    with gzip.open(FASHION_IMAGES) as f:
        photos = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_LABELS) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    k, tests = 0, {}
    for split, count, start in (("train", 16, 0), ("test", 5, 100)):
        for name, label in MESSY_CLASSES.items():
            folder = name if split == "train" else unicodedata.normalize("NFD", name)
            for j, i in enumerate(np.flatnonzero(labels == label)[start:start + count]):
                mode, fmt, ext = MESSY_FILES[k % len(MESSY_FILES)]
                size = MESSY_SIZES[k % len(MESSY_SIZES)]
                k += 1
                path = root / split / folder / f"img{j:03d}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(store(make_image(photos[i], mode, size), fmt))
                if split == "test":
                    tests[path] = name
    for j in range(40):
        mode, fmt, ext = MESSY_FILES[j % len(MESSY_FILES)]
        path = root / "unlabeled" / f"batch{j % 3}" / ("deep" * (j % 2)) / f"u{j}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store(make_image(photos[5000 + j], mode,
                                          MESSY_SIZES[j % 5]), fmt))
    junk = {"train/T-shirt/.DS_Store": b"\0\0\0\1Bud1",
            "train/sneaker/Thumbs.db": b"\xd0\xcf\x11\xe0",
            "train/big coat/desktop.ini": b"[.ShellClassInfo]",
            "train/big coat/._img000.png": b"\0\5\26\7",
            "unlabeled/@eaDir/SYNOFILE_THUMB_M.jpg": b"junk",
            "train/__MACOSX/._x.png": b"junk"}
    for relative, content in junk.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
    return tests


FASHION_IMAGES = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
FASHION_LABELS = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"


def served_classes(base, files):
    """The class each file gets from the REST server's serving_bytes, asked
    with an HTTP client."""
    import base64
    import http.client

    from conftest import rest_server
    from stl10_keras.serving.repository import ModelRepository

    repository = ModelRepository(base, "messy")
    repository.start()
    body = json.dumps({"signature_name": "serving_bytes", "instances": [
        {"b64": base64.b64encode(p.read_bytes()).decode()} for p in files]})
    with rest_server(repository) as server:
        host, port = server.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=300)
        connection.request("POST", "/v1/models/messy:predict", body,
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer
    return [row["class_names"] for row in answer["predictions"]]


def test_a_messy_folder_trains_serves_and_predicts_with_the_same_pixels(tmp_path):
    tests = write_messy_folder(tmp_path / "messy")
    args = [sys.executable, "-m", "stl10_keras.train", "--dataset", "folder",
            "--data-dir", str(tmp_path / "messy"), *TINY, "--kmeans-images", "100",
            "--image-size", "32,32", "--verbose", "2"]
    proc = subprocess.run(args, cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    first = next(i for i, line in enumerate(out) if line.startswith("data: "))
    assert out[first:first + 3] == [
        f"data: image folder {tmp_path / 'messy'} (4 classes; test: test/; 40 images "
        "in unlabeled/)",
        "  4 classes, labeled images each: T-shirt (16), big coat (16), sneaker (16), "
        "\u00f1and\u00fa bag (16)",
        "  train 52, validation 12, test 20, unlabeled 40; images 32x32x3"]
    assert "skipped 6 entries (not data)" in proc.stdout
    assert "k-means initialisation of stage(s) [1, 2] from 40 unlabeled images" in out
    assert "Traceback" not in proc.stderr and "UserWarning" not in proc.stderr
    name = "folder-messy_kmeans12_smoke_s0"  # the folder's name in the run's
    metrics = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())
    base = tmp_path / "saved_models" / name

    # Served over REST (an HTTP client, the files' bytes): the accuracy
    # metrics.json reports for test/, exactly (it was 42.5 % against 43.75 %).
    files = sorted(tests)
    served = served_classes(base, files)
    accuracy = np.mean([s == tests[p] for s, p in zip(served, files)])
    assert accuracy == metrics["test_accuracy"]

    # predict gives each file the class the server gives it.
    some = [p for p in files if p.suffix in (".gif", ".bmp", ".webp")][:2] + \
        [p for p in files if p.suffix == ".jpg"][:2]
    printed = command("stl10_keras.predict", "--model", base, "--top-k", "1", *some)
    tops = [ln.split(maxsplit=1)[1].rsplit(maxsplit=1)[0]
            for ln in printed.splitlines() if ln.startswith("  1. ")]
    assert tops == [served[files.index(p)] for p in some]

    # The same command again reports the finished run; on changed data it says so.
    again = subprocess.run(args, cwd=tmp_path, env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already holds a finished run" in again.stdout
    (files[0].parent.parent.parent / "train" / "sneaker" / "new.png").write_bytes(
        files[0].read_bytes() if files[0].suffix == ".png" else
        (tmp_path / "messy" / "train" / "sneaker" / "img000.png").read_bytes())
    changed = subprocess.run(args, cwd=tmp_path, env=subprocess_env(),
                             capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2 and "accuracy" not in changed.stdout
    assert "was trained on other data" in changed.stderr
    assert "1 file added (train/sneaker/new.png)" in changed.stderr
