import subprocess
import sys
import tarfile

import numpy as np
import pytest

from conftest import ROOT, subprocess_env
from stl10_keras import data
from stl10_keras.sources import base, stl10


# --- split ----------------------------------------------------------------------

def test_stratified_split_sizes_and_balance():
    labels = np.repeat(np.arange(10), 500)
    train, val = data.stratified_split(labels, 100, seed=3)
    assert len(train) == 4000 and len(val) == 1000
    assert np.intersect1d(train, val).size == 0
    assert np.union1d(train, val).size == 5000
    np.testing.assert_array_equal(np.bincount(labels[val]), np.full(10, 100))


def test_stratified_split_seed_stability():
    labels = np.repeat(np.arange(10), 50)
    a = data.stratified_split(labels, 5, seed=1)[1]
    b = data.stratified_split(labels, 5, seed=1)[1]
    c = data.stratified_split(labels, 5, seed=2)[1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_stratified_split_too_few_images_says_what_to_do():
    with pytest.raises(data.DataUnavailableError, match="--val-per-class"):
        data.stratified_split(np.array([0, 0, 1, 1]), 2, seed=0)


# --- digits ---------------------------------------------------------------------

def test_digits_splits():
    from sklearn.datasets import load_digits

    s = data.load_splits("digits", seed=0)
    assert s.image_shape == (32, 32, 3)
    assert s.x_train.dtype == np.uint8
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (400, 200, 300)
    np.testing.assert_array_equal(np.bincount(s.y_val), np.full(10, 20))
    unlabeled = np.concatenate(list(s.unlabeled_batches(100)))
    assert len(unlabeled) == s.num_unlabeled == 1797 - 900
    # The images are sklearn's digits: block-averaging 4x4 recovers the 8x8
    # originals (0..16) closely, and the labels go with them.
    ref = load_digits()
    small = s.x_test[..., 0].reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4)) * 16 / 255
    flat_ref = ref.images.reshape(len(ref.images), -1)
    for img, label in zip(small[:20], s.y_test[:20]):
        nearest = np.argmin(((flat_ref - img.reshape(-1)) ** 2).sum(axis=1))
        assert ref.target[nearest] == label
    # No image is in two splits.
    keys = [x.tobytes() for x in np.concatenate([s.x_train, s.x_val, s.x_test])]
    assert len(set(keys)) == len(keys)


def test_digits_split_follows_seed_but_test_is_fixed():
    a = data.load_splits("digits", seed=0)
    b = data.load_splits("digits", seed=1)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.val_indices, b.val_indices)


# --- STL-10 official binary format ----------------------------------------------

def _pattern_image(i):
    r, c, ch = np.meshgrid(np.arange(96), np.arange(96), np.arange(3), indexing="ij")
    # Asymmetric in rows vs columns, different per channel and per image.
    return ((r + 3 * c + 50 * ch + 7 * i) % 256).astype(np.uint8)


def _to_official_bytes(images):
    # The official description: per image, the red, green, blue planes in turn,
    # each written column by column (column-major).
    out = bytearray()
    for img in images:
        for ch in range(3):
            for col in range(96):
                out += bytes(img[:, col, ch])
    return bytes(out)


def _write_stl10(folder, n_train=30, n_test=10, n_unlabeled=5):
    folder.mkdir(parents=True)
    train = [_pattern_image(i) for i in range(n_train)]
    test = [_pattern_image(100 + i) for i in range(n_test)]
    unlabeled = [_pattern_image(200 + i) for i in range(n_unlabeled)]
    (folder / "train_X.bin").write_bytes(_to_official_bytes(train))
    (folder / "train_y.bin").write_bytes(bytes([i % 10 + 1 for i in range(n_train)]))
    (folder / "test_X.bin").write_bytes(_to_official_bytes(test))
    (folder / "test_y.bin").write_bytes(bytes([i % 10 + 1 for i in range(n_test)]))
    (folder / "unlabeled_X.bin").write_bytes(_to_official_bytes(unlabeled))
    (folder / "class_names.txt").write_text("\n".join(stl10.CLASS_NAMES) + "\n")
    return train, test, unlabeled


def test_stl10_binary_folder_orientation_and_labels(tmp_path):
    train, test, unlabeled = _write_stl10(tmp_path / "stl10_binary")
    s = data.load_splits("stl10", data_dir=str(tmp_path), val_per_class=1, seed=0)
    assert s.image_shape == (96, 96, 3)
    assert len(s.y_train) == 20 and len(s.y_val) == 10
    train_idx = np.setdiff1d(np.arange(30), s.val_indices)
    for j, i in enumerate(train_idx):
        np.testing.assert_array_equal(s.x_train[j], train[i])
        assert s.y_train[j] == i % 10
    np.testing.assert_array_equal(s.x_test, np.stack(test))
    np.testing.assert_array_equal(s.y_test, np.arange(10))
    stream = np.concatenate(list(s.unlabeled_batches(2)))
    np.testing.assert_array_equal(stream, np.stack(unlabeled))
    assert s.class_names == stl10.CLASS_NAMES
    # Orientation: pixel (row 0, col 1) differs from (row 1, col 0) by design.
    img = s.x_test[0].astype(int)
    assert img[0, 1, 0] - img[0, 0, 0] == 3 and img[1, 0, 0] - img[0, 0, 0] == 1


