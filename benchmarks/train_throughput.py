"""Training images/second of the full step, Keras (this backend) vs PyTorch.

The full step is the one `python -m stl10_keras.train` runs: the training
model (`RandomAffine` in front of the `ManualBatchNorm` network, built by
`build_model` + `build_training_model`), the app's SGD (momentum 0.5, weight
decay 5e-4, inverse-time decay), sparse cross-entropy from logits, the
`accuracy` metric and the app's `jit_compile` setting, driven by `model.fit`.
The data are synthetic uint8 96x96x3 batches placed on the device once, so no
input pipeline is timed. Rows, in one run:

    keras  the full step (augment on) and the plain model (augment off), for
           each batch size and precision (float32, mixed_bfloat16); with
           `--augment ...,fixmatch` also the FixMatch step (`--variant
           fixmatch`: the batch's labeled images plus `--fixmatch-ratio` (7)
           times as many unlabeled ones, weak and strong views, one forward
           pass over all of them, EMA); its images/s counts labeled images
    torch  the same network in PyTorch (3x3 conv with bias, BatchNorm2d, ReLU,
           MaxPool2d(2, ceil_mode=True), dropout, fc, fc), channels_last,
           SGD(momentum 0.5, weight_decay 5e-4), cross-entropy, bf16 through
           torch.autocast, the same augmentation ranges done per image with
           affine_grid + grid_sample; eager and torch.compile. Skipped, with the
           reason, when torch is not importable.

Each row: `--warmup` steps (compilation), then `--rounds` timed rounds of
`--steps` steps, the rounds alternating between the rows of one batch size and
precision (so a change of load on a shared machine hits them alike); the
median round is reported, with the ratio to PyTorch eager at the same batch
size, precision and augmentation.

`--profile-parts` times the parts of the step instead (where the time goes):
host->device transfer of a uint8 batch, `RandomAffine` alone (compiled as the
app compiles it), and the training step of the plain model with
ManualBatchNorm, with keras' BatchNormalization and with no batch norm at all.

Usage (run once per backend):
    KERAS_BACKEND=jax python benchmarks/train_throughput.py [--json OUT.json]
    python benchmarks/train_throughput.py --quick            # seconds, tiny net
    python benchmarks/train_throughput.py --profile-parts
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE.parent), str(_HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from stl10_keras import flags  # noqa: E402
from stl10_keras import model as model_lib  # noqa: E402
from stl10_keras.augment import random_affine_from_config  # noqa: E402
from stl10_keras.config import Config, preset  # noqa: E402
from stl10_keras.train import compile_training_model, jit_compile_setting  # noqa: E402,E501
from _common import cpu_name  # noqa: E402

PRECISIONS = ("float32", "mixed_bfloat16")
TORCH_MODES = ("eager", "compile")
FULL = {"widths": "64,128,256,512,512", "image_size": 96, "batch_sizes": "32,256",
        "steps": 20, "warmup": 3, "rounds": 3}
QUICK = {"widths": "8,16,16,32,32", "image_size": 32, "batch_sizes": "4,8",
         "steps": 2, "warmup": 1, "rounds": 1}


# --- the Keras side ---------------------------------------------------------------

def make_config(widths: tuple[int, ...], batch_norm: str = "manual",
                augment: bool = True, fc_units: int | None = None) -> Config:
    """The app's default config (the `augment` variant: no k-means) at `widths`."""
    config = preset("default", "stl10", "augment" if augment else "baseline")
    config.model.widths = widths
    config.model.convs_per_stage = (1,) * len(widths)
    config.model.batch_norm = batch_norm
    if fc_units is not None:
        config.model.fc_units = fc_units
    return config


