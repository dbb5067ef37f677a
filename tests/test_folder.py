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



# --- the check in one pass --------------------------------------------------------

def _load_error(root, **kwargs):
    with pytest.raises(data.DataUnavailableError) as info:
        data.load_splits("folder", str(root), **kwargs)
    return str(info.value)


def test_a_palette_png_is_read_not_a_crash(tmp_path):
    # Pillow's verify() after reading the palette raised "verify must be called
    # directly after open", naming no file.
    write_folder(tmp_path)
    path = tmp_path / "train" / "cat" / "palette.png"
    Image.fromarray(planted(0, 9)).convert("P", palette=Image.Palette.ADAPTIVE,
                                           colors=8).save(path)
    s = data.load_splits("folder", str(tmp_path))
    want = np.asarray(Image.open(path).convert("RGB"))
    assert any(np.array_equal(want, x) for x in np.concatenate([s.x_train, s.x_val,
                                                               s.x_test]))


def test_every_problem_is_reported_at_once_grouped_by_kind(tmp_path):
    write_folder(tmp_path, per_class=6, unlabeled=4)
    train = tmp_path / "train"
    for i in range(7):  # more of one kind than the report names
        (train / "dog" / f"notes{i}.txt").write_text("hello")
    (train / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(planted(0, 0)).save(train / "loose.png")
    (train / "fox").mkdir()
    Image.fromarray(planted(0, 0)).save(train / "fox" / "a.png")
    # A valid header, the pixels cut off: only decoding finds it out.
    jpeg = tmp_path / "unlabeled" / "part0" / "cut.jpg"
    Image.fromarray(planted(1, 1)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:-40])
    Image.fromarray(planted(0, 0, size=(20, 20))).save(train / "emu" / "big.png")
    lines = _load_error(tmp_path).splitlines()
    assert lines[0] == (f"{tmp_path} has 12 problems of 6 kinds; fix them all, "
                        "then rerun:")
    text = "\n".join(lines)
    for heading in [
            "1 x files lie directly in a split folder (put each into a folder named "
            "after its class):",
            "7 x files are not images (JPEG, PNG, GIF, BMP, WebP) (move them out of "
            "the data folder):",
            "1 x files are not readable images (replace or remove them):",
            "1 x images cannot be decoded (replace or remove them):",
            "1 x class folders hold fewer than 2 images (add images or remove the "
            "folders):",
            "1 x images differ in size (pass --image-size H,W to resize them all):"]:
        assert f"  {heading}" in lines, heading
    assert "    train/dog/notes0.txt" in lines and "    ... and 2 more" in lines
    assert "notes5.txt" not in text  # the first five of a kind, then a count
    assert "    train/loose.png" in lines and "    train/fox (1)" in lines
    assert any(ln.startswith("    unlabeled/part0/cut.jpg (") for ln in lines)
    assert any(ln.startswith("    train/cat/0.png (") for ln in lines)
    assert any("20x20: 1 images (e.g. train/emu/big.png)" in ln for ln in lines)


