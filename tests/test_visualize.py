"""Figures: planted colours end up in the right half; the PNG holds the array."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from stl10_keras.visualize import save_augmentation_grid


def test_augmentation_grid_puts_originals_left_and_augmented_right(tmp_path):
    originals = np.zeros((40, 12, 12, 3), np.uint8)
    originals[..., 0] = 255  # pure red
    augmented = np.zeros((40, 12, 12, 3), np.float32)
    augmented[..., 2] = 255.0  # pure blue
    path = tmp_path / "figures" / "augmentation.png"
    image = save_augmentation_grid(originals, augmented, str(path))

    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    red = np.all(image == [255, 0, 0], axis=-1)
    blue = np.all(image == [0, 0, 255], axis=-1)
    half = image.shape[1] // 2
    assert red[:, :half].sum() > 0 and red[:, half:].sum() == 0
    assert blue[:, half:].sum() > 0 and blue[:, :half].sum() == 0
    # 36 images of 12x12 pixels each side, drawn at least at their own size.
    assert red.sum() >= 36 * 144 and blue.sum() >= 36 * 144

    written = matplotlib.image.imread(str(path))
    written = np.rint(written[..., :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(written, image)
    assert [p.name for p in path.parent.iterdir()] == ["augmentation.png"]


def test_augmentation_grid_rejects_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match="same shape"):
        save_augmentation_grid(
            np.zeros((4, 8, 8, 3)), np.zeros((4, 8, 9, 3)), str(tmp_path / "x.png")
        )


def test_the_augmentation_figure_shows_every_class_in_a_named_row(tmp_path):
    # A folder's training images come class by class: the figure showed 36
    # images of the first class, unnamed.
    from stl10_keras.visualize import augmentation_figure

    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]])
    labels = np.repeat(np.arange(4), [50, 30, 3, 40])
    images = colours[labels][:, None, None, :].repeat(20, 1).repeat(20, 2)
    images = images.astype(np.uint8)
    names = ["T-shirt", "big coat", "\u00f1and\u00fa", "bag"]

    def identity(x, training):
        return x

    rows = augmentation_figure(identity, images, tmp_path, labels, names)
    assert rows == names
    figure = matplotlib.image.imread(str(tmp_path / "figures" / "augmentation.png"))
    figure = np.rint(figure[..., :3] * 255).astype(int)
    half = figure.shape[1] // 2
    for colour in colours:  # every class, on both sides
        hits = np.all(figure == colour, axis=-1)
        assert hits[:, :half].sum() >= 9 * 32 * 32 and hits[:, half:].sum() > 0
    # The names are drawn left of the images: dark text pixels there.
    first = np.flatnonzero(np.any(np.all(figure == colours[0], -1), axis=0))[0]
    assert (figure[:, :first - 2].sum(-1) < 200).any()
    without = augmentation_figure(identity, images, tmp_path)  # the first 36
    assert without == []
