"""Augmentation throughput: RandomAffine vs Keras' built-in chain (and torchvision).

Prints images/second for batches of 32 and 256 of 96x96x3 uint8-valued
images, all in the same run:

    a  RandomAffine in tf.data (`Dataset.map` on batches)
    a2 the same with `resampler="affine_transform"` (TF's fused CPU kernel)
    a3 the same with the map function XLA-compiled (`jit_compile=True`)
    b  RandomAffine in `tf.function(jit_compile=True)` (XLA)
    c  Keras' RandomFlip + RandomRotation + RandomZoom + RandomTranslation
       in tf.data (the reference; ratios are against it)
    d  torchvision.transforms.v2 RandomHorizontalFlip + RandomAffine on a
       batch tensor (PyTorch peer; skipped when torch is not importable)

FixMatch's strong view (docs/semi-supervised.md), same batches:

    e  StrongAugment (2 ops + Cutout, fused) in `tf.function(jit_compile=True)`
    e2 StrongAugment in tf.data
    f  Keras' RandAugment (2 ops) + RandomErasing in tf.data
    f2 the same in `tf.function(jit_compile=True)` (skipped with the reason
       when XLA cannot compile it)

Usage:
    python benchmarks/augment.py [--batches 6 --warmup 2 --repeats 2]
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from typing import Callable

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Only light imports here: keras and TensorFlow load after the flags are
# parsed, so a bad flag is refused in a fraction of a second.
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stl10_keras import flags  # noqa: E402
from _common import cpu_name  # noqa: E402

SIZE = 96
MAX_ROTATION_DEG = 15.0
SCALE_RANGE = (1.0, 1.4)
MAX_TRANSLATION = 0.2


def random_affine(resampler: str = "gather") -> RandomAffine:
    from stl10_keras.augment import RandomAffine

    return RandomAffine(
        max_rotation_deg=MAX_ROTATION_DEG,
        scale_range=SCALE_RANGE,
        max_translation=MAX_TRANSLATION,
        seed=0,
        resampler=resampler,
    )


def builtin_chain() -> keras.Sequential:
    import keras

    # RandomZoom's factor f samples at (1 + f) times the coordinates, so a
    # magnification s in [1, 1.4] is f in [1 / 1.4 - 1, 0].
    zoom = 1.0 / SCALE_RANGE[1] - 1.0
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=0),
            keras.layers.RandomRotation(
                MAX_ROTATION_DEG / 360.0, fill_mode="reflect", seed=0
            ),
            keras.layers.RandomZoom((zoom, 0.0), fill_mode="reflect", seed=0),
            keras.layers.RandomTranslation(
                MAX_TRANSLATION, MAX_TRANSLATION, fill_mode="reflect", seed=0
            ),
        ]
    )


def strong_augment():
    from stl10_keras.strong_augment import StrongAugment

    return StrongAugment(num_ops=2, magnitude=1.0, cutout=0.5, seed=0)


def keras_strong_chain() -> keras.Sequential:
    import keras

    # Keras' nearest equivalents: RandAugment's factor is its strength;
    # RandomErasing cuts one rectangle of 2-33 % of the area (Cutout: 25 %).
    return keras.Sequential([
        keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.5, seed=0),
        keras.layers.RandomErasing(factor=1.0, value_range=(0, 255), seed=0),
    ])


def checked_jit_method(layer, batch: np.ndarray) -> Method | str:
    """`jit_method`, or why XLA cannot compile the layer."""
    method = jit_method(layer, batch)
    try:
        method(1, 0)
    except Exception as err:  # XLA's refusals come as several error types
        return f"skipped: no XLA ({type(err).__name__})"
    return method


# A method times itself: run(warmup, batches) -> seconds for the timed batches.
Method = Callable[[int, int], float]


def _time(step: Callable[[], object], warmup: int, batches: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(batches):
        step()
    return time.perf_counter() - start


def tf_data_method(layer, batch: np.ndarray, jit: bool = False) -> Method:
    """`layer` mapped over a stream of uint8 batches in tf.data."""
    import tensorflow as tf

    def augment(images):
        return layer(tf.cast(images, "float32"), training=True)

    if jit:
        augment = tf.function(augment, jit_compile=True)
    ds = (
        tf.data.Dataset.from_tensors(batch)
        .repeat()
        .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )

    def run(warmup: int, batches: int) -> float:
        # A fresh iterator per round, deleted after it: a live one keeps
        # prefetching in the background, which would both steal CPU from the
        # other methods and hand this one batches made in their time.
        it = iter(ds)
        try:
            return _time(lambda: next(it), warmup, batches)
        finally:
            del it

    return run


def jit_method(layer, batch: np.ndarray) -> Method:
    """`layer` in an XLA-compiled function, each result fetched."""
    import tensorflow as tf

    fn = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    x = tf.constant(batch)
    return lambda warmup, batches: _time(lambda: fn(x).numpy(), warmup, batches)


def torchvision_method(batch: np.ndarray) -> Method | str:
    """torchvision v2 on uint8 NCHW images, or why it is skipped."""
    try:
        import torch
        from torchvision.transforms import v2
    except ImportError as err:
        return f"skipped: {err}"
    transform = v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(
                degrees=MAX_ROTATION_DEG,
                translate=(MAX_TRANSLATION, MAX_TRANSLATION),
                scale=SCALE_RANGE,
                interpolation=v2.InterpolationMode.BILINEAR,
            ),
        ]
    )
    images = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()

    def step():
        # v2 draws one set of parameters per call: call it per image, as a
        # DataLoader worker would, for per-image randomness like the others.
        return torch.stack([transform(img) for img in images])

    return lambda warmup, batches: _time(step, warmup, batches)


def measure(
    methods: dict[str, Method | str], batch_size: int, batches: int, warmup: int,
    repeats: int,
) -> dict[str, float | str]:
    """Best images/second of each method over `repeats` interleaved rounds.

    Rounds alternate between the methods so that a load change on a shared
    machine hits all of them; the best round is the least disturbed one.
    """
    best: dict[str, float | str] = {
        name: m if isinstance(m, str) else 0.0 for name, m in methods.items()
    }
    for _ in range(repeats):
        for name, method in methods.items():
            if isinstance(method, str):
                continue
            rate = batches * batch_size / method(warmup, batches)
            best[name] = max(best[name], rate)
    return best


def _load() -> str:
    # Other jobs on a shared machine change the numbers; print how busy it was.
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


REFERENCE = "c built-in chain, tf.data"


def main(argv: list[str] | None = None) -> None:
    parser = flags.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=flags.number(int, 1), default=6,
                        help="timed batches/round")
    parser.add_argument("--warmup", type=flags.number(int, 0), default=2,
                        help="untimed batches")
    parser.add_argument("--repeats", type=flags.number(int, 1), default=2,
                        help="rounds; best kept")
    parser.add_argument(
        "--batch-sizes", default="32,256", help="comma-separated batch sizes"
    )
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error("--batch-sizes takes integers separated by commas, e.g. 32,256.")
    if min(batch_sizes) < 1:
        parser.error("--batch-sizes must be >= 1, e.g. 32,256.")

    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    print(
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_name()},"
        f" {os.cpu_count()} CPUs; TF {tf.__version__}, Keras {keras.__version__};"
        f" best of {args.repeats} rounds of {args.batches} batches"
        f" after {args.warmup} warm-up; load average {_load()} at start"
    )
    rows = []
    for bs in batch_sizes:
        batch = rng.integers(0, 256, (bs, SIZE, SIZE, 3), dtype=np.uint8)
        methods: dict[str, Method | str] = {
            "a RandomAffine, tf.data": tf_data_method(random_affine(), batch),
            "a2 RandomAffine(affine_transform), tf.data": tf_data_method(
                random_affine("affine_transform"), batch
            ),
            "a3 RandomAffine, tf.data, jit map": tf_data_method(
                random_affine(), batch, jit=True
            ),
            "b RandomAffine, tf.function jit": jit_method(random_affine(), batch),
            REFERENCE: tf_data_method(builtin_chain(), batch),
            "d torchvision v2": torchvision_method(batch),
            "e StrongAugment, tf.function jit": jit_method(strong_augment(), batch),
            "e2 StrongAugment, tf.data": tf_data_method(strong_augment(), batch),
            "f keras RandAugment+RandomErasing, tf.data": tf_data_method(
                keras_strong_chain(), batch),
            "f2 keras RandAugment+RandomErasing, jit": checked_jit_method(
                keras_strong_chain(), batch),
        }
        rows.append(
            (bs, measure(methods, bs, args.batches, args.warmup, args.repeats))
        )

    print(f"load average {_load()} at end")
    print(f"{'method':<44}{'batch':>6}{'images/s':>10}{'vs built-in':>13}")
    for bs, results in rows:
        for name, value in results.items():
            if isinstance(value, str):
                print(f"{name:<44}{bs:>6}  {value}")
                continue
            ratio = value / results[REFERENCE]
            print(f"{name:<44}{bs:>6}{value:>10.0f}{ratio:>12.2f}x")


if __name__ == "__main__":
    main()
