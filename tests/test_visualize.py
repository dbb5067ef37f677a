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
