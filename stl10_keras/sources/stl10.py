"""STL-10: the official binary files (`stl10_binary/`, or its tarball) or
tensorflow-datasets.

The labeled 5,000 and test 8,000 images are read into memory; the 100,000
unlabeled images are streamed (a memory map of `unlabeled_X.bin`, or tfds'
`unlabelled` split), never materialised.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from stl10_keras.errors import DataUnavailableError
from stl10_keras.sources.base import (
    Source, Splits, finish_splits, register, tfds_arrays)

if TYPE_CHECKING:
    from stl10_keras.config import DataConfig

NAME = "stl10"

CLASS_NAMES = (
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
)
SHAPE = (96, 96, 3)
URL_HOST = "ai.stanford.edu"
ARCHIVE = "stl10_binary.tar.gz"
FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")
VAL_PER_CLASS = 100  # of each class's 500: 4,000 train / 1,000 validation, as the lab


def load(data_dir: str | None, val_per_class: int, seed: int,
         download: bool) -> Splits:
    """STL-10's splits: the binary files in `data_dir` when there, else tfds."""
    folder = find_stl10_binary(data_dir) if data_dir else None
    if folder is not None:
        return _load_stl10_binary(folder, val_per_class, seed)
    return _load_stl10_tfds(data_dir, val_per_class, seed, download)


def find_stl10_binary(data_dir: str | os.PathLike) -> Path | None:
    """Locate (extracting if needed) an `stl10_binary` folder under `data_dir`.

    Accepts the folder itself, a folder holding `stl10_binary/`, a folder
    holding `stl10_binary.tar.gz`, or the path of the tarball. A tarball is
    extracted once next to itself, atomically (a temp folder renamed into
    place), so an interrupted extraction leaves nothing half-written.

    Returns:
        The folder with `train_X.bin` etc., or None when nothing is there.
    """
    path = Path(data_dir).expanduser()
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _extract_stl10(path, path.parent)
    if (path / "train_X.bin").exists():
        return path
    if (path / "stl10_binary" / "train_X.bin").exists():
        return path / "stl10_binary"
    if (path / ARCHIVE).exists():
        return _extract_stl10(path / ARCHIVE, path)
    return None


