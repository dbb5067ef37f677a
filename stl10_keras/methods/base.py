"""The plug-in interface of a training method, and the registry of methods.

A method decides how the inference network is trained: on the labeled images
alone (`none`), or also on the unlabeled ones (FixMatch, FreeMatch,
self-training, ...). Each is one module of `stl10_keras.methods` defining a
`Method` subclass decorated with `@register`; the registry finds every module
of the package on first use, so adding a method is adding its module (and its
tests). `train`, `ablation`, `config` and the command line iterate the
registry and name no method, as USB's `semilearn/algorithms` does with its
`AlgorithmBase` subclasses.

A method brings:
- `section`: its config dataclass (fields made with `flags.option`, so its
  flags are generated like every other section's), stored in
  `Config.methods[name]`;
- `training_model`: a `keras.Model` around the inference network that trains
  on keras' own `train_step` (overriding `call`, `compute_loss` and
  `compute_metrics` only), so it runs on every backend;
- `batches`: what that model's `fit` reads.

The training model logs the method's own metrics (mask rate, pseudo-label
accuracy, ...) through keras' `compute_metrics`, so they reach the progress
bar, history.csv and TensorBoard like `loss`. A method whose keras side needs
a model class of its own keeps it in the backend-agnostic core
(`stl10_keras.semisupervised`): this package imports keras only when a run
trains, so that flags are checked before TensorFlow starts.

This module is light: it imports neither keras nor the method modules at the
top, so building the flags costs no TensorFlow start-up.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from stl10_keras.errors import ConfigError

if TYPE_CHECKING:
    from stl10_keras.config import Config
    from stl10_keras.distribute import Distributed


class Method:
    """One way of training the inference model (subclass it and `@register`).

    The class describes the method (its attributes, `validate`,
    `check_data`); an instance is one run's use of it, made before any model
    is built: `prepare` -> `training_model` -> `batches`.

    Class attributes:
        name: the method's name (`--semi-supervised NAME`; also an ablation
            variant unless it is `none`).
        summary: one line for `--help` and the docs.
        section: its config dataclass, or None when it has no settings.
        base_variant: the lab's variant (augmentation, k-means stages) a
            variant of this name builds on.
        uses_unlabeled: it trains on the unlabeled split (refused without one).
        averages_weights: evaluation and export use the moving average of the
            weights (`semi_supervised.ema_decay`).

    Args:
        config: the run's config.
        run_dir: the run directory (figures, records), or None.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    section: ClassVar[type | None] = None
    base_variant: ClassVar[str] = "kmeans12"
    uses_unlabeled: ClassVar[bool] = True
    averages_weights: ClassVar[bool] = True

    def __init__(self, config: "Config", run_dir: Path | None = None):
        self.config = config
        self.run_dir = run_dir

    @classmethod
    def options_of(cls, config: "Config") -> Any:
        """This method's section of `config` (None when it has none)."""
        return config.methods.get(cls.name)

    @property
    def options(self) -> Any:
        return self.options_of(self.config)

    @classmethod
    def apply_preset(cls, config: "Config", preset: str) -> None:
        """Adjust the section for a preset (`smoke`: tiny, for tests)."""

    @classmethod
    def validate(cls, config: "Config") -> None:
        """Raise `ConfigError` naming the fix for an invalid value of the section."""

    @classmethod
    def check_data(cls, config: "Config", splits) -> None:
        """Refuse data the method cannot train on, before a run is written."""
        if cls.uses_unlabeled and not splits.num_unlabeled:
            raise ConfigError(
                f"{splits.source} has no unlabeled images, which --semi-supervised "
                f"{cls.name} trains on; add them (STL-10: unlabeled_X.bin) or "
                "choose --variant kmeans12.")

    def prepare(self, splits, verbose: int = 1):
        """Work before the model is built, outside any distribution scope (e.g.
        a teacher's pseudo-labels, a tf.data map); returns the splits to train
        on (by default `splits`)."""
        return splits

    def initial_weights(self) -> str | None:
        """A finished run (or its `model.keras`) whose weights the model starts
        from instead of a random or k-means initialisation: `--init-from`."""
        return self.config.semi_supervised.init_from

    def epochs(self, splits) -> int:
        """Epochs `fit` trains on `splits` (the prepared ones)."""
        return self.config.train.epochs

    def training_model(self, model, splits):
        """The `keras.Model` that `fit` trains, sharing `model`'s weights."""
        raise NotImplementedError

    def record(self) -> dict[str, Any] | None:
        """What the method adds to `metrics.json` (e.g. the pseudo-labels kept)."""
        return None

    def batches(self, splits, epochs: tuple[int, int], dist: "Distributed"):
        """The training stream of epochs `epochs[0] .. epochs[1] - 1`, each a
        function of `(seed, epoch)` so that a resumed run sees the batches of
        an uninterrupted one; sharded by `dist`."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Method]] = {}
_DISCOVERED = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as `--semi-supervised cls.name`."""
    if _REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"two training methods are named '{cls.name}'")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a method (tests register toy ones)."""
    _REGISTRY.pop(name, None)


def _discover() -> None:
    """Import every module of this package once; each registers its method."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def names() -> tuple[str, ...]:
    """Every registered method's name, `none` first."""
    _discover()
    return tuple(sorted(_REGISTRY, key=lambda n: (n != "none", n)))


def get(name: str) -> type[Method]:
    """The method called `name`; a `ConfigError` listing the others if none is."""
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"--semi-supervised must be one of {', '.join(names())}; "
                          f"'{name}' is not a training method.")
    return _REGISTRY[name]


def sections() -> dict[str, type]:
    """`{method name: its config dataclass}` of the methods that have settings."""
    _discover()
    return {n: _REGISTRY[n].section for n in names() if _REGISTRY[n].section}
