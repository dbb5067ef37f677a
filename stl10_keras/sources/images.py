"""Image files -> uint8 arrays: decode, convert channels, resize (Pillow).

One place for what every image source needs: which files are images, how
one is decoded into `(H, W, C)` uint8 with 1 or 3 channels, and how arrays
already in memory are brought to another size or channel count.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from stl10_keras.errors import DataUnavailableError
from stl10_keras.sources.base import Splits

# The formats `keras.utils.image_dataset_from_directory` reads, plus WebP.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
# Pillow modes that hold one gray channel (with or without alpha).
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def image_header(path: Path) -> tuple[tuple[int, int], int]:
    """`((H, W), channels)` of an image file, from its header (not decoded).

    Raises:
        DataUnavailableError: the file is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            channels = 1 if _is_gray(image) else 3
            # Checks the file's structure without decoding it all; the image
            # object is unusable afterwards.
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataUnavailableError(
            f"{path} is not a readable image ({_reason(e)}); replace or remove it."
        ) from None
    return (height, width), channels


def _is_gray(image) -> bool:
    """Gray modes, and palette images (GIF) whose palette holds only grays.

    WebP and JPEG files written from gray pixels may decode as RGB (WebP
    stores no gray): such images count as RGB, as Pillow reads them.
    """
    if image.mode in GRAY_MODES:
        return True
    if image.mode == "P" and image.palette is not None \
            and image.palette.mode == "RGB":
        palette = np.asarray(image.getpalette() or [], np.uint8).reshape(-1, 3)
        return bool(len(palette)) and bool(
            (palette == palette[:, :1]).all())
    return False


def decode_image(path: Path, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    """Decode an image file into `(H, W, channels)` uint8, resized to `size`.

    Gray images are repeated into 3 channels and colour images converted to
    luminance (ITU-R 601-2, Pillow's `L`) as `channels` asks; transparency
    is dropped; an animated GIF gives its first frame.

    Raises:
        DataUnavailableError: the file cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataUnavailableError(
            f"{path} cannot be decoded ({_reason(e)}); replace or remove it."
        ) from None
    return array.reshape(array.shape[0], array.shape[1], channels)


def _reason(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def conform(images: np.ndarray, size: tuple[int, int] | None,
            channels: int | None) -> np.ndarray:
    """uint8 NHWC images at `size` (H, W) with `channels` (1 or 3); None keeps it.

    Channels: gray is repeated into RGB; RGB becomes luminance with Pillow's
    weights (`L = R * 299/1000 + G * 587/1000 + B * 114/1000`).
    """
    from PIL import Image

    if channels is not None and images.shape[-1] != channels:
        if channels == 3:
            images = np.repeat(images, 3, axis=-1)
        else:
            weights = np.array([299, 587, 114], np.float32) / 1000.0
            images = np.clip(np.rint(images.astype(np.float32) @ weights), 0, 255)
            images = images.astype(np.uint8)[..., None]
    if size is None or tuple(images.shape[1:3]) == tuple(size):
        return images
    c = images.shape[-1]
    out = np.empty((len(images), size[0], size[1], c), np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if c == 1 else image)
        resized = np.asarray(pil.resize((size[1], size[0]),
                                        Image.Resampling.BILINEAR))
        out[i] = resized.reshape(size[0], size[1], c)
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


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (sorted); any other file is an error.

    Hidden files (`.DS_Store`, `._x.jpg`) are not images and are passed over,
    as `keras.utils.image_dataset_from_directory` does.

    Raises:
        DataUnavailableError: a file that is not a JPEG, PNG, GIF, BMP or WebP.
    """
    files = []
    walk = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for root, dirs, names in walk:
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if name.startswith(".") or path.is_dir():
                continue
            if not is_image_file(path):
                raise DataUnavailableError(
                    f"{path} is not an image ({', '.join(IMAGE_EXTENSIONS)}); move it "
                    "out of the data folder."
                )
            files.append(path)
    return sorted(files)
