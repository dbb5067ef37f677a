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
from dataclasses import dataclass, field
from typing import Any

from stl10_keras import sources
from stl10_keras.errors import ConfigError

# The datasets registered when this module was imported; `sources.names()` is
# the live list (a source registered later, e.g. in a test, is in it).
DATASETS = sources.names()
VARIANTS = ("baseline", "augment", "kmeans1", "kmeans12")  # the lab's Table 1
# Beyond the lab: kmeans12 + FixMatch on the unlabeled images (docs/semi-supervised.md).
ALL_VARIANTS = VARIANTS + ("fixmatch",)
SEMI_SUPERVISED_METHODS = ("none", "fixmatch")
PRESETS = ("default", "paper", "smoke")
FILL_MODES = ("reflect", "wrap", "nearest", "constant")  # RandomAffine's fill modes
# The lab's Torch decay, or a cosine to zero over the run (lets a fixed number of
# epochs converge; FixMatch's own schedule is a cosine too).
LR_SCHEDULES = ("inverse-time", "cosine")


@dataclass
class DataConfig:
    """Where the images come from and how the labeled set is split.

    Args:
        dataset: `stl10`, `digits` (scikit-learn's digits, bundled, offline),
            `fashion_mnist` (the four official IDX files, or
            tensorflow-datasets) or `folder` (your images, `data_dir/train/CLASS/*`).
        data_dir: folder holding `stl10_binary/` or `stl10_binary.tar.gz`, or a
            tensorflow-datasets data dir; Fashion-MNIST's IDX files; the image
            folder. None: tensorflow-datasets' default (Fashion-MNIST: first
            Debian's /usr/share/datasets/fashion-mnist).
        val_per_class: labeled images per class held out for validation
            (STL-10: 100 of each class's 500 -> 4,000 train / 1,000 validation).
            None picks the dataset's default (100 for stl10, 20 for digits, a
            fifth of the labeled images for fashion_mnist and folder).
        labeled_per_class: Fashion-MNIST's labeled images per class, drawn
            from its 60,000 training images by the seed (None: 500, as STL-10);
            the rest are the unlabeled split.
        image_size: `(H, W)` every image is resized to (None: as stored; a
            folder of images of different sizes needs it).
        channels: 1 (grayscale) or 3 (RGB) every image is converted to (None:
            as stored).
        download: let tensorflow-datasets download STL-10 or Fashion-MNIST
            when it is missing.
        shuffle_buffer: tf.data shuffle buffer (images) of a pipeline reshuffled
            per iteration; training instead permutes each whole epoch from
            (seed, epoch), so that a resumed run repeats it (`data.make_dataset`).
    """

    dataset: str = "stl10"
    data_dir: str | None = None
    val_per_class: int | None = None
    labeled_per_class: int | None = None
    image_size: tuple[int, ...] | None = None
    channels: int | None = None
    download: bool = True
    shuffle_buffer: int = 5000


@dataclass
class AugmentConfig:
    """The lab's four transforms, fused into one affine warp (`RandomAffine`).

    Args:
        enabled: augment the training images at all.
        on: `device` (first layer of the training model, on the accelerator)
            or `cpu` (inside the tf.data pipeline, for comparison).
        flip: random horizontal flip with p=0.5.
        max_rotation_deg: rotation drawn uniformly in +-this many degrees.
        scale_min, scale_max: zoom-in factor drawn uniformly in this range.
        max_translation: shift drawn uniformly in +-this fraction of the size.
        fill_mode: how pixels outside the image are filled.
    """

    enabled: bool = True
    on: str = "device"
    flip: bool = True
    max_rotation_deg: float = 15.0
    scale_min: float = 1.0
    scale_max: float = 1.4
    max_translation: float = 0.2
    fill_mode: str = "reflect"


@dataclass
class KMeansConfig:
    """Unsupervised pre-training of the first conv stages with k-means.

    Args:
        stages: 1-based stages whose kernels are initialised from k-means
            centroids (`()`: none, `(1,)`: kmeans1, `(1, 2)`: kmeans12).
        patch_size: side of the square patches clustered for stage 1.
        patches_per_image: random patches drawn from each unlabeled image.
        num_images: unlabeled images read (a stream; never all in memory).
        normalize: per-patch brightness/contrast normalisation.
        whiten: ZCA-whiten the patches (folded into the kernel and bias).
        zca_epsilon: regulariser added to the eigenvalues in ZCA whitening.
        batch_size: MiniBatchKMeans batch size.
        max_iter: MiniBatchKMeans passes over the patches.
    """

    stages: tuple[int, ...] = ()
    patch_size: int = 3
    patches_per_image: int = 20
    num_images: int = 10000
    normalize: bool = True
    whiten: bool = True
    zca_epsilon: float = 0.01
    batch_size: int = 4096
    max_iter: int = 100


