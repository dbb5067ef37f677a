"""scikit-learn's 1,797 8x8 digits, upsampled to 32x32x3: bundled, offline.

A fixed partition per class into labeled (60), test (30) and unlabeled (the
rest, 897 in all), like STL-10's fixed splits; only the labeled set's
train/validation split follows the seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stl10_keras.errors import ConfigError
from stl10_keras.sources.base import (
    Source, Splits, array_batches, finish_splits, register)

if TYPE_CHECKING:
    from stl10_keras.config import Config, DataConfig

NAME = "digits"
CLASS_NAMES = tuple(str(i) for i in range(10))
SIZE = 32
TEST_PER_CLASS = 30
LABELED_PER_CLASS = 60
VAL_PER_CLASS = 20  # of each class's 60 labeled images


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as 32x32x3 uint8 images, and labels."""
    from scipy import ndimage
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = bunch.images.astype(np.float32) * (255.0 / 16.0)  # 0..16 -> 0..255
    factor = SIZE / small.shape[1]
    big = ndimage.zoom(small, (1, factor, factor), order=1)
    big = np.clip(np.rint(big), 0, 255).astype(np.uint8)
    return np.repeat(big[..., None], 3, axis=-1), bunch.target.astype(np.int32)


def load(val_per_class: int, seed: int) -> Splits:
    """The digits' splits; `seed` draws the train/validation split."""
    images, labels = digits_images()
    rng = np.random.default_rng(1234)  # fixed, like STL-10's fixed splits
    test, labeled, unlabeled = [], [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:TEST_PER_CLASS])
        labeled.append(idx[TEST_PER_CLASS:TEST_PER_CLASS + LABELED_PER_CLASS])
        unlabeled.append(idx[TEST_PER_CLASS + LABELED_PER_CLASS:])
    test, labeled, unlabeled = (np.sort(np.concatenate(p)) for p in (test, labeled,
                                                                     unlabeled))
    x_unlabeled = images[unlabeled]
    splits = finish_splits(
        NAME, CLASS_NAMES, images[labeled], labels[labeled], images[test],
        labels[test], array_batches(x_unlabeled), len(x_unlabeled),
        "scikit-learn digits (8x8 upsampled to 32x32x3)", val_per_class, seed,
    )
    # Known to the experimenter only: FixMatch reports its pseudo-labels' accuracy.
    splits.unlabeled_labels = labels[unlabeled].astype(np.int32)
    return splits


@register
class Digits(Source):
    """scikit-learn's digits: bundled, offline, seconds to train on a CPU."""

    name = NAME
    help = "scikit-learn's 8x8 digits as 32x32x3, bundled, offline"

    def load(self, data: DataConfig, seed: int) -> Splits:
        return load(data.val_per_class, seed)

    def source_files(self, data_dir: str | None) -> list[Path]:
        return []  # bundled with scikit-learn: nothing of the user's to fingerprint

    def default_val_per_class(self, labeled_per_class: int | None) -> int:
        return VAL_PER_CLASS

    def apply_preset(self, config: Config) -> None:
        # 1,797 small images: a smaller k-means sample, fewer epochs. Digits
        # are not mirror-symmetric (a flipped 2 is no 2): no flips.
        config.kmeans.num_images = 800  # of its 897 unlabeled images
        config.train.epochs = 15
        config.augment.flip = False

    def check_flags(self, config: Config, data_dir_given: bool) -> None:
        if data_dir_given:
            # An error, not a warning: the value would be recorded in
            # config.json, where it changes nothing but makes the run's config
            # differ.
            raise ConfigError("--data-dir is not used by --dataset digits (bundled "
                              "with scikit-learn); drop it.")
