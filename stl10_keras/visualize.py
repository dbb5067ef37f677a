"""Figures of the lab as PNG files (matplotlib, Agg backend, no display needed).

Each figure function writes its PNG atomically and returns the rendered image
as an RGB uint8 array, so the caller can also log it to TensorBoard.
"""

from __future__ import annotations

import math
import os
import tempfile

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a matplotlib figure to pixels.

    Args:
        fig: a `matplotlib.figure.Figure` (given an Agg canvas if it has none).

    Returns:
        The figure as an `(H, W, 3)` uint8 RGB array.
    """
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(image: np.ndarray, path: str) -> None:
    """Write an RGB uint8 array to `path` as PNG, atomically.

    A temporary file in the same folder is renamed over `path`, so a reader
    (TensorBoard, a browser) never sees a half-written figure.

    Args:
        image: `(H, W, 3)` uint8 RGB pixels.
        path: the PNG file to write; its folder is created if missing.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            matplotlib.image.imsave(f, image, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _mosaic(images: np.ndarray, rows: int, cols: int, gap: int = 2) -> np.ndarray:
    """Tile `(N, H, W, C)` uint8 images into one `rows x cols` image, white gaps."""
    n, h, w, c = images.shape
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = r * (h + gap), k * (w + gap)
        out[top: top + h, left: left + w] = images[i]
    return out


def _as_uint8_images(images: np.ndarray, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{name} must be (N, H, W, 1 or 3) images in 0..255; got shape "
            f"{images.shape}."
        )
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def save_augmentation_grid(
    originals: np.ndarray, augmented: np.ndarray, path: str, n: int = 36
) -> np.ndarray:
    """The lab's Figure 3: images before and after augmentation, side by side.

    The first `n` originals are tiled on the left (6 x 6 for `n=36`) and the
    same images augmented on the right, in the same grid positions.

    Args:
        originals: `(N, H, W, C)` images in 0..255 (`C` is 1 or 3), float or
            uint8.
        augmented: the same images after augmentation, same shape.
        path: PNG file to write.
        n: how many images to show (at most N).

    Returns:
        The figure as an `(H, W, 3)` uint8 RGB array (what the PNG holds).
    """
    originals = _as_uint8_images(originals, "originals")
    augmented = _as_uint8_images(augmented, "augmented")
    if originals.shape != augmented.shape:
        raise ValueError(
            f"originals {originals.shape} and augmented {augmented.shape} must have "
            "the same shape: pass each image and its augmented copy."
        )
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    n = min(n, len(originals))
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    left = _mosaic(originals[:n], rows, cols)
    right = _mosaic(augmented[:n], rows, cols)

    height, width = left.shape[:2]
    # Draw each mosaic at one figure pixel per image pixel (no resampling
    # blur), with a margin, a gap between the halves and room for titles.
    dpi, margin, title = 100, 12, 28
    fig_w = 2 * width + 3 * margin
    fig_h = height + 2 * margin + title
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    gray = left.shape[-1] == 1
    for k, (mosaic, name) in enumerate(((left, "original"), (right, "augmented"))):
        x0 = margin + k * (width + margin)
        ax = fig.add_axes(
            (x0 / fig_w, margin / fig_h, width / fig_w, height / fig_h)
        )
        ax.imshow(
            mosaic[..., 0] if gray else mosaic,
            cmap="gray" if gray else None,
            vmin=0,
            vmax=255,
            interpolation="nearest",
        )
        ax.set_title(name, fontsize=11)
        ax.set_axis_off()
    image = figure_to_array(fig)
    save_png(image, path)
    return image
