"""`freematch`: FixMatch with FreeMatch's self-adaptive threshold (Wang et al., 2023).

FixMatch's fixed `tau = 0.95` keeps almost every pseudo-label out while the
model is unsure, so its first epochs learn from the labeled images alone.
FreeMatch's threshold follows the model's own confidence (a moving average
of its top probability, scaled per class by the moving average of each
class's probability), and a fairness term keeps the pseudo-labels' classes
balanced. It shares FixMatch's section (views, `--unlabeled-ratio`,
`--unlabeled-weight`); its own is the states' momentum and the fairness
weight. The keras side is `stl10_keras.semisupervised.FreeMatch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from stl10_keras.errors import ConfigError
from stl10_keras.flags import option
from stl10_keras.methods.base import register
from stl10_keras.methods.fixmatch import FixMatchMethod

if TYPE_CHECKING:
    from stl10_keras.config import Config


@dataclass
class FreeMatchConfig:
    """FreeMatch's own settings (USB's defaults)."""

    flag_group: ClassVar[str] = "FreeMatch (--semi-supervised freematch)"

    ema_momentum: float = option(
        0.999, "momentum of the moving averages behind the threshold (USB's ema_p)",
        "--freematch-momentum")
    fairness_weight: float = option(
        0.01, "weight of the fairness term that balances the pseudo-labels' "
        "classes (USB's ent_loss_ratio; 0: none)", "--fairness-weight")


@register
class FreeMatchMethod(FixMatchMethod):
    """FixMatch with a threshold that adapts to the model's confidence."""

    name = "freematch"
    summary = ("FixMatch with a self-adaptive, per-class threshold and a fairness "
               "term (Wang et al., 2023)")
    section = FreeMatchConfig

    @classmethod
    def apply_preset(cls, config: "Config", preset: str) -> None:
        """FixMatch's section is set by FixMatch itself."""

    @classmethod
    def validate(cls, config: "Config") -> None:
        super().validate(config)
        f = config.methods[cls.name]
        if not 0.0 <= f.ema_momentum < 1.0:
            raise ConfigError("--freematch-momentum must be in [0, 1), e.g. 0.999.")
        if not 0.0 <= f.fairness_weight < float("inf"):
            raise ConfigError("--fairness-weight must be 0 or more, e.g. 0.01.")

    def build(self, model, track_pseudo_label_accuracy: bool = False):
        from stl10_keras.semisupervised import build_freematch_model

        return build_freematch_model(self.config, model, track_pseudo_label_accuracy)
