"""What every dataset source shares: `Splits`, the split helpers, and the registry.

A dataset is a `Source` subclass in its own module of `stl10_keras.sources`,
registered with `@register`. Everything that differs between datasets lives
on it: how it loads, which files it reads, its validation split, its preset
tweaks and its flag checks. `data.load_splits`, `config.preset`,
`config.validate`, the `--dataset` flag and the ablation ask the registry
(`get(name)`, `names()`), so adding a dataset is one module plus one import
line in `sources/__init__.py`.

This module imports no source module, nor `data`, `config` or `cli` (their
types only for type checking): the sources import it, and they import it.
"""

from __future__ import annotations

import abc
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, TypeVar

import numpy as np

from stl10_keras import runtime
from stl10_keras.errors import ConfigError, DataUnavailableError

if TYPE_CHECKING:
    from stl10_keras.config import Config, DataConfig

UnlabeledFactory = Callable[[int], Iterator[np.ndarray]]


@dataclass
class Splits:
    """A dataset's four splits.

    Attributes:
        name: the source's registered name (`stl10`, `digits`, ...).
        class_names: the class names, index = label.
        image_shape: `(H, W, C)`.
        x_train, y_train: labeled training images (uint8 NHWC) and labels (int32).
        x_val, y_val: the held-out labeled validation images and labels.
        x_test, y_test: the test split.
        unlabeled_batches: `unlabeled_batches(batch_size)` returns a fresh
            iterator over uint8 batches of the unlabeled split (a stream).
        num_unlabeled: number of unlabeled images (None if unknown).
        source: where the data came from, for the run's records.
        val_indices: indices into the labeled set that form validation.
        unlabeled_labels: the unlabeled images' true labels in stream order,
            where the dataset knows them (digits); only FixMatch's
            pseudo-label accuracy metric reads them. None otherwise.
        notes: lines the source adds to the data summary (`describe`), such
            as an image folder's formats and skipped files.
    """

    name: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    unlabeled_batches: UnlabeledFactory
    num_unlabeled: int | None
    source: str
    val_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    unlabeled_labels: np.ndarray | None = None
    notes: tuple[str, ...] = ()

    def describe(self) -> list[str]:
        """The data summary a command prints before training (one screen)."""
        counts = np.bincount(np.concatenate([self.y_train, self.y_val]),
                             minlength=len(self.class_names))
        classes = ", ".join(f"{name} ({n})"
                            for name, n in zip(self.class_names, counts))
        unlabeled = ("?" if self.num_unlabeled is None
                     else f"{self.num_unlabeled:,}")
        h, w, c = self.image_shape
        lines = [
            f"data: {self.source}",
            f"  {len(self.class_names)} classes, labeled images each: {classes}",
            f"  train {len(self.y_train):,}, validation {len(self.y_val):,}, "
            f"test {len(self.y_test):,}, unlabeled {unlabeled}; images "
            f"{h}x{w}x{c}",
        ]
        return lines + [f"  {note}" for note in self.notes]

    def summary(self) -> dict:
        return {
            "dataset": self.name,
            "source": self.source,
            "class_names": list(self.class_names),
            "image_shape": list(self.image_shape),
            "train": int(len(self.y_train)),
            "validation": int(len(self.y_val)),
            "test": int(len(self.y_test)),
            "unlabeled": self.num_unlabeled,
        }


# --- the registry ---------------------------------------------------------------

