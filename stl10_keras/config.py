"""Configuration: one dataclass per part, named presets, JSON round trip.

A run is fully described by a `Config`. The command line picks a preset
(`paper`, `default`, `smoke`), overrides single fields with flags, and the
resolved config is written to `RUN/config.json`; `--config RUN/config.json`
reproduces the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from stl10_keras import flags, sources
from stl10_keras.errors import ConfigError
from stl10_keras.flags import option
from stl10_keras.methods import base as method_registry

VARIANTS = ("baseline", "augment", "kmeans1", "kmeans12")  # the lab's Table 1
PRESETS = ("default", "paper", "smoke")
FILL_MODES = ("reflect", "wrap", "nearest", "constant")  # RandomAffine's fill modes
# The lab's Torch decay, or a cosine to zero over the run (lets a fixed number of
# epochs converge; FixMatch's own schedule is a cosine too).
LR_SCHEDULES = ("inverse-time", "cosine")


@dataclass
class DataConfig:
    """Where the images come from and how the labeled set is split."""

    flag_group: ClassVar[str] = "data"

    dataset: str = option(
        "stl10", lambda: sources.help_text(default="stl10") + " (docs/data.md)",
        "--dataset", choices=sources.names)
    data_dir: str | None = option(
        None, "stl10: folder with stl10_binary/ or stl10_binary.tar.gz, or a "
        "tensorflow-datasets data dir; fashion_mnist: folder of its four IDX files "
        "(default: Debian's /usr/share/datasets/fashion-mnist, then "
        "tensorflow-datasets); folder: DIR with train/CLASS/*", "--data-dir")
    val_per_class: int | None = option(
        None, "labeled images per class held out for validation (default: 100 for "
        "stl10, 20 for digits, a fifth of the labeled images for fashion_mnist and "
        "folder)", "--val-per-class")
    labeled_per_class: int | None = option(
        None, "fashion_mnist: labeled training images per class, drawn by the seed "
        "(default 500, as STL-10); the rest are unlabeled", "--labeled-per-class")
    image_size: tuple[int, ...] | None = option(
        None, "resize every image to H,W (or N for NxN); a folder of images of "
        "different sizes needs it (default: as stored)", "--image-size",
        type=flags.image_size, metavar="H,W")
    channels: int | None = option(
        None, "convert every image to 1 (grayscale) or 3 (RGB) channels (default: "
        "as stored)", "--channels", choices=(1, 3))
    download: bool = option(
        True, "let tensorflow-datasets download STL-10 or Fashion-MNIST when it is "
        "missing", "--no-download")
    shuffle_buffer: int = option(
        5000, "tf.data shuffle buffer (images) of a pipeline reshuffled per "
        "iteration; training instead permutes each whole epoch from (seed, epoch), "
        "so that a resumed run repeats it (data.make_dataset)")


@dataclass
class AugmentConfig:
    """The lab's four transforms, fused into one affine warp (`RandomAffine`)."""

    flag_group: ClassVar[str] = "augmentation"

    enabled: bool = option(
        True, "augment the training images (default for every variant but "
        "baseline)", "--augment", negatable=True)
    on: str = option(
        "device", "in the model on the accelerator (default) or in tf.data",
        "--augment-on", choices=("device", "cpu"))
    flip: bool = option(True, "random horizontal flip with p=0.5", "--no-flip")
    max_rotation_deg: float = option(
        15.0, "rotation drawn uniformly in +-this many degrees", "--max-rotation")
    scale_min: float = option(
        1.0, "MIN,MAX zoom-in factor drawn uniformly in this range",
        "--scale-range", type=flags.float_pair, metavar="MIN,MAX", also="scale_max")
    scale_max: float = option(1.4, "the zoom range's upper end (--scale-range)")
    max_translation: float = option(
        0.2, "shift drawn uniformly in +-this fraction of the image size",
        "--max-translation")
    fill_mode: str = option(
        "reflect", "how pixels outside the image are filled (reflect, wrap, "
        "nearest or constant)")


