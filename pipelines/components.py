"""The pipeline's five components, after TFX's contracts, without TFX.

Each component is a plain function `(output_dir, inputs..., parameters...) ->
properties`: it reads its input artifacts, writes its payload into
`output_dir`, and returns the JSON-ready properties that go into the
artifact's `metadata.json`. The runner (`pipelines.pipeline`) decides whether
a component runs at all (its cache), gives it a fresh output folder and
commits the artifact atomically.

An artifact is a folder holding `metadata.json` (type, producer, parameters,
fingerprint of its inputs and parameters, created time, properties) and its
payload:

- `ExampleGen` -> `Examples`: `Split-{train,validation,test,unlabeled}/
  data_tfrecord-0000i-of-0000N.gz` (gzipped TFRecord files of `tf.train.Example`:
  raw uint8 `image`, its `shape`, `label`; -1 for unlabeled), counts and a
  content hash of the images and labels.
- `Transform` -> `TransformOutput`: `statistics.json` (per-channel mean/std of
  the training split) and, for the k-means variants, `kmeans.npz` (each
  layer's kernel, bias and centroids) and `kmeans.json`.
- `Trainer` -> `Model`: `model_run/`, the `stl10_keras.train` run directory
  (`model.keras`, `metrics.json`, `logs/`, `figures/`, ...).
- `Evaluator` -> `ModelBlessing`: `BLESSED` or `NOT_BLESSED` (its reason in one
  sentence), `evaluation.json`, `confusion_matrix.png`.
- `Pusher` -> `PushedModel`: the pushed version and path, or why nothing was
  pushed. A pushed version is `SERVING_DIR/N/` (TF Serving's layout) and holds
  `assets.extra/pipeline_push.json`, which names the model it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from stl10_keras.config import Config, ConfigError
from stl10_keras.io_utils import atomic_write_json, atomic_write_text, read_json

#: Part of every fingerprint: bump it when a component's output changes for the
#: same inputs and parameters, so old artifacts stop counting as cached.
CODE_VERSION = "1"
METADATA_FILE = "metadata.json"
SPLITS = ("train", "validation", "test", "unlabeled")
ARTIFACT_TYPES = {
    "ExampleGen": "Examples",
    "Transform": "TransformOutput",
    "Trainer": "Model",
    "Evaluator": "ModelBlessing",
    "Pusher": "PushedModel",
}
BLESSED_FILE = "BLESSED"
NOT_BLESSED_FILE = "NOT_BLESSED"
#: Inside each pushed version (TF Serving ignores `assets.extra/`).
PUSH_RECORD = "assets.extra/pipeline_push.json"
#: The Trainer's Keras model inside its artifact.
MODEL_PATH = "model_run/model.keras"
_BATCH = 256  # images per batch when streaming a split
_REQUIRED_METADATA = ("type", "producer", "fingerprint", "parameters", "properties",
                      "created")


# --- artifacts and fingerprints --------------------------------------------------

@dataclass(frozen=True)
class Artifact:
    """A committed artifact: its folder and its `metadata.json`."""

    uri: Path
    metadata: dict[str, Any]

    @property
    def type(self) -> str:
        return self.metadata["type"]

    @property
    def fingerprint(self) -> str:
        return self.metadata["fingerprint"]

    @property
    def properties(self) -> dict[str, Any]:
        return self.metadata["properties"]


def read_artifact(uri: str | os.PathLike) -> Artifact | None:
    """The artifact in `uri`, or None unless it holds a complete `metadata.json`."""
    path = Path(uri) / METADATA_FILE
    try:
        metadata = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(metadata, dict) or any(k not in metadata
                                             for k in _REQUIRED_METADATA):
        return None
    return Artifact(Path(uri), metadata)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def compute_fingerprint(component: str, parameters: dict[str, Any],
                        inputs: dict[str, str]) -> str:
    """sha256 of a component's name, `CODE_VERSION`, parameters and inputs.

    Args:
        component: e.g. `Trainer`.
        parameters: the JSON-ready parameters that shape its output.
        inputs: `{input name: the input artifact's fingerprint}`.

    Returns:
        64 hex digits.
    """
    text = canonical_json({"component": component, "code_version": CODE_VERSION,
                           "parameters": parameters, "inputs": inputs})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- ExampleGen ------------------------------------------------------------------

class ContentHash:
    """sha256 of a dataset's content: each split's count, image shape, pixels, labels.

    Fed batch by batch (the unlabeled split is a stream), split by split; the
    digest does not depend on how the batches are cut.
    """

    def __init__(self):
        self._splits: dict[str, dict[str, Any]] = {}

    def update(self, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        s = self._splits.setdefault(split, {"count": 0, "shape": None,
                                            "images": hashlib.sha256(),
                                            "labels": hashlib.sha256()})
        images = np.ascontiguousarray(images, np.uint8)
        s["count"] += len(images)
        s["shape"] = list(images.shape[1:])
        s["images"].update(images.tobytes())
        s["labels"].update(np.ascontiguousarray(labels, "<i4").tobytes())

    def hexdigest(self) -> str:
        summary = {name: {"count": s["count"], "shape": s["shape"],
                          "images": s["images"].hexdigest(),
                          "labels": s["labels"].hexdigest()}
                   for name, s in self._splits.items()}
        return hashlib.sha256(canonical_json(summary).encode()).hexdigest()


def shard_name(split: str, index: int, num_shards: int) -> str:
    """TFX's file naming: `Split-train/data_tfrecord-00000-of-00004.gz`."""
    return f"Split-{split}/data_tfrecord-{index:05d}-of-{num_shards:05d}.gz"


