"""Fashion-MNIST IDX files and an image folder through every command, end to end.

train (k-means, augmentation) -> export -> predict, embed, ablation and the
pipeline, each as a user runs it, on data written here byte by byte: the
official Fashion-MNIST files are never needed.
"""

import contextlib
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
