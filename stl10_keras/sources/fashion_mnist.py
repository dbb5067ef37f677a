"""Fashion-MNIST: the four official IDX files, or tensorflow-datasets.

Zalando's 70,000 28x28 grayscale product photos, 10 classes. The files are
looked for in `--data-dir`, else where Debian's `dataset-fashion-mnist`
package installs them, else tensorflow-datasets' `fashion_mnist` is used
(downloaded when allowed). The split follows STL-10's protocol: N labeled
images per class drawn from the 60,000 training images by the seed (500 by
default, as STL-10 has), the rest of the training images with their labels
dropped are the unlabeled stream, the 10,000 test images are the test split.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stl10_keras.errors import DataUnavailableError
from stl10_keras.sources.base import (
    Source, Splits, array_batches, finish_splits, register, tfds_arrays)

if TYPE_CHECKING:
    from stl10_keras.config import DataConfig

NAME = "fashion_mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
               "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Where Debian's dataset-fashion-mnist package puts the four files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_LABELED_PER_CLASS = 500  # STL-10's 500 labeled images per class
TFDS_HOST = "storage.googleapis.com"
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes into a uint8 array.

    The format: a big-endian int32 magic number `0x0000 08 D` (type 8 is
    unsigned byte, D the number of dimensions), D big-endian int32 sizes,
    then the data in C order.

    Args:
        path: the file (`.gz` is decompressed).
        magic: the expected magic number (2051 images, 2049 labels).

    Returns:
        A uint8 array of the file's shape.

    Raises:
        DataUnavailableError: not such an IDX file, or truncated.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataUnavailableError(
            f"Cannot read {path} ({e}); download the Fashion-MNIST files again."
        ) from None
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise DataUnavailableError(
            f"{path} is not an IDX file of magic number {magic} (found {found}); "
            "download the Fashion-MNIST files again."
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataUnavailableError(f"{path} is truncated; download it again.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise DataUnavailableError(
            f"{path} holds {len(raw) - header} bytes of data where its header "
            f"promises {size} ({'x'.join(map(str, shape))}); download it again."
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def find_files(folder: str | os.PathLike) -> dict[str, Path] | None:
    """The four files in `folder` (`.gz` or uncompressed); None if one is missing."""
    folder = Path(folder).expanduser()
    found = {}
    for key, name in FILES.items():
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def read_files(files: dict[str, Path]) -> tuple[np.ndarray, ...]:
    """`(x_train, y_train, x_test, y_test)`: NHWC uint8 images, int32 labels."""
    x = read_idx(files["train_images"], IDX_IMAGES_MAGIC)
    y = read_idx(files["train_labels"], IDX_LABELS_MAGIC)
    x_test = read_idx(files["test_images"], IDX_IMAGES_MAGIC)
    y_test = read_idx(files["test_labels"], IDX_LABELS_MAGIC)
    for images, labels, what in ((x, y, "train"), (x_test, y_test, "test")):
        if len(images) != len(labels):
            raise DataUnavailableError(
                f"The {what} files hold {len(images)} images but {len(labels)} "
                "labels; download the Fashion-MNIST files again."
            )
        if labels.size and labels.max() >= len(CLASS_NAMES):
            raise DataUnavailableError(
                f"The {what} labels go up to {labels.max()}, Fashion-MNIST has "
                f"{len(CLASS_NAMES)} classes; download the files again."
            )
    return (x[..., None], y.astype(np.int32), x_test[..., None],
            y_test.astype(np.int32))


def missing_message(data_dir: str | None) -> str:
    where = data_dir or "DIR"
    names = ", ".join(f"{n}.gz" for n in FILES.values())
    return (
        f"Fashion-MNIST is not on disk and cannot be downloaded: place {names} in "
        f"{where} and pass --data-dir {where}, or install Debian's {DEBIAN_PACKAGE} "
        f"package (apt-get install {DEBIAN_PACKAGE}), or run offline on the bundled "
        "data with --dataset digits."
    )


def load_arrays(data_dir: str | None, download: bool) -> tuple[tuple, str]:
    """The four arrays and where they came from.

    `--data-dir` with the four files, else (no `--data-dir`) the Debian
    package's folder, else tensorflow-datasets (a prepared copy in
    `data_dir`, or a download when allowed and the host answers).
    """
    if data_dir is not None:
        files = find_files(data_dir)
        if files is not None:
            return read_files(files), f"Fashion-MNIST IDX files in {data_dir}"
    elif find_files(DEBIAN_DIR) is not None:
        return (read_files(find_files(DEBIAN_DIR)),
                f"Fashion-MNIST IDX files in {DEBIAN_DIR} (Debian {DEBIAN_PACKAGE})")
    return _load_tfds(data_dir, download), "tensorflow-datasets fashion_mnist"


def _load_tfds(data_dir: str | None, download: bool) -> tuple:
    arrays = tfds_arrays(NAME, "Fashion-MNIST", data_dir, download, TFDS_HOST,
                         missing_message(data_dir), batch=4096)
    return (*arrays["train"], *arrays["test"])


def draw_labeled(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of `per_class` images of each class, drawn by `seed`.

    Raises:
        DataUnavailableError: a class has fewer than `per_class` images.
    """
    rng = np.random.default_rng([seed, 17])  # not the validation split's stream
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise DataUnavailableError(
                f"Class {c} has {len(idx)} training images, fewer than "
                f"--labeled-per-class {per_class}; lower it."
            )
        chosen.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(chosen))


