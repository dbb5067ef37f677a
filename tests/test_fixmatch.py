"""FixMatch against numpy: the loss of hand-built batches, its gradient, the
metrics, keras' EMA against a numpy EMA, the unlabeled stream against planted
images, and the command line (both backends, resume, export)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import (  # noqa: E402
    FAST_XLA, ROOT, assert_same_run, saved_model_vs_keras, subprocess_env)
from stl10_keras.config import Config, ConfigError, preset  # noqa: E402
from stl10_keras.semisupervised import (  # noqa: E402
    METRIC_NAMES,
    UNKNOWN_LABEL,
    fixmatch_unlabeled_terms,
)
from stl10_keras.unlabeled import UnlabeledStream  # noqa: E402


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_ce(labels, logits):
    return -np.log(np_softmax(logits)[np.arange(len(labels)), labels])


def np_unlabeled(weak, strong, tau):
    probs = np_softmax(weak.astype(np.float64))
    mask = (probs.max(-1) >= tau).astype(np.float64)
    pseudo = probs.argmax(-1)
    return np.mean(mask * np_ce(pseudo, strong.astype(np.float64))), mask, pseudo


def hand_built(k=10, u=12, seed=0):
    """Weak logits whose top probabilities are far from 0.9 but one exactly 0.5."""
    rng = np.random.default_rng(seed)
    weak = rng.normal(0, 1, (u, k)).astype(np.float32)
    weak[::3, rng.integers(0, k)] += 9.0  # confident rows
    weak[1] = -1e4  # exp underflows to 0 in float32 and float64 alike
    weak[1, 2] = weak[1, 7] = 0.0  # a tie: exactly 0.5, argmax the first (2)
    strong = rng.normal(0, 2, (u, k)).astype(np.float32)
    return weak, strong


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.95])
def test_unlabeled_loss_mask_and_pseudo_labels_match_numpy(tau):
    weak, strong = hand_built()
    terms = fixmatch_unlabeled_terms(weak, strong, tau)
    want, mask, pseudo = np_unlabeled(weak, strong, tau)
    assert float(terms["loss"]) == pytest.approx(want, rel=1e-5)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(terms["mask"]), mask)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(terms["pseudo_labels"]),
                                  pseudo)
    assert mask[1] == (tau <= 0.5) and pseudo[1] == 2  # at the threshold: counted
    assert 0 < mask.sum() < len(mask)


def test_no_gradient_flows_through_the_pseudo_labels():
    import tensorflow as tf

    weak, strong = (tf.Variable(a) for a in hand_built())
    tau = 0.9
    with tf.GradientTape() as tape:
        loss = fixmatch_unlabeled_terms(weak, strong, tau)["loss"]
    g_weak, g_strong = tape.gradient(loss, [weak, strong])
    assert g_weak is None or not np.any(g_weak.numpy())
    # d/d strong of mean(mask * CE(pseudo, strong)) = mask (softmax - onehot) / U.
    _, mask, pseudo = np_unlabeled(weak.numpy(), strong.numpy(), tau)
    onehot = np.eye(strong.shape[1])[pseudo]
    want = mask[:, None] * (np_softmax(strong.numpy().astype(np.float64)) - onehot)
    np.testing.assert_allclose(g_strong.numpy(), want / len(mask), atol=1e-6)


def tiny_fixmatch(tau=0.9, weight=2.0, track=True):
    config = preset("smoke", "digits", "fixmatch")
    config.model.widths, config.model.fc_units = (4,), 8
    config.model.convs_per_stage = (1,)
    config.kmeans.stages = ()
    from stl10_keras.model import build_model
    from stl10_keras.semisupervised import build_fixmatch_model

    config.methods["fixmatch"].confidence_threshold = tau
    config.methods["fixmatch"].unlabeled_weight = weight
    model = build_model(config, (8, 8, 3))
    fm = build_fixmatch_model(config, model, track_pseudo_label_accuracy=track)
    fm.compile(optimizer="sgd",
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               metrics=["accuracy"])
    return fm


def test_model_loss_and_metrics_of_a_hand_built_batch_match_numpy():
    tau, weight = 0.9, 2.0
    fm = tiny_fixmatch(tau, weight)
    weak, strong = hand_built()
    rng = np.random.default_rng(5)
    labeled = rng.normal(0, 1, (5, 10)).astype(np.float32)
    labels = np.array([0, 3, 3, 9, 1])
    _, mask, pseudo = np_unlabeled(weak, strong, tau)
    truth = pseudo.copy()
    truth[::2] = UNKNOWN_LABEL  # known for odd rows only
    truth[3] = (pseudo[3] + 1) % 10  # one known pseudo-label is wrong
    y = (labels, truth)
    y_pred = (labeled, weak, strong)
    loss = float(fm.compute_loss(None, y, y_pred, training=True))
    unlabeled, _, _ = np_unlabeled(weak, strong, tau)
    supervised = np.mean(np_ce(labels, labeled.astype(np.float64)))
    assert loss == pytest.approx(supervised + weight * unlabeled, rel=1e-5)
    logs = fm.compute_metrics(None, y, y_pred)
    assert float(logs["supervised_loss"]) == pytest.approx(supervised, rel=1e-5)
    assert float(logs["unlabeled_loss"]) == pytest.approx(unlabeled, rel=1e-5)
    assert float(logs["mask_rate"]) == pytest.approx(mask.mean())
    counted = mask.astype(bool) & (truth != UNKNOWN_LABEL)
    assert counted.sum() >= 2 and counted[3]
    want_acc = np.mean(pseudo[counted] == truth[counted])
    assert float(logs["pseudo_label_accuracy"]) == pytest.approx(want_acc)
    acc = np.mean(labeled.argmax(-1) == labels)
    assert float(logs["accuracy"]) == pytest.approx(acc)
    # Validation batches are plain (images, labels) with a plain loss, and
    # no unlabeled metrics.
    fm.reset_metrics()
    plain = fm.compute_metrics(None, labels, labeled)
    assert not set(plain) & set(METRIC_NAMES)
    assert float(plain["accuracy"]) == pytest.approx(acc)
    plain_loss = float(fm.compute_loss(None, labels, labeled, training=False))
    assert plain_loss == pytest.approx(supervised, rel=1e-5)


def test_the_three_views_go_through_the_network_as_one_batch():
    fm = tiny_fixmatch()
    seen = []
    original = fm.model.call

    def spy(inputs, *args, **kwargs):
        seen.append(tuple(inputs.shape))
        return original(inputs, *args, **kwargs)

    fm.model.call = spy
    x = np.zeros((3, 8, 8, 3), np.uint8), np.zeros((6, 8, 8, 3), np.uint8)
    labeled, weak, strong = fm(x, training=True)
    assert [tuple(t.shape) for t in (labeled, weak, strong)] == [(3, 10), (6, 10),
                                                                 (6, 10)]
    assert seen == [(3 + 6 + 6, 8, 8, 3)]
    clone = fm.__class__.from_config(fm.get_config())
    assert clone.confidence_threshold == fm.confidence_threshold
    assert clone.strong.get_config() == fm.strong.get_config()
    assert clone.count_params() == fm.count_params()


@pytest.mark.parametrize("decay, batch_size", [(0.8, 8), (0.5, 2)])
def test_keras_ema_matches_a_numpy_warmed_up_ema_and_ends_in_the_model(
        decay, batch_size):
    # The average's momentum at update t is TF's ExponentialMovingAverage
    # warm-up, min(decay, (1 + t) / (10 + t)): 5 updates stay on the ramp,
    # 20 reach decay 0.5 at t = 8.
    from stl10_keras.config import TrainConfig
    from stl10_keras.train import optimizer

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=optimizer(TrainConfig(learning_rate=0.1, momentum=0.0,
                                                  weight_decay=0.0, lr_decay=0.0),
                                      ema_decay=decay),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    raw = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raw.append([np.array(w) for w in self.model.get_weights()])

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)).astype(np.float32), rng.integers(0, 2, 40)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
              callbacks=[Record()])
    ema = [w.copy() for w in raw[0]]  # keras starts the average at step 1's weights
    for t, step in enumerate(raw[1:], start=1):
        m = min(decay, (1 + t) / (10 + t))
        ema = [m * e + (1 - m) * w for e, w in zip(ema, step)]
    assert len(raw) == 40 // batch_size
    for got, want, last in zip(model.get_weights(), ema, raw[-1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, last)  # the average, not the last step


def planted_stream(n=23, batch=5, chunk=7, seed=0, labels=True):
    """Image i is filled with i, its label is i % 10; records what was read."""
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, 2, 2, 1), np.uint8)
    reads = []

    def factory(size):
        for i in range(0, n, size):
            reads.append(size)
            yield images[i:i + size]

    stream = UnlabeledStream(factory, n, batch, seed=seed, chunk=chunk,
                             labels=np.arange(n) % 10 if labels else None)
    return stream, reads


def test_unlabeled_stream_covers_each_image_once_per_pass_with_aligned_labels():
    stream, reads = planted_stream(n=20, batch=5, chunk=7)
    seen = []
    for k in range(8):  # two passes
        x, y = stream.batch(k)
        ids = x[:, 0, 0, 0].astype(int)
        np.testing.assert_array_equal(y, ids % 10)
        seen.append(ids)
    first, second = np.concatenate(seen[:4]), np.concatenate(seen[4:])
    assert sorted(first) == list(range(20)) == sorted(second)
    assert not np.array_equal(first, second)  # each pass is shuffled anew
    assert not np.array_equal(first, np.arange(20))
    assert set(reads) == {7}  # read in chunks, never as a whole


def test_unlabeled_batch_k_is_the_same_read_in_order_or_jumped_to():
    whole, _ = planted_stream()
    in_order = [whole.batch(k) for k in range(12)]  # crosses passes (23 % 5 != 0)
    for k in (11, 3, 7, 0, 5):
        fresh, _ = planted_stream()
        x, y = fresh.batch(k)
        np.testing.assert_array_equal(x, in_order[k][0])
        np.testing.assert_array_equal(y, in_order[k][1])
    unknown, _ = planted_stream(labels=False)
    assert set(unknown.batch(2)[1]) == {UNKNOWN_LABEL}


def test_config_round_trips_and_validates_semi_supervised_settings():
    config = preset("smoke", "digits", "fixmatch")
    assert config.semi_supervised.method == "fixmatch"
    assert config.kmeans.stages == (1, 2) and config.augment.enabled
    assert Config.from_json(config.to_json()) == config
    config.semi_supervised.method = "none"
    with pytest.raises(ConfigError, match="--variant fixmatch"):
        Config.from_json(config.to_json())
    for key, value, needle in [("unlabeled_ratio", 0, "--unlabeled-ratio"),
                               ("confidence_threshold", 1.5, "--confidence-threshold"),
                               ("ema_decay", 1.0, "--ema-decay"),
                               ("method", "mixmatch", "--semi-supervised")]:
        bad = json.loads(preset("smoke", "digits", "fixmatch").to_json())
        bad["semi_supervised"][key] = value
        with pytest.raises(ConfigError, match=needle):
            Config.from_dict(bad)
    assert preset("default", "digits", "kmeans12").semi_supervised.method == "none"


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "stl10_keras.train", *args],
                          cwd=ROOT, env=env or subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.e2e
def test_stl10_files_train_with_their_unlabeled_split_or_get_one_sentence(tmp_path):
    from test_data import _write_stl10  # STL-10's official binary format

    folder = tmp_path / "stl10_binary"
    _write_stl10(folder, n_train=40, n_test=10, n_unlabeled=9)
    args = ["--preset", "smoke", "--variant", "fixmatch", "--data-dir", str(folder),
            "--val-per-class", "1", "--batch-size", "8", "--widths", "4,8",
            "--fc-units", "16", "--kmeans-images", "9", "--no-export",
            "--verbose", "0"]
    proc = _cli(*args, "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["unlabeled"] == 9
    assert "pseudo_label_accuracy" not in metrics["history"][-1]  # labels unknown
    (folder / "unlabeled_X.bin").unlink()
    proc = _cli(*args, "--run-dir", str(tmp_path / "none"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no unlabeled images" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "none").exists()


_MIRRORED_LOSS = """
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from stl10_keras.config import preset
    from stl10_keras.model import build_model
    from stl10_keras.semisupervised import build_fixmatch_model

    def fixmatch():
        config = preset("smoke", "digits", "fixmatch")
        config.model.widths, config.model.fc_units = (4,), 8
        config.model.convs_per_stage, config.kmeans.stages = (1,), ()
        config.methods["fixmatch"].confidence_threshold = 0.3
        config.methods["fixmatch"].unlabeled_weight = 2.0
        fm = build_fixmatch_model(config, build_model(config, (8, 8, 3)))
        fm.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        return fm

    rng = np.random.default_rng(0)
    labeled = rng.normal(0, 1, (8, 10)).astype("float32")
    weak = rng.normal(0, 2, (16, 10)).astype("float32")
    strong = rng.normal(0, 1, (16, 10)).astype("float32")
    labels = rng.integers(0, 10, 8).astype("int32")
    truth = np.full(16, -1, "int32")
    whole = float(fixmatch().compute_loss(
        None, (labels, truth), (labeled, weak, strong), training=True))

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        fm = fixmatch()
    def halves(ctx):  # replica r gets rows [r n/2, (r+1) n/2) of each array
        r = ctx.replica_id_in_sync_group
        return [tf.constant(a[r * len(a) // 2:(r + 1) * len(a) // 2])
                for a in (labeled, weak, strong, labels, truth)]
    parts = strategy.experimental_distribute_values_from_function(halves)
    def step(l, w, s, y, t):
        return fm.compute_loss(None, (y, t), (l, w, s), training=True)
    per_replica = strategy.run(step, args=tuple(parts))
    summed = float(strategy.reduce("SUM", per_replica, axis=None))
    p = np.exp(weak - weak.max(-1, keepdims=True))
    masked = int((p.max(-1) / p.sum(-1) >= 0.3).sum())
    print(json.dumps({"whole": whole, "summed": summed, "masked": masked}))
"""


def test_under_a_mirrored_strategy_the_replicas_losses_sum_to_the_whole_batchs():
    # tf.distribute sums the replicas' gradients, so each replica's loss must
    # be its share of the global mean: keras' losses divide by the replica
    # count, and FixMatch's unlabeled term has to as well (a plain mean there
    # counted it twice over two replicas).
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_MIRRORED_LOSS)],
                          cwd=ROOT, env=subprocess_env(KERAS_BACKEND="tensorflow"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < result["masked"] < 16  # both halves of the loss count
    assert result["summed"] == pytest.approx(result["whole"], rel=1e-5)


# Batches of 40 divide digits' 400 training images: every step's loss counts
# alike in the epoch's mean, so loss = supervised + unlabeled holds per epoch.
FIXMATCH_RUN = ["--dataset", "digits", "--preset", "smoke", "--variant", "fixmatch",
                "--epochs", "3", "--batch-size", "40", "--widths", "4,8",
                "--fc-units", "16", "--confidence-threshold", "0.3", "--verbose", "0"]


@pytest.fixture(scope="module")
def fixmatch_run(tmp_path_factory):
    """One uninterrupted FixMatch run from the CLI, exported (shared by two tests)."""
    folder = tmp_path_factory.mktemp("fixmatch")
    run, export = folder / "run", folder / "export"
    proc = _cli(*FIXMATCH_RUN, "--run-dir", str(run), "--export-dir", str(export))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, export, json.loads((run / "metrics.json").read_text())


@pytest.mark.e2e
def test_fixmatch_trains_logs_exports_the_ema_weights_from_the_cli(fixmatch_run):
    run, export, metrics = fixmatch_run
    assert metrics["semi_supervised"] == "fixmatch"
    last = metrics["history"][-1]
    for key in ("supervised_loss", "unlabeled_loss", "mask_rate",
                "pseudo_label_accuracy", "val_accuracy"):
        assert np.isfinite(last[key]), key
    assert "val_mask_rate" not in last
    assert last["mask_rate"] > 0  # tau 0.3 on 10 classes: some pseudo-labels count
    # loss = supervised + 1.0 * unlabeled (the default lambda).
    assert last["loss"] == pytest.approx(
        last["supervised_loss"] + last["unlabeled_loss"], rel=1e-4)
    assert (run / "figures" / "strong_augmentation.png").exists()
    assert (run / "logs" / "train").is_dir()
    # The export is an ordinary SavedModel of model.keras, which holds the
    # averaged weights: validation accuracy reproduced from both.
    diff, accuracy = saved_model_vs_keras(export / "1", run / "model.keras")
    assert diff < 1e-5
    assert accuracy == pytest.approx(metrics["val_accuracy"], abs=1e-9)


@pytest.mark.e2e
def test_a_resumed_fixmatch_run_has_the_history_of_an_uninterrupted_one(
        fixmatch_run, tmp_path):
    from test_train import _kill_after_epochs

    _, _, want = fixmatch_run
    resumed = tmp_path / "resumed"
    args = [*FIXMATCH_RUN, "--no-export", "--run-dir", str(resumed)]
    _kill_after_epochs(args, resumed / "history.csv", 2)
    assert not (resumed / "metrics.json").exists()
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((resumed / "metrics.json").read_text())
    assert got["resumed"] is True and want["resumed"] is False
    # Same unlabeled batches, augmentation draws, weights and EMA after the
    # resume.
    assert_same_run(got, want)


@pytest.mark.e2e
def test_fixmatch_trains_under_jax(tmp_path):
    run = tmp_path / "run"
    env = subprocess_env(KERAS_BACKEND="jax", XLA_FLAGS=FAST_XLA)
    proc = _cli("--dataset", "digits", "--preset", "smoke", "--variant", "fixmatch",
                "--epochs", "1", "--batch-size", "40", "--widths", "4,8",
                "--fc-units", "16",
                "--confidence-threshold", "0.3", "--run-dir", str(run), "--no-export",
                "--verbose", "0", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads((run / "metrics.json").read_text())["history"][-1]
    assert last["mask_rate"] > 0 and np.isfinite(last["unlabeled_loss"])
    assert last["loss"] == pytest.approx(
        last["supervised_loss"] + last["unlabeled_loss"], rel=1e-4)


def test_a_run_from_before_semi_supervised_existed_is_not_refused(tmp_path):
    from stl10_keras.distribute import Distributed
    from stl10_keras.train import _prepare

    config = preset("smoke", "digits", "kmeans12")
    old = json.loads(config.to_json())
    del old["semi_supervised"]  # a config.json written before the section
    (tmp_path / "config.json").write_text(json.dumps(old))
    _prepare(config, tmp_path, None, False, Distributed())  # no ConfigError
    # Fields added to a section later read as their defaults, which are what
    # such a run did (the lab's decay, no synchronised batch norm)...
    del old["train"]["lr_schedule"], old["model"]["sync_batch_norm"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    _prepare(config, tmp_path, None, False, Distributed())
    # ...so a run from before them is still told apart from one using them.
    cosine = preset("smoke", "digits", "kmeans12")
    cosine.train.lr_schedule = "cosine"
    with pytest.raises(ConfigError, match="different config"):
        _prepare(cosine, tmp_path, None, False, Distributed())
    fixmatch = preset("smoke", "digits", "fixmatch")
    with pytest.raises(ConfigError, match="different config"):
        _prepare(fixmatch, tmp_path, None, False, Distributed())
