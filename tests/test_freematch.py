"""FreeMatch's self-adaptive threshold and fairness term against numpy references
written from USB's `FreeMatchThresholingHook` and `entropy_loss`."""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from stl10_keras.config import preset  # noqa: E402
from stl10_keras.model import build_model  # noqa: E402
from stl10_keras.semisupervised import (  # noqa: E402
    build_freematch_model, fixmatch_unlabeled_terms, freematch_fairness_loss)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def usb_fairness(mask, logits_s, p_model, label_hist):
    """USB's `entropy_loss` in numpy (boolean selection, bincount)."""
    mask = mask.astype(bool)
    if not mask.any():
        return 0.0
    prob_s = softmax(logits_s[mask])
    hist_s = np.bincount(prob_s.argmax(1), minlength=logits_s.shape[1]) / mask.sum()
    with np.errstate(divide="ignore"):
        inv_hist = np.where(label_hist > 0, 1 / label_hist, 0.0)
        inv_s = np.where(hist_s > 0, 1 / hist_s, 0.0)
    mod_p = p_model * inv_hist
    mod_p /= mod_p.sum()
    mod_s = prob_s.mean(0) * inv_s
    mod_s /= mod_s.sum()
    return float((mod_p * np.log(mod_s + 1e-12)).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_thresholds_mask_as_numpy(seed):
    rng = np.random.default_rng(seed)
    weak, strong = rng.normal(size=(2, 64, 5)).astype(np.float32) * 2
    thresholds = rng.uniform(0.2, 0.6, 5).astype(np.float32)
    terms = fixmatch_unlabeled_terms(weak, strong, thresholds)
    p = softmax(weak)
    want = (p.max(1) >= thresholds[p.argmax(1)]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(terms["mask"]), want)
    assert 0 < want.sum() < 64  # a planted case where the classes' thresholds matter


@pytest.mark.parametrize("seed", [0, 1])
def test_fairness_term_matches_usb(seed):
    rng = np.random.default_rng(seed)
    strong = rng.normal(size=(32, 4)).astype(np.float32) * 2
    mask = (rng.uniform(size=32) < 0.5).astype(np.float32)
    p_model = softmax(rng.normal(size=4)).astype(np.float32)
    label_hist = np.array([0.4, 0.3, 0.3, 0.0], np.float32)  # a class never seen
    got = float(freematch_fairness_loss(mask, strong, p_model, label_hist))
    assert got == pytest.approx(usb_fairness(mask, strong, p_model, label_hist),
                                rel=1e-5, abs=1e-6)
    assert float(freematch_fairness_loss(np.zeros(32, np.float32), strong,
                                         p_model, label_hist)) == 0.0


def test_states_thresholds_and_loss_of_a_batch_match_numpy():
    config = preset("smoke", "digits", "freematch")
    config.methods["freematch"].ema_momentum = 0.7  # visible in one step
    config.augment.enabled = False  # views = images (strong still augments)
    keras.utils.set_random_seed(0)
    model = build_model(config, (8, 8, 3))
    fm = build_freematch_model(config, model)
    rng = np.random.default_rng(0)
    labeled = rng.integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    unlabeled = rng.integers(0, 256, (12, 8, 8, 3)).astype(np.uint8)
    labeled_logits, weak, strong, state = fm((labeled, unlabeled), training=True)
    p = softmax(np.asarray(weak, np.float64))
    k, m = p.shape[1], 0.7
    time_p = m / k + (1 - m) * p.max(1).mean()
    p_model = m / k + (1 - m) * p.mean(0)
    hist = m / k + (1 - m) * np.bincount(p.argmax(1), minlength=k) / len(p)
    np.testing.assert_allclose(float(fm.time_p.numpy()), time_p, rtol=1e-5)
    np.testing.assert_allclose(fm.p_model.numpy(), p_model, rtol=1e-5)
    np.testing.assert_allclose(fm.label_hist.numpy(), hist, rtol=1e-5)
    thresholds = time_p * p_model / p_model.max()
    np.testing.assert_allclose(np.asarray(state[0]), thresholds, rtol=1e-5)
    # Inference does not move the states, and validation logs no threshold.
    fm((labeled, unlabeled), training=False)
    np.testing.assert_allclose(float(fm.time_p.numpy()), time_p, rtol=1e-5)
    fm.compile(optimizer="sgd",
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               metrics=["accuracy"])
    logs = fm.evaluate(labeled, np.arange(4) % 10, verbose=0, return_dict=True)
    assert "threshold" not in logs and "accuracy" in logs
    # The loss: supervised + lambda * masked CE + fairness_weight * fairness.
    fm.compile(optimizer="sgd",
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    y = (np.arange(4) % k, np.full(12, -1))
    got = float(fm.compute_loss(y=y, y_pred=(labeled_logits, weak, strong, state)))
    mask = (p.max(1) >= thresholds[p.argmax(1)]).astype(np.float64)
    ps = softmax(np.asarray(strong, np.float64))
    unlabeled_ce = np.mean(mask * -np.log(ps[np.arange(12), p.argmax(1)]))
    pl = softmax(np.asarray(labeled_logits, np.float64))
    supervised = np.mean(-np.log(pl[np.arange(4), y[0]]))
    fairness = usb_fairness(mask, np.asarray(strong, np.float64), p_model, hist)
    want = supervised + unlabeled_ce + 0.01 * fairness
    assert got == pytest.approx(want, rel=1e-4)


def test_no_gradient_flows_through_the_thresholds_or_the_weak_views():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    weak = tf.constant(rng.normal(size=(16, 4)).astype(np.float32))
    strong = tf.constant(rng.normal(size=(16, 4)).astype(np.float32))
    thresholds = tf.constant([0.3, 0.4, 0.5, 0.2])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([weak, strong, thresholds])
        terms = fixmatch_unlabeled_terms(weak, strong, thresholds)
        loss = terms["loss"] + freematch_fairness_loss(terms["mask"], strong,
                                                       tf.nn.softmax(weak)[0],
                                                       tf.ones(4) / 4)
    for source in (weak, thresholds):
        grad = tape.gradient(loss, source)
        assert grad is None or not np.any(np.asarray(grad))
    assert np.any(np.asarray(tape.gradient(loss, strong)))