@dataclass
class ModelConfig:
    """The lab's network: N stages of [conv -> BN -> ReLU -> max-pool] + 2 FC.

    Args:
        widths: filters of each stage (5 stages by default).
        convs_per_stage: conv+BN+ReLU blocks per stage before its pool (the
            lab's 7-conv model is `widths=(64,128,256,512,512)`,
            `convs_per_stage=(1,1,2,2,1)`).
        kernel_size: conv kernel side.
        fc_units: width of the hidden fully connected layer.
        dropout: dropout rate before each fully connected layer.
        batch_norm: `manual` (ManualBatchNorm, the lab's derivation) or
            `keras` (keras.layers.BatchNormalization, for comparison).
        bn_momentum: moving-average momentum of the BN statistics.
        bn_epsilon: epsilon inside the BN square root.
        sync_batch_norm: under `--distribution mirrored`, batch statistics
            over all replicas' images (each layer's `synchronized`) rather
            than each replica's own share.
        num_classes: output classes.
    """

    widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    convs_per_stage: tuple[int, ...] = (1, 1, 1, 1, 1)
    kernel_size: int = 3
    fc_units: int = 512
    dropout: float = 0.5
    batch_norm: str = "manual"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    sync_batch_norm: bool = False
    num_classes: int = 10


@dataclass
class TrainConfig:
    """Optimisation: SGD as the lab's Torch `optim.sgd` does it.

    Args:
        epochs: passes over the labeled training split.
        batch_size: images per step.
        learning_rate: initial SGD learning rate.
        lr_decay: inverse-time decay per step, `lr_t = lr / (1 + lr_decay * t)`.
        lr_schedule: `inverse-time` (the lab's, with `lr_decay`) or `cosine`:
            `lr_t = lr * (1 + cos(pi * t / T)) / 2` over the run's T steps, to 0
            at the last step (`lr_decay` is not used).
        weight_decay: L2 weight decay.
        momentum: SGD momentum.
        seed: seeds the split, the weights, augmentation and k-means.
        mixed_precision: train in mixed bfloat16 (statistics stay float32).
    """

    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 0.01
    lr_decay: float = 1e-7
    lr_schedule: str = "inverse-time"
    weight_decay: float = 5e-4
    momentum: float = 0.5
    seed: int = 0
    mixed_precision: bool = False


