"""`python -m stl10_keras.train`: config -> data -> init -> fit -> evaluate -> export.

Run directory (one per run):

    RUN/config.json  metrics.json  model.keras  history.csv  logs/  backup/  figures/

Rerunning the same command after an interruption resumes from the last
completed epoch (keras BackupAndRestore); rerunning a finished run prints its
results and does nothing (`--overwrite` starts it over).

`--distribution mirrored` (TensorFlow) or `data-parallel` (JAX, also across
hosts) trains on several devices; see `stl10_keras.distribute`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

# 3, not 2: also hides C++ errors TensorFlow logs for a machine without CUDA
# ("failed call to cuInit"); a user who sets it lower sees them again.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from stl10_keras import config as cfg  # noqa: E402
from stl10_keras.config import Config, ConfigError  # noqa: E402
from stl10_keras.io_utils import atomic_write_json, read_json  # noqa: E402

if TYPE_CHECKING:
    from stl10_keras.distribute import Distributed, DistributionOptions


class TrainingError(RuntimeError):
    """Training cannot go on; the message says what to change."""


# --- command line ---------------------------------------------------------------

def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 64,128, got '{text}'"
        ) from None


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MIN,MAX like 1.0,1.4, got '{text}'"
        ) from None
    return lo, hi


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that shape a `Config` (shared by train and ablation)."""
    g = parser.add_argument_group("run")
    g.add_argument("--dataset", choices=cfg.DATASETS, default=None,
                   help="stl10 (default) or the bundled digits dataset")
    g.add_argument("--data-dir", default=None,
                   help="folder with stl10_binary/ or stl10_binary.tar.gz, or a "
                        "tensorflow-datasets data dir")
    g.add_argument("--preset", choices=cfg.PRESETS, default=None,
                   help="default (trains), paper (the lab's lr 1.0) or smoke (tiny)")
    g.add_argument("--variant", choices=cfg.VARIANTS, default=None,
                   help="the lab's Table 1 column (default kmeans12)")
    g.add_argument("--config", default=None,
                   help="a config.json to start from (e.g. RUN/config.json)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--val-per-class", type=int, default=None,
                   help="labeled images per class held out for validation")
    g.add_argument("--no-download", action="store_true",
                   help="never let tensorflow-datasets download STL-10")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--learning-rate", type=float, default=None)
    g.add_argument("--lr-decay", type=float, default=None,
                   help="inverse-time decay per step: lr / (1 + decay * step)")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--mixed-precision", action="store_true", default=None,
                   help="train in mixed bfloat16")
    g = parser.add_argument_group("model")
    g.add_argument("--widths", type=_ints, default=None, help="filters per stage")
    g.add_argument("--convs-per-stage", type=_ints, default=None)
    g.add_argument("--kernel-size", type=int, default=None,
                   help="conv kernel side (k-means patches of stage 1 match it)")
    g.add_argument("--fc-units", type=int, default=None)
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--batch-norm", choices=("manual", "keras"), default=None)
    g = parser.add_argument_group("augmentation")
    g.add_argument("--augment", dest="augment", action="store_true", default=None,
                   help="augment (default for every variant but baseline)")
    g.add_argument("--no-augment", dest="augment", action="store_false")
    g.add_argument("--augment-on", choices=("device", "cpu"), default=None,
                   help="in the model on the accelerator (default) or in tf.data")
    g.add_argument("--max-rotation", type=float, default=None, help="degrees")
    g.add_argument("--scale-range", type=_range, default=None, help="MIN,MAX zoom")
    g.add_argument("--max-translation", type=float, default=None,
                   help="fraction of the image size")
    g.add_argument("--no-flip", action="store_true", default=None)
    g = parser.add_argument_group("k-means pre-training")
    g.add_argument("--kmeans-patch-size", type=int, default=None)
    g.add_argument("--kmeans-images", type=int, default=None,
                   help="unlabeled images read for k-means")
    g.add_argument("--kmeans-patches-per-image", type=int, default=None)
    g.add_argument("--no-whiten", action="store_true", default=None)


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve preset (or --config file) + explicit flags into a validated Config."""
    if args.config:
        config = Config.from_file(args.config)
        if args.variant:
            config.variant = args.variant
            cfg.apply_variant(config)
    else:
        config = cfg.preset(args.preset or "default", args.dataset or "stl10",
                            args.variant or "kmeans12")
    if args.dataset and args.config:
        config.data.dataset = args.dataset
    d, t, m, a, k = (config.data, config.train, config.model, config.augment,
                     config.kmeans)
    overrides = [
        (d, "data_dir", args.data_dir), (d, "val_per_class", args.val_per_class),
        (t, "seed", args.seed), (t, "epochs", args.epochs),
        (t, "batch_size", args.batch_size), (t, "learning_rate", args.learning_rate),
        (t, "lr_decay", args.lr_decay), (t, "weight_decay", args.weight_decay),
        (t, "momentum", args.momentum), (t, "mixed_precision", args.mixed_precision),
        (m, "widths", args.widths), (m, "fc_units", args.fc_units),
        (m, "kernel_size", args.kernel_size),
        (m, "dropout", args.dropout), (m, "batch_norm", args.batch_norm),
        (a, "enabled", args.augment), (a, "on", args.augment_on),
        (a, "max_rotation_deg", args.max_rotation),
        (a, "max_translation", args.max_translation),
        (k, "patch_size", args.kmeans_patch_size), (k, "num_images", args.kmeans_images),
        (k, "patches_per_image", args.kmeans_patches_per_image),
    ]
    for section, name, value in overrides:
        if value is not None:
            setattr(section, name, value)
    if args.no_download:
        d.download = False
    if args.convs_per_stage is not None:
        m.convs_per_stage = args.convs_per_stage
    elif args.widths is not None and len(m.convs_per_stage) != len(m.widths):
        m.convs_per_stage = (1,) * len(m.widths)
    if args.scale_range is not None:
        a.scale_min, a.scale_max = args.scale_range
    if args.no_flip:
        a.flip = False
    if args.no_whiten:
        k.whiten = False
    cfg.validate(config)
    return config


def default_run_name(config: Config) -> str:
    suffix = "" if config.preset == "default" else f"_{config.preset}"
    return f"{config.data.dataset}_{config.variant}{suffix}_s{config.train.seed}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stl10_keras.train",
        description="Train the lab's 5-stage CNN on STL-10 (or digits), evaluate it "
                    "and export a SavedModel.",
    )
    add_config_arguments(parser)
    g = parser.add_argument_group("outputs")
    g.add_argument("--run-dir", default=None,
                   help="run directory (default runs/DATASET_VARIANT[_PRESET]_sSEED)")
    g.add_argument("--export-dir", default=None,
                   help="TF Serving model base path (default saved_models/RUN_NAME)")
    g.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    g.add_argument("--overwrite", action="store_true",
                   help="start over even if the run dir holds a run")
    g.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                   help="keras progress: 0 silent, 1 progress bar, 2 one line/epoch")
    g = parser.add_argument_group(
        "distribution",
        "data-parallel training; --batch-size stays the global batch (README)")
    g.add_argument("--distribution", choices=("none", "mirrored", "data-parallel"),
                   default="none",
                   help="mirrored: tf.distribute.MirroredStrategy "
                        "(KERAS_BACKEND=tensorflow); data-parallel: "
                        "keras.distribution.DataParallel (KERAS_BACKEND=jax)")
    g.add_argument("--devices", default=None,
                   help="N (the first N GPUs) or gpu:0,gpu:1; cpu:0,cpu:1 splits "
                        "the CPU into logical devices (default: every GPU)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="multi-host data-parallel: process 0's address")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="multi-host data-parallel: processes in the job")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="multi-host data-parallel: this process, 0..N-1")
    return parser


def distribution_options(args: argparse.Namespace) -> "DistributionOptions":
    """The `--distribution` flags as `distribute.DistributionOptions`."""
    from stl10_keras.distribute import DistributionOptions

    return DistributionOptions(args.distribution, args.devices,
                               args.coordinator_address, args.num_processes,
                               args.process_id)


# --- training -------------------------------------------------------------------

class _Throughput:
    """Train-only images/second per epoch (validation time excluded)."""

    def __init__(self, batch_size: int):
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer._t0 = time.perf_counter()
                outer._val = 0.0
                outer._steps = 0

            def on_train_batch_end(self, batch, logs=None):
                outer._steps += 1

            def on_test_begin(self, logs=None):
                outer._tv = time.perf_counter()

            def on_test_end(self, logs=None):
                outer._val += time.perf_counter() - outer._tv

            def on_epoch_end(self, epoch, logs=None):
                seconds = time.perf_counter() - outer._t0 - outer._val
                outer.epochs.append((outer._steps * batch_size, seconds))

        self.callback = Callback()
        self.epochs: list[tuple[int, float]] = []

    def images_per_sec(self) -> float | None:
        # The first epoch includes tracing and compilation; leave it out if we can.
        timed = self.epochs[1:] if len(self.epochs) > 1 else self.epochs
        seconds = sum(s for _, s in timed)
        return sum(n for n, _ in timed) / seconds if seconds > 0 else None


class _EpochRandomState:
    """Draws each epoch's dropout and augmentation randomness from (seed, epoch).

    Dropout and `RandomAffine` draw from `keras.random.SeedGenerator`s whose
    state (a seed and a counter) is not among the weights that keras'
    `BackupAndRestore` saves, so a resumed run would start them over and
    repeat epoch 0's draws. At the start of epoch `e` this sets each
    generator's counter to its initial counter `+ e * 2**20` (an epoch takes
    fewer steps than that), so every epoch's draws are the same whether or not
    the run was resumed. It also checks that keras starts at `first_epoch`,
    the epoch the training data stream starts at.
    """

    def __init__(self, model, first_epoch: int):
        import keras

        from stl10_keras.data import EPOCH_SEED_STRIDE

        outer = self
        # SeedGenerator states are variables named like this, outside `weights`.
        self._states = [v for v in model.variables
                        if v.name == "seed_generator_state"]
        self._initial = [keras.ops.convert_to_numpy(v).tolist() for v in self._states]
        self._next_epoch = first_epoch

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                import numpy as np

                if epoch != outer._next_epoch:
                    raise TrainingError(
                        f"keras started epoch {epoch + 1} where the training data "
                        f"holds epoch {outer._next_epoch + 1}; rerun with --overwrite."
                    )
                outer._next_epoch = epoch + 1
                for v, (seed, counter) in zip(outer._states, outer._initial):
                    # Kept below 2**31: TensorFlow folds seeds into int32.
                    counter = (counter + epoch * EPOCH_SEED_STRIDE) % (2**31 - 1)
                    v.assign(np.array([seed, counter], dtype=v.dtype))

        self.callback = Callback()


def _device_summary(dist) -> str:
    """The devices `fit` will use, in words, e.g. `1 GPU (gpu:0)` or `the CPU`.

    TensorFlow's own CUDA start-up errors are hidden by default
    (TF_CPP_MIN_LOG_LEVEL=3), so a GPU machine whose driver fails says so here.
    """
    import keras

    if dist.devices:
        return f"{len(dist.devices)} devices ({', '.join(dist.devices)})"
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        gpus = [str(d) for d in jax.local_devices() if d.platform != "cpu"]
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    else:
        return f"the {backend} backend's default device"
    if gpus:
        return f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''} ({', '.join(gpus)})"
    return ("the CPU (no GPU visible; TF_CPP_MIN_LOG_LEVEL=0 shows TensorFlow's "
            "CUDA messages)" if backend == "tensorflow" else "the CPU (no GPU visible)")


def _restore_backup(backup, training_model) -> int:
    """Restore an interrupted run's backup now; the epoch to resume at (0: none).

    `fit` restores it again (the same files), but the training data stream
    must start at that epoch before `fit` is called.
    """
    backup.set_model(training_model)
    backup.on_train_begin()
    return int(getattr(training_model, "_initial_epoch", None) or 0)


def _stream_length(batches) -> int:
    """Batches in a training stream: a tf.data cardinality or a PyDataset's len."""
    if hasattr(batches, "cardinality"):
        return int(batches.cardinality())
    return len(batches)