@dataclass
class KMeansConfig:
    """Unsupervised pre-training of the first conv stages with k-means."""

    flag_group: ClassVar[str] = "k-means pre-training"

    stages: tuple[int, ...] = option(
        (), "1-based stages whose kernels are initialised from k-means centroids "
        "((): none, (1,): kmeans1, (1, 2): kmeans12; set by --variant)")
    patch_size: int = option(
        3, "side of the square patches clustered for stage 1 (the conv kernel "
        "size)", "--kmeans-patch-size")
    patches_per_image: int = option(
        20, "random patches drawn from each unlabeled image",
        "--kmeans-patches-per-image")
    num_images: int = option(
        10000, "unlabeled images read for k-means (a stream; never all in memory)",
        "--kmeans-images")
    normalize: bool = option(True, "per-patch brightness/contrast normalisation")
    whiten: bool = option(
        True, "ZCA-whiten the patches (folded into the kernel and bias)",
        "--no-whiten")
    zca_epsilon: float = option(
        0.01, "regulariser added to the eigenvalues in ZCA whitening")
    batch_size: int = option(4096, "MiniBatchKMeans batch size")
    max_iter: int = option(100, "MiniBatchKMeans passes over the patches")


@dataclass
class ModelConfig:
    """The lab's network: N stages of [conv -> BN -> ReLU -> max-pool] + 2 FC."""

    flag_group: ClassVar[str] = "model"

    widths: tuple[int, ...] = option(
        (64, 128, 256, 512, 512), "filters per stage (5 stages by default)",
        "--widths")
    convs_per_stage: tuple[int, ...] = option(
        (1, 1, 1, 1, 1), "conv+BN+ReLU blocks per stage before its pool (the lab's "
        "7-conv model: --widths 64,128,256,512,512 --convs-per-stage 1,1,2,2,1)",
        "--convs-per-stage")
    kernel_size: int = option(
        3, "conv kernel side (k-means patches of stage 1 match it)", "--kernel-size")
    fc_units: int = option(512, "width of the hidden fully connected layer",
                           "--fc-units")
    dropout: float = option(0.5, "dropout rate before each fully connected layer",
                            "--dropout")
    batch_norm: str = option(
        "manual", "manual (ManualBatchNorm, the lab's derivation) or keras "
        "(keras.layers.BatchNormalization)", "--batch-norm",
        choices=("manual", "keras"))
    bn_momentum: float = option(0.9, "moving-average momentum of the BN statistics")
    bn_epsilon: float = option(1e-5, "epsilon inside the BN square root")
    sync_batch_norm: bool = option(
        False, "--distribution mirrored: batch statistics over every replica's "
        "images", "--sync-batch-norm")
    num_classes: int = option(
        10, "output classes (a folder's: its class folders, set by the command line)")


@dataclass
class TrainConfig:
    """Optimisation: SGD as the lab's Torch `optim.sgd` does it."""

    flag_group: ClassVar[str] = "training"

    epochs: int = option(30, "passes over the labeled training split", "--epochs")
    batch_size: int = option(32, "images per step", "--batch-size")
    learning_rate: float = option(0.01, "initial SGD learning rate",
                                  "--learning-rate")
    lr_decay: float = option(
        1e-7, "inverse-time decay per step: lr / (1 + decay * step)", "--lr-decay")
    lr_schedule: str = option(
        "inverse-time", "inverse-time (the lab's, with --lr-decay) or cosine: "
        "lr (1 + cos(pi t / T)) / 2 over the run's T steps, to 0 at the last",
        "--lr-schedule", choices=LR_SCHEDULES)
    weight_decay: float = option(5e-4, "L2 weight decay", "--weight-decay")
    momentum: float = option(0.5, "SGD momentum", "--momentum")
    seed: int = option(
        0, "seeds the split, the weights, augmentation and k-means", "--seed")
    mixed_precision: bool = option(
        False, "train in mixed bfloat16 (statistics stay float32)",
        "--mixed-precision")


