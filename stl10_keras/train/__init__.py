"""Training one run: prepare -> initialise and fit -> finish; resumable.

Run directory (one per run):

    RUN/config.json  metrics.json  model.keras  history.csv  logs/  backup/  figures/

Rerunning the same command after an interruption resumes from the last
completed epoch (keras BackupAndRestore). Once the last epoch is trained its
weights are kept in `RUN/final.weights.h5` (with `RUN/fit.json`) until
`metrics.json` is written, so a run killed during evaluation, saving or export
resumes at that step and never trains again. Rerunning a finished run prints
its results and does nothing (`--overwrite` starts it over). The command line
is `stl10_keras.cli` (run by this package's `__main__`); `--distribution` is
`stl10_keras.distribute`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stl10_keras import config as cfg
from stl10_keras import methods, runtime
from stl10_keras.config import Config
from stl10_keras.errors import ConfigError, TrainingError, one_line
from stl10_keras.io_utils import (atomic_output, atomic_write_json,
                                  check_output_dir, crash_point, read_json)

if TYPE_CHECKING:
    from stl10_keras.distribute import Distributed


#: What a finished fit leaves until metrics.json is written: the trained
#: weights, and what `_finish` needs besides them (throughput, k-means record).
FINAL_WEIGHTS = "final.weights.h5"
FIT_RECORD = "fit.json"
#: The SavedModel version a run is exporting (its number is chosen once).
EXPORT_RECORD = "export.json"


def optimizer(t: cfg.TrainConfig, ema_decay: float | None = None,
              steps_per_epoch: int | None = None, epochs: int | None = None):
    """The lab's SGD; with `ema_decay`, it also keeps a moving average of the
    weights (keras' `use_ema`, warmed up: `averaging.EMAWarmupSGD`), which
    evaluation and export use.
    `steps_per_epoch` sizes the cosine schedule (`epochs` of them, by default
    `t.epochs`)."""
    import keras

    if ema_decay is None:
        return keras.optimizers.SGD(
            learning_rate=learning_rate_schedule(t, steps_per_epoch, epochs),
            momentum=t.momentum, weight_decay=t.weight_decay)
    from stl10_keras.averaging import EMAWarmupSGD

    return EMAWarmupSGD(
        learning_rate=learning_rate_schedule(t, steps_per_epoch, epochs),
        momentum=t.momentum, weight_decay=t.weight_decay, use_ema=True,
        ema_momentum=ema_decay)


def learning_rate_schedule(t: cfg.TrainConfig, steps_per_epoch: int | None = None,
                           epochs: int | None = None):
    """The step -> learning rate function `t.lr_schedule` names."""
    import keras

    if t.lr_schedule == "cosine":
        if not steps_per_epoch:
            raise ValueError("the cosine schedule needs the run's steps_per_epoch")
        # keras holds the rate at alpha (0) from decay_steps on.
        return keras.optimizers.schedules.CosineDecay(
            t.learning_rate, decay_steps=(epochs or t.epochs) * steps_per_epoch,
            alpha=0.0)
    # Torch's optim.sgd learningRateDecay: lr_t = lr / (1 + decay * t).
    return keras.optimizers.schedules.InverseTimeDecay(
        t.learning_rate, decay_steps=1, decay_rate=t.lr_decay
    )


def jit_compile_setting():
    """XLA on accelerators; off for TensorFlow on a CPU, where it does not pay.

    Measured with benchmarks/train_step.py on a 2-core CPU: at 32x32 a training
    step with XLA took 2x the time of one without; at 96x96 they were within
    noise (see docs/performance.md).
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return "auto" if tf.config.list_physical_devices("GPU") else False
    return "auto"


def compile_training_model(training_model, t: cfg.TrainConfig,
                           steps_per_execution: int = 1,
                           ema_decay: float | None = None,
                           steps_per_epoch: int | None = None,
                           epochs: int | None = None) -> None:
    """Compile the training model as every run does (benchmarks time this step)."""
    import keras

    training_model.compile(
        optimizer=optimizer(t, ema_decay, steps_per_epoch, epochs),
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
    device_line: bool = True,
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
        device_line: print the devices training uses first (when `verbose`);
            a caller that trains many runs says it once itself.

    Returns:
        The metrics dict also written to `RUN/metrics.json`.
    """
    from stl10_keras.distribute import Distributed

    dist = distribution or Distributed()
    run = _prepare(config, Path(run_dir), export_dir, overwrite, dist)
    if run.finished is not None:
        return run.finished
    wall0 = time.perf_counter()
    if splits is None:
        from stl10_keras import data as data_lib

        # Before config.json is written: a run whose data is missing leaves no
        # run behind, so rerunning with a corrected --data-dir is not refused.
        splits = data_lib.load_splits_for(config)
    _check_num_classes(config, splits)
    if config.semi_supervised.init_from:
        init_from_path(config.semi_supervised.init_from)  # refused before a run
    method = methods.get(config.semi_supervised.method)
    method.check_data(config, splits)
    _open_run(run, config, splits, verbose)

    keras = runtime.load_keras()
    if verbose and device_line:
        print(f"training on {runtime.device_summary(dist.devices)}")
    keras.utils.set_random_seed(config.train.seed)
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if config.train.mixed_precision else "float32"
    )
    fitted = _load_fitted(config, run, splits, verbose)
    if fitted is None:
        fitted = _fit(config, run, method(config, run.dir), splits, kmeans_result,
                      verbose)
    return _finish(config, run, splits, fitted, wall0)


def _check_num_classes(config: Config, splits) -> None:
    """The model's outputs must match the data's classes (a folder has its own)."""
    n = len(splits.class_names)
    if n != config.model.num_classes:
        raise ConfigError(
            f"The data has {n} classes but the config's model.num_classes is "
            f"{config.model.num_classes}; set it to {n} (the command line does so "
            "for --dataset folder from its class folders).")


@dataclass
class _Run:
    """Where a run lives and what it may do (from `_prepare`)."""

    dir: Path
    export_dir: str | os.PathLike | None
    dist: "Distributed"
    has_tf: bool
    finished: dict | None = None  # metrics of a run that already finished
    # `--overwrite` of a run that exists: it is removed by `_open_run`, once the
    # new config and its data have loaded, so a mistake there loses nothing.
    replaces: bool = False


@dataclass
class _Fitted:
    """What `_fit` leaves for `_finish`."""

    model: Any
    history: list[dict[str, float]]
    images_per_sec: float | None
    kmeans_info: dict | None
    resumed: bool
    averaging: dict | None = None  # `_choose_weights`' record


def _prepare(config: Config, run_dir: Path, export_dir, overwrite: bool,
             dist: "Distributed") -> _Run:
    """Check what can be checked before any work; open (or report) the run."""
    from stl10_keras.distribute import check_batch_size

    check_batch_size(config.train.batch_size, dist.replicas)
    if config.model.sync_batch_norm and (
            dist.mode == "data-parallel"
            or runtime.load_keras().backend.backend() != "tensorflow"):
        # On one device it changes nothing (one replica's statistics are the
        # batch's); keras' synchronized layers exist on TensorFlow only.
        raise ConfigError(
            "--sync-batch-norm synchronises the replicas of --distribution "
            "mirrored on the tensorflow backend (data-parallel already normalises "
            "over the global batch); drop it.")
    has_tf = runtime.tensorflow_installed()  # imported after the checks below
    if not has_tf and config.augment.enabled and config.augment.on == "cpu":
        raise ConfigError("--augment-on cpu runs in tf.data, and TensorFlow is not "
                          "installed; use --augment-on device.")
    if not has_tf and export_dir is not None:
        raise ConfigError("Exporting a SavedModel needs TensorFlow, which is not "
                          "installed; install it or pass --no-export.")
    if not dist.is_chief:
        export_dir = None
    run_dir = dist.run_dir(run_dir)
    check_output_dir(run_dir, "--run-dir")
    if export_dir is not None:
        check_output_dir(export_dir, "--export-dir")
    run = _Run(run_dir, export_dir, dist, has_tf,
               replaces=overwrite and run_dir.exists())
    if run.replaces:
        return run  # neither compared nor reported: it is trained anew
    config_path = run_dir / "config.json"
    # Checked before a finished run is reported: its results are not this config's.
    if config_path.exists():
        previous = cfg.with_later_sections(read_run_json(config_path), config)
        if previous != json.loads(config.to_json()):  # JSON has lists, not tuples
            raise ConfigError(
                f"{run_dir} holds a run with a different config; resume it with "
                f"--config {config_path}, or pass another --run-dir (--overwrite "
                "deletes that run)."
            )
    _check_same_data(config, run_dir)
    if (run_dir / "metrics.json").exists():
        run.finished = read_run_json(run_dir / "metrics.json")
        _remove_resume_files(run_dir)  # left by a kill just after metrics.json
    return run


def _fit(config: Config, run: _Run, method: methods.Method, splits,
         kmeans_result: dict | None, verbose: int) -> _Fitted:
    """Build and initialise the model, then fit it with `method` (from the
    backup if any)."""
    import keras

    from stl10_keras import callbacks as cb
    from stl10_keras import data as data_lib
    from stl10_keras.model import build_model

    t, dist = config.train, run.dist
    backup_dir = run.dir / "backup"
    resuming = backup_dir.exists() and any(backup_dir.iterdir())
    history_path = run.dir / "history.csv"
    throughput = cb.Throughput(t.batch_size)
    train_splits = method.prepare(splits, verbose)
    epochs = method.epochs(train_splits)
    # prepare may train (a teacher): every run then starts from the same state.
    keras.utils.set_random_seed(t.seed)
    # Everything that creates or updates weights runs inside the strategy or
    # distribution scope (a no-op without --distribution).
    with dist.scope():
        model = build_model(config, splits.image_shape)
        start = method.initial_weights()
        if start:
            kmeans_info = None  # the finished run's weights replace any
            if not resuming:
                _init_from(start, model, verbose)
        else:
            kmeans_info = _kmeans_init(config, model, splits, run.dir, resuming,
                                       kmeans_result)
        dist.sync_weights(model)
        training_model = method.training_model(model, train_splits)
        ema_decay = (config.semi_supervised.ema_decay if method.averages_weights
                     else None)
        # A labeled epoch's steps (every method's epoch is one pass over the
        # labeled images); a data-parallel stream may cut a tiny last batch to
        # nothing, which only holds the cosine's 0 a step early.
        compile_training_model(
            training_model, t, ema_decay=ema_decay,
            steps_per_epoch=data_lib.num_batches(len(train_splits.y_train),
                                                 t.batch_size), epochs=epochs)
        # Kept when fit returns: the last epoch's state until the final
        # weights are on disk (`_keep_final`).
        backup = cb.backup_and_restore(backup_dir)
        first_epoch = cb.restore_backup(backup, training_model)
        # One stream of the epochs still to train, each epoch's order drawn
        # from (seed, epoch): a resumed run gets the batches of an
        # uninterrupted one (tf.data's reshuffle_each_iteration would start
        # over at epoch 0's order). A finished backup still gets one epoch
        # for its length; keras trains none.
        stream = (min(first_epoch, epochs - 1), epochs)
        train_ds = method.batches(train_splits, stream, dist)
        steps_per_epoch = _stream_length(train_ds) // (stream[1] - stream[0])
        val_batch = 256 // dist.replicas * dist.replicas
        val_ds = dist.shard_batches(
            data_lib.make_batches(splits.x_val, splits.y_val, val_batch),
            len(splits.y_val), val_batch)
        callbacks = [
            cb.EpochRandomState(training_model, first_epoch).callback,
            keras.callbacks.TerminateOnNaN(),
            throughput.callback,
            keras.callbacks.CSVLogger(str(history_path), append=True),
            backup,
        ]
        raw = cb.LastEpochWeights(model, epochs)
        if ema_decay is not None:
            # Validation with the averaged weights; fit ends by copying them
            # into the model (finalize_variable_values), so test and export
            # use them too. Not swap_on_epoch: the backup must hold the
            # trained weights in the model and the average in the optimizer.
            callbacks.insert(0, keras.callbacks.SwapEMAWeights())
            callbacks.append(raw.callback)
        if run.has_tf:  # keras' TensorBoard callback writes with tf.summary
            callbacks.insert(
                4, keras.callbacks.TensorBoard(log_dir=str(run.dir / "logs")))
        training_model.fit(
            train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks,
            verbose=verbose, shuffle=False,  # the batches are already shuffled
            initial_epoch=first_epoch, steps_per_epoch=steps_per_epoch,
        )
    history = _read_history(history_path)
    if not history or not math.isfinite(history[-1].get("loss", math.nan)) \
            or len(history) < epochs:
        shutil.rmtree(backup_dir, ignore_errors=True)  # nothing worth resuming
        raise TrainingError(
            f"Training diverged (the loss became NaN or inf) with learning rate "
            f"{t.learning_rate}; rerun with a lower --learning-rate and --overwrite."
        )
    # Evaluation, saving and export use an ordinary one-device copy.
    model = dist.local_copy(model, lambda: build_model(config, splits.image_shape))
    averaging = None
    if ema_decay is not None:
        averaging = _choose_weights(model, raw.weights, train_splits)
    fitted = _Fitted(model, history, throughput.images_per_sec(), kmeans_info,
                     resuming, averaging)
    _keep_final(run.dir, fitted)
    return fitted


def _choose_weights(model, raw_weights, splits) -> dict:
    """The averaged weights (with batch statistics recomputed for them), unless
    the last epoch's raw weights are more accurate on validation.

    `model` holds the average when `fit` returns. The average is what the
    methods that learn from unlabeled images evaluate; checking it against
    the raw weights means no default can export a model worse than the one it
    trained, whatever the run's length (`averaging.py`).

    Returns:
        `{"weights": "average" | "raw", "average_val_accuracy",
        "raw_val_accuracy"}` (raw: None when this process did not train the
        last epoch, e.g. a resumed run that had finished it).
    """
    from stl10_keras.averaging import recalibrate_batch_norm

    recalibrate_batch_norm(model, splits.x_train)
    average = model.get_weights()
    record = {"weights": "average", "raw_val_accuracy": None,
              "average_val_accuracy": _accuracy(model, splits.x_val, splits.y_val)}
    if raw_weights is not None:
        model.set_weights(raw_weights)
        record["raw_val_accuracy"] = _accuracy(model, splits.x_val, splits.y_val)
        if record["raw_val_accuracy"] > record["average_val_accuracy"]:
            record["weights"] = "raw"
        else:
            model.set_weights(average)
    return record


def _keep_final(run_dir: Path, fitted: _Fitted) -> None:
    """Save the trained weights for `_finish`, then drop the epoch backup.

    The weights first, the record second (both atomic), the backup last: a
    kill at any moment leaves either the backup or the final weights.
    """
    with atomic_output(run_dir / FINAL_WEIGHTS, suffix=".weights.h5") as tmp:
        fitted.model.save_weights(tmp)
    atomic_write_json(run_dir / FIT_RECORD, {
        "images_per_sec": fitted.images_per_sec,
        "kmeans_info": fitted.kmeans_info,
        "resumed": fitted.resumed,
        "averaging": fitted.averaging,
    })
    shutil.rmtree(run_dir / "backup", ignore_errors=True)


def _load_fitted(config: Config, run: _Run, splits, verbose: int) -> _Fitted | None:
    """A run killed after its last epoch: its final weights (None: not trained yet)."""
    weights, record = run.dir / FINAL_WEIGHTS, run.dir / FIT_RECORD
    if not (weights.exists() and record.exists()):
        return None
    from stl10_keras.model import build_model

    info = read_run_json(record)
    model = build_model(config, splits.image_shape)
    model.load_weights(weights)
    if verbose:
        print(f"{run.dir} finished training before it was interrupted; "
              "evaluating and exporting its final weights.")
    return _Fitted(model, _read_history(run.dir / "history.csv"),
                   info["images_per_sec"], info["kmeans_info"], info["resumed"],
                   info.get("averaging"))


def _finish(config: Config, run: _Run, splits, fitted: _Fitted,
            wall0: float) -> dict[str, Any]:
    """Evaluate, save `model.keras` and the figures, export, write metrics.json."""
    from stl10_keras.visualize import filters_figure

    dist, model = run.dist, fitted.model
    val_accuracy = _accuracy(model, splits.x_val, splits.y_val)
    crash_point("evaluation")
    test_accuracy = _accuracy(model, splits.x_test, splits.y_test)
    model_path = run.dir / "model.keras"
    if dist.is_chief:
        with atomic_output(model_path, suffix=".keras") as tmp:
            model.save(tmp)
        filters_figure(model, run.dir)

    exported = None
    if run.export_dir is not None:
        exported = str(_export_once(model, model_path, run,
                                    splits.class_names))
    kmeans_info = fitted.kmeans_info
    metrics = {
        "val_accuracy": val_accuracy,
        "test_accuracy": test_accuracy,
        "history": fitted.history,
        "train_images_per_sec": fitted.images_per_sec,
        "wall_seconds": time.perf_counter() - wall0,
        "epochs": len(fitted.history),  # the method's (a student's may differ)
        "resumed": fitted.resumed,
        "variant": config.variant,
        "semi_supervised": config.semi_supervised.method,
        "method": methods.get(config.semi_supervised.method)(config, run.dir).record(),
        "averaging": fitted.averaging,
        "kmeans_seconds": kmeans_info["kmeans_seconds"] if kmeans_info else None,
        "kmeans": kmeans_info["layers"] if kmeans_info else None,
        "data": splits.summary(),
        "class_names": list(splits.class_names),  # for `stl10_keras.export`
        "export_path": exported,
        **dist.record(),
    }
    atomic_write_json(run.dir / "metrics.json", metrics)
    _remove_resume_files(run.dir)
    return metrics


def _remove_resume_files(run_dir: Path) -> None:
    """What only an unfinished run needs: the backup, final weights, records."""
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    for name in (FINAL_WEIGHTS, FIT_RECORD, EXPORT_RECORD):
        (run_dir / name).unlink(missing_ok=True)


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
    """Top-1 accuracy, from eager forward passes in batches.

    Not `model.predict`: every run's new model traces a new predict function,
    and TensorFlow counts those traces across models (by the function's code),
    so an ablation's fifth run in one process printed retracing warnings.
    """
    import keras
    import numpy as np

    predicted = [
        np.argmax(keras.ops.convert_to_numpy(
            model(images[i:i + batch_size].astype(np.float32), training=False)),
            axis=-1)
        for i in range(0, len(labels), batch_size)]
    return float(np.mean(np.concatenate(predicted) == labels))


def read_run_json(
    path: Path,
    fix: str = "pass --overwrite to train the run again, or another --run-dir",
) -> Any:
    """A run's config.json or metrics.json; unreadable, a `ConfigError` naming `fix`."""
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); {fix}.") from None


def _open_run(run: _Run, config: Config, splits, verbose: int) -> None:
    """Start the run's records: its config, the data it is trained on
    (`data.DATA_RECORD`); say what data that is.

    Called once the config and all its data have loaded and passed their checks,
    right before any work, and only then is a run that `--overwrite` replaces
    removed: a typo in `--data-dir` or a flag leaves the old run as it was.
    """
    from stl10_keras import data as data_lib

    if run.replaces:
        _remove_run(run.dir, keep_process_dirs=run.dist.processes > 1)
    run.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.dir / "config.json", config.to_dict())
    record_path = run.dir / data_lib.DATA_RECORD
    if not record_path.exists():  # a resumed run keeps the record it started with
        record = data_lib.data_record(config.data.dataset, config.data.data_dir)
        atomic_write_json(record_path, record)
    summary = "\n".join(splits.describe())
    if verbose and summary not in _DESCRIBED:  # an ablation's runs: said once
        _DESCRIBED.add(summary)
        print(summary, flush=True)


#: The data summaries printed by this process.
_DESCRIBED: set[str] = set()


def _check_same_data(config: Config, run_dir: Path) -> None:
    """A run (finished or not) whose data has changed since it started is not
    reported or resumed as if it were this data's."""
    from stl10_keras import data as data_lib

    record_path = run_dir / data_lib.DATA_RECORD
    if not record_path.exists():
        return  # a run from before runs recorded their data, or not started
    previous = read_run_json(record_path)
    current = data_lib.data_record(config.data.dataset, config.data.data_dir,
                                   previous)
    changes = data_lib.data_changes(previous, current)
    if changes:
        where = config.data.data_dir or "the data"
        raise ConfigError(
            f"{run_dir} was trained on other data: since it started, {changes} in "
            f"{where}; pass --overwrite to train it again on the data as it is "
            "now, or another --run-dir.")


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


def _export_once(model, model_path: Path, run: _Run, class_names) -> Path:
    """Export the run's SavedModel version; after a kill, the same version.

    The version number is recorded in the run before the export starts, so a
    rerun finds a version that was renamed into place before the kill (and
    keeps it), or exports that version again over its temporary folder,
    instead of adding a second version of the same model.
    """
    from stl10_keras.export import next_version

    base, record = Path(run.export_dir), run.dir / EXPORT_RECORD
    pending = read_run_json(record) if record.exists() else None
    if pending is not None and pending["export_dir"] == str(base):
        version = pending["version"]
        if (base / str(version) / "saved_model.pb").is_file():
            return base / str(version)
    else:
        version = next_version(base)
        atomic_write_json(record, {"export_dir": str(base), "version": version})
    from stl10_keras.export import ExportError, export_from_any_backend

    try:
        return export_from_any_backend(model, model_path, base, class_names, version)
    except ExportError as e:
        raise TrainingError(str(e)) from None


def init_from_path(init_from: str) -> Path:
    """The `model.keras` that `--init-from` names (a run directory or the file)."""
    path = Path(init_from).expanduser()
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise ConfigError(
            f"--init-from {init_from} holds no model.keras (a finished run's "
            "directory, e.g. runs/fashion_mnist_baseline_s0); train that run first "
            "or fix the path.")
    return path


def _init_from(init_from: str, model, verbose: int) -> None:
    """Copy a finished run's weights into `model` (the same architecture)."""
    from stl10_keras.model import load_model

    path = init_from_path(init_from)
    try:
        source = load_model(path)
    except Exception as e:  # a corrupt or foreign file: say which, not how
        raise ConfigError(f"--init-from {init_from}: {path} cannot be loaded "
                          f"({one_line(e)}).") from None
    mine = [tuple(w.shape) for w in model.weights]
    theirs = [tuple(w.shape) for w in source.weights]
    if mine != theirs:
        raise ConfigError(
            f"--init-from {init_from}: that run's network differs from this one "
            f"({len(theirs)} weight tensors against {len(mine)}, or other shapes); "
            "use the same --widths, --fc-units, image size and classes.")
    model.set_weights(source.get_weights())
    if verbose:
        print(f"starting from the weights of {path}")


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
    from stl10_keras.visualize import centroids_figure

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
        # What k-means will read: --kmeans-images, or all there are if fewer.
        available = splits.num_unlabeled
        count = config.kmeans.num_images if available is None else min(
            config.kmeans.num_images, available)
        print(f"k-means initialisation of stage(s) {list(config.kmeans.stages)} from "
              f"{count:,} unlabeled images")
        result = kmeans_init(model, config, lambda: splits.unlabeled_batches(256))
    info = {"kmeans_seconds": result["kmeans_seconds"], "layers": result["layers"]}
    atomic_write_json(info_path, info)
    centroids_figure(result, config, run_dir)
    return info
