"""Fashion-MNIST: IDX files written byte by byte in the official big-endian format."""

import gzip
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, subprocess_env
from stl10_keras import data
from stl10_keras.sources import base
from stl10_keras.sources import fashion_mnist as fm


def write_idx_images(path, images):
    """The official layout: >i4 magic 2051, >i4 count, rows, cols, then pixels."""
    n, rows, cols = images.shape
    header = struct.pack(">iiii", 2051, n, rows, cols)
    payload = header + images.astype(np.uint8).tobytes()
    _write(path, payload)


def write_idx_labels(path, labels):
    payload = struct.pack(">ii", 2049, len(labels)) + bytes(int(v) for v in labels)
    _write(path, payload)


def _write(path, payload):
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_fashion_mnist(folder, per_class=12, test_per_class=3, gz=True, size=28):
    """Four files of planted images: image i's pixel (0, 0) is i % 256, (0, 1)
    its label, the rest a seeded pattern; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    arrays = {}
    for split, count in (("train", per_class), ("t10k", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), count)).astype(np.uint8)
        images = rng.integers(0, 256, (len(labels), size, size), dtype=np.uint8)
        images[:, 0, 0] = np.arange(len(labels)) % 256
        images[:, 0, 1] = labels
        ext = ".gz" if gz else ""
        write_idx_images(folder / f"{split}-images-idx3-ubyte{ext}", images)
        write_idx_labels(folder / f"{split}-labels-idx1-ubyte{ext}", labels)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_are_read_as_written(tmp_path, gz):
    arrays = write_fashion_mnist(tmp_path, gz=gz)
    s = data.load_splits("fashion_mnist", data_dir=str(tmp_path), seed=0,
                         labeled_per_class=5)
    images, labels = arrays["train"]
    assert s.image_shape == (28, 28, 1) and s.x_train.dtype == np.uint8
    assert s.class_names == fm.CLASS_NAMES
    # STL-10's protocol: N labeled per class, a fifth of them validation,
    # the rest unlabeled, the test files the test split.
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (40, 10, 30)
    np.testing.assert_array_equal(np.bincount(s.y_train), np.full(10, 4))
    np.testing.assert_array_equal(np.bincount(s.y_val), np.full(10, 1))
    np.testing.assert_array_equal(s.x_test[..., 0], arrays["t10k"][0])
    np.testing.assert_array_equal(s.y_test, arrays["t10k"][1])
    # Every labeled image is the file's image with its own label (planted).
    for x, y in zip(np.concatenate([s.x_train, s.x_val]),
                    np.concatenate([s.y_train, s.y_val])):
        i = int(x[0, 0, 0])
        np.testing.assert_array_equal(x[..., 0], images[i])
        assert y == labels[i] == x[0, 1, 0]
    unlabeled = np.concatenate(list(s.unlabeled_batches(16)))
    assert len(unlabeled) == s.num_unlabeled == 120 - 50
    seen = {int(x[0, 0, 0]) for x in np.concatenate([s.x_train, s.x_val, unlabeled])}
    assert seen == set(range(120))  # a partition of the training file


def test_labeled_draw_follows_the_seed(tmp_path):
    write_fashion_mnist(tmp_path)
    a, b, c = (data.load_splits("fashion_mnist", data_dir=str(tmp_path), seed=s,
                                labeled_per_class=5) for s in (0, 0, 1))
    ids = [sorted(int(v) for v in np.concatenate([x.x_train, x.x_val])[:, 0, 0, 0])
           for x in (a, b, c)]
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_val_per_class_and_default_labeled_count(tmp_path):
    write_fashion_mnist(tmp_path, per_class=fm.DEFAULT_LABELED_PER_CLASS + 1,
                        test_per_class=1, size=4)
    s = data.load_splits("fashion_mnist", data_dir=str(tmp_path), seed=0)
    assert (len(s.y_train), len(s.y_val), s.num_unlabeled) == (4000, 1000, 10)
    s = data.load_splits("fashion_mnist", data_dir=str(tmp_path), seed=0,
                         labeled_per_class=10, val_per_class=3)
    assert (len(s.y_train), len(s.y_val)) == (70, 30)


def test_too_many_labeled_per_class_names_the_flag(tmp_path):
    write_fashion_mnist(tmp_path, per_class=4)
    with pytest.raises(data.DataUnavailableError, match="--labeled-per-class 5"):
        data.load_splits("fashion_mnist", data_dir=str(tmp_path), labeled_per_class=5)


@pytest.mark.parametrize("damage", ["magic", "truncated", "count"])
def test_a_damaged_file_names_the_file(tmp_path, damage):
    write_fashion_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    if damage == "magic":
        raw[:4] = struct.pack(">i", 2049)
    elif damage == "truncated":
        raw = raw[:-5]
    else:
        write_idx_labels(tmp_path / "train-labels-idx1-ubyte", [0] * 7)
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DataUnavailableError) as info:
        data.load_splits("fashion_mnist", data_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "again" in message
    assert "train-" in message or "train files" in message


def test_the_debian_folder_is_used_without_data_dir(tmp_path, monkeypatch):
    arrays = write_fashion_mnist(tmp_path / "debian")
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    s = data.load_splits("fashion_mnist", seed=0, labeled_per_class=5)
    assert "Debian" in s.source
    np.testing.assert_array_equal(s.y_test, arrays["t10k"][1])


def test_through_tensorflow_datasets_mock(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setattr(base, "host_reachable", lambda *a, **k: True)
    with tfds.testing.mock_data(num_examples=60):
        s = data.load_splits("fashion_mnist", seed=0, labeled_per_class=2)
    assert s.source == "tensorflow-datasets fashion_mnist"
    assert s.image_shape == (28, 28, 1) and s.x_train.dtype == np.uint8
    assert len(s.y_test) == 60
    assert len(s.y_train) + len(s.y_val) + s.num_unlabeled == 60


def test_missing_files_offline_is_one_sentence(tmp_path):
    """No files in --data-dir and no download: the sentence names every way out."""
    proc = subprocess.run(
        [sys.executable, "-m", "stl10_keras.train", "--dataset", "fashion_mnist",
         "--data-dir", str(tmp_path), "--no-download", "--preset", "smoke",
         "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    for needed in ("--data-dir", "train-images-idx3-ubyte.gz",
                   "t10k-labels-idx1-ubyte.gz", "dataset-fashion-mnist",
                   "--dataset digits"):
        assert needed in lines[0]
    assert not (tmp_path / "run").exists()
