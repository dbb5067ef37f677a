"""Image files for the sources: which files are images and which are OS junk,
what a file's header says, its pixels, and arrays brought to a size.

The pixels of a file come from `stl10_keras.images.preprocess`, the path the
SavedModel's `serving_bytes` signature runs in its graph, so a model is
trained on exactly what it is served. Pillow only reads headers here (format,
size, mode, EXIF orientation), which is cheap and names a bad file clearly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from stl10_keras import images
from stl10_keras.errors import DataUnavailableError
from stl10_keras.sources.base import Splits

# The formats `keras.utils.image_dataset_from_directory` reads, plus WebP.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
# Pillow modes that hold one gray channel (with or without alpha).
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
# What operating systems and NAS boxes leave beside images (lower case).
JUNK_FILES = {"thumbs.db": "Thumbs.db", "desktop.ini": "desktop.ini",
              ".ds_store": ".DS_Store"}
JUNK_FOLDERS = {"@eadir": "@eaDir/", "__macosx": "__MACOSX/"}


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def junk_kind(name: str, is_dir: bool) -> str | None:
    """Why an entry is skipped as operating-system junk (None: it is not).

    Thumbs.db, desktop.ini, .DS_Store, macOS's `._*` files, Synology's
    `@eaDir/`, macOS archives' `__MACOSX/`, and any other hidden (dot) entry.
    """
    lower = name.lower()
    if is_dir:
        if lower in JUNK_FOLDERS:
            return JUNK_FOLDERS[lower]
        return "hidden folders" if name.startswith(".") else None
    if lower in JUNK_FILES:
        return JUNK_FILES[lower]
    if name.startswith("._"):
        return "._* files"
    return "hidden files" if name.startswith(".") else None


@dataclass
class Listing:
    """What a folder holds, sorted: image files, other files, skipped junk."""

    images: list[Path] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)
    subfolders: list[Path] = field(default_factory=list)  # not recursive only
    skipped: dict[str, list[Path]] = field(default_factory=dict)

    def skip(self, kind: str, path: Path) -> None:
        self.skipped.setdefault(kind, []).append(path)


def list_folder(folder: Path, recursive: bool = False) -> Listing:
    """Sort `folder`'s entries (and, if `recursive`, its sub-folders') into
    image files, other files, sub-folders and junk; nothing raises."""
    out = Listing()
    for root, dirs, names in os.walk(folder):
        here = Path(root)
        kept = []
        for d in sorted(dirs):
            kind = junk_kind(d, is_dir=True)
            if kind:
                out.skip(kind, here / d)
            elif recursive:
                kept.append(d)
            else:
                out.subfolders.append(here / d)
        dirs[:] = kept
        for name in sorted(names):
            path = here / name
            kind = junk_kind(name, is_dir=False)
            if kind:
                out.skip(kind, path)
            elif is_image_file(path):
                out.images.append(path)
            else:
                out.not_images.append(path)
    out.images.sort()
    out.not_images.sort()
    return out


@dataclass
class Header:
    """What an image file's header says (nothing is decoded)."""

    format: str
    size: tuple[int, int]  # (H, W), upright (EXIF orientation applied)
    mode: str
    gray: bool


def read_header(path: Path) -> Header:
    """The header of an image file, as Pillow reads it.

    Raises:
        ValueError: the file is not an image the decode path reads; the
            message is the reason (no file name, no full stop).
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. Pillow's DecompressionBombWarning
            with Image.open(path) as image:
                fmt, (width, height), mode = image.format, image.size, image.mode
                gray = _is_gray(image)
                orientation = _orientation(image)
                compression = image.info.get("compression") if fmt == "BMP" else None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        raise ValueError(reason(e)) from None
    if fmt not in images.FORMATS:
        raise ValueError(f"a {fmt} image; convert it to PNG or JPEG")
    if compression in (images.BMP_RLE8, images.BMP_RLE4):
        raise ValueError("a run-length compressed BMP; convert it to PNG")
    if orientation in (5, 6, 7, 8):  # a quarter turn: width and height swap
        width, height = height, width
    return Header(fmt, (height, width), mode, gray)


def _orientation(image) -> int:
    """The EXIF orientation found while opening (JPEG, WebP, a PNG's `eXIf`
    before its pixels): what `images.exif_orientation` reads in the graph.
    `Image.getexif` is not asked: for a PNG it may decode the whole image."""
    from PIL import Image

    raw = image.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = int(exif.get(0x0112, 1))
    except Exception:  # malformed EXIF is ignored, as the graph ignores it
        return 1
    return value if 1 <= value <= 8 else 1


def _is_gray(image) -> bool:
    """Gray modes, and palette images (GIF) whose palette holds only grays.

    WebP and JPEG files written from gray pixels may decode as RGB (WebP
    stores no gray): such images count as RGB, as they are stored.
    """
    if image.mode in GRAY_MODES:
        return True
    if image.mode == "P" and image.palette is not None \
            and image.palette.mode == "RGB":
        palette = np.asarray(image.getpalette() or [], np.uint8).reshape(-1, 3)
        return bool(len(palette)) and bool(
            (palette == palette[:, :1]).all())
    return False


def reason(e: BaseException) -> str:
    """An exception's message on one line, without a trailing full stop or
    TensorFlow's `{{function_node ...}}` prefix."""
    import re

    from stl10_keras.errors import one_line

    return re.sub(r"\{\{[^}]*\}\}\s*", "", one_line(e)) or type(e).__name__


