"""The one image path (`stl10_keras.images`) against Pillow and numpy.

The corpus is real photos (Fashion-MNIST's test images, from Debian's
dataset-fashion-mnist; scikit-learn's digits where it is not installed),
coloured, resized to sizes between 20x20 and 100x80 and re-encoded by Pillow
in every mode and format a user's folder may hold. The reference for each file
is what Pillow reads, turned upright by `ImageOps.exif_transpose`, converted
with Pillow's `convert` (16 bits scaled by numpy) and resized with Pillow's
bilinear filter.
"""

import gzip
import io
import struct
import zlib
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from stl10_keras import images
from stl10_keras.data import load_splits
from stl10_keras.export import export_saved_model

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def real_images(n: int, seed: int = 0) -> np.ndarray:
    """`n` real 28x28 grey photos (uint8)."""
    if FASHION.is_file():
        with gzip.open(FASHION) as f:
            data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    else:  # 8x8 digits, 0..16, enlarged
        from sklearn.datasets import load_digits

        digits = load_digits().images.astype(np.float32) * (255 / 16)
        data = np.kron(digits, np.ones((4, 4)))[:, 2:30, 2:30].astype(np.uint8)
    rng = np.random.default_rng(seed)
    return data[rng.choice(len(data), n, replace=False)]


