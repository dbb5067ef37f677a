"""Datasets behind one interface: `load_splits` asks the registry of sources
(`stl10_keras.sources`: stl10, digits, fashion_mnist, folder, ...) and
returns `Splits`.

Every dataset is returned as a `Splits`: labeled train / validation / test as
uint8 arrays (STL-10's labeled 5,000 and test 8,000 images are 0.36 GB as
uint8), and the unlabeled split as a *stream* of uint8 batches (STL-10's
100,000 unlabeled images are 2.76 GB as uint8, 11 GB as float32: never
materialised). `make_dataset` turns arrays into a tf.data pipeline that moves
uint8 (cache -> shuffle -> batch -> prefetch); the model rescales on the device.
`make_batches` picks it when TensorFlow is installed and otherwise feeds the
same uint8 batches from numpy (`NumpyBatches`), for a JAX-only install.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from stl10_keras import runtime, sources
from stl10_keras.config import DataConfig
from stl10_keras.errors import DataUnavailableError
# Re-exported: they lived here before the sources had a base module of their own.
from stl10_keras.sources.base import (  # noqa: F401
    Splits,
    UnlabeledFactory,
    finish_splits,
    host_reachable,
    stratified_split,
    tfds_arrays,
)


def source_for(dataset: str) -> sources.Source:
    """The registered source `dataset`.

    Raises:
        DataUnavailableError: no source has that name; the message lists them.
    """
    names = sources.names()
    if dataset not in names:
        listed = " or ".join(filter(None, (", ".join(names[:-1]), names[-1])))
        raise DataUnavailableError(f"Unknown dataset '{dataset}'; use {listed}.")
    return sources.get(dataset)


def default_val_per_class(dataset: str,
                          labeled_per_class: int | None = None) -> int | None:
    """Validation images per class when `--val-per-class` is not given.

    Each source decides: STL-10 and digits hold out fixed counts; Fashion-MNIST
    a fifth of its labeled images per class (STL-10's 100 of 500); a folder a
    fifth of its smallest class (None here: only the files say how many there
    are).
    """
    return source_for(dataset).default_val_per_class(labeled_per_class)


def load_splits(
    dataset: str,
    data_dir: str | None = None,
    val_per_class: int | None = None,
    seed: int = 0,
    download: bool = True,
    labeled_per_class: int | None = None,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
) -> Splits:
    """Load a dataset's splits.

    Args:
        dataset: a registered source's name (`stl10`, `digits`,
            `fashion_mnist`, `folder`).
        data_dir: for STL-10, a folder holding `stl10_binary/` (or the folder
            itself) or `stl10_binary.tar.gz`, else a tensorflow-datasets data
            dir; for Fashion-MNIST the folder of its four IDX files (or a
            tensorflow-datasets data dir); for `folder` the image folder
            (`train/CLASS/*`, optional `test/`, `unlabeled/`). Ignored for digits.
        val_per_class: labeled images per class held out for validation
            (None: `default_val_per_class`).
        seed: seeds the train/validation split (and Fashion-MNIST's draw of
            its labeled images).
        download: allow tensorflow-datasets to download STL-10 / Fashion-MNIST.
        labeled_per_class: Fashion-MNIST's labeled images per class (None: 500).
        image_size: `(H, W)` to resize every image to (None: as stored).
        channels: 1 or 3 to convert every image to (None: as stored).

    Returns:
        A `Splits`.

    Raises:
        DataUnavailableError: the data is neither on disk nor downloadable, or
            no source has that name.
    """
    source = source_for(dataset)
    if val_per_class is None:
        val_per_class = source.default_val_per_class(labeled_per_class)
    data = DataConfig(dataset=dataset, data_dir=data_dir, val_per_class=val_per_class,
                      labeled_per_class=labeled_per_class, image_size=image_size,
                      channels=channels, download=download)
    splits = source.load(data, seed)
    if image_size is not None or channels is not None:
        from stl10_keras.sources.images import conform_splits

        # A no-op for a source that decoded at this size already (a folder).
        splits = conform_splits(splits, image_size, channels)
    return splits


def source_files(dataset: str, data_dir: str | None) -> list[Path]:
    """The files a dataset would be read from, sorted (for fingerprints).

    Each source decides: an image folder, every file under `train/`, `test/`
    and `unlabeled/`; Fashion-MNIST, its four IDX files (in `data_dir`, else
    Debian's folder); STL-10, the files in `data_dir` and its `stl10_binary/`.
    Empty for the bundled digits and for data only tensorflow-datasets holds.
    """
    return source_for(dataset).source_files(data_dir)


def source_files_signature(dataset: str, data_dir: str | None) -> str | None:
    """sha256 of `source_files`' paths, sizes and modification times (None: no
    files): it changes when a file is added, removed, replaced or edited."""
    import hashlib

    files = source_files(dataset, data_dir)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                      .encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


#: A run's record of the files it was trained on (`train` writes it).
DATA_RECORD = "data.json"
# sha256 of files already hashed in this process, by (path, size, mtime): an
# ablation's runs read the same files.
_HASHES: dict[tuple[str, int, int], str] = {}


def data_record(dataset: str, data_dir: str | None,
                previous: dict | None = None) -> dict:
    """What a run is trained on: each source file's size and sha256.

    Args:
        dataset: the source's name.
        data_dir: `--data-dir` (None: the source's default).
        previous: an earlier record; a file whose size and modification time
            it holds unchanged keeps its hash there (not read again).

    Returns:
        `{"dataset", "data_dir", "files": {path: {"size", "mtime_ns",
        "sha256"}}}`, paths relative to `data_dir` (absolute outside it).
        No files (bundled digits, data only tensorflow-datasets holds): `{}`.
    """
    import hashlib

    root = Path(data_dir).expanduser().resolve() if data_dir else None
    old = (previous or {}).get("files", {})
    files = {}
    for path in source_files(dataset, data_dir):
        resolved = path.resolve()
        key = (resolved.relative_to(root).as_posix()
               if root is not None and resolved.is_relative_to(root) else str(resolved))
        stat = resolved.stat()
        known = old.get(key)
        cache = (str(resolved), stat.st_size, stat.st_mtime_ns)
        if known and (known["size"], known["mtime_ns"]) == cache[1:]:
            digest = known["sha256"]
        elif cache in _HASHES:
            digest = _HASHES[cache]
        else:
            sha = hashlib.sha256()
            with open(resolved, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
            digest = _HASHES[cache] = sha.hexdigest()
        files[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                      "sha256": digest}
    if not files:
        return {}
    return {"dataset": dataset, "data_dir": data_dir, "files": files}


def data_changes(previous: dict, current: dict) -> str | None:
    """How `current` differs from `previous` (two `data_record`s), in words
    ("2 files added (train/cat/x.png, ...), 1 changed (...)"); None: the same."""
    before, now = previous.get("files", {}), current.get("files", {})
    added = sorted(set(now) - set(before))
    removed = sorted(set(before) - set(now))
    changed = sorted(k for k in set(now) & set(before)
                     if now[k]["sha256"] != before[k]["sha256"])
    parts = []
    for what, keys in (("added", added), ("removed", removed), ("changed", changed)):
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            parts.append(f"{len(keys)} file{'s' * (len(keys) != 1)} {what} ({shown})")
    return ", ".join(parts) or None


def load_splits_for(config, seed: int | None = None) -> Splits:
    """`load_splits` with a run config's data settings and seed.

    Args:
        config: a `stl10_keras.config.Config`.
        seed: the split's seed; None uses `config.train.seed`.
    """
    d = config.data
    return load_splits(d.dataset, d.data_dir, d.val_per_class,
                       config.train.seed if seed is None else seed, d.download,
                       labeled_per_class=d.labeled_per_class,
                       image_size=d.image_size, channels=d.channels)


# --- tf.data --------------------------------------------------------------------

# Each epoch's seed-generator counters start `epoch * EPOCH_SEED_STRIDE` past
# their initial ones (`train`): room for 2**20 draws per epoch.
EPOCH_SEED_STRIDE = 1 << 20


def num_batches(num_examples: int, batch_size: int,
                drop_remainder: bool = False) -> int:
    """Batches in one epoch of `num_examples` (a partial last one, unless dropped)."""
    if drop_remainder:
        return num_examples // batch_size
    return math.ceil(num_examples / batch_size)


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 5000,
    map_fn: Callable | None = None,
    drop_remainder: bool = False,
    epochs: tuple[int, int] | None = None,
):
    """A tf.data pipeline of uint8 batches: cache -> shuffle -> batch -> map -> prefetch.

    Args:
        images: uint8 NHWC images.
        labels: int labels.
        batch_size: images per batch.
        shuffle: reshuffle every epoch (seeded).
        seed: the shuffle seed.
        shuffle_buffer: shuffle buffer size (images).
        map_fn: optional batch-level function `(images, labels) -> (images,
            labels)`, e.g. augmentation on the CPU (`--augment-on cpu`).
        drop_remainder: drop a last partial batch.
        epochs: `(first, stop)`: one stream holding epochs `first .. stop - 1`
            back to back, epoch `e` in the order of a full permutation drawn
            statelessly from `(seed, e)` (`shuffle_buffer` is not used), so an
            epoch's order does not depend on the epoch the stream starts at: a
            run resumed at epoch `first` sees the batches an uninterrupted run
            sees. Train on it with `steps_per_epoch=num_batches(len(labels),
            batch_size)`. None: one epoch per iteration, buffer-shuffled anew
            every time it is iterated (the n-th iteration's order depends on n,
            counted from this call).

    Returns:
        A `tf.data.Dataset` yielding `(images, labels)`.
    """
    import tensorflow as tf

    if epochs is not None:
        ds = _epoch_stream(images, labels, batch_size, shuffle, seed,
                           drop_remainder, epochs)
    else:
        ds = tf.data.Dataset.from_tensor_slices((images, labels)).cache()
        if shuffle:
            ds = ds.shuffle(min(shuffle_buffer, len(labels)), seed=seed,
                            reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if map_fn is not None:
        ds = ds.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _epoch_stream(images, labels, batch_size, shuffle, seed, drop_remainder, epochs):
    """`make_dataset`'s batches of epochs `first .. stop - 1`, each a function of
    `(seed, epoch)`.

    `Dataset.shuffle` takes no per-epoch tensor seed, so each epoch's order is
    `tf.random.experimental.index_shuffle` (a stateless permutation) keyed by
    `(seed, epoch)`, and batches gather their rows from the arrays.
    """
    import tensorflow as tf

    first, stop = epochs
    n = len(labels)
    x = tf.convert_to_tensor(images)
    y = tf.convert_to_tensor(labels)

    def one_epoch(epoch):
        order = tf.data.Dataset.range(n)
        if shuffle:
            key = tf.stack([tf.constant(int(seed), tf.int64), epoch])
            order = order.map(lambda i: tf.random.experimental.index_shuffle(
                i, key, tf.constant(n - 1, tf.int64)))
        return order.batch(batch_size, drop_remainder=drop_remainder)

    steps = num_batches(n, batch_size, drop_remainder)
    ds = tf.data.Dataset.range(first, stop).flat_map(one_epoch)
    ds = ds.map(lambda rows: (tf.gather(x, rows), tf.gather(y, rows)),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.apply(
        tf.data.experimental.assert_cardinality(steps * max(stop - first, 0)))


# --- numpy batches (no TensorFlow) ----------------------------------------------

def numpy_batches(images, labels, batch_size, shuffle=False, seed=0, epochs=None):
    """A `NumpyBatches` (a factory: keras is imported only when it is called)."""
    import keras

    steps = num_batches(len(labels), batch_size)

    class NumpyBatches(keras.utils.PyDataset):
        """uint8 `(images, labels)` batches from numpy arrays, reshuffled every epoch.

        The shuffle is a full permutation drawn from `seed` and the epoch
        number (tf.data's buffer shuffle orders the images differently, so a
        run fed by it is not step-for-step the same as one fed by tf.data).
        With `epochs=(first, stop)` it is one stream of those epochs, batch
        `i` from epoch `first + i // steps_per_epoch`, so the order never
        depends on how many epochs keras has counted; otherwise one epoch,
        whose order moves on to the next epoch's at each `on_epoch_end`.
        """

        steps_per_epoch = steps

        def __init__(self):
            super().__init__()
            self._epoch = 0 if epochs is None else epochs[0]
            self._order = (self._epoch, self._permutation(self._epoch))

        def _permutation(self, epoch: int):
            if not shuffle:
                return np.arange(len(labels))
            return np.random.default_rng([seed, epoch]).permutation(len(labels))

        def __len__(self) -> int:
            return steps if epochs is None else steps * max(epochs[1] - epochs[0], 0)

        def __getitem__(self, index: int):
            if epochs is None:
                epoch, step = self._epoch, index
            else:
                epoch, step = divmod(index, steps)
                epoch += epochs[0]
            if self._order[0] != epoch:
                self._order = (epoch, self._permutation(epoch))
            rows = self._order[1][step * batch_size:(step + 1) * batch_size]
            return images[rows], labels[rows]

        def on_epoch_end(self) -> None:
            if epochs is None:
                self._epoch += 1
                self._order = (self._epoch, self._permutation(self._epoch))

    return NumpyBatches()


def make_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 5000,
    map_fn: Callable | None = None,
    use_tensorflow: bool | None = None,
    epochs: tuple[int, int] | None = None,
):
    """Training or evaluation batches: tf.data if TensorFlow is there, else numpy.

    Args:
        images, labels, batch_size, shuffle, seed, shuffle_buffer, map_fn,
            epochs: as for `make_dataset`; `map_fn` needs TensorFlow.
        use_tensorflow: force a choice; None uses tf.data when TensorFlow can
            be imported.

    Returns:
        A `tf.data.Dataset`, or a `keras.utils.PyDataset` of numpy batches;
        `fit` takes either.
    """
    if use_tensorflow is None:
        use_tensorflow = runtime.tensorflow_available()
    if use_tensorflow:
        return make_dataset(images, labels, batch_size, shuffle=shuffle, seed=seed,
                            shuffle_buffer=shuffle_buffer, map_fn=map_fn,
                            epochs=epochs)
    if map_fn is not None:
        raise ValueError("map_fn runs in tf.data and needs TensorFlow.")
    return numpy_batches(images, labels, batch_size, shuffle=shuffle, seed=seed,
                         epochs=epochs)