def val_per_class_for(labeled_per_class: int | None) -> int:
    """A fifth of the labeled images per class (STL-10's 100 of 500), at least 1."""
    return max(1, (labeled_per_class or DEFAULT_LABELED_PER_CLASS) // 5)


def load(data_dir: str | None, labeled_per_class: int | None,
         val_per_class: int | None, seed: int, download: bool) -> Splits:
    """Fashion-MNIST's splits under STL-10's protocol (see the module docstring).

    Args:
        data_dir: folder of the four IDX files (or a tensorflow-datasets dir).
        labeled_per_class: labeled training images per class (None: 500).
        val_per_class: of those, held out for validation (None: a fifth).
        seed: draws the labeled images and the validation split.
        download: allow tensorflow-datasets to download.
    """
    (x, y, x_test, y_test), source = load_arrays(data_dir, download)
    per_class = labeled_per_class or DEFAULT_LABELED_PER_CLASS
    labeled = draw_labeled(y, per_class, seed)
    rest = np.setdiff1d(np.arange(len(y)), labeled)
    x_unlabeled = x[rest]
    splits = finish_splits(
        NAME, CLASS_NAMES, x[labeled], y[labeled], x_test, y_test,
        array_batches(x_unlabeled), len(x_unlabeled), source,
        val_per_class if val_per_class is not None else val_per_class_for(per_class),
        seed,
    )
    # Known to the experimenter only: FixMatch reports its pseudo-labels' accuracy.
    splits.unlabeled_labels = y[rest].astype(np.int32)
    return splits


@register
class FashionMNIST(Source):
    """Fashion-MNIST under STL-10's protocol: N labeled images per class drawn by
    the seed, the rest of its training images unlabeled."""

    name = NAME
    help = ("Zalando's Fashion-MNIST (its four IDX files in --data-dir or "
            f"{DEBIAN_DIR}, else tensorflow-datasets)")
    takes_labeled_per_class = True

    def load(self, data: DataConfig, seed: int) -> Splits:
        return load(data.data_dir, data.labeled_per_class, data.val_per_class, seed,
                    data.download)

    def source_files(self, data_dir: str | None) -> list[Path]:
        # Without --data-dir, Debian's folder is read when it holds the files.
        files = find_files(data_dir or DEBIAN_DIR)
        return sorted(files.values()) if files else []

    def default_val_per_class(self, labeled_per_class: int | None) -> int:
        return val_per_class_for(labeled_per_class)