def colour(gray: np.ndarray) -> np.ndarray:
    """An RGB image from a grey one: each channel a different view of it."""
    h, w = gray.shape
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    return np.stack([gray, 255 - gray, ramp.astype(np.uint8)], -1)


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (grey `(H, W)` or RGB `(H, W, 3)` uint16), written by hand:
    Pillow writes no 16-bit RGB."""
    h, w = array.shape[:2]
    colour_type = 2 if array.ndim == 3 else 0
    rows = array.reshape(h, -1).astype(">u2").tobytes()
    stride = len(rows) // h
    raw = b"".join(b"\0" + rows[i * stride:(i + 1) * stride] for i in range(h))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def make_image(gray28: np.ndarray, mode: str, size: tuple[int, int]) -> Image.Image:
    """A Pillow image in `mode` of `size` (W, H) from a real grey photo."""
    gray = np.asarray(Image.fromarray(gray28).resize(size, Image.Resampling.BICUBIC))
    rgb = Image.fromarray(colour(gray))
    alpha = Image.fromarray(np.flipud(gray).copy())
    wide = (gray.astype(np.int32) * 257
            + (np.arange(gray.size).reshape(gray.shape) % 257).astype(np.int32))
    return {
        "1": lambda: Image.fromarray(gray).convert("1"),
        "L": lambda: Image.fromarray(gray),
        "LA": lambda: Image.merge("LA", (Image.fromarray(gray), alpha)),
        "P": lambda: rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "PA": lambda: rgb.convert("P").convert("PA"),
        "RGB": lambda: rgb,
        "RGBA": lambda: Image.merge("RGBA", (*rgb.split(), alpha)),
        "CMYK": lambda: rgb.convert("CMYK"),
        "YCbCr": lambda: rgb.convert("YCbCr"),
        "I;16": lambda: Image.fromarray(wide.astype(np.uint16)),
        "I": lambda: Image.fromarray(wide),
        "F": lambda: Image.fromarray(wide.astype(np.float32)),
    }[mode]()


def store(image: Image.Image, fmt: str) -> bytes:
    """`image` as a file of `fmt` ("JPEG progressive", "PNG", "GIF", ...).

    32-bit modes (I, F) are stored as 16-bit PNG, the deepest grey these
    formats hold.
    """
    if image.mode in ("I", "F"):
        image = image.convert("I").convert("I;16")
    if fmt == "JPEG progressive":
        return encode(image, "JPEG", quality=90, progressive=True)
    if fmt == "WEBP lossless":
        return encode(image, "WEBP", lossless=True)
    return encode(image, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


# (mode, format): every Pillow mode, in the formats that can hold it.
CORPUS = [
    ("1", "PNG"), ("1", "BMP"), ("1", "GIF"),
    ("L", "PNG"), ("L", "JPEG"), ("L", "BMP"), ("L", "GIF"),
    ("LA", "PNG"), ("LA", "WEBP lossless"),
    ("P", "PNG"), ("P", "GIF"), ("P", "BMP"),
    ("PA", "WEBP lossless"),
    ("RGB", "PNG"), ("RGB", "JPEG"), ("RGB", "JPEG progressive"), ("RGB", "BMP"),
    ("RGB", "WEBP"), ("RGB", "WEBP lossless"), ("RGB", "GIF"),
    ("RGBA", "PNG"), ("RGBA", "BMP"), ("RGBA", "WEBP lossless"),
    ("CMYK", "JPEG"), ("YCbCr", "JPEG"),
    ("I;16", "PNG"), ("I", "PNG"), ("F", "PNG"),
]
SIZES = [(20, 20), (100, 80), (31, 57), (64, 48)]  # (W, H)


def corpus_files() -> dict[str, bytes]:
    """name -> encoded image: each CORPUS entry, a 16-bit RGB PNG, an animated
    GIF, and JPEG / PNG / WebP files under each EXIF orientation."""
    photos = real_images(len(CORPUS) + 12)
    files = {}
    for i, (mode, fmt) in enumerate(CORPUS):
        size = SIZES[i % len(SIZES)]
        name = f"{mode}-{fmt}".replace(" ", "-").replace(";", "")
        files[name] = store(make_image(photos[i], mode, size), fmt)
    wide = colour(photos[-1]).astype(np.uint16) * 257 + 99
    files["RGB16-PNG"] = png16(wide)
    frames = [Image.fromarray(colour(photos[-2 - k])).convert("P") for k in range(3)]
    files["animated-GIF"] = encode(frames[0], "GIF", save_all=True,
                                   append_images=frames[1:])
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        photo = make_image(photos[-3 - orientation % 3], "RGB", (40, 24))
        for fmt, kwargs in (("JPEG", {"quality": 90}), ("PNG", {}),
                            ("WEBP", {"lossless": True})):
            files[f"exif{orientation}-{fmt}"] = encode(photo, fmt, exif=exif.tobytes(),
                                                       **kwargs)
    return files


def reference(data: bytes, size: tuple[int, int], channels: int) -> np.ndarray:
    """What Pillow makes of a file: upright, 16 bits scaled to 8 (numpy),
    converted to `L` or `RGB`, resized to `size` (H, W) with its bilinear
    filter."""
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):
            wide = np.asarray(image).astype(np.int64)
            image = Image.fromarray(np.round(wide / 257).astype(np.uint8))
        image = image.convert("L" if channels == 1 else "RGB")
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(image).reshape(size[0], size[1], channels)


@pytest.fixture(scope="module")
def corpus():
    return corpus_files()


# --- the steps, against Pillow ----------------------------------------------------

def test_resize_is_pillows_bilinear_filter_bit_for_bit():
    rng = np.random.default_rng(0)
    shapes = [(20, 20, 96, 96), (100, 80, 32, 32), (28, 28, 96, 96), (7, 50, 40, 3),
              (60, 10, 5, 30), (33, 35, 33, 12), (480, 640, 96, 96)]
    shapes += [tuple(int(v) for v in rng.integers(1, 70, 4)) for _ in range(30)]
    for h, w, oh, ow in shapes:
        channels = 1 + 2 * (h % 2)
        image = rng.integers(0, 256, (h, w, channels), np.uint8)
        image[: h // 2] //= 4  # an edge, where rounding shows
        pil = Image.fromarray(image[..., 0] if channels == 1 else image)
        want = np.asarray(pil.resize((ow, oh), Image.Resampling.BILINEAR))
        got = images.resize(tf.constant(image), oh, ow).numpy()
        np.testing.assert_array_equal(got, want.reshape(oh, ow, channels),
                                      err_msg=f"{(h, w)} -> {(oh, ow)}")
    # A batch is resized image by image.
    batch = rng.integers(0, 256, (3, 30, 40, 3), np.uint8)
    want = [np.asarray(Image.fromarray(b).resize((23, 17), Image.Resampling.BILINEAR))
            for b in batch]
    np.testing.assert_array_equal(images.resize(batch, 17, 23).numpy(), want)


def test_channels_are_pillows_luminance_and_repeated_grey():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (4, 9, 11, 3), np.uint8)
    grey = np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in rgb])
    np.testing.assert_array_equal(images.to_channels(rgb, 1).numpy()[..., 0], grey)
    rgba = np.concatenate([rgb, rgb[..., :1]], -1)  # alpha is dropped
    np.testing.assert_array_equal(images.to_channels(rgba, 3).numpy(), rgb)
    np.testing.assert_array_equal(images.to_channels(grey[..., None], 3).numpy(),
                                  np.repeat(grey[..., None], 3, -1))


def test_every_mode_and_format_gives_the_pixels_pillow_reads(corpus):
    decode = {c: images.preprocess_fn(48, 40, c) for c in (1, 3)}
    for name, data in corpus.items():
        if name == "RGB16-PNG":
            continue  # Pillow keeps the high byte: numpy is its reference below
        for channels in (1, 3):
            got = decode[channels](tf.constant(data)).numpy().astype(int)
            want = reference(data, (48, 40), channels).astype(int)
            # Lossless formats to the bit; a JPEG within one level (another
            # libjpeg build may round its IDCT differently).
            limit = 1 if "JPEG" in name else 0
            assert np.abs(got - want).max() <= limit, (name, channels)


def test_exif_orientation_is_read_from_jpeg_png_and_webp(corpus):
    for name, data in corpus.items():
        if name.startswith("exif"):
            with Image.open(io.BytesIO(data)) as image:
                want = image.getexif().get(0x0112)
            assert images.exif_orientation(tf.constant(data)).numpy() == want, name
    plain = encode(Image.new("RGB", (4, 3)), "JPEG")
    assert images.exif_orientation(tf.constant(plain)).numpy() == 1
    # Orientations 5..8 turn the image a quarter: a 40x24 photo comes out 24x40.
    native = images.decode(tf.constant(corpus["exif6-JPEG"]))
    upright = images.orient(native, images.exif_orientation(
        tf.constant(corpus["exif6-JPEG"])))
    assert native.shape[:2] == (24, 40) and upright.shape[:2] == (40, 24)


def test_16_bit_images_are_scaled_to_8_bits_not_clipped():
    # Training used to clip them (pure black and white).
    wide = np.array([[0, 256, 1000], [30000, 40000, 65535]], np.uint16)
    got = images.decode(tf.constant(png16(wide))).numpy()[..., 0]
    np.testing.assert_array_equal(got, np.round(wide / 257).astype(np.uint8))
    rgb = np.stack([wide, wide[::-1], 65535 - wide], -1)
    got = images.decode(tf.constant(png16(rgb))).numpy()
    np.testing.assert_array_equal(got, np.round(rgb / 257).astype(np.uint8))


def bmp4(indices: np.ndarray, palette: np.ndarray) -> bytes:
    """A 4-bit palette BMP, written by hand (Pillow writes 1 and 8 bits only)."""
    h, w = indices.shape
    stride = (w * 4 + 31) // 32 * 4
    rows = b""
    for row in indices[::-1]:  # bottom-up
        padded = np.zeros(stride * 2, np.uint8)
        padded[:w] = row
        rows += bytes((padded[0::2] << 4) | padded[1::2])
    colours = np.concatenate([palette[:, ::-1], np.zeros((16, 1), np.uint8)], 1)
    offset = 14 + 40 + 64
    return (b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset)
            + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 4, 0, len(rows), 2835, 2835,
                          16, 0)
            + colours.astype(np.uint8).tobytes() + rows)


def test_a_4_bit_bmp_is_read_through_its_palette():
    rng = np.random.default_rng(3)
    indices = rng.integers(0, 16, (7, 13)).astype(np.uint8)
    palette = rng.integers(0, 256, (16, 3)).astype(np.uint8)
    data = bmp4(indices, palette)
    got = images.decode(tf.constant(data)).numpy()
    np.testing.assert_array_equal(got, palette[indices])
    np.testing.assert_array_equal(got, np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB")))


def test_an_animated_gif_gives_its_first_frame(corpus):
    got = images.decode(tf.constant(corpus["animated-GIF"])).numpy()
    with Image.open(io.BytesIO(corpus["animated-GIF"])) as gif:
        assert gif.n_frames == 3
        np.testing.assert_array_equal(got[..., :3], np.asarray(gif.convert("RGB")))


def test_a_truncated_image_is_an_invalid_argument(corpus):
    cut = corpus["RGB-JPEG"][: len(corpus["RGB-JPEG"]) // 2]
    with pytest.raises(tf.errors.InvalidArgumentError):
        images.preprocess_fn(8, 8, 3)(tf.constant(cut))


# --- training and serving see the same pixels -----------------------------------------

def pixel_model(h, w, c):
    """A 'classifier' whose logits are its input pixels / 10, so the served
    probabilities give back the pixels the SavedModel's graph made:
    `10 * (log p_i - log p_j) = x_i - x_j`."""
    inputs = keras.Input((h, w, c))
    logits = keras.layers.Flatten()(keras.layers.Rescaling(0.1)(inputs))
    return keras.Model(inputs, logits)


def served_pixel_difference(version_dir, files: list[bytes], pixels: np.ndarray):
    """The largest difference between the pixels `serving_bytes` makes of each
    file and `pixels` (what training made of it), in grey levels."""
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_bytes"]
    served = signature(image_bytes=tf.constant(files))["probabilities"].numpy()
    log_p = np.log(served.astype(np.float64))
    x = pixels.reshape(len(files), -1).astype(np.float64)
    # Equal up to the softmax's per-image constant: compare centred.
    d = 10 * log_p - x
    d -= d.mean(axis=1, keepdims=True)
    return np.abs(d).max()


@pytest.mark.parametrize("channels", [1, 3])
def test_training_and_serving_make_the_same_pixels_of_every_file(tmp_path, corpus,
                                                                 channels):
    # A folder whose test/ holds the whole corpus (two classes); training reads
    # it, the exported SavedModel's serving_bytes decodes the same files. A
    # 1-channel model used to refuse CMYK JPEGs and GIFs when served.
    names = sorted(corpus)
    for i, name in enumerate(names):
        ext = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp",
               "WEBP": "webp"}[next(f for f in ("JPEG", "PNG", "GIF", "BMP", "WEBP")
                                    if f in name)]
        for split in ("train", "test"):
            path = tmp_path / "data" / split / f"c{i % 2}" / f"{name}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(corpus[name])
    splits = load_splits("folder", str(tmp_path / "data"), image_size=(24, 20),
                         channels=channels)
    files = [p.read_bytes() for c in ("c0", "c1")
             for p in sorted((tmp_path / "data" / "test" / c).iterdir())]
    h, w = 24, 20
    version = export_saved_model(pixel_model(h, w, channels), tmp_path / "m",
                                 [str(i) for i in range(h * w * channels)])
    assert served_pixel_difference(version, files, splits.x_test) <= 0.01
    # ... and both are Pillow's reading of the file (lossless ones exactly).
    for data, x in zip(files, splits.x_test):
        assert np.abs(x.astype(int) - reference(data, (h, w), channels)).max() <= 1
