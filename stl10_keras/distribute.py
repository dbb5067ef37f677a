"""Data-parallel training on existing engines: `--distribution {none,mirrored,data-parallel}`.

- `mirrored`: `tf.distribute.MirroredStrategy` on the TensorFlow backend, one
  host, every local GPU (or the `--devices` given). Keras 3 `fit` distributes
  the tf.data input and all-reduces the gradients.
- `data-parallel`: `keras.distribution.DataParallel` on the JAX backend. The
  weights are replicated over a 1-D device mesh and each batch is sharded
  along it; XLA inserts the all-reduces. Across hosts, every process is started
  with `--coordinator-address HOST:PORT --num-processes N --process-id I`,
  which calls `keras.distribution.initialize` (it wraps
  `jax.distributed.initialize`) before any JAX computation.

The rule for batch and learning rate: `--batch-size` is the *global* batch;
each replica gets `batch_size / replicas` images of every batch and the
learning rate is unchanged, so a run over R replicas computes the same updates
as one device with the same batch (up to the batch-norm statistics under
`mirrored`, which are per replica; see docs/scale-out.md). The batch must divide by R.

`tf.distribute.MultiWorkerMirroredStrategy` is not offered: with Keras 3 `fit`
it fails (keras-team/keras#20585); multi-host training uses the JAX path.

Devices must be configured before TensorFlow or JAX starts, so `setup` runs
first (train calls it before loading data).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from stl10_keras.errors import ConfigError, DistributionError

MODES = ("none", "mirrored", "data-parallel")



#: The Keras backend each mode runs on.
BACKENDS = {"mirrored": "tensorflow", "data-parallel": "jax"}
DEVICE_KINDS = ("cpu", "gpu", "tpu")


@dataclass(frozen=True)
class DistributionOptions:
    """What the command line asked for (`--distribution` and its flags).

    Args:
        mode: one of `MODES`.
        devices: `None` (every local accelerator), a count `"N"` (the first N
            GPUs) or names `"gpu:0,gpu:1"`; `"cpu:0,cpu:1"` splits the CPU into
            that many logical devices (for testing without GPUs). With several
            processes it names each process's local devices.
        coordinator_address: `HOST:PORT` of process 0 (multi-host JAX), or None.
        num_processes: processes in the job (multi-host JAX).
        process_id: this process's index, `0 .. num_processes - 1`.
    """

    mode: str = "none"
    devices: str | None = None
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def multi_process(self) -> bool:
        return self.coordinator_address is not None


@dataclass(frozen=True)
class DeviceRequest:
    """Parsed `--devices`: a kind and either explicit local indices or a count."""

    kind: str
    indices: tuple[int, ...] | None = None
    count: int | None = None

    @property
    def size(self) -> int:
        return len(self.indices) if self.indices is not None else int(self.count)


def parse_devices(text: str) -> DeviceRequest:
    """Parse `--devices`: `"2"`, `"gpu:0,gpu:1"` or `"cpu:0,cpu:1"`.

    Raises:
        ConfigError: anything else, or names of mixed kinds, or a repeated name.
    """
    text = text.strip().lower()
    if re.fullmatch(r"\d+", text):
        if int(text) < 1:
            raise ConfigError("--devices N needs N >= 1.")
        return DeviceRequest("gpu", count=int(text))
    kinds, indices = set(), []
    for part in text.split(","):
        m = re.fullmatch(rf"\s*/?({'|'.join(DEVICE_KINDS)}):(\d+)\s*", part)
        if not m:
            raise ConfigError(
                f"--devices '{text}' is not a count or a list like gpu:0,gpu:1 "
                "(cpu:0,cpu:1 for logical CPU devices)."
            )
        kinds.add(m.group(1))
        indices.append(int(m.group(2)))
    if len(kinds) > 1:
        raise ConfigError("--devices must name devices of one kind, e.g. gpu:0,gpu:1.")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"--devices '{text}' names a device twice.")
    return DeviceRequest(kinds.pop(), indices=tuple(indices))


def check_options(options: DistributionOptions, backend: str) -> DeviceRequest | None:
    """Refuse flag combinations that cannot work, before anything starts.

    Args:
        options: the parsed flags.
        backend: `keras.backend.backend()`.

    Returns:
        The parsed `--devices`, or None.

    Raises:
        ConfigError: one sentence naming the fix.
    """
    mode = options.mode
    if mode not in MODES:
        raise ConfigError(f"Unknown --distribution '{mode}'; choose one of "
                          f"{', '.join(MODES)}.")
    coordinator = (options.coordinator_address, options.num_processes,
                   options.process_id)
    if mode == "none":
        if options.devices is not None or any(c is not None for c in coordinator):
            raise ConfigError("--devices and the coordinator flags need "
                              "--distribution mirrored or data-parallel.")
        return None
    needed = BACKENDS[mode]
    if backend != needed:
        raise ConfigError(
            f"--distribution {mode} runs on the {needed} backend, but Keras uses "
            f"{backend}; rerun with KERAS_BACKEND={needed} set in the environment."
        )
    if mode == "mirrored" and any(c is not None for c in coordinator):
        raise ConfigError(
            "--coordinator-address, --num-processes and --process-id are for "
            "--distribution data-parallel (KERAS_BACKEND=jax): MirroredStrategy runs "
            "on one host, and MultiWorkerMirroredStrategy fails with Keras 3 fit "
            "(keras-team/keras#20585)."
        )
    if any(c is not None for c in coordinator):
        if any(c is None for c in coordinator):
            raise ConfigError(
                "Multi-host data-parallel needs all three of --coordinator-address "
                "HOST:PORT, --num-processes N and --process-id I."
            )
        if not re.fullmatch(r"\S+:\d+", options.coordinator_address):
            raise ConfigError(
                f"--coordinator-address '{options.coordinator_address}' is not "
                "HOST:PORT, e.g. 10.0.0.1:1234."
            )
        if options.num_processes < 1 or not \
                0 <= options.process_id < options.num_processes:
            raise ConfigError(
                f"--process-id must be in 0..{options.num_processes - 1} and "
                "--num-processes at least 1."
            )
    request = parse_devices(options.devices) if options.devices else None
    if request is not None and mode == "mirrored" and request.kind == "tpu":
        raise ConfigError("--distribution mirrored runs on CPUs or GPUs; "
                          "use --distribution data-parallel for TPUs.")
    return request


def expected_replicas(options: DistributionOptions,
                      request: DeviceRequest | None) -> int | None:
    """The replica count the flags imply, when it is known before setup."""
    if options.mode == "none":
        return 1
    if request is None:
        return None
    return request.size * (options.num_processes or 1)


def check_batch_size(batch_size: int, replicas: int) -> None:
    """`--batch-size` is the global batch: it must split evenly over the replicas."""
    if batch_size % replicas:
        multiple = max(replicas, batch_size // replicas * replicas)
        raise ConfigError(
            f"--batch-size {batch_size} does not split evenly over {replicas} "
            f"replicas; pass a multiple of {replicas}, e.g. --batch-size {multiple}."
        )


@dataclass
class Distributed:
    """Where a run trains: the strategy or distribution, and who this process is.

    Attributes:
        mode: one of `MODES`.
        replicas: model replicas in sync (devices over all processes).
        processes: processes in the job (1 unless multi-host JAX).
        process_id: this process's index; process 0 writes the run's files.
        devices: the devices replicated over, as names.
        strategy: the `tf.distribute.MirroredStrategy` (mode `mirrored`).
        distribution: the `keras.distribution.DataParallel` (`data-parallel`).
    """

    mode: str = "none"
    replicas: int = 1
    processes: int = 1
    process_id: int = 0
    devices: tuple[str, ...] = ()
    strategy: Any = field(default=None, repr=False)
    distribution: Any = field(default=None, repr=False)

    @property
    def is_chief(self) -> bool:
        """Process 0: it writes the run directory and exports."""
        return self.process_id == 0

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Build, initialise, compile and fit inside this scope.

        Models built here have distributed variables; outside it (after
        training) `local_copy` gives an ordinary one for evaluation and export.
        """
        if self.strategy is not None:
            with self.strategy.scope():
                yield
        elif self.distribution is not None:
            with self.distribution.scope():
                yield
        else:
            yield

    def run_dir(self, run_dir: str | os.PathLike) -> Path:
        """Process 0 uses the run dir; process I > 0 its subfolder `process_I/`.

        Each process keeps its own backup and history there, so it can resume
        on a host that does not share process 0's disk.
        """
        run_dir = Path(run_dir)
        return run_dir if self.is_chief else run_dir / f"process_{self.process_id}"

    def record(self) -> dict[str, Any]:
        """What metrics.json records about where the run trained."""
        return {"distribution": self.mode, "replicas": self.replicas,
                "processes": self.processes, "devices": list(self.devices)}

    def shard_batches(self, batches, num_examples: int | None = None,
                      batch_size: int | None = None, epochs: int = 1):
        """This process's part of each global batch, split evenly over replicas.

        Under `data-parallel` every device must get the same number of images
        from each batch, and every process the same number of batches. Each
        batch (a last partial one too) is cut to a multiple of the replica
        count (at most `replicas - 1` images are left out, only from a batch
        whose size does not divide; none from a full batch) and process I keeps
        rows `[I * n / P, (I + 1) * n / P)` of it. A batch cut to nothing is
        skipped. Keras' own `auto_shard_dataset` rebatches and shards whole
        batches instead, which gives processes unequal batch counts whenever
        the last batch is partial, so it is switched off.

        Args:
            batches: a `tf.data.Dataset` or a `keras.utils.PyDataset` of
                `(images, labels)` global batches.
            num_examples, batch_size: what `batches` was made from. With them
                a tf.data pipeline keeps a known length (keras then shows
                progress and does not warn that the input ran out).
            epochs: how many epochs `batches` holds back to back (a stream
                from `data.make_batches(..., epochs=...)`); each epoch's last
                batch may be cut to nothing.

        Returns:
            The same kind of object yielding this process's rows; unchanged
            unless the mode is `data-parallel`.
        """
        if self.mode != "data-parallel":
            return batches
        if _is_tf_dataset(batches):
            kept = None
            if num_examples is not None and batch_size is not None:
                kept = -(-num_examples // batch_size)
                if num_examples - (kept - 1) * batch_size < self.replicas:
                    kept -= 1  # the last batch is cut to nothing
                kept *= epochs
            return _shard_tf_dataset(batches, self.replicas, self.processes,
                                     self.process_id, kept)
        return sharded_batches(batches, self.replicas, self.processes,
                               self.process_id)

    def sync_weights(self, model) -> None:
        """Make every process hold process 0's weights (multi-host only).

        Each process initialises the weights (and runs k-means) from the same
        seed, but nothing guarantees bit-equal results on different hosts; a
        replicated weight that differs between processes would silently diverge.
        """
        if self.processes <= 1:
            return
        from jax.experimental import multihost_utils

        model.set_weights(multihost_utils.broadcast_one_to_all(model.get_weights()))

    def local_copy(self, model, build):
        """An undistributed model with `model`'s weights (the model itself if `none`).

        Evaluation, `model.keras` and the SavedModel use it: it runs on one
        device and exports like any model built without a strategy.

        Args:
            model: the trained model, built inside `scope()`.
            build: a function that builds the same architecture.
        """
        if self.mode == "none":
            return model
        weights = model.get_weights()
        local = build()
        local.set_weights(weights)
        return local


def rows_for_process(n: int, replicas: int, processes: int, process_id: int
                     ) -> tuple[int, int]:
    """`[start, stop)` of the rows process `process_id` takes from a batch of `n`."""
    per_process = (n // replicas) * (replicas // processes)
    start = process_id * per_process
    return start, start + per_process


def _is_tf_dataset(batches) -> bool:
    mod = type(batches).__module__
    if not mod.startswith("tensorflow"):
        return False
    import tensorflow as tf

    return isinstance(batches, tf.data.Dataset)


def _shard_tf_dataset(ds, replicas: int, processes: int, process_id: int,
                      kept: int | None = None):
    import tensorflow as tf

    local_replicas = replicas // processes

    def take_rows(images, labels):
        n = tf.shape(images)[0]
        per_process = (n // replicas) * local_replicas
        start = process_id * per_process
        return images[start:start + per_process], labels[start:start + per_process]

    ds = ds.map(take_rows)
    # Only an epoch's last batch can be cut to nothing.
    ds = ds.filter(lambda images, labels: tf.shape(images)[0] > 0)
    if kept is not None:
        ds = ds.apply(tf.data.experimental.assert_cardinality(kept))
    return ds.prefetch(tf.data.AUTOTUNE)


def sharded_batches(batches, replicas: int, processes: int, process_id: int):
    """`Distributed.shard_batches` for a `keras.utils.PyDataset` of numpy batches.

    Batches are `(images, labels)`, or FixMatch's `((labeled, unlabeled),
    (labels, unlabeled_labels))`, whose two parts are cut alike, each by its
    own size. Which batches survive the cut follows from the labeled sizes
    (`batches.batch_sizes` when given, so that they need not be read).
    (A factory, so that importing this module does not import keras.)
    """
    import keras

    class ShardedBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            # Which batches survive the cut depends only on their sizes,
            # which do not change between epochs (a stream of several epochs
            # says how many batches one has).
            self._period = getattr(batches, "steps_per_epoch", len(batches))
            sizes = getattr(batches, "batch_sizes", None) or [
                len(batches[i][1]) for i in range(self._period)]
            self._keep = [i for i, n in enumerate(sizes) if n >= replicas]
            self._epochs = len(batches) // self._period if self._period else 0
            self.steps_per_epoch = len(self._keep)

        def __len__(self) -> int:
            return len(self._keep) * self._epochs

        def __getitem__(self, index: int):
            epoch, step = divmod(index, len(self._keep))
            images, labels = batches[epoch * self._period + self._keep[step]]
            if isinstance(images, tuple):  # FixMatch: (labeled, unlabeled) parts
                parts = [take_rows(x, y) for x, y in zip(images, labels)]
                return tuple(p[0] for p in parts), tuple(p[1] for p in parts)
            return take_rows(images, labels)

        def on_epoch_end(self) -> None:
            batches.on_epoch_end()

    def take_rows(images, labels):
        start, stop = rows_for_process(len(labels), replicas, processes, process_id)
        return images[start:stop], labels[start:stop]

    return ShardedBatches()


# --- setup ------------------------------------------------------------------------

_ACTIVE: tuple[DistributionOptions, Distributed] | None = None


def setup(options: DistributionOptions) -> Distributed:
    """Configure the devices and the strategy or distribution, once per process.

    Must run before TensorFlow or JAX computes anything: logical CPU devices,
    JAX's CPU device count and `jax.distributed` can only be set up then.

    Args:
        options: the flags (checked with `check_options` first).

    Returns:
        The `Distributed` to train under. A second call with the same options
        returns the same object.

    Raises:
        ConfigError: the devices asked for do not exist, or the runtime already
            started with other devices.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        if _ACTIVE[0] == options:
            return _ACTIVE[1]
        raise ConfigError("The devices were already set up for another "
                          "--distribution in this process; start a new process.")
    import keras

    request = check_options(options, keras.backend.backend())
    if options.mode == "none":
        result = Distributed()
    elif options.mode == "mirrored":
        result = _setup_mirrored(request)
    else:
        result = _setup_data_parallel(options, request)
    _ACTIVE = (options, result)
    return result


def _setup_mirrored(request: DeviceRequest | None) -> Distributed:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if request is None:
        names = [f"/gpu:{i}" for i in range(len(gpus))] or ["/cpu:0"]
    elif request.kind == "cpu":
        count = max(request.indices) + 1
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
        except RuntimeError:
            raise ConfigError("TensorFlow started before --devices could split the "
                              "CPU; set it up first (distribute.setup).") from None
        names = [f"/cpu:{i}" for i in request.indices]
    else:
        indices = request.indices or tuple(range(request.count))
        missing = [i for i in indices if i >= len(gpus)]
        if missing:
            raise ConfigError(
                f"--devices asks for GPU {missing[0]}, but TensorFlow sees "
                f"{len(gpus)} GPU(s); pass fewer, or cpu:0,cpu:1 to test on the CPU."
            )
        names = [f"/gpu:{i}" for i in indices]
    strategy = tf.distribute.MirroredStrategy(devices=names)
    return Distributed("mirrored", strategy.num_replicas_in_sync,
                       devices=tuple(n.lstrip("/") for n in names), strategy=strategy)


def _setup_data_parallel(options: DistributionOptions,
                         request: DeviceRequest | None) -> Distributed:
    import jax
    import keras

    if request is not None and request.kind == "cpu":
        # Before the CPU backend starts (and before jax.distributed, which
        # starts it): the number of host devices each process exposes.
        jax.config.update("jax_num_cpu_devices", max(request.indices) + 1)
    if options.multi_process:
        try:
            keras.distribution.initialize(options.coordinator_address,
                                          options.num_processes, options.process_id)
        except Exception as e:  # jax reports connection failures as several types
            raise DistributionError(
                f"Process {options.process_id} could not join the job of "
                f"{options.num_processes} at {options.coordinator_address} "
                f"({type(e).__name__}); start every process with the same "
                "--coordinator-address (process 0's host) and --num-processes."
            ) from None
    processes, process_id = jax.process_count(), jax.process_index()
    if request is None:
        devices = list(jax.devices())
    else:
        try:
            platform_devices = jax.devices(request.kind)
        except RuntimeError:
            raise ConfigError(f"--devices asks for {request.kind} devices, but JAX "
                              f"has none (it has {jax.devices()[0].platform}); pass "
                              "cpu:0,cpu:1 to test on the CPU, or run where JAX sees "
                              "GPUs.") from None
        devices = []
        for p in range(processes):
            local = sorted((d for d in platform_devices if d.process_index == p),
                           key=lambda d: d.id)
            indices = request.indices or tuple(range(request.count))
            if max(indices) >= len(local):
                raise ConfigError(
                    f"--devices asks for {request.kind}:{max(indices)}, but process "
                    f"{p} has {len(local)} {request.kind} device(s); pass fewer."
                )
            devices.extend(local[i] for i in indices)
    names = [f"{d.platform}:{d.id}" for d in devices]
    # Batches are sharded per process by Distributed.shard_batches.
    distribution = keras.distribution.DataParallel(devices=names,
                                                   auto_shard_dataset=False)
    return Distributed("data-parallel", len(names), processes, process_id,
                       tuple(names), distribution=distribution)