def test_stl10_tarball_is_extracted_once(tmp_path):
    src = tmp_path / "src"
    _, test, _ = _write_stl10(src / "stl10_binary", n_train=20, n_test=4, n_unlabeled=2)
    archive_dir = tmp_path / "data"
    archive_dir.mkdir()
    with tarfile.open(archive_dir / "stl10_binary.tar.gz", "w:gz") as tar:
        tar.add(src / "stl10_binary", arcname="stl10_binary")
    s = data.load_splits("stl10", data_dir=str(archive_dir), val_per_class=1)
    np.testing.assert_array_equal(s.x_test, np.stack(test))
    extracted = archive_dir / "stl10_binary" / "train_X.bin"
    assert extracted.exists()
    mtime = extracted.stat().st_mtime_ns
    data.load_splits("stl10", data_dir=str(archive_dir), val_per_class=1)
    assert extracted.stat().st_mtime_ns == mtime
    assert not (archive_dir / ".stl10_binary.partial").exists()


@pytest.mark.parametrize("content", [b"junk\n", b""])
def test_a_broken_tarball_is_one_sentence(tmp_path, content):
    # tarfile's own message for a file that is no archive spans five lines.
    (tmp_path / "stl10_binary.tar.gz").write_bytes(content)
    with pytest.raises(tarfile.ReadError):  # the reference: tarfile refuses it
        tarfile.open(tmp_path / "stl10_binary.tar.gz")
    with pytest.raises(data.DataUnavailableError) as info:
        data.load_splits("stl10", data_dir=str(tmp_path), val_per_class=1)
    message = str(info.value)
    assert "\n" not in message and "download stl10_binary.tar.gz again" in message
    assert not (tmp_path / ".stl10_binary.partial").exists()


def test_stl10_truncated_file_is_reported(tmp_path):
    _write_stl10(tmp_path / "stl10_binary")
    with open(tmp_path / "stl10_binary" / "test_X.bin", "ab") as f:
        f.write(b"xx")
    with pytest.raises(data.DataUnavailableError, match="truncated"):
        data.load_splits("stl10", data_dir=str(tmp_path), val_per_class=1)


def test_stl10_through_tensorflow_datasets_mock(monkeypatch):
    import tensorflow_datasets as tfds

    # mock_data replaces tfds' download with a no-op; stand in for the network.
    monkeypatch.setattr(base, "host_reachable", lambda *a, **k: True)
    with tfds.testing.mock_data(num_examples=80):
        s = data.load_splits("stl10", val_per_class=2, seed=0)
        first = next(s.unlabeled_batches(16))
    assert s.image_shape == (96, 96, 3)
    assert len(s.y_train) + len(s.y_val) == 80 and len(s.y_val) == 20
    assert len(s.y_test) == 80
    assert s.x_train.dtype == np.uint8 and first.shape == (16, 96, 96, 3)
    assert set(np.unique(s.y_train)) <= set(range(10))


def test_offline_error_is_one_clear_sentence(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "stl10_keras.train", "--preset", "smoke",
         "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--no-export"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "--data-dir" in proc.stderr and "--dataset digits" in proc.stderr
    assert "stl10_binary.tar.gz" in proc.stderr


def test_make_dataset_moves_uint8_and_reshuffles():
    x = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1).repeat(2, axis=1)
    y = np.arange(20)
    ds = data.make_dataset(x, y, batch_size=8, shuffle=True, seed=0)
    epoch1 = np.concatenate([b[1].numpy() for b in ds])
    epoch2 = np.concatenate([b[1].numpy() for b in ds])
    images, _ = next(iter(ds))
    assert images.dtype.name == "uint8"
    assert sorted(epoch1) == list(range(20))
    assert not np.array_equal(epoch1, epoch2)


@pytest.mark.parametrize("use_tensorflow", [True, False])
def test_an_epoch_stream_started_later_has_the_same_epochs(use_tensorflow):
    # A resumed run starts the stream at its resume epoch; every epoch must be
    # the one an uninterrupted run (a stream from epoch 0) gets.
    x = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1)
    y = np.arange(20, dtype=np.int32)

    def epochs(first, stop):
        batches = data.make_batches(x, y, 8, shuffle=True, seed=5,
                                    use_tensorflow=use_tensorflow,
                                    epochs=(first, stop))
        rows = ([b[1] for b in batches.as_numpy_iterator()] if use_tensorflow
                else [batches[i][1] for i in range(len(batches))])
        assert len(rows) == 3 * (stop - first)  # batches of 8, 8, 4 per epoch
        return [np.concatenate(rows[i:i + 3]).tolist()
                for i in range(0, len(rows), 3)]

    whole = epochs(0, 4)
    assert all(sorted(e) == list(range(20)) for e in whole)
    assert len({tuple(e) for e in whole}) == 4  # reshuffled every epoch
    assert epochs(2, 4) == whole[2:]