class Source(abc.ABC):
    """A dataset: how it loads, which files it reads, what it sets in a config.

    Subclass it in a module of `stl10_keras.sources`, set `name` and `help`,
    implement the abstract methods and decorate the class with `@register`
    (a subclass that leaves one out cannot be instantiated, so cannot be
    registered). The hooks with a default body change nothing unless
    overridden.

    Attributes:
        name: the `--dataset` value, `DataConfig.dataset` and `Splits.name`.
        help: what it is, in a few words, for `--dataset`'s help.
        lab_reference: the lab reported its Table 1 on this dataset, so the
            ablation shows the lab's numbers beside ours.
        takes_labeled_per_class: it draws its labeled set from a larger one
            with `--labeled-per-class`; other sources refuse the flag.
    """

    name: ClassVar[str]
    help: ClassVar[str]
    lab_reference: ClassVar[bool] = False
    takes_labeled_per_class: ClassVar[bool] = False

    @abc.abstractmethod
    def load(self, data: DataConfig, seed: int) -> Splits:
        """The dataset's splits.

        Args:
            data: the run's data settings; `data.val_per_class` None means the
                source's own default (`default_val_per_class` gave None).
            seed: seeds the train/validation split (and any other draw).

        Returns:
            A `Splits` named `self.name`, as stored (`data.image_size` and
            `data.channels` are applied afterwards by `data.load_splits`;
            a source may already honour them while decoding).

        Raises:
            DataUnavailableError: the data cannot be found or read.
        """

    @abc.abstractmethod
    def source_files(self, data_dir: str | None) -> list[Path]:
        """The files `load` reads, sorted (what a pipeline's fingerprint covers).

        Returns:
            `[]` when it reads none that a user could change (bundled data,
            data only tensorflow-datasets holds).
        """

    @abc.abstractmethod
    def default_val_per_class(self, labeled_per_class: int | None) -> int | None:
        """Validation images per class when `--val-per-class` is not given.

        Returns:
            The count, or None where only the files can say (`load` decides).
        """

    def apply_preset(self, config: Config) -> None:
        """Change a fresh preset for this dataset (`config.preset`, before the
        preset's own changes, so `smoke` still shrinks everything)."""

    def validate(self, config: Config) -> None:
        """Raise `ConfigError` for a setting this dataset cannot use.

        Every config passes here (`config.validate`: presets, files, flags).
        """
        if config.data.labeled_per_class is not None \
                and not self.takes_labeled_per_class:
            takers = [n for n in names() if get(n).takes_labeled_per_class]
            raise ConfigError(f"--labeled-per-class applies to --dataset "
                              f"{' or '.join(takers)} only; drop it.")

    def check_flags(self, config: Config, data_dir_given: bool) -> None:
        """Raise `ConfigError` for a command line this dataset refuses.

        Only the command line passes here (`cli.check_data_dir`), after
        `config.validate`: a config file's value is the run's record, not a
        user's new mistake.

        Args:
            config: the resolved config.
            data_dir_given: whether `--data-dir` was on the command line.
        """

    def configure(self, config: Config) -> None:
        """Set what the data itself decides (e.g. `model.num_classes`), after
        the flags and before `config.validate`; reads no image."""


_SOURCES: dict[str, Source] = {}
SourceType = TypeVar("SourceType", bound=type[Source])


