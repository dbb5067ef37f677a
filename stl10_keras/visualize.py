"""Figures of the lab as PNG files (matplotlib, Agg backend, no display needed).

Each figure function writes its PNG atomically and returns the rendered image
as an RGB uint8 array, so the caller can also log it to TensorBoard.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.image  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from stl10_keras.io_utils import atomic_output  # noqa: E402


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
    with atomic_output(path, suffix=".png") as tmp:
        matplotlib.image.imsave(tmp, image, format="png")


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
    originals: np.ndarray, augmented: np.ndarray, path: str, n: int = 36,
    row_labels: Sequence[str] | None = None,
) -> np.ndarray:
    """The lab's Figure 3: images before and after augmentation, side by side.

    The first `n` originals are tiled on the left (6 x 6 for `n=36`) and the
    same images augmented on the right, in the same grid positions. With
    `row_labels`, the images are that many rows of equal length, each row
    named on its left (one class a row), and small images are enlarged
    (nearest neighbour) so that the names fit.

    Args:
        originals: `(N, H, W, C)` images in 0..255 (`C` is 1 or 3), float or
            uint8.
        augmented: the same images after augmentation, same shape.
        path: PNG file to write.
        n: how many images to show (at most N; all of them with `row_labels`).
        row_labels: a name per row, or None.

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
    label_width = 0
    if row_labels:
        rows, n = len(row_labels), len(originals)
        cols = math.ceil(n / rows)
        # Enlarged to at least 32 pixels a tile, so each row holds its name.
        scale = max(1, math.ceil(32 / originals.shape[1]))
        originals, augmented = (np.repeat(np.repeat(a, scale, 1), scale, 2)
                                for a in (originals, augmented))
        label_width = 7 * max(len(str(name)) for name in row_labels) + 8
    else:
        n = min(n, len(originals))
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
    left = _mosaic(originals[:n], rows, cols)
    right = _mosaic(augmented[:n], rows, cols)

    height, width = left.shape[:2]
    # Draw each mosaic at one figure pixel per image pixel (no resampling
    # blur), with a margin, a gap between the halves and room for titles.
    dpi, margin, title = 100, 12, 28
    fig_w = 2 * width + 3 * margin + label_width
    fig_h = height + 2 * margin + title
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    gray = left.shape[-1] == 1
    if row_labels:
        tile = (height + 2) / rows  # a row and its gap, in figure pixels
        for r, name in enumerate(row_labels):
            y = margin + height - (r + 0.5) * tile + 1
            fig.text((margin + label_width - 6) / fig_w, y / fig_h, str(name),
                     ha="right", va="center", fontsize=9)
    for k, (mosaic, name) in enumerate(((left, "original"), (right, "augmented"))):
        x0 = margin + label_width + k * (width + margin)
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
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.96 - 0.4 / fig.get_figheight()))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    rgb = figure_to_array(fig)
    save_png(rgb, path)
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


# --- a training run's figures (PNG in RUN/figures/, also in TensorBoard) -------

def log_image(log_dir: Path, tag: str, image) -> None:
    """Write one RGB uint8 image to TensorBoard (Images tab); needs TensorFlow."""
    from stl10_keras import runtime

    if not runtime.tensorflow_available():
        return  # the PNG in figures/ is still written
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(log_dir / "images"))
    with writer.as_default():
        tf.summary.image(tag, image[None], step=0)
    writer.close()


def centroids_figure(result: dict, config, run_dir: Path) -> None:
    """Figure 1: the stage-1 k-means centroids as small images."""
    centroids = result["centroids"].get("stage1_conv")
    if centroids is None:
        return
    k = config.kmeans.patch_size
    image = save_centroid_grid(
        centroids, k, centroids.shape[1] // (k * k),
        str(run_dir / "figures" / f"kmeans_centroids_{k}x{k}.png"),
    )
    log_image(run_dir / "logs", f"figure1_kmeans_centroids_{k}x{k}", image)


