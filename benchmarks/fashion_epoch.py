"""Seconds per training epoch on Fashion-MNIST's protocol (4,000 images, 28x28x1).

The ablation's real training model (RandomAffine in front of the default
5-stage network, SGD as every run compiles it) fits one epoch of uint8
batches several times; the table reports the median epoch after a first,
compiling one. Run it once per backend and compare:

    python benchmarks/fashion_epoch.py [--images 4000] [--batch-size 32]
        [--epochs 3] [--jit off,on] [--steps-per-execution 1,16]
        [--widths 64,128,256,512,512]
    KERAS_BACKEND=jax python benchmarks/fashion_epoch.py --jit on
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from stl10_keras import flags  # noqa: E402
from _common import cpu_name  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",")]


def main() -> None:
    p = flags.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=flags.number(int, 1), default=4000)
    p.add_argument("--batch-size", type=flags.number(int, 1), default=32)
    p.add_argument("--epochs", type=int, default=3,
                   help="epochs per setting; the first (compiling) is not counted")
    p.add_argument("--jit", default="off",
                   help="comma-separated XLA settings: off, on")
    p.add_argument("--steps-per-execution", default="1",
                   help="comma-separated values of compile(steps_per_execution)")
    p.add_argument("--widths", default="64,128,256,512,512")
    p.add_argument("--no-augment", action="store_true")
    args = p.parse_args()
    try:
        widths, spes = _ints(args.widths), _ints(args.steps_per_execution)
    except ValueError:
        p.error("--widths and --steps-per-execution take integers separated by "
                "commas, e.g. 1,16.")
    if not set(args.jit.split(",")) <= {"off", "on"}:
        p.error("--jit takes off and/or on.")
    if min(*widths, *spes) < 1 or args.epochs < 2:
        p.error("--widths and --steps-per-execution must be >= 1 and --epochs >= 2.")

    from stl10_keras.data import make_batches
    from stl10_keras.runtime import tensorflow_available

    tensorflow_available()
    import keras

    from stl10_keras.augment import random_affine_from_config
    from stl10_keras.config import preset
    from stl10_keras.model import build_model, build_training_model
    from stl10_keras.train import optimizer

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.images, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, 10, args.images).astype(np.int32)
    rows = []
    for jit in args.jit.split(","):
        for spe in spes:
            config = preset("default", "fashion_mnist",
                            "baseline" if args.no_augment else "augment")
            config.model.widths = tuple(widths)
            config.model.convs_per_stage = (1,) * len(widths)
            keras.backend.clear_session()
            keras.utils.set_random_seed(0)
            model = build_model(config, (28, 28, 1))
            training = build_training_model(
                model, random_affine_from_config(config.augment, seed=0))
            training.compile(
                optimizer=optimizer(config.train),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"], jit_compile=jit == "on",
                steps_per_execution=spe)
            batches = make_batches(x, y, args.batch_size, shuffle=True)
            times = []
            for _ in range(args.epochs):
                t0 = time.perf_counter()
                training.fit(batches, epochs=1, verbose=0)
                times.append(time.perf_counter() - t0)
            rows.append((jit, spe, times[0], statistics.median(times[1:])))
            print(f"jit {jit} steps_per_execution {spe}: epochs {times}", flush=True)
    load = os.getloadavg()[0]
    print(f"# {cpu_name()}, {os.cpu_count()} cores (1-min load {load:.1f} at the "
          f"end), keras {keras.__version__} ({keras.backend.backend()}), 28x28x1, "
          f"{args.images} images, batch {args.batch_size}, widths {args.widths}, "
          f"{'no ' if args.no_augment else ''}augmentation")
    print("| XLA | steps_per_execution | first epoch (s) | epoch (s, median) | "
          "images/s |")
    print("|---|---:|---:|---:|---:|")
    for jit, spe, first, epoch in rows:
        print(f"| {jit} | {spe} | {first:.1f} | {epoch:.1f} | "
              f"{args.images / epoch:.0f} |")


if __name__ == "__main__":
    main()
