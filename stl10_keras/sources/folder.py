"""Your own images, in the layout `keras.utils.image_dataset_from_directory` reads.

    DIR/train/CLASS/*.jpg|png|gif|bmp|webp   labeled images; class names are the
                                             folder names, sorted
    DIR/test/CLASS/*                         optional; else a fifth of each class
                                             of train (at least 1) is held out
                                             as test, the same for every seed
    DIR/unlabeled/**                         optional, any depth, streamed; else
                                             k-means reads the training images

Validation is held out of train by the seed, a fifth of the smallest class
by default (`--val-per-class`). Every file is checked before training: an
unreadable image, a class folder with fewer than 2 images, fewer than 2
classes, images of different sizes without `--image-size`, an empty
`unlabeled/`, each stops the load with one sentence naming the file and the
fix. Nothing is skipped but hidden files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from stl10_keras.errors import ConfigError, DataUnavailableError
from stl10_keras.sources.base import Source, Splits, finish_splits, register
from stl10_keras.sources.images import decode_image, image_header, list_images

if TYPE_CHECKING:
    from stl10_keras.config import Config, DataConfig

NAME = "folder"
TEST_FRACTION = 5  # without test/: 1/5 of each class (at least 1) is the test split
TEST_SEED = 1234  # fixed, like STL-10's fixed test split
MIN_PER_CLASS = 2
SPLITS = ("train", "test", "unlabeled")  # the sub-folders `load` reads
NEEDS_DATA_DIR = ("--dataset folder needs --data-dir DIR, the folder holding "
                  "train/CLASS/* (and optionally test/ and unlabeled/).")


def class_folder_names(data_dir: str | None) -> tuple[str, ...]:
    """The class names `load` will find in `data_dir/train/` (sorted), without
    reading any image; () when there is no such folder."""
    train_dir = Path(data_dir or "").expanduser() / "train"
    if not data_dir or not train_dir.is_dir():
        return ()
    return tuple(sorted(e.name for e in train_dir.iterdir()
                        if e.is_dir() and not e.name.startswith(".")))


def scan_classes(split_dir: Path) -> dict[str, list[Path]]:
    """`{class name: image files}` of `split_dir/CLASS/*`, classes sorted.

    Raises:
        DataUnavailableError: a loose file in `split_dir`, or a class folder
            with fewer than 2 images.
    """
    classes = {}
    for entry in sorted(split_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise DataUnavailableError(
                f"{entry} lies directly in {split_dir}; put each image into a folder "
                f"named after its class ({split_dir}/CLASS/{entry.name})."
            )
        files = list_images(entry)
        if len(files) < MIN_PER_CLASS:
            raise DataUnavailableError(
                f"Class folder {entry} holds {len(files)} image(s); each class needs "
                f"at least {MIN_PER_CLASS}: add images or remove the folder."
            )
        classes[entry.name] = files
    return classes


def _shape_of(files: list[Path], size: tuple[int, int] | None,
              channels: int | None) -> tuple[tuple[int, int], int]:
    """The `(H, W)` and channel count all images get; checks every header."""
    from tqdm import tqdm

    sizes: dict[tuple[int, int], Path] = {}
    gray = True
    for path in tqdm(files, desc="Checking images", unit="img", leave=False,
                     disable=len(files) < 2000):
        hw, c = image_header(path)
        sizes.setdefault(hw, path)
        gray = gray and c == 1
    if size is None and len(sizes) > 1:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        raise DataUnavailableError(
            f"The images differ in size ({pa} is {a[0]}x{a[1]}, {pb} is "
            f"{b[0]}x{b[1]}); pass --image-size H,W to resize them all."
        )
    return (size or next(iter(sizes))), (channels or (1 if gray else 3))


def _decode_all(files: list[Path], size, channels, what: str) -> np.ndarray:
    from tqdm import tqdm

    out = np.empty((len(files), size[0], size[1], channels), np.uint8)
    for i, path in enumerate(tqdm(files, desc=f"Reading {what}", unit="img",
                                  leave=False, disable=len(files) < 2000)):
        out[i] = decode_image(path, size, channels)
    return out


def load(data_dir: str | None, val_per_class: int | None, seed: int,
         image_size: tuple[int, int] | None = None,
         channels: int | None = None) -> Splits:
    """An image folder's splits (see the module docstring).

    Args:
        data_dir: the folder holding `train/`.
        val_per_class: validation images per class (None: a fifth of the
            smallest class, at least 1).
        seed: the train/validation split's seed.
        image_size: `(H, W)` to resize to; needed when the images differ in size.
        channels: 1 or 3; None: 1 if every image is grayscale, else 3.

    Raises:
        DataUnavailableError: the folder or one of its files is unusable; the
            message names it and the fix.
    """
    if not data_dir:
        raise DataUnavailableError(NEEDS_DATA_DIR)
    root = Path(data_dir).expanduser()
    train_dir, test_dir, unlabeled_dir = (root / "train", root / "test",
                                          root / "unlabeled")
    if not train_dir.is_dir():
        raise DataUnavailableError(
            f"{train_dir} is missing; --data-dir must hold train/CLASS/* (one folder "
            "of images per class).")
    train = scan_classes(train_dir)
    if len(train) < 2:
        raise DataUnavailableError(
            f"{train_dir} holds {len(train)} class folder(s); a classifier needs at "
            "least 2 (train/CLASS_A/*, train/CLASS_B/*).")
    class_names = tuple(train)
    test = scan_classes(test_dir) if test_dir.is_dir() else None
    if test is not None:
        unknown = sorted(set(test) - set(class_names))
        if unknown:
            raise DataUnavailableError(
                f"{test_dir} has class folder(s) {unknown} that train/ lacks; rename "
                f"them to one of {list(class_names)} or remove them.")
    unlabeled = _unlabeled_files(unlabeled_dir)

    x_files, y = _flatten(train, class_names)
    if test is not None:
        t_files, y_test = _flatten(test, class_names)
        held_out = "test/"
    else:
        x_files, y, t_files, y_test = _hold_out_test(x_files, y, class_names,
                                                     train_dir)
        held_out = f"1/{TEST_FRACTION} of each class of train/ (fixed)"
    size, c = _shape_of(x_files + t_files + (unlabeled or []), image_size, channels)
    if val_per_class is None:
        val_per_class = max(1, int(np.bincount(y).min()) // 5)
    x = _decode_all(x_files, size, c, "train/")
    x_test = _decode_all(t_files, size, c, "test/")

    def unlabeled_batches(batch_size: int) -> Iterator[np.ndarray]:
        if unlabeled is None:  # the training images, labels dropped
            for i in range(0, len(x), batch_size):
                yield x[i:i + batch_size]
            return
        for i in range(0, len(unlabeled), batch_size):
            yield np.stack([decode_image(p, size, c)
                            for p in unlabeled[i:i + batch_size]])

    unlabeled_text = (f"{len(unlabeled)} images in unlabeled/" if unlabeled is not None
                      else "no unlabeled/: k-means reads the labeled images")
    source = (f"image folder {root} ({len(class_names)} classes; test: {held_out}; "
              f"{unlabeled_text})")
    try:
        return finish_splits(NAME, class_names, x, y, x_test, y_test,
                             unlabeled_batches,
                             len(unlabeled) if unlabeled is not None else len(x),
                             source, val_per_class, seed)
    except DataUnavailableError as e:
        raise DataUnavailableError(f"{train_dir}: {e}") from None


def _unlabeled_files(unlabeled_dir: Path) -> list[Path] | None:
    if not unlabeled_dir.is_dir():
        return None
    files = list_images(unlabeled_dir, recursive=True)
    if not files:
        raise DataUnavailableError(
            f"{unlabeled_dir} holds no images; add some or remove the folder.")
    return files


def _flatten(classes: dict[str, list[Path]],
             class_names: tuple[str, ...]) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for name, paths in classes.items():
        files += paths
        labels += [class_names.index(name)] * len(paths)
    return files, np.asarray(labels, np.int32)


def _hold_out_test(files, labels, class_names, train_dir):
    """A fixed fifth of each class (at least 1) as the test split."""
    rng = np.random.default_rng(TEST_SEED)
    test = []
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 3:
            raise DataUnavailableError(
                f"Class folder {train_dir / name} holds {len(idx)} images: without a "
                "test/ folder a class needs at least 3 (test, validation, training); "
                "add images or a test/ folder.")
        test.append(rng.permutation(idx)[:max(1, len(idx) // TEST_FRACTION)])
    test = np.sort(np.concatenate(test))
    keep = np.setdiff1d(np.arange(len(labels)), test)
    return ([files[i] for i in keep], labels[keep], [files[i] for i in test],
            labels[test])


@register
class ImageFolder(Source):
    """Your own images: `DIR/train/CLASS/*`, optional `test/` and `unlabeled/`."""

    name = NAME
    help = "your images in --data-dir (train/CLASS/*, optional test/, unlabeled/)"

    def load(self, data: DataConfig, seed: int) -> Splits:
        return load(data.data_dir, data.val_per_class, seed, data.image_size,
                    data.channels)

    def source_files(self, data_dir: str | None) -> list[Path]:
        if not data_dir:
            return []
        root = Path(data_dir).expanduser()
        return sorted(p for sub in SPLITS for p in (root / sub).rglob("*")
                      if p.is_file())

    def default_val_per_class(self, labeled_per_class: int | None) -> None:
        return None  # a fifth of the smallest class: only the files can say

    def check_flags(self, config: Config, data_dir_given: bool) -> None:
        if not config.data.data_dir:
            raise ConfigError(NEEDS_DATA_DIR)

    def configure(self, config: Config) -> None:
        # The model's outputs are the folder's classes; fewer than 2 (or no
        # train/) is left to the data loader, which names the fix.
        names = class_folder_names(config.data.data_dir)
        if len(names) >= 2:
            config.model.num_classes = len(names)
