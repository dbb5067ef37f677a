"""The command line of `python -m stl10_keras.train`, and the flags it shares.

`add_config_arguments` and `config_from_args` are the flags that shape a
`Config`; `ablation` and `pipelines.run` build their parsers on them, so a
flag means the same thing in every command. `main` is the train command:
flags -> config -> devices -> `train.train` -> a summary and what to do next.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from stl10_keras import config as cfg
from stl10_keras import runtime, sources
from stl10_keras.config import Config, ConfigError
from stl10_keras.io_utils import check_output_dir

if TYPE_CHECKING:
    from stl10_keras.distribute import Distributed, DistributionOptions


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 64,128, got '{text}'"
        ) from None


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MIN,MAX like 1.0,1.4, got '{text}'"
        ) from None
    return lo, hi


def _size(text: str) -> tuple[int, int]:
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(
            f"expected H,W like 96,96 (or one number for a square), got '{text}'")
    return values * 2 if len(values) == 1 else values


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that shape a `Config` (shared by train and ablation)."""
    g = parser.add_argument_group("run")
    g.add_argument("--dataset", choices=sources.names(), default=None,
                   help=sources.help_text(default=cfg.DataConfig.dataset)
                   + " (docs/data.md)")
    g.add_argument("--data-dir", default=None,
                   help="stl10: folder with stl10_binary/ or stl10_binary.tar.gz, "
                        "or a tensorflow-datasets data dir; fashion_mnist: folder "
                        "of its four IDX files; folder: DIR with train/CLASS/*")
    g.add_argument("--preset", choices=cfg.PRESETS, default=None,
                   help="default (trains), paper (the lab's lr 1.0) or smoke (tiny)")
    g.add_argument("--variant", choices=cfg.ALL_VARIANTS, default=None,
                   help="the lab's Table 1 column (default kmeans12), or fixmatch "
                        "(kmeans12 + FixMatch)")
    g.add_argument("--config", default=None,
                   help="a config.json to start from (e.g. RUN/config.json)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--val-per-class", type=int, default=None,
                   help="labeled images per class held out for validation")
    g.add_argument("--labeled-per-class", type=int, default=None,
                   help="fashion_mnist: labeled training images per class, drawn "
                        "by the seed (default 500, as STL-10); the rest are "
                        "unlabeled")
    g.add_argument("--image-size", type=_size, default=None, metavar="H,W",
                   help="resize every image to H,W (or N for NxN); a folder of "
                        "images of different sizes needs it")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="convert every image to 1 (grayscale) or 3 (RGB) channels "
                        "(default: as stored)")
    g.add_argument("--no-download", action="store_true",
                   help="never let tensorflow-datasets download STL-10 or "
                        "Fashion-MNIST")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--learning-rate", type=float, default=None)
    g.add_argument("--lr-decay", type=float, default=None,
                   help="inverse-time decay per step: lr / (1 + decay * step)")
    g.add_argument("--lr-schedule", default=None, choices=cfg.LR_SCHEDULES,
                   help="inverse-time (the lab's, with --lr-decay) or cosine "
                        "(to 0 at the last step)")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--mixed-precision", action="store_true", default=None,
                   help="train in mixed bfloat16")
    g = parser.add_argument_group("model")
    g.add_argument("--widths", type=_ints, default=None, help="filters per stage")
    g.add_argument("--convs-per-stage", type=_ints, default=None)
    g.add_argument("--kernel-size", type=int, default=None,
                   help="conv kernel side (k-means patches of stage 1 match it)")
    g.add_argument("--fc-units", type=int, default=None)
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--batch-norm", choices=("manual", "keras"), default=None)
    g.add_argument("--sync-batch-norm", action="store_true", default=None,
                   help="--distribution mirrored: batch statistics over every "
                        "replica's images")
    g = parser.add_argument_group("augmentation")
    g.add_argument("--augment", dest="augment", action="store_true", default=None,
                   help="augment (default for every variant but baseline)")
    g.add_argument("--no-augment", dest="augment", action="store_false")
    g.add_argument("--augment-on", choices=("device", "cpu"), default=None,
                   help="in the model on the accelerator (default) or in tf.data")
    g.add_argument("--max-rotation", type=float, default=None, help="degrees")
    g.add_argument("--scale-range", type=_range, default=None, help="MIN,MAX zoom")
    g.add_argument("--max-translation", type=float, default=None,
                   help="fraction of the image size")
    g.add_argument("--no-flip", action="store_true", default=None)
    g = parser.add_argument_group("k-means pre-training")
    g.add_argument("--kmeans-patch-size", type=int, default=None)
    g.add_argument("--kmeans-images", type=int, default=None,
                   help="unlabeled images read for k-means")
    g.add_argument("--kmeans-patches-per-image", type=int, default=None)
    g.add_argument("--no-whiten", action="store_true", default=None)
    g = parser.add_argument_group("semi-supervised (docs/semi-supervised.md)")
    g.add_argument("--semi-supervised", choices=cfg.SEMI_SUPERVISED_METHODS,
                   default=None,
                   help="fixmatch: also train on the unlabeled images")
    g.add_argument("--unlabeled-ratio", type=int, default=None,
                   help="mu: unlabeled images per labeled image in a step")
    g.add_argument("--confidence-threshold", type=float, default=None,
                   help="tau: pseudo-labels count at this top probability")
    g.add_argument("--unlabeled-weight", type=float, default=None,
                   help="lambda: weight of the unlabeled loss")
    g.add_argument("--strong-ops", type=int, default=None,
                   help="RandAugment-style ops per strong view")
    g.add_argument("--strong-magnitude", type=float, default=None,
                   help="largest op strength, a fraction of each op's range")
    g.add_argument("--cutout", type=float, default=None,
                   help="Cutout square's side, a fraction of the image size")
    g.add_argument("--ema-decay", type=float, default=None,
                   help="decay of the weights' moving average used to evaluate")


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve preset (or --config file) + explicit flags into a validated Config."""
    if args.config:
        config = Config.from_file(args.config)
        if args.variant:
            config.variant = args.variant
            cfg.apply_variant(config)
    else:
        config = cfg.preset(args.preset or "default", args.dataset or "stl10",
                            args.variant or "kmeans12")
    if args.dataset and args.config:
        config.data.dataset = args.dataset
    d, t, m, a, k = (config.data, config.train, config.model, config.augment,
                     config.kmeans)
    semi = config.semi_supervised
    overrides = [
        (d, "data_dir", args.data_dir), (d, "val_per_class", args.val_per_class),
        (d, "labeled_per_class", args.labeled_per_class),
        (d, "image_size", args.image_size), (d, "channels", args.channels),
        (t, "seed", args.seed), (t, "epochs", args.epochs),
        (t, "batch_size", args.batch_size), (t, "learning_rate", args.learning_rate),
        (t, "lr_decay", args.lr_decay), (t, "lr_schedule", args.lr_schedule),
        (t, "weight_decay", args.weight_decay),
        (t, "momentum", args.momentum), (t, "mixed_precision", args.mixed_precision),
        (m, "widths", args.widths), (m, "fc_units", args.fc_units),
        (m, "kernel_size", args.kernel_size),
        (m, "dropout", args.dropout), (m, "batch_norm", args.batch_norm),
        (m, "sync_batch_norm", args.sync_batch_norm),
        (a, "enabled", args.augment), (a, "on", args.augment_on),
        (a, "max_rotation_deg", args.max_rotation),
        (a, "max_translation", args.max_translation),
        (k, "patch_size", args.kmeans_patch_size), (k, "num_images", args.kmeans_images),
        (k, "patches_per_image", args.kmeans_patches_per_image),
        (semi, "method", args.semi_supervised),
        (semi, "unlabeled_ratio", args.unlabeled_ratio),
        (semi, "confidence_threshold", args.confidence_threshold),
        (semi, "unlabeled_weight", args.unlabeled_weight),
        (semi, "strong_ops", args.strong_ops),
        (semi, "strong_magnitude", args.strong_magnitude),
        (semi, "cutout", args.cutout), (semi, "ema_decay", args.ema_decay),
    ]
    for section, name, value in overrides:
        if value is not None:
            setattr(section, name, value)
    if args.no_download:
        d.download = False
    if args.convs_per_stage is not None:
        m.convs_per_stage = args.convs_per_stage
    elif args.widths is not None and len(m.convs_per_stage) != len(m.widths):
        m.convs_per_stage = (1,) * len(m.widths)
    if args.scale_range is not None:
        a.scale_min, a.scale_max = args.scale_range
    if args.no_flip:
        a.flip = False
    if args.no_whiten:
        k.whiten = False
    sources.get(d.dataset).configure(config)
    cfg.validate(config)
    check_data_dir(config, given=args.data_dir is not None)
    return config


def check_data_dir(config: Config, given: bool) -> None:
    """Refuse a `--data-dir` that is a file, or that the dataset does not read
    or needs (`Source.check_flags`).

    Args:
        config: the resolved config.
        given: whether `--data-dir` was on the command line (a config file's
            value is the run's record, not a user's new mistake).
    """
    sources.get(config.data.dataset).check_flags(config, data_dir_given=given)
    data_dir = config.data.data_dir
    if data_dir is None:
        return
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir {data_dir} is a file, not a directory; pass "
                          "the folder that holds stl10_binary/ or the archive.")


def default_run_name(config: Config) -> str:
    suffix = "" if config.preset == "default" else f"_{config.preset}"
    return f"{config.data.dataset}_{config.variant}{suffix}_s{config.train.seed}"


def build_train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stl10_keras.train",
        description="Train the lab's 5-stage CNN on STL-10 (or digits, "
                    "Fashion-MNIST, your own image folder), evaluate it and export a "
                    "SavedModel.",
    )
    add_config_arguments(parser)
    g = parser.add_argument_group("outputs")
    g.add_argument("--run-dir", default=None,
                   help="run directory (default runs/DATASET_VARIANT[_PRESET]_sSEED)")
    g.add_argument("--export-dir", default=None,
                   help="TF Serving model base path (default saved_models/RUN_NAME)")
    g.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    g.add_argument("--overwrite", action="store_true",
                   help="start over even if the run dir holds a run")
    g.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                   help="keras progress: 0 silent, 1 progress bar, 2 one line/epoch")
    g = parser.add_argument_group(
        "distribution",
        "data-parallel training; --batch-size stays the global batch "
        "(docs/scale-out.md)")
    g.add_argument("--distribution", choices=("none", "mirrored", "data-parallel"),
                   default="none",
                   help="mirrored: tf.distribute.MirroredStrategy "
                        "(KERAS_BACKEND=tensorflow); data-parallel: "
                        "keras.distribution.DataParallel (KERAS_BACKEND=jax)")
    g.add_argument("--devices", default=None,
                   help="N (the first N GPUs) or gpu:0,gpu:1; cpu:0,cpu:1 splits "
                        "the CPU into logical devices (default: every GPU)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="multi-host data-parallel: process 0's address")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="multi-host data-parallel: processes in the job")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="multi-host data-parallel: this process, 0..N-1")
    return parser


def distribution_options(args: argparse.Namespace) -> "DistributionOptions":
    """The `--distribution` flags as `distribute.DistributionOptions`."""
    from stl10_keras.distribute import DistributionOptions

    return DistributionOptions(args.distribution, args.devices,
                               args.coordinator_address, args.num_processes,
                               args.process_id)


def _setup_distribution(args: argparse.Namespace, config: Config) -> "Distributed":
    """Check the --distribution flags, then set up the devices (before any data)."""
    if args.distribution == "none" and args.devices is None \
            and args.coordinator_address is None and args.num_processes is None \
            and args.process_id is None:
        from stl10_keras.distribute import Distributed

        return Distributed()
    from stl10_keras import distribute

    options = distribution_options(args)
    if options.mode == "none":  # flags that need a --distribution: no backend yet
        distribute.check_options(options, backend="")
    keras = runtime.load_keras()
    request = distribute.check_options(options, keras.backend.backend())
    replicas = distribute.expected_replicas(options, request)
    if replicas is not None:  # refuse before starting any runtime
        distribute.check_batch_size(config.train.batch_size, replicas)
    return distribute.setup(options)


def _print_summary(metrics: dict, run_dir: Path) -> None:
    ips = metrics.get("train_images_per_sec")
    speed = f"  ({ips:.0f} train images/s)" if ips else ""
    print(f"validation accuracy {metrics['val_accuracy']:.4f}  "
          f"test accuracy {metrics['test_accuracy']:.4f}{speed}")
    print(f"run dir: {run_dir}")
    if metrics.get("export_path"):
        print(f"SavedModel: {metrics['export_path']}")
    print("next:")
    print(f"  tensorboard --logdir {run_dir / 'logs'}")
    if metrics.get("export_path"):
        base = Path(metrics["export_path"]).parent
        print(f"  python -m stl10_keras.serve --model-base-path {base}")
        print(f"  python -m stl10_keras.predict --model {base} IMAGE.png")
    else:
        print(f"  python -m stl10_keras.export --run-dir {run_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m stl10_keras.train`: the exit code (0, 1 data/training, 2 flags)."""
    runtime.start()
    parser = build_train_parser()
    args = parser.parse_args(argv)
    from stl10_keras.data import DataUnavailableError
    from stl10_keras.distribute import DistributionError
    from stl10_keras.train import TrainingError, train

    try:
        config = config_from_args(args)
        name = default_run_name(config)
        run_dir = Path(args.run_dir or Path("runs") / name)
        export_dir = None if args.no_export else (
            args.export_dir or str(Path("saved_models") / name))
        # train() checks them too; here they are refused before a
        # --distribution loads keras and starts its devices.
        check_output_dir(run_dir, "--run-dir")
        if export_dir is not None:
            check_output_dir(export_dir, "--export-dir")
        distribution = _setup_distribution(args, config)
        finished = (run_dir / "metrics.json").exists() and not args.overwrite
        metrics = train(config, run_dir, export_dir, overwrite=args.overwrite,
                        verbose=args.verbose, distribution=distribution)
        if not distribution.is_chief:
            print(f"process {distribution.process_id} of {distribution.processes} "
                  "done; process 0 wrote the run.")
            return 0
        if finished:
            print(f"{run_dir} already holds a finished run (pass --overwrite to "
                  "train it again):")
        _print_summary(metrics, run_dir)
        return 0
    except (ConfigError, DataUnavailableError, DistributionError,
            TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        print("\nInterrupted. Rerun the same command to resume from the last "
              "completed epoch.", file=sys.stderr)
        return 130
