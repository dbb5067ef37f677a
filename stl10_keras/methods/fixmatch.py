"""`fixmatch`: FixMatch (Sohn et al., NeurIPS 2020) as a training-method plug-in.

Each step takes `B` labeled images and `mu * B` unlabeled ones; the model's
prediction on a weak view of an unlabeled image, where its top probability is
at least `tau`, is the hard pseudo-label of its strong view. The keras side
(the `FixMatch` model on keras' own `train_step`, its loss and metrics, the
weak view) is `stl10_keras.semisupervised`; this module is its config section
(`FixMatchConfig`: `--unlabeled-ratio`, `--confidence-threshold`, ...), its
checks and its batches, and imports keras only when a run trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from stl10_keras.errors import ConfigError
from stl10_keras.flags import option
from stl10_keras.methods.base import Method, register

if TYPE_CHECKING:
    from stl10_keras.config import Config

@dataclass
class FixMatchConfig:
    """FixMatch's settings (Sohn et al., 2020); FreeMatch shares them."""

    flag_group: ClassVar[str] = "FixMatch (--semi-supervised fixmatch, freematch)"

    unlabeled_ratio: int = option(
        7, "mu: unlabeled images per labeled image in a step", "--unlabeled-ratio")
    confidence_threshold: float = option(
        0.95, "tau: a weak view's prediction becomes a pseudo-label at this top "
        "probability", "--confidence-threshold")
    unlabeled_weight: float = option(
        1.0, "lambda: weight of the unlabeled loss", "--unlabeled-weight")
    weak_translation: float = option(
        0.125, "the weak view's largest shift, a fraction of the size (with a flip "
        "when augment.flip)")
    strong_ops: int = option(2, "RandAugment-style ops per strong view",
                             "--strong-ops")
    strong_magnitude: float = option(
        1.0, "largest op strength, a fraction of each op's range (each image draws "
        "its strength uniformly in [0, this])", "--strong-magnitude")
    cutout: float = option(
        0.5, "Cutout square's side, a fraction of the image size", "--cutout")


@register
class FixMatchMethod(Method):
    """FixMatch: pseudo-labels from weak views train the strong views."""

    name = "fixmatch"
    summary = "pseudo-labels of weak views train strong views (Sohn et al., 2020)"
    section = FixMatchConfig

    @classmethod
    def options_of(cls, config: "Config") -> FixMatchConfig:
        return config.methods[FixMatchMethod.name]  # FreeMatch's too

    @classmethod
    def apply_preset(cls, config: "Config", preset: str) -> None:
        if preset == "smoke":
            cls.options_of(config).unlabeled_ratio = 2

    @classmethod
    def validate(cls, config: "Config") -> None:
        s = cls.options_of(config)
        if s.unlabeled_ratio < 1:
            raise ConfigError("--unlabeled-ratio must be at least 1, e.g. FixMatch's 7.")
        if not 0.0 < s.confidence_threshold <= 1.0:
            raise ConfigError("--confidence-threshold must be in (0, 1], e.g. 0.95.")
        if not (0 <= s.unlabeled_weight < math.inf):
            raise ConfigError("--unlabeled-weight must be 0 or more, e.g. 1.")
        if not 0.0 <= s.weak_translation < 1.0 or not 0.0 <= s.cutout < 1.0:
            raise ConfigError("fixmatch.weak_translation and --cutout must be in "
                              "[0, 1) (fractions of the image size).")
        if s.strong_ops < 0 or not 0.0 <= s.strong_magnitude <= 1.0:
            raise ConfigError("--strong-ops must be 0 or more and --strong-magnitude "
                              "in [0, 1].")
        if config.augment.on == "cpu":
            raise ConfigError(f"{cls.name} augments on the device; drop "
                              "--augment-on cpu.")

    def training_model(self, model, splits):
        """The FixMatch training model, after drawing its weak and strong views."""
        import numpy as np

        from stl10_keras.semisupervised import weak_augmentation
        from stl10_keras.visualize import augmentation_figure, save_augmentation_grid

        config, run_dir = self.config, self.run_dir
        figure_layer = weak_augmentation(config, seed=config.train.seed)
        if figure_layer is not None and run_dir is not None:
            augmentation_figure(figure_layer, splits.x_train, run_dir,
                                splits.y_train, splits.class_names)
        known = getattr(splits, "unlabeled_labels", None) is not None
        training_model = self.build(model, track_pseudo_label_accuracy=known)
        if run_dir is not None:
            # The strong views beside their originals; a copy of the layer
            # draws them, so the run's own draws are not moved on.
            strong = training_model.strong.__class__.from_config(
                training_model.strong.get_config())
            originals = splits.x_train[:36]
            views = np.clip(np.asarray(strong(originals, training=True)), 0, 255)
            save_augmentation_grid(
                originals, views.astype("uint8"),
                str(Path(run_dir) / "figures" / "strong_augmentation.png"))
        return training_model

    def build(self, model, track_pseudo_label_accuracy: bool = False):
        from stl10_keras.semisupervised import build_fixmatch_model

        return build_fixmatch_model(self.config, model, track_pseudo_label_accuracy)

    def batches(self, splits, epochs, dist):
        from stl10_keras.unlabeled import fixmatch_batches

        t = self.config.train
        # Epoch e's unlabeled batches follow from e: resumed runs match.
        return dist.shard_batches(fixmatch_batches(
            splits, t.batch_size, self.options.unlabeled_ratio, t.seed, epochs))
