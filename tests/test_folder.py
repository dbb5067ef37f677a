"""Image folders: PNG / JPEG / ... files written with Pillow, read back as splits."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, subprocess_env
from stl10_keras import data


def planted(label, index, size=(12, 16), channels=3):
    """An image whose pixel (0, 0) encodes (label, index); smooth elsewhere so
    JPEG keeps it close."""
    h, w = size
    image = np.full((h, w, channels), 40 + 60 * label, np.uint8)
    image[: h // 2, :, :] = 200 - 10 * index
    return image


def write_folder(root, classes=("cat", "dog", "emu"), per_class=6, test_per_class=0,
                 unlabeled=0, size=(12, 16), channels=3, formats=("png", "jpg")):
    """DIR/train/CLASS/i.EXT (alternating formats), optional test/ and unlabeled/."""
    written = {}
    for split, count in (("train", per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            for i in range(count):
                path = root / split / name / f"{i}.{formats[i % len(formats)]}"
                path.parent.mkdir(parents=True, exist_ok=True)
                image = planted(c, i, size, channels)
                Image.fromarray(image[..., 0] if channels == 1 else image).save(path)
                written[path] = (c, image)
    for i in range(unlabeled):
        path = root / "unlabeled" / f"part{i % 2}" / f"u{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(planted(0, i, size, channels).squeeze()).save(path)
    return written


def test_png_and_jpeg_images_become_labeled_splits(tmp_path):
    written = write_folder(tmp_path, per_class=5, test_per_class=2, unlabeled=5,
                           formats=("png", "jpg", "webp"))
    s = data.load_splits("folder", str(tmp_path), seed=0)
    assert s.class_names == ("cat", "dog", "emu")  # sorted folder names
    assert s.image_shape == (12, 16, 3)
    # A fifth of the smallest class (5 -> 1) is validation; test/ is the test split.
    assert (len(s.y_train), len(s.y_val), len(s.y_test)) == (12, 3, 6)
    assert s.num_unlabeled == 5
    unlabeled = np.concatenate(list(s.unlabeled_batches(2)))
    assert unlabeled.shape == (5, 12, 16, 3)
    # Each image is Pillow's decoding of its file (PNG exact, JPEG lossy),
    # labeled by its folder.
    refs = {path: np.asarray(Image.open(path).convert("RGB")) for path in written}
    for x, y in zip(np.concatenate([s.x_train, s.x_val, s.x_test]),
                    np.concatenate([s.y_train, s.y_val, s.y_test])):
        matches = [p for p, ref in refs.items() if np.array_equal(ref, x)]
        assert matches and all(written[p][0] == y for p in matches)


def test_without_test_folder_a_fixed_fifth_is_held_out(tmp_path):
    write_folder(tmp_path, per_class=10)
    a, b = (data.load_splits("folder", str(tmp_path), seed=s) for s in (0, 1))
    assert len(a.y_test) == 6 and np.array_equal(np.bincount(a.y_test), [2, 2, 2])
    np.testing.assert_array_equal(a.x_test, b.x_test)  # the same for every seed
    assert not np.array_equal(a.x_val, b.x_val)  # validation follows the seed
    assert "1/5 of each class" in a.source


def test_grayscale_images_give_one_channel_and_flags_convert(tmp_path):
    # WebP stores no gray: Pillow reads it back as RGB, so it is left out here.
    write_folder(tmp_path, channels=1, formats=("png", "bmp", "gif"))
    s = data.load_splits("folder", str(tmp_path), seed=0)
    assert s.image_shape == (12, 16, 1)
    s3 = data.load_splits("folder", str(tmp_path), seed=0, channels=3,
                          image_size=(24, 8))
    assert s3.image_shape == (24, 8, 3)
    # --channels 3 repeats the gray channel; --image-size is Pillow's bilinear resize.
    path = sorted((tmp_path / "train" / "cat").iterdir())[0]
    ref = np.asarray(Image.open(path).convert("RGB").resize((8, 24),
                                                            Image.Resampling.BILINEAR))
    assert any(np.array_equal(ref, x) for x in np.concatenate(
        [s3.x_train, s3.x_val, s3.x_test]))


def test_images_of_different_sizes_need_image_size(tmp_path):
    write_folder(tmp_path)
    big = tmp_path / "train" / "cat" / "big.png"
    Image.fromarray(planted(0, 0, (20, 20))).save(big)
    with pytest.raises(data.DataUnavailableError, match="--image-size H,W"):
        data.load_splits("folder", str(tmp_path))
    s = data.load_splits("folder", str(tmp_path), image_size=(10, 10))
    assert s.image_shape == (10, 10, 3)


def _break(root, case):
    if case == "corrupt":
        (root / "train" / "dog" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        return "0.png", "replace or remove it"
    if case == "not an image":
        (root / "train" / "dog" / "notes.txt").write_text("hello")
        return "notes.txt", "move it out"
    if case == "one image":
        (root / "train" / "fox").mkdir()
        Image.fromarray(planted(0, 0)).save(root / "train" / "fox" / "a.png")
        return "fox", "at least 2"
    if case == "one class":
        for name in ("dog", "emu"):
            for f in (root / "train" / name).iterdir():
                f.unlink()
            (root / "train" / name).rmdir()
        return "1 class", "at least 2"
    if case == "empty unlabeled":
        (root / "unlabeled").mkdir()
        return "unlabeled", "add some or remove the folder"
    if case == "loose file":
        Image.fromarray(planted(0, 0)).save(root / "train" / "x.png")
        return "x.png", "folder named after its class"
    if case == "unknown test class":
        (root / "test" / "yak").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(planted(0, i)).save(root / "test" / "yak" / f"{i}.png")
        return "yak", "rename"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["corrupt", "not an image", "one image", "one class",
                                  "empty unlabeled", "loose file",
                                  "unknown test class"])
def test_bad_folders_get_one_sentence_naming_the_file(tmp_path, case):
    write_folder(tmp_path)
    name, fix = _break(tmp_path, case)
    with pytest.raises(data.DataUnavailableError) as info:
        data.load_splits("folder", str(tmp_path))
    message = str(info.value)
    assert name in message and fix in message and "\n" not in message


def test_missing_train_folder_exits_1_before_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "stl10_keras.train", "--dataset", "folder",
         "--data-dir", str(tmp_path), "--preset", "smoke", "--run-dir",
         str(tmp_path / "run")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'train'} is missing; --data-dir must hold train/CLASS/* "
        "(one folder of images per class)."]
    assert not (tmp_path / "run").exists()

