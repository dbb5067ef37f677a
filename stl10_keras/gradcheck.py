"""`python -m stl10_keras.gradcheck`: the lab's hand-derived gradients, checked.

Every analytic gradient of `stl10_keras.backprop` (the module DAG and batch
norm, term by term, masked and unmasked) is compared with autodiff and central
finite differences on seeded random float64 inputs; `gradient_checks` holds
the checks and says what each reference is. This module is the command: its
flags, the table and the exit code.

`main(argv, bn_backward=..., dag_backward=..., masked_bn_backward=...)` takes a
replacement backward pass (tests use it to feed a wrong gradient);
`--inject-bug NAME` does the same from the command line for a demonstration.
The replacement feeds the analytic rows of the derivation; the rows marked
"via" (autodiff through the custom-gradient modules and `batch_norm_train`) and
the edge cases run the library as it is. The exit code is 1 when a check fails,
2 for a bad flag; the flags are checked before keras loads.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Callable, Sequence

from stl10_keras import errors, flags, runtime

if TYPE_CHECKING:
    from stl10_keras.gradient_checks import BnBackward, CheckResult, DagBackward

# The names of --inject-bug's wrong backward passes (`gradient_checks.
# INJECTABLE_BUGS`), here so that the flags are checked before keras loads.
BUG_NAMES = ("drop-dvar-term", "mask-ignored", "ties-to-x1")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m stl10_keras.gradcheck`."""
    parser = flags.ArgumentParser(
        prog="python -m stl10_keras.gradcheck",
        description="Check the lab's hand-derived gradients (module DAG, batch "
        "norm, masked batch norm) against autodiff and central finite "
        "differences in float64.",
    )
    parser.add_argument("--seed", type=flags.number(int, 0), default=0,
                        help="input seed (default 0)")
    parser.add_argument("--batch", type=flags.number(int, 2), default=8,
                        help="batch size m, at least 2; a batch of one (variance "
                        "0) is an edge case checked separately (default 8)")
    parser.add_argument("--channels", type=flags.number(int, 1), default=3,
                        help="channels (default 3)")
    parser.add_argument("--height", type=flags.number(int, 0), default=4,
                        help="height of the conv-shaped (N, H, W, C) input; "
                        "0 with --width 0 skips it (default 4)")
    parser.add_argument("--width", type=flags.number(int, 0), default=4,
                        help="width of the conv-shaped input (default 4)")
    parser.add_argument("--tolerance", type=flags.positive(float), default=1e-6,
                        help="largest relative error of a float64 gradient "
                        "check (default 1e-6)")
    parser.add_argument("--inject-bug", choices=BUG_NAMES,
                        help="replace a backward pass with a deliberately wrong "
                        "one (drop-dvar-term: dE/dx without its dE/dsigma^2 "
                        "term; mask-ignored: the masked batch norm's backward "
                        "as if nothing were masked; ties-to-x1: max and min "
                        "both route to x1 at a tie) and watch the checks fail")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses and checks the flags (argparse exits with 2 on a bad one)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.height == 0) != (args.width == 0):
        parser.error("--height and --width must both be positive, or both 0 to "
                     "skip the conv-shaped input")
    return args


def format_table(results: Sequence[CheckResult]) -> str:
    """The results as a fixed-width text table."""
    header = ("quantity", "reference", "max abs err", "max rel err", "tol", "result")
    rows = [
        (r.quantity, r.reference, f"{r.max_abs_error:.1e}", f"{r.max_rel_error:.1e}",
         f"{r.tolerance:.1e}", "pass" if r.passed else "FAIL")
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(
    argv: Sequence[str] | None = None,
    *,
    bn_backward: BnBackward | None = None,
    dag_backward: DagBackward | None = None,
    masked_bn_backward: BnBackward | None = None,
) -> int:
    """Runs the checks and prints the table.

    Args:
        argv: command-line arguments (default `sys.argv[1:]`).
        bn_backward: replaces `backprop.batch_norm_backward` in the unmasked
            checks (tests feed a wrong gradient through it).
        dag_backward: replaces `backprop.dag_backward`.
        masked_bn_backward: replaces `backprop.batch_norm_backward` in the
            masked checks.

    Returns:
        0 when every check passes, 1 otherwise, 2 when the backend cannot run
        them (argparse exits with 2 on a bad flag), 130 on Ctrl-C.
    """
    runtime.start()
    args = parse_args(argv)  # before keras loads: a bad flag answers at once
    overrides = {"bn": bn_backward, "dag": dag_backward,
                 "masked_bn": masked_bn_backward}
    try:
        return _check_and_report(args, overrides)
    except errors.UserError as error:
        return errors.report(error)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return errors.EXIT_INTERRUPTED


def _check_and_report(args: argparse.Namespace,
                      overrides: dict[str, Callable | None]) -> int:
    """Run the checks with `overrides` (or `--inject-bug`); print the table."""
    from stl10_keras import gradient_checks as gc  # loads keras quietly

    import keras
    import numpy as np

    from stl10_keras import backprop

    if args.inject_bug:
        kind, wrong = gc.INJECTABLE_BUGS[args.inject_bug]
        overrides = {**overrides, kind: wrong}
    results = gc.run_checks(
        seed=args.seed, batch=args.batch, channels=args.channels,
        height=args.height, width=args.width, tolerance=args.tolerance,
        bn_backward=overrides["bn"] or backprop.batch_norm_backward,
        dag_backward=overrides["dag"] or backprop.dag_backward,
        masked_bn_backward=overrides["masked_bn"] or backprop.batch_norm_backward,
    )

    conv = f", conv x ({args.batch}, {args.height}, {args.width}, {args.channels})"
    print("Backprop by hand: analytic gradients vs independent references")
    print(f"backend {keras.backend.backend()}, seed {args.seed}, dense x "
          f"({args.batch}, {args.channels}){conv if args.height else ''}, "
          f"epsilon {gc.EPSILON:g}, float64 unless stated, FD step {gc.FD_STEP:g}")
    print(f"masked x ({args.batch}, {gc.MASKED_STEPS}, {args.channels}) with a "
          "padding mask (sequences of random lengths, one fully padded), and fully "
          "masked")
    print("E = sum(dE/dy * y), random dE/dy; "
          "rel err = max|analytic - reference| / max|reference|")
    if args.inject_bug:
        print(f"injected bug: {args.inject_bug}")
    print()
    print(format_table(results))
    failed = [r for r in results if not r.passed]
    print()
    shape = (args.batch, args.height or 1, args.width or 1, args.channels)
    print(f"For contrast, E[x^2] - mu^2 at offset {gc.LARGE_OFFSET:g}, scale "
          f"{gc.TINY_SCALE:g} in float64 has relative error "
          f"{gc.naive_variance_error(np.random.default_rng(args.seed), shape):.1e}"
          ".")
    if failed:
        print(f"{len(failed)} of {len(results)} checks FAILED.")
        return 1
    print(f"All {len(results)} checks passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
