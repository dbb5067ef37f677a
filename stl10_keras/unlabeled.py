"""Feeding FixMatch: labeled batches beside a resumable stream of unlabeled ones.

The unlabeled split is a stream (`Splits.unlabeled_batches`), never all in
memory. `UnlabeledStream` cycles through it pass after pass, shuffling
within chunks of `chunk` images by `(seed, pass, chunk)`, and hands out
batch `k` as images `[k * size, (k + 1) * size)` of that endless sequence.
Batch `k` is a function of `k` alone: a run resumed at epoch `e` asks for
batch `e * steps_per_epoch` and gets what the uninterrupted run got there
(reading sequentially, it skips forward by reading; it never holds more
than one chunk).

`fixmatch_batches` pairs it with the labeled epochs of `data.numpy_batches`
as a `keras.utils.PyDataset` (works under TensorFlow and JAX).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from stl10_keras.semisupervised import UNKNOWN_LABEL

DEFAULT_CHUNK = 4096


class UnlabeledStream:
    """Endless, chunk-shuffled, position-addressable batches of unlabeled images.

    Args:
        factory: `factory(n)` returns a fresh iterator over uint8 batches of
            the unlabeled split, `n` images each but maybe the last.
        num_images: images in the split (one pass).
        batch_size: images per batch handed out.
        seed: seeds the shuffle.
        labels: the images' true labels in stream order where known (only for
            the pseudo-label accuracy metric), else None.
        chunk: images shuffled together (read as one batch of `factory`).
    """

    def __init__(self, factory: Callable[[int], Iterator[np.ndarray]],
                 num_images: int, batch_size: int, seed: int = 0,
                 labels: np.ndarray | None = None, chunk: int = DEFAULT_CHUNK):
        if num_images < 1:
            raise ValueError("UnlabeledStream needs at least one unlabeled image.")
        if labels is not None and len(labels) != num_images:
            raise ValueError(f"{len(labels)} labels for {num_images} unlabeled images.")
        self.factory = factory
        self.num_images = int(num_images)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.labels = labels
        self.chunk = int(chunk)
        self._reader: Iterator | None = None
        self._position = -1  # the image the reader yields next

    def batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `k`: `(images, true_labels)` with `UNKNOWN_LABEL` where unknown."""
        start = k * self.batch_size
        if self._reader is None or self._position != start:
            self._reader = self._images_from(start)
        images, labels = [], []
        need = self.batch_size
        while need:
            x, y = next(self._reader)
            images.append(x)
            labels.append(y)
            need -= len(x)
        self._position = start + self.batch_size
        return np.concatenate(images), np.concatenate(labels)

    def _images_from(self, position: int):
        """Yield `(images, labels)` pieces of the endless sequence from `position`.

        The generator is resumed where the last batch ended; a piece never
        crosses the end of a batch, so the caller can stop exactly there.
        """
        pass_index, offset = divmod(position, self.num_images)
        want = self.batch_size - position % self.batch_size
        while True:
            start = 0
            for images, labels in self._chunks(pass_index):
                stop = start + len(images)
                if stop <= offset:
                    start = stop
                    continue
                lo = max(offset - start, 0)
                while lo < len(images):
                    hi = min(lo + want, len(images))
                    yield images[lo:hi], labels[lo:hi]
                    want -= hi - lo
                    if want == 0:
                        want = self.batch_size
                    lo = hi
                start = stop
            pass_index, offset = pass_index + 1, 0

    def _chunks(self, pass_index: int):
        """One pass as shuffled chunks of `(images, labels)`."""
        start = 0
        for chunk_index, images in enumerate(self.factory(self.chunk)):
            n = len(images)
            labels = (np.asarray(self.labels[start:start + n], np.int32)
                      if self.labels is not None
                      else np.full(n, UNKNOWN_LABEL, np.int32))
            order = np.random.default_rng([self.seed, pass_index, chunk_index]
                                          ).permutation(n)
            yield np.asarray(images)[order], labels[order]
            start += n


def fixmatch_batches(splits, batch_size: int, unlabeled_ratio: int, seed: int,
                     epochs: tuple[int, int], chunk: int = DEFAULT_CHUNK):
    """Training batches `((labeled, unlabeled), (labels, unlabeled_labels))`.

    Args:
        splits: a `data.Splits` with an unlabeled split.
        batch_size: labeled images per step, `B`.
        unlabeled_ratio: `mu`: each step also has `mu * B` unlabeled images.
        seed: seeds the labeled epochs' order and the unlabeled shuffle.
        epochs: `(first, stop)`: the epochs this stream holds (as
            `data.make_dataset`'s `epochs`); an epoch is one pass over the
            labeled images.
        chunk: unlabeled images shuffled together.

    Returns:
        A `keras.utils.PyDataset` of `(stop - first) * steps_per_epoch` batches.
    """
    import keras

    from stl10_keras.data import numpy_batches

    labeled = numpy_batches(splits.x_train, splits.y_train, batch_size,
                            shuffle=True, seed=seed, epochs=epochs)
    steps = labeled.steps_per_epoch
    num_unlabeled = splits.num_unlabeled or sum(
        len(b) for b in splits.unlabeled_batches(chunk))  # unknown: count once
    stream = UnlabeledStream(
        splits.unlabeled_batches, num_unlabeled, unlabeled_ratio * batch_size,
        seed=seed, labels=getattr(splits, "unlabeled_labels", None), chunk=chunk)

    class FixMatchBatches(keras.utils.PyDataset):
        """Step `i` of epoch `e` pairs labeled batch `i` with unlabeled batch
        `e * steps_per_epoch + i`."""

        steps_per_epoch = steps
        # Labeled images per step (`Distributed.shard_batches` cuts by them).
        batch_sizes = [min(batch_size, len(splits.y_train) - i * batch_size)
                       for i in range(steps)]

        def __len__(self) -> int:
            return len(labeled)

        def __getitem__(self, index: int):
            x, y = labeled[index]
            u, u_labels = stream.batch(epochs[0] * steps + index)
            return (x, u), (y, u_labels)

    return FixMatchBatches()
