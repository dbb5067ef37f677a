"""Your own images, in the layout `keras.utils.image_dataset_from_directory` reads.

    DIR/train/CLASS/**.jpg|png|gif|bmp|webp  labeled images; class names are the
                                             folder names (Unicode NFC), sorted
    DIR/test/CLASS/**                        optional; else a fifth of each class
                                             of train (at least 1) is held out
                                             as test, the same for every seed
    DIR/unlabeled/**                         optional, any depth, streamed; else
                                             k-means reads the training images

Validation is held out of train by the seed, a fifth of the smallest class
by default (`--val-per-class`). The whole folder is checked in one pass
before anything trains (`FolderCheck`): every image's header, then every
image decoded by the path serving uses (`stl10_keras.images`), unlabeled ones
included. All problems are reported together, grouped by kind; one problem
is one sentence naming the file and the fix. Operating-system junk
(Thumbs.db, desktop.ini, .DS_Store, `._*`, `@eaDir/`, `__MACOSX/`, hidden
files) is skipped and counted in the data summary.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from stl10_keras.errors import ConfigError, DataUnavailableError
from stl10_keras.sources.base import Source, Splits, finish_splits, register
from stl10_keras.sources.images import (Header, Listing, decode_bytes, decode_file,
                                        junk_kind, list_folder, read_header)

if TYPE_CHECKING:
    from stl10_keras.config import Config, DataConfig

NAME = "folder"
TEST_FRACTION = 5  # without test/: 1/5 of each class (at least 1) is the test split
TEST_SEED = 1234  # fixed, like STL-10's fixed test split
MIN_PER_CLASS = 2
SPLITS = ("train", "test", "unlabeled")  # the sub-folders `load` reads
NEEDS_DATA_DIR = ("--dataset folder needs --data-dir DIR, the folder holding "
                  "train/CLASS/* (and optionally test/ and unlabeled/).")
#: Problems of one kind listed by name in a report of several; the rest counted.
SHOWN_PER_KIND = 5
#: Each kind of problem, in report order: (what is wrong, the fix).
KINDS = {
    "loose": ("files lie directly in a split folder",
              "put each into a folder named after its class"),
    "not_image": ("files are not images (JPEG, PNG, GIF, BMP, WebP)",
                  "move them out of the data folder"),
    "unreadable": ("files are not readable images", "replace or remove them"),
    "undecodable": ("images cannot be decoded", "replace or remove them"),
    "same_class": ("class folders have the same name after Unicode normalisation",
                   "merge them"),
    "small_class": (f"class folders hold fewer than {MIN_PER_CLASS} images",
                    "add images or remove the folders"),
    "no_test_room": ("classes hold fewer than 3 images without a test/ folder",
                     "add images or a test/ folder"),
    "classes": ("too few classes", "a classifier needs at least 2"),
    "unknown_test_class": ("test/ class folders are not in train/",
                           "rename or remove them"),
    "validation": ("classes are too small to hold out validation images",
                   "lower --val-per-class or add images"),
    "empty_unlabeled": ("unlabeled/ holds no images",
                        "add some or remove the folder"),
    "sizes": ("images differ in size", "pass --image-size H,W to resize them all"),
}


def class_name(folder_name: str) -> str:
    """A class's name: its folder's name in Unicode NFC, so that "é" typed on
    one system (NFC) and copied from another (NFD) is one class."""
    return unicodedata.normalize("NFC", folder_name)


def class_folder_names(data_dir: str | None) -> tuple[str, ...]:
    """The class names `load` will find in `data_dir/train/` (sorted), without
    reading any image; () when there is no such folder."""
    train_dir = Path(data_dir or "").expanduser() / "train"
    if not data_dir or not train_dir.is_dir():
        return ()
    return tuple(sorted({class_name(e.name) for e in train_dir.iterdir()
                         if e.is_dir() and not junk_kind(e.name, is_dir=True)}))


@dataclass
class Problem:
    """One thing wrong with the folder."""

    kind: str  # a key of KINDS
    subject: str  # what the grouped report lists (a path, a class, a size)
    sentence: str  # the whole message when it is the only problem


@dataclass
class FolderCheck:
    """One pass over an image folder: what it holds and everything wrong with it.

    Attributes:
        root: the folder (`--data-dir`).
        classes: split -> class name -> image files (train, test).
        unlabeled: the image files of `unlabeled/` (None: no such folder).
        headers: image file -> its header (readable files only).
        skipped: why -> junk entries passed over.
        problems: everything wrong, in the order found.
    """

    root: Path
    classes: dict[str, dict[str, list[Path]]] = field(default_factory=dict)
    unlabeled: list[Path] | None = None
    headers: dict[Path, Header] = field(default_factory=dict)
    skipped: dict[str, list[Path]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def add(self, kind: str, subject: str, sentence: str) -> None:
        self.problems.append(Problem(kind, subject, sentence))

    def relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def note_listing(self, listing: Listing) -> None:
        for kind, paths in listing.skipped.items():
            self.skipped.setdefault(kind, []).extend(paths)
        for path in listing.not_images:
            self.add("not_image", self.relative(path),
                     f"{path} is not an image (.jpg, .jpeg, .png, .gif, .bmp, "
                     ".webp); move it out of the data folder.")

    def scan_split(self, split_dir: Path) -> dict[str, list[Path]]:
        """`{class name: image files}` of `split_dir/CLASS/**`, classes sorted."""
        top = list_folder(split_dir)
        for kind, paths in top.skipped.items():
            self.skipped.setdefault(kind, []).extend(paths)
        for path in top.images + top.not_images:
            self.add("loose", self.relative(path),
                     f"{path} lies directly in {split_dir}; put each image into a "
                     f"folder named after its class ({split_dir}/CLASS/{path.name}).")
        classes: dict[str, list[Path]] = {}
        folders: dict[str, list[Path]] = {}
        for folder in top.subfolders:
            listing = list_folder(folder, recursive=True)
            self.note_listing(listing)
            name = class_name(folder.name)
            folders.setdefault(name, []).append(folder)
            classes.setdefault(name, []).extend(listing.images)
        for name, paths in folders.items():
            if len(paths) > 1:
                shown = " and ".join(repr(p.name) for p in paths)
                self.add("same_class", self.relative(paths[0]),
                         f"{split_dir} has class folders {shown}, the same name "
                         "written with different Unicode characters; merge them.")
        for name in sorted(classes):
            files = classes[name]
            if len(files) < MIN_PER_CLASS:
                folder = folders[name][0]
                self.add("small_class", f"{self.relative(folder)} ({len(files)})",
                         f"Class folder {folder} holds {len(files)} image(s); each "
                         f"class needs at least {MIN_PER_CLASS}: add images or "
                         "remove the folder.")
        return {name: sorted(classes[name]) for name in sorted(classes)}

    def read_headers(self, files: list[Path]) -> None:
        from tqdm import tqdm

        for path in tqdm(files, desc="Checking images", unit="img", leave=False,
                         disable=len(files) < 2000):
            try:
                self.headers[path] = read_header(path)
            except ValueError as e:
                self.add("unreadable", f"{self.relative(path)} ({e})",
                         f"{path} is not a readable image ({e}); replace or "
                         "remove it.")

    def report(self) -> str:
        """The problems as one message: one sentence for one problem; else a
        sentence, then each kind with its fix, its first few and a count."""
        if len(self.problems) == 1:
            return self.problems[0].sentence
        by_kind: dict[str, list[Problem]] = {}
        for problem in self.problems:
            by_kind.setdefault(problem.kind, []).append(problem)
        lines = [f"{self.root} has {len(self.problems)} problems of "
                 f"{len(by_kind)} kinds; fix them all, then rerun:"]
        for kind in KINDS:
            found = by_kind.get(kind, [])
            if not found:
                continue
            what, fix = KINDS[kind]
            lines.append(f"  {len(found)} x {what} ({fix}):")
            lines += [f"    {p.subject}" for p in found[:SHOWN_PER_KIND]]
            if len(found) > SHOWN_PER_KIND:
                lines.append(f"    ... and {len(found) - SHOWN_PER_KIND} more")
        return "\n".join(lines)


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
        DataUnavailableError: the folder or some of its files are unusable; the
            message names every problem and its fix.
    """
    if not data_dir:
        raise DataUnavailableError(NEEDS_DATA_DIR)
    root = Path(data_dir).expanduser()
    train_dir, test_dir, unlabeled_dir = (root / s for s in SPLITS)
    if not train_dir.is_dir():
        raise DataUnavailableError(
            f"{train_dir} is missing; --data-dir must hold train/CLASS/* (one folder "
            "of images per class).")
    check = FolderCheck(root)
    train = check.scan_split(train_dir)
    check.classes["train"] = train
    class_names = tuple(train)
    if len(train) < 2:
        check.add("classes", f"train/ ({len(train)} class)",
                  f"{train_dir} holds {len(train)} class folder(s); a classifier "
                  "needs at least 2 (train/CLASS_A/*, train/CLASS_B/*).")
    test = check.scan_split(test_dir) if test_dir.is_dir() else None
    if test is not None:
        check.classes["test"] = test
        unknown = [name for name in test if name not in class_names]
        for name in unknown:
            check.add("unknown_test_class", f"test/{name}",
                      f"{test_dir} has class folder {name!r} that train/ lacks; "
                      f"rename it to one of {list(class_names)} or remove it.")
    if unlabeled_dir.is_dir():
        listing = list_folder(unlabeled_dir, recursive=True)
        check.note_listing(listing)
        check.unlabeled = listing.images
        if not listing.images:
            check.add("empty_unlabeled", "unlabeled/",
                      f"{unlabeled_dir} holds no images; add some or remove the "
                      "folder.")

    x_files, y = _flatten(train, class_names)
    if test is not None:
        known = {k: v for k, v in test.items() if k in class_names}
        t_files, y_test = _flatten(known, class_names)
        held_out = "test/"
    else:
        x_files, y, t_files, y_test = _hold_out_test(check, x_files, y,
                                                     class_names, train_dir)
        held_out = f"1/{TEST_FRACTION} of each class of train/ (fixed)"
    if val_per_class is None:
        val_per_class = max(1, int(np.bincount(y).min()) // 5) if len(y) else 1
    _check_validation_room(check, y, class_names, val_per_class, train_dir)

    unlabeled = check.unlabeled or []
    check.read_headers(x_files + t_files + unlabeled)
    size, c = _shape_of(check, image_size, channels)
    x = _decode_all(check, x_files, size, c, "train/")
    x_test = _decode_all(check, t_files, size, c, "test/")
    _decode_all(check, unlabeled, size, c, "unlabeled/", keep=False)
    if check.problems:
        raise DataUnavailableError(check.report())

    def unlabeled_batches(batch_size: int) -> Iterator[np.ndarray]:
        if check.unlabeled is None:  # the training images, labels dropped
            for i in range(0, len(x), batch_size):
                yield x[i:i + batch_size]
            return
        for i in range(0, len(unlabeled), batch_size):
            yield np.stack([decode_file(p, size, c)
                            for p in unlabeled[i:i + batch_size]])

    unlabeled_text = (f"{len(unlabeled)} images in unlabeled/"
                      if check.unlabeled is not None
                      else "no unlabeled/: k-means reads the labeled images")
    source = (f"image folder {root} ({len(class_names)} classes; test: {held_out}; "
              f"{unlabeled_text})")
    splits = finish_splits(NAME, class_names, x, y, x_test, y_test,
                           unlabeled_batches,
                           len(unlabeled) if check.unlabeled is not None else len(x),
                           source, val_per_class, seed)
    splits.notes = tuple(_summary(check, size, c, image_size, x_files + t_files
                                  + unlabeled))
    return splits


def _check_validation_room(check: FolderCheck, y: np.ndarray,
                           class_names: tuple[str, ...], val_per_class: int,
                           train_dir: Path) -> None:
    """Each class must keep a training image after `val_per_class` are held out."""
    counts = np.bincount(y, minlength=len(class_names)) if len(y) else []
    for name, count in zip(class_names, counts):
        if MIN_PER_CLASS <= count <= val_per_class:
            check.add("validation", f"train/{name} ({count})",
                      f"Class folder {train_dir / name} leaves {count} images for "
                      f"training and validation, too few to hold out "
                      f"{val_per_class} for validation; lower --val-per-class or "
                      "add images.")


def _shape_of(check: FolderCheck, size: tuple[int, int] | None,
              channels: int | None) -> tuple[tuple[int, int], int]:
    """The `(H, W)` and channel count all images get (from their headers)."""
    sizes: dict[tuple[int, int], list[Path]] = {}
    for path, header in check.headers.items():
        sizes.setdefault(header.size, []).append(path)
    gray = all(h.gray for h in check.headers.values())
    c = channels or (1 if gray and check.headers else 3)
    if size is not None:
        return tuple(size), c
    if not sizes:
        return (1, 1), c
    common = max(sizes, key=lambda s: (len(sizes[s]), s))
    if len(sizes) > 1:
        (a, pa), (b, pb) = [(s, sizes[s][0]) for s in list(sizes)[:2]]
        listed = ", ".join(f"{h}x{w}: {len(p)} images (e.g. {check.relative(p[0])})"
                           for (h, w), p in sorted(sizes.items(),
                                                   key=lambda kv: -len(kv[1])))
        check.add("sizes", listed,
                  f"The images differ in size ({pa} is {a[0]}x{a[1]}, {pb} is "
                  f"{b[0]}x{b[1]}); pass --image-size H,W to resize them all.")
    return common, c


def _decode_all(check: FolderCheck, files: list[Path], size, channels, what: str,
                keep: bool = True) -> np.ndarray:
    """Decode every readable file of `files` (each read once); the unreadable
    ones and those that fail are problems, their rows left zero."""
    from tqdm import tqdm

    out = np.zeros((len(files) if keep else 0, size[0], size[1], channels), np.uint8)
    for i, path in enumerate(tqdm(files, desc=f"Reading {what}", unit="img",
                                  leave=False, disable=len(files) < 2000)):
        if path not in check.headers:
            continue  # reported as unreadable
        try:
            image = decode_bytes(path.read_bytes(), size, channels)
        except (OSError, ValueError) as e:
            check.add("undecodable", f"{check.relative(path)} ({e})",
                      f"{path} cannot be decoded ({e}); replace or remove it.")
            continue
        if keep:
            out[i] = image
    return out


def _summary(check: FolderCheck, size: tuple[int, int], channels: int,
             image_size: tuple[int, int] | None, files: list[Path]) -> list[str]:
    """The folder's part of the data summary: pixels, formats, skipped junk."""
    headers = [check.headers[p] for p in files]
    stored = sorted({h.size for h in headers}, key=lambda s: s[0] * s[1])
    stored_text = (f"{stored[0][0]}x{stored[0][1]}" if len(stored) == 1 else
                   f"{len(stored)} sizes, {stored[0][0]}x{stored[0][1]} to "
                   f"{stored[-1][0]}x{stored[-1][1]}")
    how = ("resized by --image-size" if image_size is not None and stored != [size]
           else "as stored")
    colours = "grey" if channels == 1 else "RGB"
    formats = Counter(h.format for h in headers)
    modes = Counter(h.mode for h in headers)
    lines = [
        f"pixels: stored {stored_text}; {how} to {size[0]}x{size[1]} {colours}",
        "files: " + ", ".join(f"{n} {f}" for f, n in formats.most_common())
        + " (modes " + ", ".join(f"{m} {n}" for m, n in modes.most_common()) + ")",
    ]
    skipped = sum(len(p) for p in check.skipped.values())
    if skipped:
        lines.append(f"skipped {skipped} entries (not data): " + ", ".join(
            f"{len(p)} {kind}" for kind, p in sorted(check.skipped.items(),
                                                     key=lambda kv: -len(kv[1]))))
    return lines


def _flatten(classes: dict[str, list[Path]],
             class_names: tuple[str, ...]) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for name, paths in classes.items():
        files += paths
        labels += [class_names.index(name)] * len(paths)
    return files, np.asarray(labels, np.int32)


def _hold_out_test(check, files, labels, class_names, train_dir):
    """A fixed fifth of each class (at least 1) as the test split."""
    rng = np.random.default_rng(TEST_SEED)
    test = []
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(labels == c)
        if MIN_PER_CLASS <= len(idx) < 3:
            check.add("no_test_room", f"train/{name} ({len(idx)})",
                      f"Class folder {train_dir / name} holds {len(idx)} images: "
                      "without a test/ folder a class needs at least 3 (test, "
                      "validation, training); add images or a test/ folder.")
        if len(idx):
            test.append(rng.permutation(idx)[:max(1, len(idx) // TEST_FRACTION)])
    test = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
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
        """Every file of `train/`, `test/` and `unlabeled/` but the junk skipped."""
        if not data_dir:
            return []
        root = Path(data_dir).expanduser()
        files = []
        for sub in SPLITS:
            if (root / sub).is_dir():
                listing = list_folder(root / sub, recursive=True)
                files += listing.images + listing.not_images
        return sorted(files)

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
