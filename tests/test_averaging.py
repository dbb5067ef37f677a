"""The weights' moving average at any run length, and the batch statistics that
belong to it (`stl10_keras.averaging`).

References: TF's ExponentialMovingAverage warm-up formula in numpy; batch
means computed by numpy from the layer's own inputs; and, end to end, the
raw weights of the same run (the average must not be worse than them).
"""
import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import ROOT, subprocess_env
from stl10_keras.averaging import (batch_norm_layers, recalibrate_batch_norm,
                                   warmup_momentum)


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_warmup_momentum_is_tfs_formula(decay):
    steps = np.arange(0, 12000)
    got = np.asarray(keras.ops.convert_to_numpy(warmup_momentum(decay, steps)))
    want = np.where(steps > 0, np.minimum(decay, (1 + steps) / (10 + steps)), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # By hand: 10/19 at step 9; the decay from (10 decay - 1) / (1 - decay) on.
    assert got[9] == pytest.approx(10 / 19)
    reached = round((10 * decay - 1) / (1 - decay))
    assert got[reached] == pytest.approx(decay) and got[reached // 2] < decay


@pytest.mark.parametrize("batch_norm", ["manual", "keras"])
def test_recalibration_gives_the_mean_of_the_batches_statistics(batch_norm):
    from stl10_keras.config import preset
    from stl10_keras.model import build_model

    config = preset("smoke", "digits", "baseline")
    config.model.batch_norm = batch_norm
    keras.utils.set_random_seed(0)
    model = build_model(config, (8, 8, 3))
    images = np.random.default_rng(0).integers(0, 256, (70, 8, 8, 3)).astype(np.uint8)
    bn = batch_norm_layers(model)
    assert len(bn) == 5
    first = bn[0]
    before = model.get_layer("stage1_conv")
    probe = keras.Model(model.input, before.output)
    used = recalibrate_batch_norm(model, images, batch_size=32)
    assert used == 3  # 32 + 32 + 6 images
    x = [np.asarray(probe(images[i:i + 32].astype("float32")), np.float64)
         for i in range(0, 70, 32)]
    means = np.mean([b.mean(axis=(0, 1, 2)) for b in x], axis=0)
    variances = np.mean([b.var(axis=(0, 1, 2)) for b in x], axis=0)
    np.testing.assert_allclose(np.asarray(first.moving_mean), means,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(first.moving_variance), variances,
                               rtol=1e-3, atol=1e-5)
    assert first.momentum == config.model.bn_momentum  # restored


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "stl10_keras.train", *args],
                          cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=900)


SMALL = ["--dataset", "digits", "--preset", "smoke", "--batch-size", "40",
         "--widths", "16,32", "--fc-units", "64", "--dropout", "0.1",
         "--learning-rate", "0.05", "--momentum", "0.9", "--max-rotation", "0",
         "--scale-range", "1,1", "--verbose", "0", "--no-export"]


@pytest.fixture(scope="module")
def supervised_start(tmp_path_factory):
    # FreeMatch's threshold starts at 1/K: from a network at chance level it
    # takes almost every pseudo-label, wrong ones included, and on this tiny
    # network stayed at 19.5 % validation accuracy; it starts from a
    # supervised run (--init-from), as docs/semi-supervised.md recommends.
    run = tmp_path_factory.mktemp("start") / "run"
    proc = _cli(*SMALL, "--variant", "baseline", "--epochs", "3", "--run-dir",
                str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["fixmatch", "freematch"])
@pytest.mark.parametrize("epochs", [3, 10])
def test_the_average_is_no_worse_than_the_raw_weights_at_any_length(
        method, epochs, tmp_path, request):
    # Digits, batch 40: 10 steps an epoch, so 30 and 100 steps, far below the
    # ~1,000 steps a fixed decay of 0.999 remembers (it exported the initial
    # weights). The default decay is asked for explicitly; a small network
    # that learns digits in a few epochs (SMALL: light augmentation, little
    # dropout).
    start = ([] if method == "fixmatch" else
             ["--init-from", str(request.getfixturevalue("supervised_start"))])
    run = tmp_path / "run"
    proc = _cli(*SMALL, "--variant", method, "--epochs", str(epochs),
                "--ema-decay", "0.999", *start, "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    record = metrics["averaging"]
    assert record["raw_val_accuracy"] > 0.2  # the raw weights learned something
    assert record["average_val_accuracy"] >= record["raw_val_accuracy"] - 0.05
    chosen = max(record["average_val_accuracy"], record["raw_val_accuracy"])
    assert metrics["val_accuracy"] == pytest.approx(chosen, abs=1e-9)