def build_keras_training_model(config: Config, image_size: int,
                               precision: str = "float32",
                               steps_per_execution: int = 1,
                               no_batch_norm: bool = False) -> keras.Model:
    """The training model compiled as `stl10_keras.train.train` compiles it.

    `no_batch_norm` replaces every batch-norm layer by an identity (the same
    network without BN), to time what BN costs; it is for `--profile-parts`.
    """
    keras.mixed_precision.set_global_policy(precision)
    if keras.backend.backend() == "tensorflow":
        keras.utils.set_random_seed(config.train.seed)
    else:
        # set_random_seed imports TensorFlow whenever it is installed, also
        # under JAX; throughput needs no particular weights.
        np.random.seed(config.train.seed)
    patch = (mock.patch.object(model_lib, "_batch_norm",
                               lambda m, name: keras.layers.Identity(name=name))
             if no_batch_norm else contextlib.nullcontext())
    with patch:
        model = model_lib.build_model(config, (image_size, image_size, 3))
    augmentation = random_affine_from_config(config.augment, seed=config.train.seed)
    training_model = model_lib.build_training_model(model, augmentation)
    compile_training_model(training_model, config.train, steps_per_execution)
    return training_model


def build_keras_fixmatch_model(config: Config, image_size: int,
                               precision: str = "float32",
                               steps_per_execution: int = 1,
                               method: str = "fixmatch") -> keras.Model:
    """The FixMatch (or FreeMatch) training model compiled as
    `stl10_keras.train.train` does."""
    from stl10_keras import semisupervised

    keras.mixed_precision.set_global_policy(precision)
    np.random.seed(config.train.seed)
    model = model_lib.build_model(config, (image_size, image_size, 3))
    build = {"fixmatch": semisupervised.build_fixmatch_model,
             "freematch": semisupervised.build_freematch_model}[method]
    training_model = build(config, model)
    compile_training_model(training_model, config.train, steps_per_execution,
                           ema_decay=config.semi_supervised.ema_decay)
    return training_model


def fixmatch_runner(config: Config, args, precision: str, data,
                    rng: np.random.Generator,
                    method: str = "fixmatch") -> Callable[[], float]:
    """`keras_runner` for the FixMatch (or FreeMatch) step; `data` is the
    labeled batch."""
    images, labels = data
    batch, s = int(images.shape[0]), args.image_size
    unlabeled = to_device(rng.integers(0, 256, (args.fixmatch_ratio * batch, s, s, 3),
                                       dtype=np.uint8))
    truth = to_device(np.full(args.fixmatch_ratio * batch, -1, np.int32))
    model = build_keras_fixmatch_model(config, s, precision, args.steps_per_execution,
                                       method)
    x, y = (images, unlabeled), (labels, truth)
    if args.warmup:
        fit_round(model, x, y, args.warmup)
    return lambda: fit_round(model, x, y, args.steps)


def to_device(array: np.ndarray):
    """`array` as a tensor on the backend's default device (GPU where there is one)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.device_put(array)
    if backend == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.as_tensor(array).to(device)
    return keras.ops.convert_to_tensor(array)


def wait_for(tensor) -> None:
    """Block until `tensor` has been computed (device work is asynchronous)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        jax.block_until_ready(tensor)
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    else:
        keras.ops.convert_to_numpy(keras.ops.sum(keras.ops.cast(tensor, "float32")))


def repeated_batches(images, labels):
    """What `fit` reads: the same on-device batch, forever.

    TensorFlow gets a `tf.data` dataset (as the app feeds it); other backends
    a Python generator of the device arrays, which `fit` passes through
    without copying them back to the host.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.data.Dataset.from_tensors((images, labels)).repeat()

    def forever():
        while True:
            yield images, labels

    return forever()


class _EpochTimer(keras.callbacks.Callback):
    """Seconds of each epoch, the last step's result waited for."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        # The loss metric accumulates every step, so reading it waits for all.
        float(np.asarray((logs or {}).get("loss", 0.0)))
        self.seconds.append(time.perf_counter() - self._start)


def fit_round(model: keras.Model, images, labels, steps: int) -> float:
    """Seconds of `steps` training steps run by `model.fit` (fit's setup excluded)."""
    timer = _EpochTimer()
    model.fit(repeated_batches(images, labels), steps_per_epoch=steps, epochs=1,
              verbose=0, callbacks=[timer], shuffle=False)
    return timer.seconds[0]


def keras_runner(config: Config, args, precision: str, data,
                 no_batch_norm: bool = False) -> Callable[[], float]:
    """Build and warm up (compile) the training model; return one timed round."""
    model = build_keras_training_model(config, args.image_size, precision,
                                       args.steps_per_execution, no_batch_norm)
    if args.warmup:
        fit_round(model, *data, args.warmup)
    return lambda: fit_round(model, *data, args.steps)