@dataclass
class SemiSupervisedConfig:
    """How the network is trained: the method (`stl10_keras.methods`), its start."""

    flag_group: ClassVar[str] = "training method (docs/semi-supervised.md)"

    method: str = option(
        "none", "none (labeled images only) or a method that also learns from the "
        "unlabeled images", "--semi-supervised", choices=method_registry.names)
    ema_decay: float = option(
        0.999, "decay of the weights' moving average that the unlabeled-image "
        "methods evaluate and export (keras' use_ema, warmed up over the first "
        "steps)", "--ema-decay")
    init_from: str | None = option(
        None, "start from the weights of a finished run (a run directory), instead "
        "of a random or k-means initialisation", "--init-from")


@dataclass
class Config:
    """A whole run. `variant` decides augmentation and k-means stages."""

    preset: str = "default"
    variant: str = "kmeans12"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    semi_supervised: SemiSupervisedConfig = field(default_factory=SemiSupervisedConfig)
    # Each training method's own section, {method name: its dataclass}.
    methods: dict[str, Any] = field(default_factory=lambda: {
        name: cls() for name, cls in method_registry.sections().items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError("A config must be a JSON object like the config.json "
                              "a run writes.")
        d = _moved_to_method_sections(d)
        parts = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key not in parts:
                raise ConfigError(f"Unknown config key '{key}'; remove it from the file.")
            sub = _SECTIONS.get(key)
            if (sub or key == "methods") and not isinstance(value, dict):
                raise ConfigError(f"'{key}' must be an object of "
                                  f"{sub.__name__ if sub else 'method sections'}; "
                                  "fix it in the file.")
            if key == "methods":
                kwargs[key] = _method_sections_from_dict(value)
            else:
                kwargs[key] = (_section_from_dict(sub, value) if sub
                               else _checked_value(key, parts[key], value))
        config = cls(**kwargs)
        validate(config)
        return config

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_file(cls, path) -> "Config":
        """Read a `config.json`; any problem is a `ConfigError` naming the file."""
        try:
            text = open(path).read()
        except OSError as e:
            raise ConfigError(f"Cannot read {path} ({e.strerror}).") from None
        try:
            return cls.from_json(text)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{path} is not a valid config.json ({e}).") from None


def sections() -> dict[str, type]:
    """The config's own sections, `{name in Config: dataclass}`."""
    return dict(_SECTIONS)


def section_classes() -> list[type]:
    """Every section's dataclass, the methods' after the config's own (flag order)."""
    return [*_SECTIONS.values(), *method_registry.sections().values()]


def section_parts(config: Config) -> list[Any]:
    """`config`'s section instances in `section_classes` order."""
    return [*(getattr(config, name) for name in _SECTIONS),
            *(config.methods[name] for name in method_registry.sections())]


_SECTIONS = {
    "data": DataConfig,
    "augment": AugmentConfig,
    "kmeans": KMeansConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "semi_supervised": SemiSupervisedConfig,
}


def with_later_sections(d: Any, current: Config) -> Any:
    """A config.json dict with what was added since it was written, to be
    compared with `current`. A run from before `semi_supervised` trained
    without it, which is what `current` does when its method is `none`; a
    field or a method section added later (e.g. `train.lr_schedule`) has a
    default that does what runs did before it existed."""
    if not isinstance(d, dict):
        return d
    d = _moved_to_method_sections(d)
    if "semi_supervised" not in d:
        section = (current.semi_supervised
                   if current.semi_supervised.method == "none"
                   else SemiSupervisedConfig())
        d = {**d, "semi_supervised": dataclasses.asdict(section)}
    filled = dict(d)
    stored = d.get("methods") if isinstance(d.get("methods"), dict) else {}
    filled["methods"] = dict(stored)
    for name, cls in [*_SECTIONS.items(), *method_registry.sections().items()]:
        where = filled if name in _SECTIONS else filled["methods"]
        given = d.get(name) if name in _SECTIONS else stored.get(name, {})
        if isinstance(given, dict):
            defaults = json.loads(json.dumps(dataclasses.asdict(cls())))
            where[name] = {**defaults, **given}
    return filled


def _method_sections_from_dict(d: dict[str, Any]) -> dict[str, Any]:
    """`Config.methods` from JSON: every registered method's section, a missing
    one at its defaults (a run from before the method existed)."""
    known = method_registry.sections()
    unknown = set(d) - set(known)
    if unknown:
        raise ConfigError(f"Unknown training method section(s) {sorted(unknown)} "
                          f"under 'methods' (known: {', '.join(known)}); remove them "
                          "from the file.")
    for name, value in d.items():
        if not isinstance(value, dict):
            raise ConfigError(f"methods.{name} must be an object of "
                              f"{known[name].__name__} fields; fix it in the file.")
    return {name: _section_from_dict(cls, d.get(name, {}), f"methods.{name}")
            for name, cls in known.items()}


def _moved_to_method_sections(d: dict[str, Any]) -> dict[str, Any]:
    """`d` with the settings a method owns moved under `methods`: FixMatch's
    were fields of `semi_supervised` before methods became plug-ins, and a
    config.json of that time must still load (and compare equal)."""
    s = d.get("semi_supervised")
    if not isinstance(s, dict):
        return d
    own = {f.name for f in dataclasses.fields(SemiSupervisedConfig)}
    # A field name two methods share belongs to the first registered.
    owners = {f.name: name
              for name, cls in reversed(method_registry.sections().items())
              for f in dataclasses.fields(cls)}
    moved = {k: v for k, v in s.items() if k not in own and k in owners}
    if not moved:
        return d
    sections = dict(d.get("methods") or {})
    for key, value in moved.items():
        sections[owners[key]] = {**sections.get(owners[key], {}), key: value}
    kept = {k: v for k, v in s.items() if k not in moved}
    return {**d, "semi_supervised": kept, "methods": sections}


def _section_from_dict(cls: type, d: dict[str, Any], where: str | None = None) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(
            f"Unknown {cls.__name__} key(s) {sorted(unknown)}; remove them from the file."
        )
    section = where or {v: k for k, v in _SECTIONS.items()}[cls]
    types = typing.get_type_hints(cls)
    fixed = {k: _checked_value(f"{section}.{k}", types[k], v) for k, v in d.items()}
    return cls(**fixed)


def field_kind(annotation: Any) -> tuple[Any, bool]:
    """`(type, optional)` of a field's annotation: `int | None` -> `(int, True)`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
            and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return annotation, False


def _checked_value(name: str, annotation: Any, value: Any) -> Any:
    """`value` as the field's type; JSON lists become tuples (round trips compare equal).

    Without this a string or float in a config file reaches `validate` or keras
    and fails there with a message that names neither the field nor the fix.
    """
    kind, optional = field_kind(annotation)
    if value is None and optional:
        return None

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)) \
            and all(is_int(v) for v in value):
        return tuple(value)
    if kind is int and is_int(value):
        return value
    if kind is float and (is_int(value) or isinstance(value, float)):
        return float(value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    expected = {int: "an integer", float: "a number", bool: "true or false",
                str: "a string"}.get(kind, "a list of integers")
    raise ConfigError(f"{name} must be {expected}{' or null' if optional else ''}, "
                      f"not {json.dumps(value)}; fix it in the file.")


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    """Raise `ConfigError` unless `value` is one of `choices` (`what`: its name)."""
    if value not in choices:
        raise ConfigError(f"Unknown {what} '{value}'; choose one of "
                          f"{', '.join(choices)}.")


def all_variants() -> tuple[str, ...]:
    """The lab's four, then each method that learns from unlabeled images
    (`fixmatch`, ...: the method on top of its `base_variant`)."""
    return VARIANTS + tuple(n for n in method_registry.names() if n != "none")


def __getattr__(name: str) -> Any:
    # ALL_VARIANTS depends on the registered methods, which are found on first
    # use, not while this module is being imported.
    if name == "ALL_VARIANTS":
        return all_variants()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def apply_variant(config: Config) -> None:
    """Set augmentation, k-means stages and the training method from `config.variant`.

    The lab's four (Table 1) train on labeled images only; a method's name is
    that method on top of the lab's variant it names as its base.
    """
    check_choice(config.variant, all_variants(), "variant")
    base = config.variant
    if base not in VARIANTS:
        base = method_registry.get(config.variant).base_variant
    config.augment.enabled = base != "baseline"
    config.kmeans.stages = {"baseline": (), "augment": (), "kmeans1": (1,),
                            "kmeans12": (1, 2)}[base]
    config.semi_supervised.method = (config.variant if config.variant not in VARIANTS
                                     else "none")


def preset(name: str, dataset: str = "stl10", variant: str = "kmeans12") -> Config:
    """Return the named preset for a dataset.

    Args:
        name: `paper` (the lab's values exactly: SGD lr 1.0), `default` (the
            lab's values with a learning rate that trains in Keras, see
            docs/training.md), or `smoke` (tiny widths, 1 epoch, small k-means; tests).
        dataset: a registered source's name (`sources.names()`).
        variant: one of `all_variants()`.

    Returns:
        A validated `Config`.
    """
    check_choice(name, PRESETS, "preset")
    check_choice(dataset, sources.names(), "dataset")
    config = Config(preset=name, variant=variant)
    config.data.dataset = dataset
    sources.get(dataset).apply_preset(config)
    if name == "paper":
        config.train.learning_rate = 1.0
    elif name == "smoke":
        config.model.widths = (8, 16, 16, 32, 32)
        config.model.fc_units = 32
        config.train.epochs = 1
        config.kmeans.num_images = 64
        config.kmeans.patches_per_image = 10
        config.kmeans.max_iter = 10
        config.kmeans.batch_size = 256
        config.data.shuffle_buffer = 512
    for method in map(method_registry.get, method_registry.names()):
        method.apply_preset(config, name)
    apply_variant(config)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Raise `ConfigError` naming the fix for any invalid value."""
    m, t, a, k, d = config.model, config.train, config.augment, config.kmeans, config.data
    check_choice(config.preset, PRESETS, "preset")
    check_choice(d.dataset, sources.names(), "dataset")
    check_choice(config.variant, all_variants(), "variant")
    check_choice(config.train.lr_schedule, LR_SCHEDULES, "lr-schedule")
    _validate_semi_supervised(config)
    if not m.widths or any(w < 1 for w in m.widths):
        raise ConfigError("--widths needs one positive filter count per stage, e.g. 64,128.")
    if len(m.convs_per_stage) != len(m.widths) or any(c < 1 for c in m.convs_per_stage):
        raise ConfigError(
            "convs_per_stage needs one positive count per stage "
            f"({len(m.widths)} stages); fix --convs-per-stage."
        )
    if m.kernel_size < 1:
        raise ConfigError("--kernel-size must be at least 1, e.g. 3.")
    if m.fc_units < 1:
        raise ConfigError("--fc-units must be at least 1, e.g. 512.")
    if m.batch_norm not in ("manual", "keras"):
        raise ConfigError("--batch-norm must be 'manual' or 'keras'.")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError("--dropout must be in [0, 1).")
    if t.epochs < 1:
        raise ConfigError("--epochs must be at least 1.")
    if t.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1.")
    # Each `not (...)` is also true for NaN, which fails every comparison.
    if not (0 < t.learning_rate < math.inf):
        raise ConfigError("--learning-rate must be a positive finite number, e.g. "
                          "0.01.")
    if not (0 <= t.lr_decay < math.inf):
        raise ConfigError("--lr-decay must be a finite number, 0 or more (0: a "
                          "constant learning rate).")
    if not (0 <= t.weight_decay < math.inf):
        raise ConfigError("--weight-decay must be a finite number, 0 or more (0: "
                          "no weight decay).")
    if not 0.0 <= t.momentum <= 1.0:
        raise ConfigError("--momentum must be in [0, 1], e.g. the lab's 0.5.")
    if not 0 <= t.seed < 2**32:
        raise ConfigError("--seed must be an integer in 0..4294967295.")
    if d.val_per_class is not None and d.val_per_class < 1:
        raise ConfigError("--val-per-class must be at least 1 (validation images "
                          "per class).")
    if d.labeled_per_class is not None and d.labeled_per_class < 2:
        raise ConfigError("--labeled-per-class must be at least 2 (labeled images per "
                          "class, a fifth of them held out for validation).")
    sources.get(d.dataset).validate(config)
    if d.image_size is not None and (len(d.image_size) != 2
                                     or min(d.image_size) < 1):
        raise ConfigError("--image-size needs two positive numbers H,W, e.g. 96,96.")
    if d.channels is not None and d.channels not in (1, 3):
        raise ConfigError("--channels must be 1 (grayscale) or 3 (RGB).")
    if d.shuffle_buffer < 1:
        raise ConfigError("data.shuffle_buffer must be at least 1; fix the config file.")
    if a.on not in ("device", "cpu"):
        raise ConfigError("--augment-on must be 'device' or 'cpu'.")
    if not all(math.isfinite(v) for v in (a.scale_min, a.scale_max)):
        raise ConfigError("--scale-range must be finite numbers, e.g. 1.0,1.4.")
    if not 1.0 <= a.scale_min <= a.scale_max:
        raise ConfigError("Scale range must satisfy 1 <= min <= max; fix --scale-range.")
    if a.fill_mode not in FILL_MODES:
        raise ConfigError(f"augment.fill_mode must be one of {', '.join(FILL_MODES)}; "
                          "fix the config file.")
    if not 0.0 <= a.max_translation < 1.0 or not 0.0 <= a.max_rotation_deg <= 180.0:
        raise ConfigError("Translation must be in [0, 1) and rotation in [0, 180] degrees.")
    if any(s < 1 or s > len(m.widths) for s in k.stages):
        raise ConfigError(
            f"k-means stages {k.stages} must lie in 1..{len(m.widths)}; fix --variant."
        )
    if k.patch_size < 1 or k.patch_size % 2 == 0:
        raise ConfigError("--kmeans-patch-size must be a positive odd number, e.g. 3 or 7.")
    if k.num_images < 1:
        raise ConfigError("--kmeans-images must be at least 1, e.g. 10000.")
    if k.patches_per_image < 1:
        raise ConfigError("--kmeans-patches-per-image must be at least 1, e.g. 20.")
    if k.batch_size < 1 or k.max_iter < 1 or k.zca_epsilon <= 0:
        raise ConfigError("kmeans.batch_size and kmeans.max_iter must be at least 1 "
                          "and kmeans.zca_epsilon positive; fix the config file.")
    if 1 in k.stages and k.patch_size != m.kernel_size:
        raise ConfigError(
            f"--kmeans-patch-size ({k.patch_size}) must equal the conv kernel size "
            f"({m.kernel_size}) to initialise stage 1; set both, e.g. "
            "--kmeans-patch-size 7 --kernel-size 7."
        )


def _validate_semi_supervised(config: Config) -> None:
    s = config.semi_supervised
    method = method_registry.get(s.method)  # ConfigError naming the methods
    if config.variant not in VARIANTS and s.method != config.variant:
        raise ConfigError(f"--variant {config.variant} trains with --semi-supervised "
                          f"{config.variant}; drop --semi-supervised {s.method} or "
                          "choose --variant kmeans12.")
    if not 0.0 <= s.ema_decay < 1.0:
        raise ConfigError("--ema-decay must be in [0, 1), e.g. 0.999.")
    if s.init_from is not None and not s.init_from.strip():
        raise ConfigError("--init-from needs a run directory (one holding "
                          "model.keras).")
    method.validate(config)
