"""TensorBoard's projector for per-layer features: checkpoint, metadata, sprite.

`embed` computes the features; this module lays them out as the projector
plugin reads them (`RUN/logs/projector/`), with a sprite of thumbnails that
fits the browser's texture limit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from stl10_keras.errors import EmbedError
from stl10_keras.io_utils import atomic_directory, import_tensorflow

# The projector refuses sprites larger than this on either side (WebGL textures).
SPRITE_MAX_SIDE = 8192
PROJECTOR_DIR = "projector"
CHECKPOINT_PREFIX = "embedding.ckpt"
METADATA_FILE = "metadata.tsv"
SPRITE_FILE = "sprite.png"


@dataclass(frozen=True)
class SpriteLayout:
    """A square grid of thumbnails, `per_row` x `per_row`, row-major."""

    per_row: int
    thumb_height: int
    thumb_width: int

    @property
    def height(self) -> int:
        return self.per_row * self.thumb_height

    @property
    def width(self) -> int:
        return self.per_row * self.thumb_width


def sprite_layout(
    num_points: int, image_height: int, image_width: int,
    max_side: int = SPRITE_MAX_SIDE,
) -> SpriteLayout:
    """Lay `num_points` thumbnails out in a square sprite no wider than `max_side`.

    Thumbnails keep the images' size when they fit and are shrunk (aspect
    kept) when `ceil(sqrt(num_points))` of them would not.

    Args:
        num_points: thumbnails in the sprite.
        image_height, image_width: the images' size.
        max_side: the largest sprite side the projector accepts.

    Returns:
        A `SpriteLayout`.

    Raises:
        EmbedError: not even one-pixel thumbnails would fit.
    """
    if num_points < 1 or image_height < 1 or image_width < 1:
        raise ValueError("sprite_layout needs at least one point of at least 1x1.")
    per_row = math.isqrt(num_points - 1) + 1  # ceil(sqrt(n)), exact for big n
    cell = max_side // per_row
    if cell < 1:
        raise EmbedError(
            f"{num_points} thumbnails do not fit a {max_side}x{max_side} sprite even "
            f"at one pixel each; lower --max-points to at most {max_side ** 2}."
        )
    longest = max(image_height, image_width)
    if longest <= cell:
        return SpriteLayout(per_row, image_height, image_width)
    return SpriteLayout(per_row, max(1, image_height * cell // longest),
                        max(1, image_width * cell // longest))


def make_sprite(images: np.ndarray, layout: SpriteLayout) -> np.ndarray:
    """Tile `(N, H, W, C)` uint8 images into the sprite `layout` describes.

    Returns:
        `(layout.height, layout.width, 3)` uint8 RGB, unused cells black.
    """
    from PIL import Image

    n, h, w = images.shape[:3]
    th, tw = layout.thumb_height, layout.thumb_width
    sprite = np.zeros((layout.height, layout.width, 3), np.uint8)
    for i in range(n):
        image = images[i]
        if image.ndim == 2 or image.shape[-1] == 1:
            image = np.repeat(image.reshape(h, w, 1), 3, axis=-1)
        if (th, tw) != (h, w):
            image = np.asarray(Image.fromarray(image).resize((tw, th), Image.BOX))
        r, c = divmod(i, layout.per_row)
        sprite[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = image
    return sprite


def write_projector(
    log_dir: str | os.PathLike,
    features: dict[str, np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str],
    images: np.ndarray,
    summary: str,
) -> Path:
    """Write a TensorBoard projector for `features` into `log_dir/projector/`.

    One `tf.Variable` per layer is saved with `tf.train.Checkpoint`; every
    embedding shares `metadata.tsv` (header `label\\tclass`) and the sprite of
    thumbnails. An event file with `summary` (text) makes the folder a run
    TensorBoard lists, which is how the projector plugin finds it. The folder
    is built aside and swapped in, so a reader never sees half of it.

    Args:
        log_dir: the run's TensorBoard folder (`RUN/logs`).
        features: `{layer: (N, D) float32}`.
        labels: `(N,)` integer labels.
        class_names: names by label.
        images: `(N, H, W, C)` uint8 images for the sprite.
        summary: markdown shown in TensorBoard's Text tab.

    Returns:
        The projector folder.
    """
    tf = import_tensorflow()  # before tensorboard, which may import it
    from tensorboard.plugins import projector

    from stl10_keras.visualize import save_png

    final = Path(log_dir) / PROJECTOR_DIR
    with atomic_directory(final) as tmp:
        variables = {name: tf.Variable(value, trainable=False, name=name)
                     for name, value in features.items()}
        tf.train.Checkpoint(**variables).save(str(tmp / CHECKPOINT_PREFIX))

        rows = "".join(f"{int(y)}\t{class_names[int(y)]}\n" for y in labels)
        (tmp / METADATA_FILE).write_text("label\tclass\n" + rows)

        layout = sprite_layout(len(images), images.shape[1], images.shape[2])
        save_png(make_sprite(images, layout), str(tmp / SPRITE_FILE))

        config = projector.ProjectorConfig()
        for name in features:
            embedding = config.embeddings.add()
            embedding.tensor_name = f"{name}/.ATTRIBUTES/VARIABLE_VALUE"
            embedding.metadata_path = METADATA_FILE
            embedding.sprite.image_path = SPRITE_FILE
            embedding.sprite.single_image_dim.extend([layout.thumb_width,
                                                      layout.thumb_height])
        projector.visualize_embeddings(str(tmp), config)

        writer = tf.summary.create_file_writer(str(tmp))
        with writer.as_default():
            tf.summary.text("embeddings", summary, step=0)
        writer.close()
    return final