def keras_mode() -> str:
    return f"{keras.backend.backend()} fit, jit_compile={jit_compile_setting()}"


def interleave(runners: dict, rounds: int) -> dict:
    """Seconds of each runner's rounds; rounds alternate between the runners.

    On a shared machine a change of load then hits every row alike. A runner
    that is a string (why it could not run) is left out.
    """
    seconds = {key: [] for key, runner in runners.items() if callable(runner)}
    for _ in range(rounds):
        for key in seconds:
            seconds[key].append(runners[key]())
    return seconds


# --- the PyTorch peer -------------------------------------------------------------

def torch_or_reason():
    """`(torch, None)`, or `(None, why torch rows are skipped)`."""
    try:
        import torch
    except ImportError as err:
        return None, f"skipped: torch is not importable ({err})"
    return torch, None


def torch_net(widths, fc_units: int = 512, num_classes: int = 10,
              image_size: int = 96, dropout: float = 0.5):
    """The network of `build_model` in PyTorch (NCHW; use channels_last memory)."""
    from torch import nn

    layers: list[nn.Module] = []
    channels, size = 3, image_size
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=True),
                   # torch's momentum weighs the new batch: 1 - keras' 0.9.
                   nn.BatchNorm2d(width, eps=1e-5, momentum=0.1),
                   nn.ReLU(inplace=True),
                   # ceil_mode: keras' MaxPooling2D(2, padding="same").
                   nn.MaxPool2d(2, ceil_mode=True)]
        channels, size = width, math.ceil(size / 2)
    layers += [nn.Flatten(), nn.Dropout(dropout),
               nn.Linear(channels * size * size, fc_units), nn.ReLU(inplace=True),
               nn.Dropout(dropout), nn.Linear(fc_units, num_classes)]
    return nn.Sequential(*layers)


def torch_random_affine(images, flip: bool = True, max_rotation_deg: float = 15.0,
                        scale_range=(1.0, 1.4), max_translation: float = 0.2, u=None):
    """`RandomAffine`'s draws and map in PyTorch: one bilinear resampling per image.

    `images` are float NCHW. The inverse map of `affine_matrices` (flip,
    rotate, zoom about the centre, then shift), in `affine_grid`'s normalised
    coordinates, with reflection about the outer pixel edges like
    `fill_mode="reflect"`. `u`: the `(B, 5)` uniform draws (default: fresh
    ones), used as `sample_parameters` uses its draws.
    """
    import torch
    import torch.nn.functional as F

    b, _, h, w = images.shape
    if u is None:
        u = torch.rand(b, 5, device=images.device)
    sign = (1.0 - 2.0 * (u[:, 0] < 0.5).float()) if flip else torch.ones_like(u[:, 0])
    theta = (2.0 * u[:, 1] - 1.0) * (max_rotation_deg * math.pi / 180.0)
    inv_s = 1.0 / (scale_range[0] + (scale_range[1] - scale_range[0]) * u[:, 2])
    tx = (2.0 * u[:, 3] - 1.0) * (2.0 * max_translation)  # normalised: 2 t / w
    ty = (2.0 * u[:, 4] - 1.0) * (2.0 * max_translation)
    cos, sin = torch.cos(theta) * inv_s, torch.sin(theta) * inv_s
    # A = D^-1 [[s cos, -s sin], [sin, cos]] D with D = diag(w/2, h/2).
    a0, a1 = sign * cos, -sign * sin * (h / w)
    b0, b1 = sin * (w / h), cos
    rows = torch.stack([a0, a1, -(a0 * tx + a1 * ty), b0, b1, -(b0 * tx + b1 * ty)], 1)
    grid = F.affine_grid(rows.view(b, 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def torch_runner(torch, args, precision: str, augment: bool, mode: str,
                 images_np: np.ndarray, labels_np: np.ndarray
                 ) -> Callable[[], float] | str:
    """Set up and warm up the PyTorch step; return one timed round, or why it failed."""
    import torch.nn.functional as F

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    net = torch_net(args.widths_tuple, image_size=args.image_size).to(device)
    net = net.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.5,
                                weight_decay=5e-4)
    bf16 = precision == "mixed_bfloat16"
    images = torch.as_tensor(images_np).to(device)
    labels = torch.as_tensor(labels_np).long().to(device)

    def forward_loss(x_uint8, y):
        # NHWC uint8 permuted to NCHW is already channels_last in memory.
        x = x_uint8.permute(0, 3, 1, 2).float()
        if augment:
            x = torch_random_affine(x)
        x = (x * (1.0 / 127.5) - 1.0).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            logits = net(x)
        return F.cross_entropy(logits.float(), y)

    loss_fn = torch.compile(forward_loss) if mode == "compile" else forward_loss

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(images, labels)
        loss.backward()
        optimizer.step()
        return loss

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            loss = step()
        loss.item()  # waits for the device
        return time.perf_counter() - start

    try:
        # compile: the first calls trace and compile (forward, then backward).
        run(max(args.warmup, 2) if mode == "compile" else args.warmup)
    except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for compile
        reason = f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0]}"
        return reason[:200]
    return lambda: run(args.steps)


