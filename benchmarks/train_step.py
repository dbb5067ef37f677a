"""Training images/second: ManualBatchNorm vs keras' BatchNormalization, same run.

Same network (the default 5-stage model), same synthetic uint8 data, same
optimizer; only the batch-norm layer differs. Each configuration is timed in
alternating rounds so machine noise hits both alike; the table reports the
median round and the ratio.

    python benchmarks/train_step.py [--image-size 96] [--batch-size 32]
        [--steps 20] [--rounds 3] [--widths 64,128,256,512,512] [--jit off,on]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Only light imports here: keras (and TensorFlow behind it) load after the
# flags are parsed, so a bad flag is refused in a fraction of a second.
import numpy as np  # noqa: E402

from stl10_keras import flags  # noqa: E402
from stl10_keras.config import preset  # noqa: E402
from _common import cpu_name  # noqa: E402


def make_model(batch_norm: str, jit: str, args) -> keras.Model:
    import keras

    from stl10_keras.model import build_model

    config = preset("default", "stl10", "baseline")
    config.model.batch_norm = batch_norm
    config.model.widths = tuple(int(w) for w in args.widths.split(","))
    config.model.convs_per_stage = (1,) * len(config.model.widths)
    keras.utils.set_random_seed(0)
    model = build_model(config, (args.image_size, args.image_size, 3))
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile={"auto": "auto", "on": True, "off": False}[jit],
    )
    return model


def time_steps(model, x, y, steps: int) -> float:
    """Seconds for `steps` training steps (after the data is on the device)."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(x, y)
    float(np.asarray(loss))  # wait for the last step
    return time.perf_counter() - start


def main() -> None:
    p = flags.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=flags.number(int, 1), default=96)
    p.add_argument("--batch-size", type=flags.number(int, 1), default=32)
    p.add_argument("--steps", type=flags.number(int, 1), default=20)
    p.add_argument("--rounds", type=flags.number(int, 1), default=3)
    p.add_argument("--widths", default="64,128,256,512,512")
    p.add_argument("--jit", default="off,on",
                   help="comma-separated XLA settings to compare: off, on, auto")
    args = p.parse_args()
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        p.error("--widths takes integers separated by commas, e.g. 64,128,256,512,512.")
    if not set(args.jit.split(",")) <= {"off", "on", "auto"}:
        p.error("--jit takes off, on and/or auto, e.g. off,on.")
    if min(widths) < 1:
        p.error("--widths must be >= 1, e.g. 64,128,256,512,512.")

    import keras

    rng = np.random.default_rng(0)
    s = args.image_size
    x = rng.integers(0, 256, (args.batch_size, s, s, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch_size)
    jits = args.jit.split(",")
    models = {(bn, jit): make_model(bn, jit, args)
              for jit in jits for bn in ("keras", "manual")}
    for model in models.values():  # compile and warm up
        time_steps(model, x, y, 2)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(time_steps(model, x, y, args.steps))

    print(f"# {cpu_name()}, {os.cpu_count()} cores, "
          f"keras {keras.__version__} ({keras.backend.backend()}), "
          f"{s}x{s}x3, batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} steps")
    print("| batch norm | XLA | step time (ms) | images/s | vs keras BN, same XLA |")
    print("|---|---|---|---|---|")
    labels = {"keras": "keras.layers.BatchNormalization",
              "manual": "ManualBatchNorm (lab's backward)"}
    for (bn, jit), runs in times.items():
        step = statistics.median(runs) / args.steps
        base = statistics.median(times[("keras", jit)]) / args.steps
        print(f"| {labels[bn]} | {jit} | {step * 1e3:.1f} | "
              f"{args.batch_size / step:.0f} | {step / base:.3f} |")


if __name__ == "__main__":
    main()