def decode_bytes(data: bytes, size: tuple[int, int], channels: int) -> np.ndarray:
    """`images.preprocess` of an encoded image: uint8 `(H, W, channels)`.

    Raises:
        ValueError: it cannot be decoded; the message is the reason.
    """
    from stl10_keras.io_utils import import_tensorflow

    tf = import_tensorflow()  # quietly: its start-up logs would come first
    try:
        return images.preprocess_fn(size[0], size[1], channels)(
            tf.constant(data)).numpy()
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(reason(e)) from None


def decode_file(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """`decode_bytes` of a file.

    Raises:
        DataUnavailableError: the file cannot be read or decoded.
    """
    try:
        return decode_bytes(path.read_bytes(), size, channels)
    except (OSError, ValueError) as e:
        raise DataUnavailableError(
            f"{path} cannot be decoded ({reason(e)}); replace or remove it."
        ) from None


def conform(images_: np.ndarray, size: tuple[int, int] | None,
            channels: int | None, chunk: int = 256) -> np.ndarray:
    """uint8 NHWC images at `size` (H, W) with `channels` (1 or 3); None keeps it.

    The channel conversion and resize of `stl10_keras.images` (gray repeated,
    Pillow's luminance, Pillow's bilinear filter), which serving applies to
    an encoded image: the same pixels whether a model's images came from a
    file or from arrays. Without TensorFlow, Pillow itself does both.
    """
    from stl10_keras import runtime

    same_channels = channels is None or images_.shape[-1] == channels
    same_size = size is None or tuple(images_.shape[1:3]) == tuple(size)
    if same_channels and same_size:
        return images_
    channels = channels or images_.shape[-1]
    size = tuple(size) if size is not None else tuple(images_.shape[1:3])
    if not runtime.tensorflow_installed():
        return _conform_with_pillow(images_, size, channels)
    out = np.empty((len(images_), size[0], size[1], channels), np.uint8)
    for i in range(0, len(images_), chunk):
        batch = images.to_channels(images_[i:i + chunk], channels)
        out[i:i + chunk] = images.resize(batch, size[0], size[1]).numpy()
    return out


def _conform_with_pillow(array: np.ndarray, size: tuple[int, int],
                         channels: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(array), size[0], size[1], channels), np.uint8)
    for i, image in enumerate(array):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        pil = pil.convert("L" if channels == 1 else "RGB")
        if pil.size != (size[1], size[0]):
            pil = pil.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        out[i] = np.asarray(pil).reshape(size[0], size[1], channels)
    return out


def conform_splits(splits: Splits, size: tuple[int, int] | None,
                   channels: int | None) -> Splits:
    """`splits` with every split (the unlabeled stream too) passed through `conform`."""
    size = tuple(size) if size is not None else None
    stream = splits.unlabeled_batches

    def unlabeled_batches(batch_size: int) -> Iterator[np.ndarray]:
        for batch in stream(batch_size):
            yield conform(batch, size, channels)

    x_train = conform(splits.x_train, size, channels)
    return dataclasses.replace(
        splits, image_shape=tuple(int(d) for d in x_train.shape[1:]), x_train=x_train,
        x_val=conform(splits.x_val, size, channels),
        x_test=conform(splits.x_test, size, channels),
        unlabeled_batches=unlabeled_batches,
    )