def augmentation_figure(layer, images, run_dir: Path,
                        labels: np.ndarray | None = None,
                        class_names: Sequence[str] | None = None) -> list[str]:
    """Figure 3: originals beside their augmented versions.

    With `labels` and `class_names`, every class gets a row of its own
    images, named (a folder's training images come class by class, so the
    first 36 would all be of one class); otherwise the first 36 images.

    Returns:
        The row names (empty without labels).
    """
    rows: list[str] = []
    if labels is not None and class_names is not None:
        labels = np.asarray(labels)
        present = [c for c in range(len(class_names)) if (labels == c).any()]
        per_row = max(2, 36 // max(1, len(present)))
        picks = []
        for c in present:
            idx = np.flatnonzero(labels == c)
            picks.append(np.resize(idx, per_row))  # repeats a class's few images
            rows.append(str(class_names[c]))
        originals = images[np.concatenate(picks)]
    else:
        originals = images[:36]
    augmented = layer(originals.astype("float32"), training=True)
    augmented = np.clip(np.asarray(augmented), 0, 255).astype("uint8")
    image = save_augmentation_grid(originals, augmented,
                                   str(run_dir / "figures" / "augmentation.png"),
                                   n=len(originals), row_labels=rows or None)
    log_image(run_dir / "logs", "figure3_augmentation", image)
    return rows


def filters_figure(model, run_dir: Path) -> None:
    """Figure 2: the first layer's filters after training."""
    import keras

    kernel = keras.ops.convert_to_numpy(model.get_layer("stage1_conv").kernel)
    image = save_filter_grid(kernel, str(run_dir / "figures" / "filters_stage1.png"))
    log_image(run_dir / "logs", "figure2_filters_stage1", image)


# --- embeddings: t-SNE maps and kNN scores per layer (`embed`) ----------------

def _class_colors(num_classes: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(num_classes)]


def _scatter(ax, points, labels, colors, size):
    for c, color in enumerate(colors):
        mask = labels == c
        ax.scatter(points[mask, 0], points[mask, 1], s=size, color=color,
                   linewidths=0, alpha=0.85)
    ax.set_xticks([])
    ax.set_yticks([])


def _legend_handles(class_names, colors):
    from matplotlib.lines import Line2D

    return [Line2D([], [], marker="o", linestyle="", color=color, markersize=6,
                   label=name) for name, color in zip(class_names, colors)]


def _layer_title(row: dict) -> str:
    dims = f"{row['dims']} dims"
    if row["stored_dims"] != row["dims"]:
        dims += f" -> {row['stored_dims']}"
    return (f"{row['name']} ({dims})\nkNN {row['knn_accuracy']:.3f}, "
            f"on t-SNE {row['tsne_knn_accuracy']:.3f}")


def save_tsne_figure(points, labels, class_names, row, path) -> np.ndarray:
    """One layer's t-SNE map, coloured by class, with a legend of class names."""
    from matplotlib.figure import Figure

    colors = _class_colors(len(class_names))
    fig = Figure(figsize=(6.4, 5.2), dpi=100)
    ax = fig.add_axes((0.03, 0.03, 0.74, 0.86))
    _scatter(ax, points, labels, colors, size=10)
    ax.set_title(_layer_title(row), fontsize=10)
    ax.legend(handles=_legend_handles(class_names, colors), loc="center left",
              bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False, title="class")
    image = figure_to_array(fig)
    save_png(image, str(path))
    return image


def save_tsne_grid(maps, labels, class_names, rows, path, title) -> np.ndarray:
    """All layers' t-SNE maps side by side, one shared legend."""
    from matplotlib.figure import Figure

    colors = _class_colors(len(class_names))
    n = len(rows)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    spare = nrows * cols > n  # an empty panel holds the legend
    panel = 3.3
    extra = 0.0 if spare else 1.5
    fig = Figure(figsize=(cols * panel + extra, nrows * (panel + 0.4) + 0.4), dpi=100)
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, row in zip(axes.flat, rows):
        _scatter(ax, maps[row["name"]], labels, colors, size=4)
        ax.set_title(_layer_title(row), fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    fig.subplots_adjust(left=0.02, right=1 - (extra + 0.1) / fig.get_figwidth(),
                        top=1 - 0.75 / fig.get_figheight(), bottom=0.02,
                        wspace=0.08, hspace=0.3)
    handles = _legend_handles(class_names, colors)
    if spare:
        list(axes.flat)[n].legend(handles=handles, loc="center", fontsize=9,
                                  frameon=False, title="class",
                                  ncol=2 if len(class_names) > 10 else 1)
    else:
        fig.legend(handles=handles, loc="center right", fontsize=9, frameon=False,
                   title="class")
    fig.suptitle(title, fontsize=11)
    image = figure_to_array(fig)
    save_png(image, str(path))
    return image


def save_knn_chart(rows, num_classes, path, ylabel: str) -> np.ndarray:
    """Bar chart: kNN accuracy per layer, in the feature space and on the t-SNE map."""
    from matplotlib.figure import Figure

    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(4.5, 0.9 * len(rows) + 1.5), 3.8), dpi=100)
    ax = fig.add_subplot()
    feature = [r["knn_accuracy"] for r in rows]
    tsne = [r["tsne_knn_accuracy"] for r in rows]
    has_tsne = all(t is not None for t in tsne)
    width = 0.4 if has_tsne else 0.6
    bars = [ax.bar(x - (width / 2 if has_tsne else 0), feature, width,
                   label="feature space")]
    if has_tsne:
        bars.append(ax.bar(x + width / 2, tsne, width, label="2-D t-SNE"))
    for b in bars:  # differences of a few points are the story: print them
        ax.bar_label(b, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(1.0 / num_classes, color="grey", linestyle="--", linewidth=1,
               label="chance")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.18)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel(ylabel)
    ax.set_title("Class separation per layer", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=3, frameon=False)
    fig.tight_layout()
    image = figure_to_array(fig)
    save_png(image, str(path))
    return image