# --- rows and tables --------------------------------------------------------------

def _row(framework: str, mode: str, batch: int, precision: str, augment: bool,
         seconds: list[float] | None, steps: int, reason: str | None = None) -> dict:
    row: dict[str, Any] = {"framework": framework, "mode": mode, "batch": batch,
                           "precision": precision, "augment": augment}
    if seconds is None:
        row["skipped"] = reason
        return row
    step = statistics.median(seconds) / steps
    row.update(step_ms=step * 1e3, images_per_sec=batch / step,
               round_seconds=seconds)
    return row


def add_ratios(rows: list[dict]) -> None:
    """`vs_torch_eager`: images/s over PyTorch eager's, same batch/precision/augment."""
    eager = {(r["batch"], r["precision"], r["augment"]): r.get("images_per_sec")
             for r in rows if r["framework"] == "torch" and r["mode"] == "eager"}
    for r in rows:
        base = eager.get((r["batch"], r["precision"], r["augment"]))
        if r.get("images_per_sec") and base:
            r["vs_torch_eager"] = r["images_per_sec"] / base


def format_table(rows: list[dict]) -> str:
    lines = ["| framework | mode | batch | precision | augmentation | step (ms) "
             "| images/s | vs PyTorch eager |", "|---|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        augmentation = {True: "RandomAffine", False: "none",
                        "freematch": "FreeMatch (weak + strong views)"}.get(
            r["augment"], "FixMatch (weak + strong views)")
        head = (f"| {r['framework']} | {r['mode']} | {r['batch']} | {r['precision']} | "
                f"{augmentation} |")
        if "skipped" in r:
            lines.append(f"{head} {r['skipped']} | | |")
            continue
        ratio = f"{r['vs_torch_eager']:.2f}x" if "vs_torch_eager" in r else "-"
        lines.append(
            f"{head} {r['step_ms']:.1f} | {r['images_per_sec']:.0f} | {ratio} |")
    return "\n".join(lines)


# --- where the time goes ----------------------------------------------------------

def calls_runner(fn: Callable[[], Any], warmup: int, steps: int
                 ) -> Callable[[], float]:
    """Warm `fn` up; return one timed round of `steps` calls (the last waited for)."""
    for _ in range(warmup):
        wait_for(fn())

    def round_() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            out = fn()
        wait_for(out)
        return time.perf_counter() - start

    return round_


def augmentation_call(layer, images) -> Callable[[], Any]:
    """`layer(images, training=True)` compiled the way the training step compiles it."""
    backend = keras.backend.backend()
    layer(images[:1], training=True)  # build
    if backend == "jax":
        import jax

        @jax.jit
        def apply(non_trainable, x):
            return layer.stateless_call([], non_trainable, x, training=True)

        state = {"nt": [v.value for v in layer.non_trainable_variables]}

        def call():
            out, state["nt"] = apply(state["nt"], images)
            return out

        return call
    if backend == "tensorflow":
        import tensorflow as tf

        jit = jit_compile_setting()
        fn = tf.function(lambda x: layer(x, training=True),
                         jit_compile=None if jit == "auto" else bool(jit))
        return lambda: fn(images)
    return lambda: layer(images, training=True)