def test_a_truncated_unlabeled_image_stops_the_run_before_it_starts(tmp_path):
    # It passed the header check and failed ~7 s later in k-means, leaving a
    # run dir that held only config.json.
    write_folder(tmp_path, per_class=6, unlabeled=4)
    cut = tmp_path / "unlabeled" / "part1" / "cut.jpg"
    Image.fromarray(planted(1, 1)).save(cut, quality=95)
    cut.write_bytes(cut.read_bytes()[:-40])
    proc = subprocess.run(
        [sys.executable, "-m", "stl10_keras.train", "--dataset", "folder",
         "--data-dir", str(tmp_path), "--preset", "smoke", "--run-dir",
         str(tmp_path / "run"), "--no-export"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {cut} cannot be decoded")
    assert lines[0].endswith("; replace or remove it.")
    assert not (tmp_path / "run").exists()


def test_os_junk_is_skipped_and_counted(tmp_path):
    # Thumbs.db was refused while .DS_Store was skipped.
    write_folder(tmp_path, per_class=5, unlabeled=4)
    cat = tmp_path / "train" / "cat"
    (cat / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (cat / "desktop.ini").write_text("[.ShellClassInfo]")
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cat / "._0.png").write_bytes(b"\0\5\26\7")
    for junk in (tmp_path / "unlabeled" / "@eaDir", tmp_path / "train" / "__MACOSX"):
        junk.mkdir(parents=True)
        (junk / "x.jpg").write_bytes(b"not an image")
    s = data.load_splits("folder", str(tmp_path))
    assert s.class_names == ("cat", "dog", "emu") and s.num_unlabeled == 4
    assert len(s.y_train) + len(s.y_val) + len(s.y_test) == 15
    skipped = next(n for n in s.notes if n.startswith("skipped"))
    assert skipped.startswith("skipped 6 entries (not data): ")
    for name in ("Thumbs.db", "desktop.ini", ".DS_Store", "._* files", "@eaDir/",
                 "__MACOSX/"):
        assert f"1 {name}" in skipped
    # The pipeline's fingerprint does not change with junk either.
    assert all("Thumbs" not in str(p) and "@eaDir" not in str(p)
               for p in data.source_files("folder", str(tmp_path)))


def test_class_names_are_compared_in_unicode_nfc(tmp_path):
    # test/ written on macOS (NFD) and train/ elsewhere (NFC): the "rename"
    # message named two folders that looked identical.
    import unicodedata

    nfc, nfd = (unicodedata.normalize(form, "caf\u00e9 noir")
                for form in ("NFC", "NFD"))
    assert nfc != nfd
    for split, name, count in (("train", nfc, 5), ("test", nfd, 2),
                               ("train", "tea", 5), ("test", "tea", 2)):
        for i in range(count):
            path = tmp_path / split / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(planted(name == "tea", i)).save(path)
    s = data.load_splits("folder", str(tmp_path))
    assert s.class_names == (nfc, "tea")
    assert sorted(s.y_test.tolist()) == [0, 0, 1, 1]


def test_exif_orientation_turns_images_upright_in_training(tmp_path):
    # A camera's portrait JPEG is stored landscape with orientation 6.
    write_folder(tmp_path, per_class=3, size=(24, 40), formats=("png",))
    photo = planted(1, 0, size=(40, 24))  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "train" / "dog" / "portrait.jpg"
    Image.fromarray(photo).save(path, quality=95, exif=exif.tobytes())
    s = data.load_splits("folder", str(tmp_path))
    assert s.image_shape == (24, 40, 3)  # no --image-size needed
    from PIL import ImageOps

    want = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert any(np.array_equal(want, x) for x in np.concatenate([s.x_train, s.x_val,
                                                               s.x_test]))


def test_the_data_summary_names_classes_splits_pixels_and_files(tmp_path):
    write_folder(tmp_path, per_class=5, test_per_class=2, unlabeled=4,
                 formats=("png", "jpg"))
    Image.fromarray(planted(0, 0, size=(20, 30))).save(
        tmp_path / "train" / "cat" / "big.png")
    s = data.load_splits("folder", str(tmp_path), image_size=(12, 16))
    lines = s.describe()
    assert lines[0].startswith(f"data: image folder {tmp_path} (3 classes")
    assert lines[1] == "  3 classes, labeled images each: cat (6), dog (5), emu (5)"
    assert lines[2] == ("  train 13, validation 3, test 6, unlabeled 4; images "
                        "12x16x3")
    assert lines[3] == ("  pixels: stored 2 sizes, 12x16 to 20x30; resized by "
                        "--image-size to 12x16 RGB")
    assert lines[4] == "  files: 17 PNG, 9 JPEG (modes RGB 26)"
    assert len(lines) == 5  # nothing skipped


def test_kmeans_says_how_many_images_it_read_and_warns_in_one_line(tmp_path):
    # It said "from 10000 unlabeled images" for a folder of 4, then printed a
    # Python UserWarning with its source line, twice.
    write_folder(tmp_path, per_class=5, unlabeled=4)
    proc = subprocess.run(
        [sys.executable, "-m", "stl10_keras.train", "--dataset", "folder",
         "--data-dir", str(tmp_path), "--preset", "smoke", "--widths", "4,8",
         "--fc-units", "8", "--kmeans-images", "20", "--kmeans-patches-per-image",
         "4", "--run-dir", str(tmp_path / "run"), "--no-export", "--verbose", "0"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("k-means initialisation of stage(s) [1, 2] from 4 unlabeled images"
            in proc.stdout.splitlines())
    warnings = [ln for ln in proc.stderr.splitlines() if "warning" in ln.lower()]
    assert [ln[ln.index("warning: "):] for ln in warnings] == [
        "warning: The unlabeled stream ended after 4 of 20 images; k-means uses "
        "those (lower --kmeans-images to silence this)."]
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
