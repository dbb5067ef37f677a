"""The command line of `python -m stl10_keras.train`, and the flags it shares.

`add_config_arguments` and `config_from_args` are the flags that shape a
`Config`; `ablation` and `pipelines.run` build their parsers on them, so a
flag means the same thing in every command. `main` is the train command:
flags -> config -> devices -> `train.train` -> a summary and what to do next.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from stl10_keras import config as cfg
from stl10_keras import errors, flags, runtime, sources
from stl10_keras.config import Config
from stl10_keras.errors import ConfigError, UserError
from stl10_keras.io_utils import check_output_dir

if TYPE_CHECKING:
    from stl10_keras.distribute import Distributed, DistributionOptions


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that shape a `Config` (shared by train, ablation and pipelines.run).

    Every config field with a flag (`config.option`) becomes one, in a group
    per section, with its help text, and its type from the field's annotation.
    """
    g = parser.add_argument_group("run")
    g.add_argument("--preset", choices=cfg.PRESETS, default=None,
                   help="default (trains), paper (the lab's lr 1.0) or smoke (tiny)")
    g.add_argument("--variant", choices=cfg.all_variants(), default=None,
                   help="the lab's Table 1 column (default kmeans12), or a method "
                        "that learns from unlabeled images on top of its base "
                        "variant (fixmatch: kmeans12 + FixMatch)")
    g.add_argument("--config", default=None,
                   help="a config.json to start from (e.g. RUN/config.json)")
    for cls in cfg.section_classes():
        group = parser.add_argument_group(cls.flag_group)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("flag"):
                _add_field_flag(group, f, hints[f.name])


def _add_field_flag(group, f: dataclasses.Field, annotation: Any) -> None:
    """One config field's flag; its dest is the flag's name (`--no-flip`: flip)."""
    flag, extra = f.metadata["flag"], dict(f.metadata["argparse"])
    extra.pop("also", None)
    help_text = f.metadata["help"]
    kwargs: dict[str, Any] = {"dest": _dest(flag), "default": None,
                              "help": help_text() if callable(help_text) else help_text}
    if annotation is bool:
        if extra.pop("negatable", False):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:  # --no-X clears a field that is true by default; --X sets one
            kwargs.update(action="store_const", const=not flag.startswith("--no-"))
    else:
        kind, _ = cfg.field_kind(annotation)
        kwargs["type"] = (flags.int_list if typing.get_origin(kind) is tuple
                          else kind)
    if callable(extra.get("choices")):  # a registry's names, known only now
        extra["choices"] = extra["choices"]()
    kwargs.update(extra)
    group.add_argument(flag, **kwargs)


def _dest(flag: str) -> str:
    return flag.removeprefix("--").removeprefix("no-").replace("-", "_")


def apply_flags(config: Config, args: argparse.Namespace) -> None:
    """Set each config field whose flag was given (not validated here)."""
    for part in cfg.section_parts(config):
        for f in dataclasses.fields(part):
            flag = f.metadata.get("flag")
            value = getattr(args, _dest(flag), None) if flag else None
            if value is None:
                continue
            also = f.metadata["argparse"].get("also")
            if also:  # one flag, two fields: --scale-range MIN,MAX
                value, second = value
                setattr(part, also, second)
            setattr(part, f.name, value)


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve preset (or --config file) + explicit flags into a validated Config."""
    if args.config:
        config = Config.from_file(args.config)
        if args.variant:
            config.variant = args.variant
            cfg.apply_variant(config)
    else:
        config = cfg.preset(args.preset or "default",
                            args.dataset or cfg.DataConfig().dataset,
                            args.variant or "kmeans12")
    apply_flags(config, args)
    d, m = config.data, config.model
    if args.convs_per_stage is None and args.widths is not None \
            and len(m.convs_per_stage) != len(m.widths):
        m.convs_per_stage = (1,) * len(m.widths)
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
    """`DATASET_VARIANT[_PRESET]_sSEED`; an image folder's DATASET is
    `folder-NAME`, NAME its folder's, so two folders do not share a run."""
    import re
    import unicodedata

    suffix = "" if config.preset == "default" else f"_{config.preset}"
    dataset = config.data.dataset
    if dataset == "folder" and config.data.data_dir:
        name = Path(config.data.data_dir).expanduser().resolve().name
        # Letters and digits of any script stay; spaces and the rest become "-".
        slug = re.sub(r"[^\w.]+", "-", unicodedata.normalize("NFC", name)).strip("-.")
        dataset = f"folder-{slug}" if slug else dataset
    return f"{dataset}_{config.variant}{suffix}_s{config.train.seed}"


def build_train_parser() -> argparse.ArgumentParser:
    parser = flags.ArgumentParser(
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
    from stl10_keras.train import train

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
    except UserError as e:
        return errors.report(e)
    except KeyboardInterrupt:
        print("\nInterrupted. Rerun the same command to resume from the last "
              "completed epoch.", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