def profile_parts(args, batch: int, precision: str, images_np, labels_np) -> list[dict]:
    """The step's parts at one batch size and precision (`--profile-parts`)."""
    w, s = args.warmup, args.steps
    runners: dict[str, Callable[[], float]] = {}
    runners["host->device copy of the uint8 batch"] = calls_runner(
        lambda: to_device(images_np), w, s)
    data = (to_device(images_np), to_device(labels_np))
    keras.mixed_precision.set_global_policy(precision)
    layer = random_affine_from_config(make_config(args.widths_tuple).augment, seed=0)
    runners["RandomAffine alone (forward, compiled)"] = calls_runner(
        augmentation_call(layer, data[0]), w, s)
    variants = [
        ("train step, full: RandomAffine + ManualBatchNorm", "manual", True, False),
        ("train step, plain model, ManualBatchNorm", "manual", False, False),
        ("train step, plain model, keras BatchNormalization", "keras", False, False),
        ("train step, plain model, no batch norm", "manual", False, True),
    ]
    for part, bn, augment, no_bn in variants:
        config = make_config(args.widths_tuple, batch_norm=bn, augment=augment)
        runners[part] = keras_runner(config, args, precision, data, no_bn)
    rows = []
    for part, seconds in interleave(runners, args.rounds).items():
        step = statistics.median(seconds) / s
        rows.append({"part": part, "batch": batch, "precision": precision,
                     "ms": step * 1e3, "images_per_sec": batch / step,
                     "round_seconds": seconds})
    full = rows[2]["ms"]
    for row in rows:
        row["share_of_full_step"] = row["ms"] / full
    return rows


def format_parts(rows: list[dict]) -> str:
    lines = ["| part | batch | precision | ms per batch | images/s | vs full step |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['batch']} | {r['precision']} | {r['ms']:.2f} "
                     f"| {r['images_per_sec']:.0f} | {r['share_of_full_step']:.2f} |")
    return "\n".join(lines)


# --- a device trace (JAX) --------------------------------------------------------

CATEGORIES = [  # kernel name patterns -> what they are; a heuristic, say so
    ("host<->device copy", r"memcpy|MemcpyH2D|MemcpyD2H|h2d|d2h"),
    ("conv / matmul", r"conv|cudnn|gemm|xmma|cutlass|wgmma|sm\d+_|dot"),
    ("gather (RandomAffine's sampler)", r"gather"),
    ("reduction (BN statistics, loss, metrics)", r"reduce"),
    ("other fusions (elementwise: BN, ReLU, SGD)", r"fusion"),
]


def trace_steps(args, trace_dir: str) -> None:
    """Trace `--steps` full steps (first batch size and precision) with jax.profiler."""
    import jax

    batch, precision = args.batch_list[0], args.precision_list[0]
    rng = np.random.default_rng(0)
    s = args.image_size
    data = (to_device(rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8)),
            to_device(rng.integers(0, 10, batch).astype("int32")))
    model = build_keras_training_model(make_config(args.widths_tuple), s, precision,
                                       args.steps_per_execution)
    fit_round(model, *data, max(args.warmup, 1))  # compiled and warm
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        fit_round(model, *data, args.steps)
    print(f"trace of {args.steps} full steps, batch {batch}, {precision}: {trace_dir}")
    print(format_trace(summarize_trace(trace_dir)))


def summarize_trace(trace_dir: str, top: int = 25) -> dict:
    """Time per kernel (device) or per XLA op (CPU threads) in a perfetto trace."""
    import collections
    import gzip
    import re

    files = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not files:
        return {"error": f"no perfetto_trace.json.gz under {trace_dir}"}
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    # A GPU's "XLA Ops"/"XLA Modules" lines repeat its streams' kernels: count
    # the streams only. On a CPU, ThunkExecutor events wrap the ops they run.
    streams = {key for key, name in threads.items()
               if key[0] in devices and name.startswith("Stream")}

    def on_device(e) -> bool:
        key = (e.get("pid"), e.get("tid"))
        if devices:
            return key in streams if streams else key[0] in devices
        name = e.get("name", "")  # "$file:line fn": Python, on any thread
        return (threads.get(key, "python") != "python"
                and not name.startswith(("$", "ThunkExecutor")))

    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and on_device(e):
            totals[e["name"]] += float(e.get("dur", 0.0))
            counts[e["name"]] += 1
    whole = sum(totals.values()) or 1.0
    by_category: dict[str, float] = collections.defaultdict(float)
    for name, us in totals.items():
        category = next((c for c, pattern in CATEGORIES
                         if re.search(pattern, name, re.IGNORECASE)), "other")
        by_category[category] += us
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return {"file": str(files[-1]), "where": sorted(processes[p] for p in devices)
            or ["host threads other than python"], "total_ms": whole / 1e3,
            "categories": [{"category": c, "ms": us / 1e3, "share": us / whole}
                           for c, us in sorted(by_category.items(),
                                               key=lambda kv: -kv[1])],
            "top": [{"name": n, "ms": us / 1e3, "count": counts[n], "share": us / whole}
                    for n, us in ranked]}