def register(cls: SourceType) -> SourceType:
    """Class decorator: add one instance of `cls` to the registry under `cls.name`.

    Raises:
        TypeError: `cls` leaves an abstract method out.
        ValueError: the name is taken.
    """
    if cls.name in _SOURCES:
        raise ValueError(f"A dataset source named '{cls.name}' is registered "
                         "already; pick another name.")
    _SOURCES[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a source (tests register toy ones)."""
    del _SOURCES[name]


def names() -> tuple[str, ...]:
    """The registered sources' names, in registration order."""
    return tuple(_SOURCES)


def get(name: str) -> Source:
    """The registered source `name`.

    Raises:
        ConfigError: no source has that name; the message lists them.
    """
    try:
        return _SOURCES[name]
    except KeyError:
        raise ConfigError(f"Unknown dataset '{name}'; choose one of "
                          f"{', '.join(names())}.") from None


def help_text(default: str | None = None) -> str:
    """`--dataset`'s help: each source's name and `help`, the default marked."""
    return "; ".join(f"{name}{' (default)' if name == default else ''}: "
                     f"{get(name).help}" for name in names())


# --- shared by the sources ------------------------------------------------------

def stratified_split(
    labels: np.ndarray, val_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train / validation with `val_per_class` per class.

    Args:
        labels: integer labels of the labeled set.
        val_per_class: validation images per class.
        seed: the split's seed (same seed, same split).

    Returns:
        `(train_indices, val_indices)`, each sorted.
    """
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) <= val_per_class:
            raise DataUnavailableError(
                f"Class {c} has only {len(idx)} labeled images, too few to hold out "
                f"{val_per_class} for validation; lower --val-per-class."
            )
        val.append(rng.permutation(idx)[:val_per_class])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def finish_splits(name, class_names, x, y, x_test, y_test, unlabeled, num_unlabeled,
                  source, val_per_class, seed) -> Splits:
    """A `Splits` from a labeled set, split into train / validation by `seed`."""
    train_idx, val_idx = stratified_split(y, val_per_class, seed)
    return Splits(
        name=name,
        class_names=tuple(class_names),
        image_shape=tuple(int(d) for d in x.shape[1:]),
        x_train=x[train_idx],
        y_train=y[train_idx].astype(np.int32),
        x_val=x[val_idx],
        y_val=y[val_idx].astype(np.int32),
        x_test=x_test,
        y_test=y_test.astype(np.int32),
        unlabeled_batches=unlabeled,
        num_unlabeled=num_unlabeled,
        source=source,
        val_indices=val_idx,
    )


def array_batches(images: np.ndarray) -> UnlabeledFactory:
    """An unlabeled stream over images already in memory, in their order."""

    def unlabeled_batches(batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]

    return unlabeled_batches


def tfds_arrays(name: str, title: str, data_dir: str | None, download: bool,
                host: str, missing: str, batch: int = 1024) -> dict[str, Any]:
    """A tensorflow-datasets dataset's train and test splits as uint8/int32 arrays.

    Args:
        name: the tfds name (`stl10`, `fashion_mnist`).
        title: the dataset's name in messages (`STL-10`).
        data_dir: tfds' data dir (None: its default).
        download: let tfds download and prepare it when it is not on disk.
        host: the download's host, checked first (tfds retries for minutes).
        missing: the sentence naming the fix when it is not on disk and cannot
            be downloaded.
        batch: images per read.

    Returns:
        `{"train": (images, labels), "test": (images, labels), "builder": ...}`.

    Raises:
        DataUnavailableError: not on disk and no download, or the download failed.
    """
    import logging

    import tensorflow_datasets as tfds

    # Looking for a prepared copy needs no TensorFlow; tfds logs "Variant folder
    # DIR/NAME/VERSION has no dataset_info.json" (absl, WARNING) where there is
    # none, which the DataUnavailableError below says better.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(max(level, logging.ERROR))
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    finally:
        absl_logger.setLevel(level)
    if not prepared and (not download or not host_reachable(host)):
        raise DataUnavailableError(missing)
    runtime.tensorflow_available()  # loads it quietly, before tfds does
    if not prepared:
        try:
            builder.download_and_prepare()
        except Exception as e:  # network / disk errors from tfds
            raise DataUnavailableError(
                f"Downloading {title} failed ({type(e).__name__}). {missing}"
            ) from None

    def as_numpy(split: str) -> tuple[np.ndarray, np.ndarray]:
        ds = builder.as_dataset(split=split, as_supervised=True).batch(batch)
        xs, ys = zip(*tfds.as_numpy(ds))
        return (np.concatenate(xs).astype(np.uint8),
                np.concatenate(ys).astype(np.int32))

    return {"train": as_numpy("train"), "test": as_numpy("test"), "builder": builder}


def host_reachable(host: str, port: int = 80, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to `host:port` opens within `timeout` seconds."""
    # tensorflow-datasets retries a failed download for minutes; a quick
    # connection check lets an offline user get the clear message at once.
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
