"""FixMatch (Sohn et al., NeurIPS 2020) as a keras Model around the lab's network.

Each step takes a labeled batch of `B` images and an unlabeled batch of
`mu * B`. The labeled images and the unlabeled ones get a weak view
(`RandomAffine`: flip + shift); the unlabeled ones also a strong view
(`StrongAugment`). The model's prediction on a weak unlabeled view, where
its top probability is at least `tau`, becomes a hard pseudo-label (no
gradient flows through it) for the strong view:

    loss = CE(labels, labeled logits)
           + lambda * mean_u(mask_u * CE(pseudo_label_u, strong logits_u))

with `mask_u = max softmax(weak logits_u) >= tau` and the mean over all
`mu * B` unlabeled images, as in the paper's Algorithm 1.

Batch statistics: the three views go through the network as one
concatenated batch of `(1 + 2 mu) B` images, as FixMatch's reference
implementation does, so `ManualBatchNorm` normalises them together and its
moving statistics follow that mixed batch.

The design keeps keras' own `train_step` on every backend: `call` returns
the three views' logits, `compute_loss` and `compute_metrics` are
overridden (both run inside keras' stateless train step under JAX).
Evaluation and export use the moving average of the weights kept by the
optimizer (`use_ema`, see `stl10_keras.train.optimizer`).

Backend-agnostic: imports keras only (never tensorflow). This is the keras
side of the methods `fixmatch` and `freematch`; their plug-ins (config
sections, flags, batches) are `stl10_keras.methods.fixmatch` and
`stl10_keras.methods.freematch`, which import it only when a run trains.
"""

from __future__ import annotations

import keras
from keras import ops

from stl10_keras.augment import RandomAffine
from stl10_keras.config import Config
from stl10_keras.strong_augment import StrongAugment

METRIC_NAMES = ("supervised_loss", "unlabeled_loss", "mask_rate",
                "pseudo_label_accuracy")
UNKNOWN_LABEL = -1  # an unlabeled image whose true label nobody knows


def fixmatch_unlabeled_terms(weak_logits, strong_logits, threshold) -> dict:
    """The unlabeled half of FixMatch's loss, and what it is made of.

    Args:
        weak_logits: `(U, K)` logits of the weak views.
        strong_logits: `(U, K)` logits of the strong views of the same images.
        threshold: `tau`; a pseudo-label counts where the weak view's top
            probability is at least this: a number, or a `(K,)` tensor of
            per-class thresholds (the pseudo-label's class picks one).

    Returns:
        A dict: `loss` (scalar, the masked cross-entropy averaged over all
        `U` images), `per_image` (`(U,)`, masked cross-entropy), `mask`
        (`(U,)` float 0/1), `pseudo_labels` (`(U,)` int32). No gradient flows
        into `weak_logits`.
    """
    probs = ops.softmax(ops.stop_gradient(ops.cast(weak_logits, "float32")), axis=-1)
    confidence = ops.max(probs, axis=-1)
    pseudo_labels = ops.cast(ops.argmax(probs, axis=-1), "int32")
    if ops.ndim(threshold) == 1:  # per class: the pseudo-label's class's
        threshold = ops.take(ops.cast(threshold, "float32"), pseudo_labels)
    mask = ops.cast(confidence >= threshold, "float32")
    ce = keras.losses.sparse_categorical_crossentropy(
        pseudo_labels, ops.cast(strong_logits, "float32"), from_logits=True)
    per_image = mask * ce
    # mean(per_image) through keras' own reduction, which also divides by the
    # replica count under a tf.distribute strategy, as the supervised term is.
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        pseudo_labels, ops.cast(strong_logits, "float32"), sample_weight=mask)
    return {"loss": loss, "per_image": per_image, "mask": mask,
            "pseudo_labels": pseudo_labels}


