"""Figures as PNG files (matplotlib, Agg) and as RGB arrays for TensorBoard.

Every `save_*` function writes its PNG atomically (a temporary file in the
same folder, then `os.replace`), so a reader never sees half a file, and
returns the same picture as an `(H, W, 3)` uint8 array.
"""

from __future__ import annotations

import os
import tempfile

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


# ---------------------------------------------------------------------------
# k-means centroids and first-layer filters (figures 1 and 2 of the lab)
# ---------------------------------------------------------------------------


def save_centroid_grid(
    centroids: np.ndarray,
    patch_size: int,
    channels: int,
    path: str,
    title: str | None = None,
) -> np.ndarray:
    """Draw k-means centroids as a grid of small images (the lab's figure 1).

    Each centroid is reshaped to `(k, k, C)` (the flattening order of
    `stl10_keras.kmeans`) and rescaled on its own to [0, 1], so its pattern
    shows whatever its scale.

    Args:
        centroids: `(K, k * k * C)` centroids, e.g. `kmeans_init(...)
            ["centroids"]["stage1_conv"]`.
        patch_size: `k`.
        channels: `C`, 1 (grey) or 3 (RGB).
        path: the PNG to write (folders are created).
        title: figure title; None: "k-means centroids of KxK patches (K=...)".

    Returns:
        The figure as an `(H, W, 3)` uint8 array.
    """
    c = np.asarray(centroids, np.float64)
    if c.ndim != 2 or c.shape[1] != patch_size * patch_size * channels:
        raise ValueError(
            f"centroids must be (K, {patch_size * patch_size * channels}) for "
            f"{patch_size}x{patch_size}x{channels} patches, got {c.shape}."
        )
    tiles = c.reshape(-1, patch_size, patch_size, channels)
    if title is None:
        title = (f"k-means centroids of {patch_size}x{patch_size} patches "
                 f"(K={len(tiles)})")
    return _kmeans_save_tiles(tiles, title, path)


def save_filter_grid(
    kernel: np.ndarray, path: str, title: str | None = None
) -> np.ndarray:
    """Draw a conv layer's filters as a grid of small images (the lab's figure 2).

    Args:
        kernel: `(k, k, C, K)` kernel (Keras layout), e.g.
            `model.get_layer("stage1_conv").kernel`; `C` must be 1 or 3.
        path: the PNG to write (folders are created).
        title: figure title; None: "first-layer filters (KxK, K=...)".

    Returns:
        The figure as an `(H, W, 3)` uint8 array.
    """
    w = np.asarray(kernel, np.float64)
    if w.ndim != 4:
        raise ValueError(f"kernel must be (k, k, C, K), got shape {w.shape}.")
    tiles = np.moveaxis(w, -1, 0)
    if title is None:
        title = f"first-layer filters ({w.shape[0]}x{w.shape[1]}, K={w.shape[3]})"
    return _kmeans_save_tiles(tiles, title, path)


def _kmeans_save_tiles(tiles: np.ndarray, title: str, path: str) -> np.ndarray:
    mosaic = _kmeans_mosaic(tiles)
    height, width = mosaic.shape[:2]
    # About 0.35 inch per tile: 3x3 and 7x7 tiles both stay readable.
    tile_inches = 0.35 * (tiles.shape[1] + 1) / max(tiles.shape[1], 3)
    cols = (width - 1) // (tiles.shape[2] + 1)
    rows = (height - 1) // (tiles.shape[1] + 1)
    fig = Figure(figsize=(max(cols * tile_inches, 3.0), rows * tile_inches + 0.5),
                 dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.96 - 0.4 / fig.get_figheight()))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    _kmeans_write_png(rgb, path)
    return rgb


def _kmeans_mosaic(tiles: np.ndarray) -> np.ndarray:
    """`(K, k, k, C)` -> one RGB image in [0, 1], tiles separated by grey lines."""
    n, kh, kw, ch = tiles.shape
    if ch not in (1, 3):
        raise ValueError(
            f"Only 1- or 3-channel patches can be drawn, got {ch} channels "
            "(draw stage 1's centroids or filters)."
        )
    lo = tiles.min(axis=(1, 2, 3), keepdims=True)
    span = tiles.max(axis=(1, 2, 3), keepdims=True) - lo
    # A constant tile has no pattern to stretch: show it mid-grey.
    scaled = np.where(span > 0, (tiles - lo) / np.where(span > 0, span, 1.0), 0.5)
    if ch == 1:
        scaled = np.repeat(scaled, 3, axis=-1)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    mosaic = np.full((rows * (kh + 1) + 1, cols * (kw + 1) + 1, 3), 0.75)
    for i in range(n):
        r, c = divmod(i, cols)
        mosaic[1 + r * (kh + 1):1 + r * (kh + 1) + kh,
               1 + c * (kw + 1):1 + c * (kw + 1) + kw] = scaled[i]
    return mosaic


def _kmeans_write_png(rgb: np.ndarray, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        matplotlib.image.imsave(tmp, rgb, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