def _extract_stl10(archive: Path, dest: Path) -> Path:
    from tqdm import tqdm

    target = dest / "stl10_binary"
    if (target / "train_X.bin").exists():
        return target
    tmp = dest / ".stl10_binary.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            total = sum(m.size for m in members)
            with tqdm(total=total, unit="B", unit_scale=True,
                      desc=f"Extracting {archive.name}") as bar:
                for member in members:
                    name = Path(member.name).name
                    src = tar.extractfile(member)
                    with open(tmp / name, "wb") as out:
                        shutil.copyfileobj(src, out, length=1 << 22)
                    bar.update(member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # tarfile.open's ReadError lists every compression it tried, one per line.
        reason = ("not a readable tar archive"
                  if isinstance(e, tarfile.ReadError) and str(e).startswith("file could")
                  else " ".join(str(e).split()))
        raise DataUnavailableError(
            f"Could not extract {archive} ({reason}); download stl10_binary.tar.gz "
            "again."
        ) from None
    if not (tmp / "train_X.bin").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataUnavailableError(
            f"{archive} holds no train_X.bin; it is not the STL-10 binary archive."
        )
    os.replace(tmp, target)
    return target


def read_stl10_images(path: Path, shape=SHAPE) -> np.ndarray:
    """Read an STL-10 `*_X.bin` file into (N, H, W, C) uint8.

    The files store each image as 3 channel planes, each plane column-major,
    hence the transpose (N, C, W, H) -> (N, H, W, C).
    """
    raw = np.fromfile(path, dtype=np.uint8)
    per_image = int(np.prod(shape))
    if raw.size % per_image:
        raise DataUnavailableError(
            f"{path} is truncated ({raw.size} bytes is not a multiple of {per_image}); "
            "download the dataset again."
        )
    h, w, c = shape
    return np.ascontiguousarray(raw.reshape(-1, c, w, h).transpose(0, 3, 2, 1))


def read_stl10_labels(path: Path) -> np.ndarray:
    """Read an STL-10 `*_y.bin` file (labels 1..10) into 0-based int32."""
    return np.fromfile(path, dtype=np.uint8).astype(np.int32) - 1


def _load_stl10_binary(folder: Path, val_per_class: int, seed: int) -> Splits:
    missing = [f for f in FILES if not (folder / f).exists()]
    if missing:
        raise DataUnavailableError(
            f"{folder} lacks {', '.join(missing)}; download stl10_binary.tar.gz again."
        )
    x = read_stl10_images(folder / "train_X.bin")
    y = read_stl10_labels(folder / "train_y.bin")
    x_test = read_stl10_images(folder / "test_X.bin")
    y_test = read_stl10_labels(folder / "test_y.bin")
    if len(x) != len(y) or len(x_test) != len(y_test):
        raise DataUnavailableError(
            f"Image and label counts differ in {folder}; download the dataset again."
        )
    class_names = CLASS_NAMES
    names_file = folder / "class_names.txt"
    if names_file.exists():
        class_names = tuple(n.strip() for n in names_file.read_text().splitlines()
                            if n.strip())
    unlabeled_path = folder / "unlabeled_X.bin"
    per_image = int(np.prod(SHAPE))
    num_unlabeled = (unlabeled_path.stat().st_size // per_image
                     if unlabeled_path.exists() else 0)

    def unlabeled_batches(batch_size: int) -> Iterator[np.ndarray]:
        if not unlabeled_path.exists():
            raise DataUnavailableError(
                f"{unlabeled_path} is missing; the k-means variants need STL-10's "
                "unlabeled split (extract the full stl10_binary.tar.gz)."
            )
        h, w, c = SHAPE
        # A memory map: batches are read from disk as they are consumed.
        mm = np.memmap(unlabeled_path, dtype=np.uint8, mode="r").reshape(-1, c, w, h)
        for i in range(0, len(mm), batch_size):
            yield np.ascontiguousarray(mm[i:i + batch_size].transpose(0, 3, 2, 1))

    return finish_splits(NAME, class_names, x, y, x_test, y_test, unlabeled_batches,
                         num_unlabeled, f"stl10_binary folder {folder}",
                         val_per_class, seed)


# --- STL-10 through tensorflow-datasets ----------------------------------------

def offline_message(data_dir: str | None) -> str:
    where = data_dir or "DIR"
    return (
        "STL-10 is not on disk and cannot be downloaded (no network): place "
        f"{ARCHIVE} (or its extracted stl10_binary/ folder) in {where} and pass "
        f"--data-dir {where}, or run offline on the bundled data with --dataset digits."
    )


def _load_stl10_tfds(data_dir: str | None, val_per_class: int, seed: int,
                     download: bool) -> Splits:
    import tensorflow_datasets as tfds

    arrays = tfds_arrays(NAME, "STL-10", data_dir, download, URL_HOST,
                         offline_message(data_dir))
    (x, y), (x_test, y_test) = arrays["train"], arrays["test"]
    builder = arrays["builder"]
    splits_info = builder.info.splits
    num_unlabeled = (splits_info["unlabelled"].num_examples
                     if "unlabelled" in splits_info else None)

    def unlabeled_batches(batch_size: int) -> Iterator[np.ndarray]:
        ds = builder.as_dataset(split="unlabelled", as_supervised=True)
        for images, _ in tfds.as_numpy(ds.batch(batch_size)):
            yield images.astype(np.uint8)

    return finish_splits(NAME, CLASS_NAMES, x, y, x_test, y_test,
                         unlabeled_batches, num_unlabeled or None,
                         "tensorflow-datasets stl10", val_per_class, seed)


@register
class STL10(Source):
    """STL-10, the lab's dataset: 500 labeled images per class, 100,000 unlabeled."""

    name = NAME
    help = ("the lab's STL-10 (stl10_binary/ or its tarball in --data-dir, else "
            "tensorflow-datasets)")
    lab_reference = True

    def load(self, data: DataConfig, seed: int) -> Splits:
        return load(data.data_dir, data.val_per_class, seed, data.download)

    def source_files(self, data_dir: str | None) -> list[Path]:
        # Without --data-dir only tensorflow-datasets holds it: no files of the user's.
        if not data_dir:
            return []
        root = Path(data_dir).expanduser()
        return sorted(p for folder in (root, root / "stl10_binary") if folder.is_dir()
                      for p in folder.iterdir() if p.is_file())

    def default_val_per_class(self, labeled_per_class: int | None) -> int:
        return VAL_PER_CLASS