def _read_history(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    rows: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            # A crash between CSVLogger and the backup can repeat an epoch;
            # keep the last row written for each.
            rows[int(row["epoch"])] = {k: float(v) for k, v in row.items()
                                       if k != "epoch" and v != ""}
    return [{"epoch": e + 1, **rows[e]} for e in sorted(rows)]


def _accuracy(model, images, labels, batch_size: int = 256) -> float:
    import numpy as np

    logits = model.predict(images, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def log_image(log_dir: Path, tag: str, image) -> None:
    """Write one RGB uint8 image to TensorBoard (Images tab); needs TensorFlow."""
    from stl10_keras.data import tensorflow_available

    if not tensorflow_available():
        return  # the PNG in figures/ is still written
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(log_dir / "images"))
    with writer.as_default():
        tf.summary.image(tag, image[None], step=0)
    writer.close()


def optimizer(t: cfg.TrainConfig):
    import keras

    # Torch's optim.sgd learningRateDecay: lr_t = lr / (1 + decay * t).
    schedule = keras.optimizers.schedules.InverseTimeDecay(
        t.learning_rate, decay_steps=1, decay_rate=t.lr_decay
    )
    return keras.optimizers.SGD(
        learning_rate=schedule, momentum=t.momentum, weight_decay=t.weight_decay
    )


def jit_compile_setting():
    """XLA on accelerators; off for TensorFlow on a CPU, where it does not pay.

    Measured with benchmarks/train_step.py on a 2-core CPU: at 32x32 a training
    step with XLA took 2x the time of one without; at 96x96 they were within
    noise (see README).
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return "auto" if tf.config.list_physical_devices("GPU") else False
    return "auto"


def compile_training_model(training_model, t: cfg.TrainConfig,
                           steps_per_execution: int = 1) -> None:
    """Compile the training model as every run does (benchmarks time this step)."""
    import keras

    training_model.compile(
        optimizer=optimizer(t),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile_setting(),
        steps_per_execution=steps_per_execution,
    )


def train(
    config: Config,
    run_dir: str | os.PathLike,
    export_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    verbose: int = 1,
    splits=None,
    kmeans_result: dict | None = None,
    distribution: "Distributed | None" = None,
) -> dict[str, Any]:
    """Train, evaluate and export one run; resumable.

    Args:
        config: the validated run config.
        run_dir: the run directory (created).
        export_dir: TF Serving model base path, or None for no export.
        overwrite: delete an existing run in `run_dir` first.
        verbose: keras verbosity.
        splits: preloaded `data.Splits` (None: load from `config.data`).
        kmeans_result: a precomputed `kmeans.kmeans_init` result for this
            config and image shape (e.g. the pipeline's Transform): its
            `weights` are applied instead of clustering again.
        distribution: from `distribute.setup` (None: one device). Process
            I > 0 of a multi-host job writes to `RUN/process_I/` and does not
            save `model.keras` or export.

    Returns:
        The metrics dict also written to `RUN/metrics.json`.
    """
    from stl10_keras import data as data_lib
    from stl10_keras.distribute import Distributed, check_batch_size

    dist = distribution or Distributed()
    check_batch_size(config.train.batch_size, dist.replicas)
    has_tf = data_lib.tensorflow_installed()  # imported after the checks below
    if not has_tf and config.augment.enabled and config.augment.on == "cpu":
        raise ConfigError("--augment-on cpu runs in tf.data, and TensorFlow is not "
                          "installed; use --augment-on device.")
    if not has_tf and export_dir is not None:
        raise ConfigError("Exporting a SavedModel needs TensorFlow, which is not "
                          "installed; install it or pass --no-export.")
    if not dist.is_chief:
        export_dir = None
    run_dir = dist.run_dir(run_dir)
    metrics_path = run_dir / "metrics.json"
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a directory; pass "
                          "another --run-dir.")
    if overwrite and run_dir.exists():
        _remove_run(run_dir, keep_process_dirs=dist.processes > 1)
    config_path = run_dir / "config.json"
    # Checked before a finished run is reported: its results are not this config's.
    if config_path.exists():
        previous = read_run_json(config_path)
        if previous != json.loads(config.to_json()):  # JSON has lists, not tuples
            raise ConfigError(
                f"{run_dir} holds a run with a different config; resume it with "
                f"--config {config_path}, or pass --overwrite or another --run-dir."
            )
    if metrics_path.exists():
        return read_run_json(metrics_path)
    wall0 = time.perf_counter()
    if splits is None:
        # Before config.json is written: a run whose data is missing leaves no
        # run behind, so rerunning with a corrected --data-dir is not refused.
        splits = data_lib.load_splits_for(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_path, config.to_dict())

    data_lib.tensorflow_available()  # loads it quietly, before keras does
    import keras
    import numpy as np

    from stl10_keras.model import build_model, build_training_model

    t = config.train
    if verbose:
        print(f"training on {_device_summary(dist)}")
    keras.utils.set_random_seed(t.seed)
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if t.mixed_precision else "float32"
    )
    backup_dir = run_dir / "backup"
    resuming = backup_dir.exists() and any(backup_dir.iterdir())
    history_path = run_dir / "history.csv"
    throughput = _Throughput(t.batch_size)
    augmentation = None
    map_fn = None
    if config.augment.enabled and config.augment.on == "cpu":
        import tensorflow as tf

        # A tf.data map, not part of the model: built outside any strategy
        # scope, whose variables would live on the replicas' devices.
        layer = _augmentation_layer(config, splits, run_dir)

        # Compiled with XLA: 3-5x faster than a plain map (benchmarks/augment.py).
        @tf.function(jit_compile=True)
        def map_fn(images, labels):
            return layer(images, training=True), labels

    # Everything that creates or updates weights runs inside the strategy or
    # distribution scope (a no-op without --distribution).
    with dist.scope():
        model = build_model(config, splits.image_shape)
        kmeans_info = _kmeans_init(config, model, splits, run_dir, resuming,
                                   kmeans_result)
        dist.sync_weights(model)
        if config.augment.enabled and config.augment.on == "device":
            augmentation = _augmentation_layer(config, splits, run_dir)
        training_model = build_training_model(model, augmentation)
        compile_training_model(training_model, t)
        backup = keras.callbacks.BackupAndRestore(str(backup_dir),
                                                  double_checkpoint=True)
        first_epoch = _restore_backup(backup, training_model)
        # One stream of the epochs still to train, each epoch's order drawn
        # from (seed, epoch): a resumed run gets the batches of an
        # uninterrupted one (tf.data's reshuffle_each_iteration would start
        # over at epoch 0's order). A finished backup still gets one epoch
        # for its length; keras trains none.
        stream = (min(first_epoch, t.epochs - 1), t.epochs)
        train_ds = dist.shard_batches(data_lib.make_batches(
            splits.x_train, splits.y_train, t.batch_size, shuffle=True, seed=t.seed,
            shuffle_buffer=config.data.shuffle_buffer, map_fn=map_fn, epochs=stream,
        ), len(splits.y_train), t.batch_size, epochs=stream[1] - stream[0])
        steps_per_epoch = _stream_length(train_ds) // (stream[1] - stream[0])
        val_batch = 256 // dist.replicas * dist.replicas
        val_ds = dist.shard_batches(
            data_lib.make_batches(splits.x_val, splits.y_val, val_batch),
            len(splits.y_val), val_batch)
        callbacks = [
            _EpochRandomState(training_model, first_epoch).callback,
            keras.callbacks.TerminateOnNaN(),
            throughput.callback,
            keras.callbacks.CSVLogger(str(history_path), append=True),
            backup,
        ]
        if has_tf:  # keras' TensorBoard callback writes with tf.summary
            callbacks.insert(
                4, keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs")))
        training_model.fit(
            train_ds, validation_data=val_ds, epochs=t.epochs, callbacks=callbacks,
            verbose=verbose, shuffle=False,  # the batches are already shuffled
            initial_epoch=first_epoch, steps_per_epoch=steps_per_epoch,
        )
    history = _read_history(history_path)
    if not history or not np.isfinite(history[-1].get("loss", np.nan)) \
            or len(history) < t.epochs:
        raise TrainingError(
            f"Training diverged (the loss became NaN or inf) with learning rate "
            f"{t.learning_rate}; rerun with a lower --learning-rate and --overwrite."
        )

    # Evaluation, saving and export use an ordinary one-device copy.
    model = dist.local_copy(model, lambda: build_model(config, splits.image_shape))
    val_accuracy = _accuracy(model, splits.x_val, splits.y_val)
    test_accuracy = _accuracy(model, splits.x_test, splits.y_test)
    model_path = run_dir / "model.keras"
    if dist.is_chief:
        tmp_model = run_dir / ".model.tmp.keras"
        model.save(tmp_model)
        os.replace(tmp_model, model_path)
        _filters_figure(model, run_dir)

    exported = None
    if export_dir is not None:
        exported = str(_export(model, model_path, export_dir, splits.class_names))
    metrics = {
        "val_accuracy": val_accuracy,
        "test_accuracy": test_accuracy,
        "history": history,
        "train_images_per_sec": throughput.images_per_sec(),
        "wall_seconds": time.perf_counter() - wall0,
        "epochs": t.epochs,
        "resumed": resuming,
        "variant": config.variant,
        "kmeans_seconds": kmeans_info["kmeans_seconds"] if kmeans_info else None,
        "kmeans": kmeans_info["layers"] if kmeans_info else None,
        "data": splits.summary(),
        "export_path": exported,
        **dist.record(),
    }
    atomic_write_json(metrics_path, metrics)
    # The backup is only for resuming an unfinished run.
    shutil.rmtree(backup_dir, ignore_errors=True)
    return metrics


def read_run_json(
    path: Path,
    fix: str = "pass --overwrite to train the run again, or another --run-dir",
) -> Any:
    """A run's config.json or metrics.json; unreadable, a `ConfigError` naming `fix`."""
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); {fix}.") from None


def _remove_run(run_dir: Path, keep_process_dirs: bool) -> None:
    """`--overwrite`: delete a run; in a multi-host job each process its own.

    Process 0 leaves the `process_I/` folders alone: on a shared disk, process
    I may already be writing there.
    """
    if not keep_process_dirs:
        shutil.rmtree(run_dir)
        return
    for entry in run_dir.iterdir():
        if entry.is_dir() and entry.name.startswith("process_"):
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _export(model, model_path: Path, export_dir, class_names) -> Path:
    """Export the SavedModel; under another backend, from model.keras in TensorFlow.

    The export graph (serving signatures, image decoding) is TensorFlow, so a
    model trained under JAX is exported by a TensorFlow-backend subprocess from
    the `model.keras` just saved: the same weights, the same layers.
    """
    import keras

    from stl10_keras import export

    if keras.backend.backend() == "tensorflow":
        return export.export_saved_model(model, export_dir, class_names)
    package_root = str(Path(export.__file__).resolve().parents[1])
    env = dict(os.environ, KERAS_BACKEND="tensorflow",
               PYTHONPATH=os.pathsep.join(
                   p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    script = ("import sys; from stl10_keras.export import export_keras_file; "
              "print(export_keras_file(sys.argv[1], sys.argv[2], sys.argv[3:]))")
    proc = subprocess.run(
        [sys.executable, "-c", script, str(model_path), str(export_dir),
         *class_names], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise TrainingError(
            f"The SavedModel export (a TensorFlow-backend process reading "
            f"{model_path}) failed: {last}; the trained model is in {model_path}."
        )
    return Path(proc.stdout.strip().splitlines()[-1])


def _kmeans_init(config, model, splits, run_dir: Path, resuming: bool,
                 precomputed: dict | None = None) -> dict | None:
    """Initialise the k-means stages; on resume the backup restores the weights."""
    if not config.kmeans.stages:
        return None
    info_path = run_dir / "kmeans.json"
    if resuming and info_path.exists():
        return read_json(info_path)
    from stl10_keras.kmeans import apply_kmeans_weights, kmeans_init
    from stl10_keras.model import conv_layer_names

    if precomputed is not None:
        expected = {n for s in config.kmeans.stages
                    for n in conv_layer_names(config.model)[s - 1]}
        if set(precomputed["weights"]) != expected:
            raise ConfigError(
                f"The precomputed k-means result holds {sorted(precomputed['weights'])}"
                f" but this config initialises {sorted(expected)}; recompute it."
            )
        apply_kmeans_weights(model, precomputed["weights"])
        result = precomputed
    else:
        print(f"k-means initialisation of stage(s) {list(config.kmeans.stages)} from "
              f"{config.kmeans.num_images} unlabeled images")
        result = kmeans_init(model, config, lambda: splits.unlabeled_batches(256))
    info = {"kmeans_seconds": result["kmeans_seconds"], "layers": result["layers"]}
    atomic_write_json(info_path, info)
    _centroids_figure(result, config, run_dir)
    return info


def _centroids_figure(result: dict, config, run_dir: Path) -> None:
    """Figure 1: the stage-1 k-means centroids as small images."""
    from stl10_keras.visualize import save_centroid_grid

    centroids = result["centroids"].get("stage1_conv")
    if centroids is None:
        return
    k = config.kmeans.patch_size
    image = save_centroid_grid(
        centroids, k, centroids.shape[1] // (k * k),
        str(run_dir / "figures" / f"kmeans_centroids_{k}x{k}.png"),
    )
    log_image(run_dir / "logs", f"figure1_kmeans_centroids_{k}x{k}", image)


def _augmentation_layer(config: Config, splits, run_dir: Path):
    """The run's `RandomAffine` (seeded from the config), after drawing Figure 3."""
    from stl10_keras.augment import random_affine_from_config

    layer = random_affine_from_config(config.augment, seed=config.train.seed)
    _augmentation_figure(layer, splits.x_train, run_dir)
    return layer


def _augmentation_figure(layer, images, run_dir: Path) -> None:
    """Figure 3: originals beside their augmented versions."""
    from stl10_keras.visualize import save_augmentation_grid

    originals = images[:36]
    augmented = layer(originals.astype("float32"), training=True)
    import numpy as np

    augmented = np.clip(np.asarray(augmented), 0, 255).astype("uint8")
    image = save_augmentation_grid(originals, augmented,
                                   str(run_dir / "figures" / "augmentation.png"))
    log_image(run_dir / "logs", "figure3_augmentation", image)


def _filters_figure(model, run_dir: Path) -> None:
    """Figure 2: the first layer's filters after training."""
    import keras

    from stl10_keras.visualize import save_filter_grid

    kernel = keras.ops.convert_to_numpy(model.get_layer("stage1_conv").kernel)
    image = save_filter_grid(kernel, str(run_dir / "figures" / "filters_stage1.png"))
    log_image(run_dir / "logs", "figure2_filters_stage1", image)


def _print_summary(metrics: dict, run_dir: Path) -> None:
    ips = metrics.get("train_images_per_sec")
    speed = f"  ({ips:.0f} train images/s)" if ips else ""
    print(f"validation accuracy {metrics['val_accuracy']:.4f}  "
          f"test accuracy {metrics['test_accuracy']:.4f}{speed}")
    print(f"run dir: {run_dir}")
    if metrics.get("export_path"):
        print(f"SavedModel: {metrics['export_path']}")


def _setup_distribution(args: argparse.Namespace, config: Config) -> "Distributed":
    """Check the --distribution flags, then set up the devices (before any data)."""
    if args.distribution == "none" and args.devices is None \
            and args.coordinator_address is None and args.num_processes is None \
            and args.process_id is None:
        from stl10_keras.distribute import Distributed

        return Distributed()
    from stl10_keras import distribute

    options = distribution_options(args)
    if options.mode == "none":  # flags that need a --distribution: no backend yet
        distribute.check_options(options, backend="")
    from stl10_keras.data import tensorflow_available

    tensorflow_available()  # loads it quietly, before keras does
    import keras

    request = distribute.check_options(options, keras.backend.backend())
    replicas = distribute.expected_replicas(options, request)
    if replicas is not None:  # refuse before starting any runtime
        distribute.check_batch_size(config.train.batch_size, replicas)
    return distribute.setup(options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from stl10_keras.data import DataUnavailableError
    from stl10_keras.distribute import DistributionError

    try:
        config = config_from_args(args)
        distribution = _setup_distribution(args, config)
        name = default_run_name(config)
        run_dir = Path(args.run_dir or Path("runs") / name)
        export_dir = None if args.no_export else (
            args.export_dir or str(Path("saved_models") / name))
        finished = (run_dir / "metrics.json").exists() and not args.overwrite
        metrics = train(config, run_dir, export_dir, overwrite=args.overwrite,
                        verbose=args.verbose, distribution=distribution)
        if not distribution.is_chief:
            print(f"process {distribution.process_id} of {distribution.processes} "
                  "done; process 0 wrote the run.")
            return 0
        if finished:
            print(f"{run_dir} already holds a finished run (pass --overwrite to "
                  "train it again):")
        _print_summary(metrics, run_dir)
        return 0
    except (ConfigError, DataUnavailableError, DistributionError,
            TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        print("\nInterrupted. Rerun the same command to resume from the last "
              "completed epoch.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