def format_trace(summary: dict) -> str:
    if "error" in summary:
        return summary["error"]
    where = ", ".join(summary["where"])
    lines = [f"busy time on {where}: {summary['total_ms']:.1f} ms",
             "| category (by kernel name; heuristic) | ms | share |", "|---|---:|---:|"]
    lines += [f"| {c['category']} | {c['ms']:.2f} | {c['share']:.1%} |"
              for c in summary["categories"]]
    lines += ["", "| kernel / op | calls | ms | share |", "|---|---:|---:|---:|"]
    lines += [f"| `{t['name'][:90]}` | {t['count']} | {t['ms']:.2f} "
              f"| {t['share']:.1%} |"
              for t in summary["top"]]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------

def accelerator() -> str:
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            d = jax.devices()[0]
            return f"{d.platform} ({d.device_kind})" if d.platform != "cpu" else "none"
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            return ", ".join(g.name for g in gpus) or "none"
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    except Exception as err:  # noqa: BLE001 - only for the header line
        return f"unknown ({err})"


def versions(torch) -> str:
    backend = keras.backend.backend()
    parts = [f"keras {keras.__version__} ({backend}"]
    if backend in ("jax", "tensorflow"):
        module = sys.modules.get(backend)
        parts[0] += f" {getattr(module, '__version__', '?')})"
    else:
        parts[0] += ")"
    if torch is not None:
        parts.append(f"torch {torch.__version__}")
    return ", ".join(parts)


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = flags.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", help="comma-separated (default 32,256)")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="comma-separated: float32, mixed_bfloat16")
    p.add_argument("--augment", default="on,off",
                   help="on (full step), off (plain model), fixmatch or freematch "
                        "(their steps, Keras only; self_training's step is on's), "
                        "comma-separated (default on,off)")
    p.add_argument("--fixmatch-ratio", type=flags.number(int, 1), default=7,
                   help="fixmatch rows: unlabeled images per labeled one (mu; "
                        "FixMatch's is 7)")
    p.add_argument("--steps", type=flags.number(int, 1),
                   help="timed steps per round (default 20)")
    p.add_argument("--warmup", type=flags.number(int, 0),
                   help="untimed steps first (default 3)")
    p.add_argument("--rounds", type=flags.number(int, 1),
                   help="timed rounds; median kept (default 3)")
    p.add_argument("--widths", help="filters per stage (default 64,128,256,512,512)")
    p.add_argument("--image-size", type=flags.number(int, 1),
                   help="image side (default 96)")
    p.add_argument("--steps-per-execution", type=flags.number(int, 1), default=1,
                   help="keras compile(steps_per_execution=...); the app uses 1")
    p.add_argument("--torch-modes", default=",".join(TORCH_MODES),
                   help="PyTorch rows: eager, compile, or both")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--no-keras", action="store_true", help="skip the Keras rows")
    p.add_argument("--profile-parts", action="store_true",
                   help="time the step's parts instead of the throughput table")
    p.add_argument("--trace", metavar="DIR",
                   help="JAX: after the table, trace --steps full steps (first batch "
                        "size and precision) into DIR and print where the time goes")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true",
                   help="tiny run: widths 8,16,16,32,32, 32x32, batches 4,8, 2 steps")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.widths_tuple = tuple(int(v) for v in args.widths.split(","))
        args.batch_list = [int(v) for v in args.batch_sizes.split(",")]
    except ValueError:
        p.error("--widths and --batch-sizes take integers separated by commas.")
    if min(args.widths_tuple + tuple(args.batch_list)) < 1:
        p.error("--widths and --batch-sizes must be >= 1.")
    # --trace profiles a Keras step of its own, whatever --no-keras says.
    if args.no_keras and (args.no_torch or not args.torch_modes) and not args.trace:
        p.error("--no-keras with --no-torch leaves nothing to time; drop one of them.")
    args.precision_list = args.precisions.split(",")
    args.augment_list = [{"on": True, "off": False, "fixmatch": "fixmatch",
                          "freematch": "freematch"}.get(v)
                         for v in args.augment.split(",")]
    args.torch_mode_list = [] if args.no_torch else args.torch_modes.split(",")
    if any(v not in PRECISIONS for v in args.precision_list):
        p.error(f"--precisions takes {', '.join(PRECISIONS)}.")
    if None in args.augment_list:
        p.error("--augment takes on, off, fixmatch, freematch or a comma-separated "
                "list.")
    if any(m not in TORCH_MODES for m in args.torch_mode_list):
        p.error("--torch-modes takes eager, compile or eager,compile.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch, torch_reason = torch_or_reason() if args.torch_mode_list else (None, None)
    rng = np.random.default_rng(0)
    s = args.image_size
    started = datetime.now(timezone.utc)
    header = (
        f"{started:%Y-%m-%d %H:%M} UTC; {cpu_name()}, {os.cpu_count()} CPUs; "
        f"accelerator: {accelerator()}; {versions(torch)}; synthetic uint8 "
        f"{s}x{s}x3 on the device, widths {args.widths}; median of {args.rounds} "
        f"interleaved rounds of {args.steps} steps after {args.warmup} warm-up; "
        f"load average {_load()} at start"
    )
    print(header, flush=True)
    result: dict[str, Any] = {"header": header, "date": f"{started:%Y-%m-%d}",
                              "machine": cpu_name(), "cpus": os.cpu_count(),
                              "accelerator": accelerator(),
                              "backend": keras.backend.backend(),
                              "versions": versions(torch), "args": {
                                  k: v for k, v in vars(args).items()}}
    rows: list[dict] = []
    parts: list[dict] = []
    try:
        for batch in args.batch_list:
            images_np = rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8)
            labels_np = rng.integers(0, 10, batch).astype("int32")
            for precision in args.precision_list:
                if args.profile_parts:
                    new = profile_parts(args, batch, precision, images_np, labels_np)
                    parts += new  # progress, one line a part
                    print("\n".join(format_parts(new).splitlines()[2:]), flush=True)
                    continue
                data = (to_device(images_np), to_device(labels_np))
                runners: dict[tuple, Any] = {}
                for augment in args.augment_list:
                    if augment in ("fixmatch", "freematch"):
                        if not args.no_keras:
                            config = make_config(args.widths_tuple)
                            runners["keras", keras_mode(), augment] = fixmatch_runner(
                                config, args, precision, data, rng, augment)
                        continue  # no PyTorch peer of these steps
                    if not args.no_keras:
                        config = make_config(args.widths_tuple, augment=augment)
                        runners["keras", keras_mode(), augment] = keras_runner(
                            config, args, precision, data)
                    if torch is None and args.torch_mode_list:
                        runners["torch", "-", augment] = torch_reason
                    for mode in args.torch_mode_list if torch is not None else ():
                        runners["torch", mode, augment] = torch_runner(
                            torch, args, precision, augment, mode, images_np, labels_np)
                seconds = interleave(runners, args.rounds)
                new = [_row(framework, mode, batch, precision, augment,
                            seconds.get((framework, mode, augment)), args.steps,
                            reason=runner if isinstance(runner, str) else None)
                       for (framework, mode, augment), runner in runners.items()]
                rows += new
                if new:  # progress, one line a row
                    print("\n".join(format_table(new).splitlines()[2:]), flush=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    print(f"load average {_load()} at end")
    if parts:
        print(format_parts(parts))
    if rows:
        add_ratios(rows)
        print(format_table(rows))
    result["rows"], result["parts"] = rows, parts
    if args.trace:
        if keras.backend.backend() == "jax":
            try:
                trace_steps(args, args.trace)
                result["trace"] = summarize_trace(args.trace)
            finally:
                keras.mixed_precision.set_global_policy("float32")
        else:
            print("--trace: skipped, it needs KERAS_BACKEND=jax")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