def _serialize(image: np.ndarray, label: int) -> bytes:
    import tensorflow as tf

    feature = {
        "image": tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=image.shape)),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    return tf.train.Example(
        features=tf.train.Features(feature=feature)).SerializeToString()


def _write_split(output_dir: Path, split: str, batches: Iterable, count: int,
                 num_shards: int, hasher: ContentHash, bar) -> int:
    """Write `count` images into `num_shards` contiguous shards, in stream order.

    Shard i holds images `[i * count // N, (i + 1) * count // N)`, so reading
    the shards in order gives the split in its original order.
    """
    import tensorflow as tf

    options = tf.io.TFRecordOptions(compression_type="GZIP")
    bounds = [i * count // num_shards for i in range(num_shards + 1)]
    (output_dir / f"Split-{split}").mkdir(parents=True, exist_ok=True)
    shard, written = 0, 0
    writer = tf.io.TFRecordWriter(str(output_dir / shard_name(split, 0, num_shards)),
                                  options)
    try:
        for images, labels in batches:
            hasher.update(split, images, labels)
            for image, label in zip(images, labels):
                # Past the expected count (a stream longer than announced) the
                # rest goes into the last shard.
                while shard < num_shards - 1 and written >= bounds[shard + 1]:
                    writer.close()
                    shard += 1
                    writer = tf.io.TFRecordWriter(
                        str(output_dir / shard_name(split, shard, num_shards)), options)
                writer.write(_serialize(image, label))
                written += 1
            bar.update(len(images))
    finally:
        writer.close()
    for later in range(shard + 1, num_shards):  # empty shards keep the -of-N set whole
        tf.io.TFRecordWriter(str(output_dir / shard_name(split, later, num_shards)),
                             options).close()
    return written


def _labeled_batches(images: np.ndarray, labels: np.ndarray) -> Iterator:
    for i in range(0, len(images), _BATCH):
        yield images[i:i + _BATCH], labels[i:i + _BATCH]


def example_gen(
    output_dir: str | os.PathLike,
    dataset: str,
    data_dir: str | None = None,
    val_per_class: int | None = None,
    seed: int = 0,
    num_shards: int = 4,
    download: bool = True,
    progress: bool = True,
    labeled_per_class: int | None = None,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
) -> dict[str, Any]:
    """Materialise a dataset's four splits as sharded, gzipped TFRecord files.

    Args:
        output_dir: the artifact folder being written.
        dataset, data_dir, val_per_class, seed, download, labeled_per_class,
            image_size, channels: as `stl10_keras.data.load_splits` (the seed
            fixes the train/validation split).
        num_shards: files per split.
        progress: show a progress bar over all images.

    Returns:
        Properties: `dataset`, `source`, `class_names`, `image_shape`,
        `counts` (per split), `content_hash`, `num_shards`, `val_indices`.
    """
    from tqdm.auto import tqdm

    from stl10_keras.data import load_splits

    output_dir = Path(output_dir)
    splits = load_splits(dataset, data_dir, val_per_class, seed, download,
                         labeled_per_class=labeled_per_class,
                         image_size=tuple(image_size) if image_size else None,
                         channels=channels)
    num_unlabeled = splits.num_unlabeled
    if num_unlabeled is None:  # a source that does not say: count the stream once
        num_unlabeled = sum(len(b) for b in splits.unlabeled_batches(_BATCH))
    labeled = {"train": (splits.x_train, splits.y_train),
               "validation": (splits.x_val, splits.y_val),
               "test": (splits.x_test, splits.y_test)}
    total = sum(len(y) for _, y in labeled.values()) + num_unlabeled
    hasher, counts = ContentHash(), {}
    with tqdm(total=total, desc="ExampleGen", unit="img", disable=not progress,
              leave=False) as bar:
        for split, (x, y) in labeled.items():
            counts[split] = _write_split(output_dir, split, _labeled_batches(x, y),
                                         len(y), num_shards, hasher, bar)
        unlabeled = ((b, np.full(len(b), -1, np.int32))
                     for b in (splits.unlabeled_batches(_BATCH) if num_unlabeled
                               else ()))
        counts["unlabeled"] = _write_split(output_dir, "unlabeled", unlabeled,
                                           num_unlabeled, num_shards, hasher, bar)
    if counts["unlabeled"] == 0:  # an empty split still hashes the same way
        hasher.update("unlabeled", np.zeros((0, *splits.image_shape), np.uint8),
                      np.zeros(0, np.int32))
    return {
        "dataset": splits.name,
        "source": splits.source,
        "class_names": list(splits.class_names),
        "image_shape": list(splits.image_shape),
        "counts": counts,
        "content_hash": hasher.hexdigest(),
        "num_shards": num_shards,
        "val_indices": [int(i) for i in splits.val_indices],
    }


def split_files(examples: Artifact, split: str) -> list[str]:
    """The shard files of one split, in order."""
    n = examples.properties["num_shards"]
    return [str(examples.uri / shard_name(split, i, n)) for i in range(n)]


def read_split_batches(
    examples: Artifact, split: str, batch_size: int = _BATCH
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream one split from its shards, in order: `(uint8 images, int32 labels)`."""
    import tensorflow as tf

    shape = examples.properties["image_shape"]
    spec = {"image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64)}

    def parse(serialized):
        features = tf.io.parse_example(serialized, spec)
        images = tf.reshape(tf.io.decode_raw(features["image"], tf.uint8), [-1, *shape])
        return images, tf.cast(features["label"], tf.int32)

    ds = tf.data.TFRecordDataset(split_files(examples, split), compression_type="GZIP")
    ds = ds.batch(batch_size).map(parse).prefetch(2)
    for images, labels in ds.as_numpy_iterator():
        yield images, labels


def read_split(examples: Artifact, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split as arrays (the labeled splits; the unlabeled one is streamed)."""
    shape = examples.properties["image_shape"]
    xs, ys = [np.zeros((0, *shape), np.uint8)], [np.zeros(0, np.int32)]
    for images, labels in read_split_batches(examples, split):
        xs.append(images)
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def load_examples(examples: Artifact):
    """The Examples artifact as a `stl10_keras.data.Splits` (what `train` takes).

    The labeled splits are read into arrays; the unlabeled split stays a
    stream read from its shards on each call of `unlabeled_batches`.
    """
    from stl10_keras.data import DataUnavailableError, Splits

    p = examples.properties
    x_train, y_train = read_split(examples, "train")
    x_val, y_val = read_split(examples, "validation")
    x_test, y_test = read_split(examples, "test")
    num_unlabeled = p["counts"]["unlabeled"]

    def unlabeled_batches(batch_size: int) -> Iterator[np.ndarray]:
        if not num_unlabeled:
            raise DataUnavailableError(
                f"The Examples artifact {examples.uri} has no unlabeled images, which "
                "the k-means variants need; give ExampleGen a dataset with unlabeled "
                "images (STL-10's unlabeled_X.bin, a folder's unlabeled/) or pick "
                "--variant baseline or augment.")
        for images, _ in read_split_batches(examples, "unlabeled", batch_size):
            yield images

    return Splits(
        name=p["dataset"], class_names=tuple(p["class_names"]),
        image_shape=tuple(p["image_shape"]), x_train=x_train, y_train=y_train,
        x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test,
        unlabeled_batches=unlabeled_batches, num_unlabeled=num_unlabeled,
        source=f"pipeline Examples {examples.uri} ({p['source']})",
        val_indices=np.asarray(p["val_indices"], np.int64),
    )


# --- Transform -------------------------------------------------------------------

def transform_parameters(config: Config) -> dict[str, Any]:
    """The config fields that shape the Transform's output (its fingerprint).

    The k-means section, the seed, mixed precision (the model k-means runs
    through is built under the training policy), and the model fields of the
    stages up to the last k-means stage; nothing else of the model.
    """
    k, m, t = config.kmeans, config.model, config.train
    if not k.stages:
        return {"kmeans": {"stages": []}}
    last = max(k.stages)
    return {
        "kmeans": json.loads(canonical_json(_as_dict(k))),
        "seed": t.seed,
        "mixed_precision": t.mixed_precision,
        "model": {"widths": list(m.widths[:last]),
                  "convs_per_stage": list(m.convs_per_stage[:last]),
                  "kernel_size": m.kernel_size, "batch_norm": m.batch_norm,
                  "bn_epsilon": m.bn_epsilon},
    }


def _as_dict(section) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(section)


def channel_statistics(batches: Iterable[np.ndarray]) -> dict[str, Any]:
    """Per-channel mean and standard deviation (0..255 units) of uint8 images."""
    n, total, total_sq = 0, None, None
    for images in batches:
        x = np.asarray(images, np.float64).reshape(-1, images.shape[-1])
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        n += len(x)
    if not n:
        raise ValueError("No images to compute statistics from.")
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
    return {"mean": mean.tolist(), "std": std.tolist(), "pixels": int(n)}


def compute_kmeans(config: Config, splits, progress: bool = True) -> dict:
    """What `train` computes for the k-means stages, computed ahead of training.

    The model is built exactly as `stl10_keras.train.train` builds it (seed,
    precision policy, `build_model`) and `kmeans_init` runs on it with the
    unlabeled stream, so the result equals what training would compute itself.
    """
    import keras

    from stl10_keras.kmeans import kmeans_init
    from stl10_keras.model import build_model

    t = config.train
    previous = keras.mixed_precision.global_policy()
    keras.utils.set_random_seed(t.seed)
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if t.mixed_precision else "float32")
    try:
        model = build_model(config, splits.image_shape)
        return kmeans_init(model, config, lambda: splits.unlabeled_batches(256),
                           progress=progress)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def transform(output_dir: str | os.PathLike, examples: Artifact, config: Config,
              progress: bool = True) -> dict[str, Any]:
    """Dataset statistics and, per the variant, the k-means kernels of stages 1-2.

    Args:
        output_dir: the artifact folder being written.
        examples: the ExampleGen artifact.
        config: the run config (`transform_parameters` lists what is used).
        progress: show k-means progress bars.

    Returns:
        Properties: `statistics` and `kmeans` (layer names, seconds; None when
        the variant has no k-means stage).
    """
    output_dir = Path(output_dir)
    splits = load_examples(examples)
    statistics = {"train": channel_statistics(
        splits.x_train[i:i + _BATCH] for i in range(0, len(splits.x_train), _BATCH))}
    atomic_write_json(output_dir / "statistics.json", statistics)
    kmeans = None
    if config.kmeans.stages:
        result = compute_kmeans(config, splits, progress)
        arrays = {}
        for name, (kernel, bias) in result["weights"].items():
            arrays[f"{name}/kernel"] = np.asarray(kernel)
            arrays[f"{name}/bias"] = np.asarray(bias)
            arrays[f"{name}/centroids"] = np.asarray(result["centroids"][name])
        np.savez(output_dir / "kmeans.npz", **arrays)
        info = {"kmeans_seconds": result["kmeans_seconds"], "layers": result["layers"]}
        atomic_write_json(output_dir / "kmeans.json", info)
        kmeans = {"layers": list(result["weights"]),
                  "kmeans_seconds": result["kmeans_seconds"]}
    return {"statistics": statistics, "kmeans": kmeans}


def load_kmeans_result(transform_output: Artifact) -> dict | None:
    """The Transform's k-means result in `kmeans_init`'s form (None: no k-means)."""
    if not transform_output.properties.get("kmeans"):
        return None
    info = read_json(transform_output.uri / "kmeans.json")
    with np.load(transform_output.uri / "kmeans.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    names = transform_output.properties["kmeans"]["layers"]
    return {
        "kmeans_seconds": info["kmeans_seconds"],
        "layers": info["layers"],
        "centroids": {n: arrays[f"{n}/centroids"] for n in names},
        "weights": {n: (arrays[f"{n}/kernel"], arrays[f"{n}/bias"]) for n in names},
    }


# --- Trainer ---------------------------------------------------------------------

def trainer(output_dir: str | os.PathLike, examples: Artifact,
            transform_output: Artifact, config: Config,
            verbose: int = 1) -> dict[str, Any]:
    """Train with `stl10_keras.train.train` on the Examples and the Transform's k-means.

    The run directory is `output_dir/model_run`; `train` resumes it from its
    last completed epoch when the same Trainer was interrupted.

    Returns:
        Properties: `val_accuracy`, `test_accuracy`, `epochs`, `resumed`,
        `wall_seconds`, `class_names`, `image_shape`, `model` (path inside the
        artifact).
    """
    from stl10_keras.train import train

    splits = load_examples(examples)
    metrics = train(config, Path(output_dir) / "model_run", export_dir=None,
                    verbose=verbose, splits=splits,
                    kmeans_result=load_kmeans_result(transform_output))
    return {
        "val_accuracy": metrics["val_accuracy"],
        "test_accuracy": metrics["test_accuracy"],
        "epochs": metrics["epochs"],
        "resumed": metrics["resumed"],
        "wall_seconds": metrics["wall_seconds"],
        "class_names": list(splits.class_names),
        "image_shape": list(splits.image_shape),
        "model": MODEL_PATH,
    }


# --- Evaluator -------------------------------------------------------------------

def read_push_record(version_dir: str | os.PathLike) -> dict | None:
    """The pipeline's record inside a pushed version (None: not a pipeline's push)."""
    try:
        record = read_json(Path(version_dir) / PUSH_RECORD)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def served_baseline(serving_dir: str | os.PathLike,
                    candidate_fingerprint: str) -> dict[str, Any] | None:
    """The served model the Evaluator compares a candidate with, and its identity.

    The highest version under `serving_dir` (TF Serving serves the highest),
    skipping versions pushed from the candidate itself (their push record
    names its fingerprint): after a push, the same candidate is compared with
    what was served before it, not with itself.

    Returns:
        `{"version", "path", "identity"}`; `identity` is a hash of the
        version's `saved_model.pb` and `variables.index` (the index holds each
        tensor's checksum), so a different model under the same number counts
        as different. None when nothing else is served.
    """
    from stl10_keras.export import list_versions

    base = Path(serving_dir)
    for version in reversed(list_versions(base)):
        path = base / str(version)
        record = read_push_record(path)
        if record and record.get("model_fingerprint") == candidate_fingerprint:
            continue
        digest = hashlib.sha256()
        for name in ("saved_model.pb", "variables/variables.index"):
            if (path / name).is_file():
                digest.update(_file_sha256(path / name).encode())
        return {"version": version, "path": str(path), "identity": digest.hexdigest()}
    return None


def _served_predictions(path: str, images: np.ndarray, batch_size: int) -> np.ndarray:
    import tensorflow as tf

    try:
        fn = tf.saved_model.load(path).signatures["serving_default"]
    except Exception as e:  # any unloadable version
        raise ConfigError(
            f"The served model {path} does not load ({type(e).__name__}); remove that "
            "version or pass another --serving-dir.") from None
    spec = fn.structured_input_signature[1].get("images")
    if spec is None or tuple(spec.shape[1:]) != tuple(images.shape[1:]):
        raise ConfigError(
            f"The served model {path} does not take {images.shape[1]}x"
            f"{images.shape[2]}x{images.shape[3]} 'images'; it serves another dataset: "
            "pass this dataset's --serving-dir.")
    ids = [fn(images=tf.constant(images[i:i + batch_size]))["class_ids"].numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


def save_confusion_matrix(matrix: np.ndarray, class_names, title: str,
                          path: str | os.PathLike) -> np.ndarray:
    """Draw a confusion matrix (counts, rows = true class) as a PNG, atomically."""
    from matplotlib.figure import Figure

    from stl10_keras.visualize import figure_to_array, save_png

    n = len(class_names)
    fig = Figure(figsize=(1.0 + 0.5 * n, 0.8 + 0.5 * n), dpi=100)
    ax = fig.add_axes((0.22, 0.2, 0.72, 0.68))
    ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    peak = matrix.max() if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > peak / 2 else "black")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    ax.set_title(title, fontsize=9)
    image = figure_to_array(fig)
    save_png(image, str(path))
    return image


def blessing_decision(accuracy: float, threshold: float,
                      baseline: dict | None) -> tuple[bool, str]:
    """Bless when `accuracy >= threshold` and `>=` the served model's accuracy.

    Args:
        accuracy: the candidate's validation accuracy.
        threshold: the lowest accuracy to bless.
        baseline: None, or `{"version", "accuracy"}` of the served model.

    Returns:
        `(blessed, the reason in one sentence)`.
    """
    if accuracy < threshold:
        return False, (f"Validation accuracy {accuracy:.4f} is below the threshold "
                       f"{threshold:.4f} (--accuracy-threshold).")
    if baseline is not None and accuracy < baseline["accuracy"]:
        return False, (f"Validation accuracy {accuracy:.4f} is below the "
                       f"{baseline['accuracy']:.4f} of served version "
                       f"{baseline['version']}.")
    against = ("no other model is served yet" if baseline is None else
               f"at least the {baseline['accuracy']:.4f} of served version "
               f"{baseline['version']}")
    return True, (f"Validation accuracy {accuracy:.4f} is at least the threshold "
                  f"{threshold:.4f} and {against}.")


def evaluator(output_dir: str | os.PathLike, examples: Artifact, model: Artifact,
              baseline: dict | None, accuracy_threshold: float,
              batch_size: int = 256) -> dict[str, Any]:
    """Validation/test accuracy, per class, confusion matrix; bless or not.

    Args:
        output_dir: the artifact folder being written.
        examples: the ExampleGen artifact (validation and test splits).
        model: the Trainer artifact.
        baseline: `served_baseline(...)` (None: nothing served).
        accuracy_threshold: the lowest validation accuracy to bless.
        batch_size: images per prediction batch.

    Returns:
        Properties: `blessed`, `reason`, `val_accuracy`, `test_accuracy`,
        `baseline` (version, path, accuracy or None).
    """
    from sklearn.metrics import confusion_matrix

    from stl10_keras.model import load_model

    output_dir = Path(output_dir)
    class_names = examples.properties["class_names"]
    keras_model = load_model(model.uri / MODEL_PATH)
    results: dict[str, Any] = {}
    for split in ("validation", "test"):
        x, y = read_split(examples, split)
        logits = keras_model.predict(x, batch_size=batch_size, verbose=0)
        predicted = np.argmax(logits, axis=-1)
        matrix = confusion_matrix(y, predicted, labels=range(len(class_names)))
        per_class = np.diag(matrix) / np.maximum(matrix.sum(1), 1)
        accuracy = float(np.mean(predicted == y)) if len(y) else 0.0
        results[split] = {
            "accuracy": accuracy,
            "per_class_accuracy": dict(zip(class_names, per_class.tolist())),
            "confusion_matrix": matrix.tolist(),
        }
        suffix = "" if split == "validation" else "_test"
        save_confusion_matrix(matrix, class_names,
                              f"{split} confusion matrix (accuracy {accuracy:.4f})",
                              output_dir / f"confusion_matrix{suffix}.png")
        if split == "validation":
            x_val, y_val = x, y
    served = None
    if baseline is not None:
        ids = _served_predictions(baseline["path"], x_val, batch_size)
        served = {**baseline, "accuracy": float(np.mean(ids == y_val))}
    blessed, reason = blessing_decision(results["validation"]["accuracy"],
                                        accuracy_threshold, served)
    evaluation = {"validation": results["validation"], "test": results["test"],
                  "baseline": served, "accuracy_threshold": accuracy_threshold,
                  "blessed": blessed, "reason": reason}
    atomic_write_json(output_dir / "evaluation.json", evaluation)
    atomic_write_text(output_dir / (BLESSED_FILE if blessed else NOT_BLESSED_FILE),
                      reason + "\n")
    return {"blessed": blessed, "reason": reason,
            "val_accuracy": results["validation"]["accuracy"],
            "test_accuracy": results["test"]["accuracy"], "baseline": served}


# --- Pusher ----------------------------------------------------------------------

def pusher(output_dir: str | os.PathLike, model: Artifact, blessing: Artifact,
           serving_dir: str | os.PathLike) -> dict[str, Any]:
    """Export a blessed model as the next version under `serving_dir`, atomically.

    The SavedModel is exported (`stl10_keras.export.export_saved_model`) into a
    staging folder inside `serving_dir` (TF Serving skips non-integer names),
    gets its push record, and is renamed to the next free version number: a
    version appears complete or not at all. A model that is not blessed, or
    that the highest version already holds, is not pushed.

    Returns:
        Properties: `pushed` (the model is now served from `serving_dir`),
        `pushed_now`, `version`, `destination`, `reason`.
    """
    from stl10_keras.export import export_saved_model, list_versions, next_version
    from stl10_keras.model import load_model

    base = Path(serving_dir)
    if not blessing.properties["blessed"]:
        return {"pushed": False, "pushed_now": False, "version": None,
                "destination": None,
                "reason": f"not pushed: {blessing.properties['reason']}"}
    versions = list_versions(base)
    if versions:
        record = read_push_record(base / str(versions[-1]))
        if record and record.get("model_fingerprint") == model.fingerprint:
            return {"pushed": True, "pushed_now": False, "version": versions[-1],
                    "destination": str(base / str(versions[-1])),
                    "reason": f"version {versions[-1]} already serves this model"}
    keras_model = load_model(model.uri / MODEL_PATH)
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".pipeline-push-{uuid.uuid4().hex[:8]}"
    try:
        exported = export_saved_model(keras_model, staging,
                                      model.properties["class_names"], version=1)
        atomic_write_json(exported / PUSH_RECORD, {
            "model_fingerprint": model.fingerprint, "model": str(model.uri),
            "blessing": str(blessing.uri), "pushed_at": _now()})
        for _ in range(100):  # another pusher may take a number first
            version = next_version(base)
            final = base / str(version)
            try:
                os.rename(exported, final)
                break
            except OSError:
                if not final.exists():
                    raise
        else:
            raise RuntimeError(f"Could not find a free version number in {base}.")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"pushed": True, "pushed_now": True, "version": version,
            "destination": str(final), "reason": f"pushed version {version} to {final}"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
