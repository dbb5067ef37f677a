"""`python -m pipelines.run`: materialise, pre-train, train, evaluate, push if better.

    python -m pipelines.run --dataset digits --pipeline-root runs/pipelines/digits \\
        --serving-dir saved_models/digits

Every training flag of `python -m stl10_keras.train` works here too. A rerun
skips every component whose inputs and parameters are unchanged, and after a
failure resumes at the component that failed. Exit code 0 when the pipeline
finished (whether or not it pushed), 1 when a component failed, 2 for a bad
flag, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from stl10_keras import errors, flags, runtime
from stl10_keras.io_utils import check_output_dir
from stl10_keras.cli import (
    add_config_arguments,
    config_from_args,
    default_run_name,
)


def build_parser() -> argparse.ArgumentParser:
    from pipelines.pipeline import DEFAULT_ACCURACY_THRESHOLD, DEFAULT_NUM_SHARDS

    parser = flags.ArgumentParser(
        prog="python -m pipelines.run",
        description="ExampleGen -> Transform -> Trainer -> Evaluator -> Pusher: "
                    "train the lab's CNN, evaluate it against the served model and "
                    "push it to a TF Serving model base path only if it is as good.")
    add_config_arguments(parser)
    g = parser.add_argument_group("pipeline")
    g.add_argument("--pipeline-root", default=None,
                   help="where the artifacts and pipeline_run.json go (default "
                        "runs/pipelines/DATASET_VARIANT[_PRESET]_sSEED; _PRESET "
                        "only for paper and smoke)")
    g.add_argument("--serving-dir", default=None,
                   help="TF Serving model base path the Pusher pushes to and the "
                        "Evaluator compares with (default saved_models/"
                        "DATASET_VARIANT[_PRESET]_sSEED)")
    g.add_argument("--accuracy-threshold", type=float,
                   default=DEFAULT_ACCURACY_THRESHOLD,
                   help="lowest validation accuracy the Evaluator blesses (default "
                        f"{DEFAULT_ACCURACY_THRESHOLD}); the served model's accuracy "
                        "must be matched too")
    g.add_argument("--num-shards", type=int, default=DEFAULT_NUM_SHARDS,
                   help=f"TFRecord files per split (default {DEFAULT_NUM_SHARDS})")
    g.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                   help="0 status lines only, 1 progress bars, 2 one line per epoch")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    runtime.start()
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        name = default_run_name(config)
        root = args.pipeline_root or Path("runs") / "pipelines" / name
        serving_dir = args.serving_dir or Path("saved_models") / name
        check_output_dir(root, "--pipeline-root")
        check_output_dir(serving_dir, "--serving-dir")
        from pipelines.pipeline import create_pipeline, run_pipeline

        pipeline = create_pipeline(
            config,
            root,
            serving_dir,
            accuracy_threshold=args.accuracy_threshold,
            num_shards=args.num_shards,
            verbose=args.verbose,
        )
        print(f"Pipeline '{pipeline.name}': {config.data.dataset}, variant "
              f"{config.variant}, preset {config.preset}; root {pipeline.root}, "
              f"serving dir {pipeline.serving_dir}", flush=True)
        runtime.tensorflow_available()  # loads it quietly, before the components do
        result = run_pipeline(pipeline)
    except errors.UserError as e:
        return errors.report(e)
    except OSError as e:  # the pipeline root itself cannot be written
        print(f"error: cannot write {e.filename or 'the pipeline root'} "
              f"({e.strerror or e}); pass another --pipeline-root.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted. Run the same command again to resume at the "
              "unfinished component.", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    summary = pipeline.root / "pipeline_run.json"
    if result["status"] == "failed":
        failed = result["failed_component"]
        print(f"Run summary: {summary}; run the same command again to resume at "
              f"{failed}.")
        print(f"error: {failed} failed: {result['error']}", file=sys.stderr)
        return 1
    print(f"Done in {result['seconds']:.1f} s; run summary: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