@dataclass
class SemiSupervisedConfig:
    """Training on the unlabeled images too: FixMatch (Sohn et al., 2020).

    Args:
        method: `none` (labeled images only) or `fixmatch`.
        unlabeled_ratio: `mu`, unlabeled images per labeled image in a step.
        confidence_threshold: `tau`; a weak view's prediction becomes a
            pseudo-label when its top probability is at least this.
        unlabeled_weight: `lambda`, the weight of the unlabeled loss.
        weak_translation: the weak view's largest shift, a fraction of the
            size (with a flip when `augment.flip`).
        strong_ops: RandAugment-style ops drawn per image for the strong view.
        strong_magnitude: largest op strength, a fraction of each op's range;
            each image draws its strength uniformly in `[0, strong_magnitude]`.
        cutout: side of the strong view's Cutout square, a fraction of the size.
        ema_decay: decay of the moving average of the weights used for
            validation, test and export (keras' `use_ema`).
    """

    method: str = "none"
    unlabeled_ratio: int = 7
    confidence_threshold: float = 0.95
    unlabeled_weight: float = 1.0
    weak_translation: float = 0.125
    strong_ops: int = 2
    strong_magnitude: float = 1.0
    cutout: float = 0.5
    ema_decay: float = 0.999


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError("A config must be a JSON object like the config.json "
                              "a run writes.")
        parts = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key not in parts:
                raise ConfigError(f"Unknown config key '{key}'; remove it from the file.")
            sub = _SECTIONS.get(key)
            if sub and not isinstance(value, dict):
                raise ConfigError(f"'{key}' must be an object of {sub.__name__} "
                                  "fields; fix it in the file.")
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
    field added to a section later (e.g. `train.lr_schedule`) has a default
    that does what runs did before it existed."""
    if not isinstance(d, dict):
        return d
    if "semi_supervised" not in d:
        section = (current.semi_supervised
                   if current.semi_supervised.method == "none"
                   else SemiSupervisedConfig())
        d = {**d, "semi_supervised": dataclasses.asdict(section)}
    filled = dict(d)
    for name, cls in _SECTIONS.items():
        if isinstance(d.get(name), dict):
            defaults = json.loads(json.dumps(dataclasses.asdict(cls())))
            filled[name] = {**defaults, **d[name]}
    return filled


def _section_from_dict(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ConfigError(
            f"Unknown {cls.__name__} key(s) {sorted(unknown)}; remove them from the file."
        )
    section = {v: k for k, v in _SECTIONS.items()}[cls]
    fixed = {k: _checked_value(f"{section}.{k}", names[k].type, v) for k, v in d.items()}
    return cls(**fixed)


def _checked_value(name: str, annotation: str, value: Any) -> Any:
    """`value` as the field's type; JSON lists become tuples (round trips compare equal).

    Without this a string or float in a config file reaches `validate` or keras
    and fails there with a message that names neither the field nor the fix.
    """
    optional = annotation.endswith("| None")
    kind = annotation.removesuffix("| None").strip()
    if value is None and optional:
        return None

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if kind == "tuple[int, ...]" and isinstance(value, (list, tuple)) \
            and all(is_int(v) for v in value):
        return tuple(value)
    if kind == "int" and is_int(value):
        return value
    if kind == "float" and (is_int(value) or isinstance(value, float)):
        return float(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    expected = {"tuple[int, ...]": "a list of integers", "int": "an integer",
                "float": "a number", "bool": "true or false",
                "str": "a string"}.get(kind, kind)
    raise ConfigError(f"{name} must be {expected}{' or null' if optional else ''}, "
                      f"not {json.dumps(value)}; fix it in the file.")


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    """Raise `ConfigError` unless `value` is one of `choices` (`what`: its name)."""
    if value not in choices:
        raise ConfigError(f"Unknown {what} '{value}'; choose one of "
                          f"{', '.join(choices)}.")


def apply_variant(config: Config) -> None:
    """Set augmentation, k-means stages and semi-supervision from `config.variant`.

    The lab's four (Table 1) train on labeled images only; `fixmatch` is
    `kmeans12` + FixMatch.
    """
    check_choice(config.variant, ALL_VARIANTS, "variant")
    config.augment.enabled = config.variant != "baseline"
    config.kmeans.stages = {"baseline": (), "augment": (), "kmeans1": (1,),
                            "kmeans12": (1, 2), "fixmatch": (1, 2)}[config.variant]
    config.semi_supervised.method = ("fixmatch" if config.variant == "fixmatch"
                                     else "none")


def preset(name: str, dataset: str = "stl10", variant: str = "kmeans12") -> Config:
    """Return the named preset for a dataset.

    Args:
        name: `paper` (the lab's values exactly: SGD lr 1.0), `default` (the
            lab's values with a learning rate that trains in Keras, see
            docs/training.md), or `smoke` (tiny widths, 1 epoch, small k-means; tests).
        dataset: a registered source's name (`sources.names()`).
        variant: one of `VARIANTS`.

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
        config.semi_supervised.unlabeled_ratio = 2
        config.semi_supervised.ema_decay = 0.9
    apply_variant(config)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Raise `ConfigError` naming the fix for any invalid value."""
    m, t, a, k, d = config.model, config.train, config.augment, config.kmeans, config.data
    check_choice(config.preset, PRESETS, "preset")
    check_choice(d.dataset, sources.names(), "dataset")
    check_choice(config.variant, ALL_VARIANTS, "variant")
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
    if s.method not in SEMI_SUPERVISED_METHODS:
        raise ConfigError(f"--semi-supervised must be one of "
                          f"{', '.join(SEMI_SUPERVISED_METHODS)}.")
    if config.variant == "fixmatch" and s.method != "fixmatch":
        raise ConfigError("--variant fixmatch trains with --semi-supervised fixmatch; "
                          "drop --semi-supervised none or choose --variant kmeans12.")
    if s.unlabeled_ratio < 1:
        raise ConfigError("--unlabeled-ratio must be at least 1, e.g. FixMatch's 7.")
    if not 0.0 < s.confidence_threshold <= 1.0:
        raise ConfigError("--confidence-threshold must be in (0, 1], e.g. 0.95.")
    if s.unlabeled_weight < 0:
        raise ConfigError("--unlabeled-weight must be 0 or more, e.g. 1.")
    if not 0.0 <= s.weak_translation < 1.0 or not 0.0 <= s.cutout < 1.0:
        raise ConfigError("semi_supervised.weak_translation and --cutout must be in "
                          "[0, 1) (fractions of the image size).")
    if s.strong_ops < 0 or not 0.0 <= s.strong_magnitude <= 1.0:
        raise ConfigError("--strong-ops must be 0 or more and --strong-magnitude in "
                          "[0, 1].")
    if not 0.0 <= s.ema_decay < 1.0:
        raise ConfigError("--ema-decay must be in [0, 1), e.g. 0.999.")
    if s.method == "fixmatch" and config.augment.on == "cpu":
        raise ConfigError("FixMatch augments on the device; drop --augment-on cpu.")