@keras.saving.register_keras_serializable(package="stl10_keras")
class FixMatch(keras.Model):
    """Trains `model` with FixMatch; evaluates and predicts as `model` itself.

    Train on `((labeled_images, unlabeled_images), (labels, unlabeled_labels))`
    batches, where `unlabeled_labels` holds each unlabeled image's true label
    where the experimenter knows it and `UNKNOWN_LABEL` (-1) elsewhere; they
    are only used for the `pseudo_label_accuracy` metric. Validation batches
    are ordinary `(images, labels)`.

    Args:
        model: the inference network (images 0..255 -> logits).
        weak: the weak augmentation layer (None: the views are the images).
        strong: the strong augmentation layer.
        confidence_threshold: `tau`.
        unlabeled_weight: `lambda`.
        track_pseudo_label_accuracy: add the `pseudo_label_accuracy` metric
            (share of masked pseudo-labels equal to the known true label).
        **kwargs: base `keras.Model` arguments.

    Metrics (per epoch, besides `loss` and `accuracy` on the labeled views):
        `supervised_loss`, `unlabeled_loss` (unweighted), `mask_rate` (share
        of unlabeled images whose pseudo-label counts), and
        `pseudo_label_accuracy` when tracked.
    """

    #: Metrics of the unlabeled batches: left out of validation's logs.
    unlabeled_metric_names = METRIC_NAMES

    def __init__(self, model: keras.Model, weak: keras.layers.Layer | None,
                 strong: keras.layers.Layer, confidence_threshold: float = 0.95,
                 unlabeled_weight: float = 1.0,
                 track_pseudo_label_accuracy: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.weak = weak
        self.strong = strong
        self.confidence_threshold = float(confidence_threshold)
        self.unlabeled_weight = float(unlabeled_weight)
        self.track_pseudo_label_accuracy = bool(track_pseudo_label_accuracy)
        self.supervised_loss_tracker = keras.metrics.Mean(name="supervised_loss")
        self.unlabeled_loss_tracker = keras.metrics.Mean(name="unlabeled_loss")
        self.mask_rate_tracker = keras.metrics.Mean(name="mask_rate")
        self.pseudo_label_accuracy_tracker = (
            keras.metrics.Mean(name="pseudo_label_accuracy")
            if track_pseudo_label_accuracy else None)
        shape = (None, *model.input_shape[1:])
        for layer in (weak, strong):
            if layer is not None and not layer.built:
                layer.build(shape)
        self.built = True

    def call(self, inputs, training=False):
        if not isinstance(inputs, (tuple, list)):
            return self.model(inputs, training=training)
        labeled, unlabeled = inputs
        n_labeled = ops.shape(labeled)[0]
        n_unlabeled = ops.shape(unlabeled)[0]
        images = ops.concatenate([ops.cast(labeled, "float32"),
                                  ops.cast(unlabeled, "float32")], axis=0)
        weak = (self.weak(images, training=training) if self.weak is not None
                else images)
        strong = self.strong(unlabeled, training=training)
        # One batch through the network: BN sees all views together.
        batch = ops.concatenate([ops.cast(weak, strong.dtype), strong], axis=0)
        logits = self.model(batch, training=training)
        labeled_logits = logits[:n_labeled]
        weak_logits = logits[n_labeled:n_labeled + n_unlabeled]
        strong_logits = logits[n_labeled + n_unlabeled:]
        return labeled_logits, weak_logits, strong_logits

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        if not isinstance(y_pred, (tuple, list)):
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        labels, _ = y
        labeled_logits = y_pred[0]
        supervised = super().compute_loss(x, labels, labeled_logits, sample_weight,
                                          training)
        terms = self.unlabeled_terms(y_pred)
        # `regulariser`: a method's own extra term (FreeMatch's fairness).
        return (supervised + self.unlabeled_weight * terms["loss"]
                + terms.get("regulariser", 0.0))

    def unlabeled_terms(self, y_pred) -> dict:
        """`fixmatch_unlabeled_terms` of a training step's `call` output
        (FreeMatch's adds its thresholds and fairness term)."""
        _, weak_logits, strong_logits = y_pred[:3]
        return fixmatch_unlabeled_terms(weak_logits, strong_logits,
                                        self.confidence_threshold)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if not isinstance(y_pred, (tuple, list)):
            logs = super().compute_metrics(x, y, y_pred, sample_weight)
            # Validation has no unlabeled batch: leave its zeros out.
            return {k: v for k, v in logs.items()
                    if k not in self.unlabeled_metric_names}
        labels, unlabeled_labels = y
        labeled_logits = y_pred[0]
        super().compute_metrics(x, labels, labeled_logits, sample_weight)
        terms = self.unlabeled_terms(y_pred)
        self.supervised_loss_tracker.update_state(
            keras.losses.sparse_categorical_crossentropy(
                labels, ops.cast(labeled_logits, "float32"), from_logits=True))
        self.unlabeled_loss_tracker.update_state(terms["per_image"])
        self.mask_rate_tracker.update_state(terms["mask"])
        if self.pseudo_label_accuracy_tracker is not None:
            truth = ops.cast(unlabeled_labels, "int32")
            known = ops.cast(truth != UNKNOWN_LABEL, "float32")
            correct = ops.cast(terms["pseudo_labels"] == truth, "float32")
            self.pseudo_label_accuracy_tracker.update_state(
                correct, sample_weight=terms["mask"] * known)
        return self.get_metrics_result()

    def get_config(self):
        return {
            **super().get_config(),
            "model": keras.saving.serialize_keras_object(self.model),
            "weak": keras.saving.serialize_keras_object(self.weak),
            "strong": keras.saving.serialize_keras_object(self.strong),
            "confidence_threshold": self.confidence_threshold,
            "unlabeled_weight": self.unlabeled_weight,
            "track_pseudo_label_accuracy": self.track_pseudo_label_accuracy,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("model", "weak", "strong"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def weak_augmentation(config: Config, seed: int | None = None) -> RandomAffine | None:
    """FixMatch's weak view: a flip (if `augment.flip`) and a shift, no rotation/zoom.

    Returns None when augmentation is off (`--no-augment`) or does nothing.
    """
    s, a = config.methods["fixmatch"], config.augment
    if not a.enabled or (not a.flip and s.weak_translation == 0.0):
        return None
    return RandomAffine(flip=a.flip, max_rotation_deg=0.0, scale_range=(1.0, 1.0),
                        max_translation=s.weak_translation, fill_mode=a.fill_mode,
                        seed=seed, name="weak_augment")


def build_fixmatch_model(config: Config, model: keras.Model,
                         track_pseudo_label_accuracy: bool = False) -> FixMatch:
    """The run's `FixMatch` training model around `model`, seeded from the config."""
    s, seed = config.methods["fixmatch"], config.train.seed
    strong = StrongAugment(num_ops=s.strong_ops, magnitude=s.strong_magnitude,
                           cutout=s.cutout, seed=seed + 1, name="strong_augment")
    return FixMatch(model, weak_augmentation(config, seed), strong,
                    confidence_threshold=s.confidence_threshold,
                    unlabeled_weight=s.unlabeled_weight,
                    track_pseudo_label_accuracy=track_pseudo_label_accuracy,
                    name=f"{model.name}_fixmatch")


# --- FreeMatch: a self-adaptive threshold (Wang et al., ICLR 2023) ---------------

def freematch_fairness_loss(mask, strong_logits, p_model, label_hist):
    """FreeMatch's self-adaptive fairness term, as USB computes it.

    Over the strong views whose pseudo-label counts (`mask`), the mean
    probability divided by the histogram of their predicted classes, both
    normalised to sum to 1, against the model's class distribution `p_model`
    divided by the pseudo-labels' histogram `label_hist`:
    `sum_k norm(p_model / label_hist)_k * log norm(mean_p_s / hist_s)_k`.
    0 when no pseudo-label counts. Its gradient flows through the strong
    views only.
    """
    mask = ops.cast(mask, "float32")
    count = ops.sum(mask)
    probs = ops.softmax(ops.cast(strong_logits, "float32"), axis=-1)
    num_classes = ops.shape(probs)[-1]
    predicted = ops.one_hot(ops.argmax(probs, axis=-1), num_classes)
    safe = ops.maximum(count, 1.0)
    hist_s = ops.stop_gradient(ops.sum(predicted * mask[:, None], axis=0) / safe)
    mean_p_s = ops.sum(probs * mask[:, None], axis=0) / safe

    def scaled(p, hist):  # p / hist with 1/0 -> 0, normalised to sum to 1
        inverse = ops.where(hist > 0, 1.0 / ops.maximum(hist, 1e-30), 0.0)
        q = p * ops.stop_gradient(inverse)
        return q / ops.sum(q)

    target = ops.stop_gradient(scaled(ops.cast(p_model, "float32"),
                                      ops.cast(label_hist, "float32")))
    loss = ops.sum(target * ops.log(scaled(mean_p_s, hist_s) + 1e-12))
    return ops.where(count > 0, loss, 0.0)


@keras.saving.register_keras_serializable(package="stl10_keras")
class FreeMatch(FixMatch):
    """FixMatch whose threshold adapts to the model's confidence (FreeMatch).

    It keeps, as moving averages with momentum `ema_momentum` over the
    unlabeled batches' weak views (all starting at `1 / K`):
    `time_p`, the mean top probability; `p_model`, the mean probability of
    each class; `label_hist`, the share of each predicted class. A weak
    view's pseudo-label of class `c` counts where its top probability is at
    least `time_p * p_model[c] / max(p_model)`: a low threshold while the
    model is unsure, a high one once it is confident, lower for classes it
    predicts with less confidence. `fairness_weight` weights
    `freematch_fairness_loss`. The states are non-trainable weights: saved
    with the backup, so a resumed run continues them.

    Args:
        model, weak, strong, unlabeled_weight, track_pseudo_label_accuracy:
            as `FixMatch` (its fixed `confidence_threshold` is not used).
        ema_momentum: the states' momentum (USB's `ema_p`, 0.999).
        fairness_weight: weight of the fairness term (USB's `ent_loss_ratio`).
    """

    def __init__(self, model, weak, strong, ema_momentum: float = 0.999,
                 fairness_weight: float = 0.01, **kwargs):
        kwargs.pop("confidence_threshold", None)
        super().__init__(model, weak, strong, **kwargs)
        self.ema_momentum = float(ema_momentum)
        self.fairness_weight = float(fairness_weight)
        k = int(model.output_shape[-1])
        uniform = keras.initializers.Constant(1.0 / k)
        self.time_p = self.add_weight(shape=(), initializer=uniform,
                                      trainable=False, name="time_p")
        self.p_model = self.add_weight(shape=(k,), initializer=uniform,
                                       trainable=False, name="p_model")
        self.label_hist = self.add_weight(shape=(k,), initializer=uniform,
                                          trainable=False, name="label_hist")
        self.threshold_tracker = keras.metrics.Mean(name="threshold")

    def call(self, inputs, training=False):
        out = super().call(inputs, training=training)
        if not isinstance(out, tuple):
            return out
        labeled_logits, weak_logits, strong_logits = out
        probs = ops.softmax(ops.stop_gradient(ops.cast(weak_logits, "float32")),
                            axis=-1)
        if training:
            m = self.ema_momentum
            k = ops.shape(probs)[-1]
            hist = ops.mean(ops.one_hot(ops.argmax(probs, axis=-1), k), axis=0)
            self.time_p.assign(m * self.time_p + (1 - m) * ops.mean(
                ops.max(probs, axis=-1)))
            self.p_model.assign(m * self.p_model + (1 - m) * ops.mean(probs, axis=0))
            self.label_hist.assign(m * self.label_hist + (1 - m) * hist)
        # The states after this batch's update, as USB masks with them; passed
        # on in the output so the loss reads these values on every backend.
        time_p, p_model, label_hist = (ops.convert_to_tensor(v) for v in (
            self.time_p, self.p_model, self.label_hist))
        # (3, K): thresholds, p_model, label_hist. Not ops.stack, which fails
        # inside a tf.function here ("'str' object has no attribute
        # 'base_dtype'", keras 3.15 / TF 2.21).
        state = ops.concatenate([ops.expand_dims(v, 0) for v in (
            time_p * p_model / ops.max(p_model), p_model, label_hist)], axis=0)
        return labeled_logits, weak_logits, strong_logits, state

    def unlabeled_terms(self, y_pred) -> dict:
        _, weak_logits, strong_logits, state = y_pred
        terms = fixmatch_unlabeled_terms(weak_logits, strong_logits, state[0])
        fairness = freematch_fairness_loss(terms["mask"], strong_logits,
                                           state[1], state[2])
        terms["regulariser"] = self.fairness_weight * fairness
        terms["thresholds"] = state[0]
        return terms

    unlabeled_metric_names = METRIC_NAMES + ("threshold",)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if isinstance(y_pred, (tuple, list)):
            self.threshold_tracker.update_state(ops.mean(y_pred[3][0]))
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def get_config(self):
        config = super().get_config()
        config.pop("confidence_threshold", None)
        return {**config, "ema_momentum": self.ema_momentum,
                "fairness_weight": self.fairness_weight}


def build_freematch_model(config: Config, model: keras.Model,
                          track_pseudo_label_accuracy: bool = False) -> FreeMatch:
    """The run's `FreeMatch` training model: FixMatch's views and weight, the
    `freematch` section's momentum and fairness weight."""
    s, f, seed = config.methods["fixmatch"], config.methods["freematch"], \
        config.train.seed
    strong = StrongAugment(num_ops=s.strong_ops, magnitude=s.strong_magnitude,
                           cutout=s.cutout, seed=seed + 1, name="strong_augment")
    return FreeMatch(model, weak_augmentation(config, seed), strong,
                     ema_momentum=f.ema_momentum,
                     fairness_weight=f.fairness_weight,
                     unlabeled_weight=s.unlabeled_weight,
                     track_pseudo_label_accuracy=track_pseudo_label_accuracy,
                     name=f"{model.name}_freematch")
