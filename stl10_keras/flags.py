"""Command-line parsing shared by every command: the parser and its value types.

`ArgumentParser` answers a bad flag with one sentence and "see --help" (exit
code 2), not argparse's whole usage block: with some fifty flags that block
buried the sentence that matters. The usage is printed by `--help` only.

The type helpers turn a flag's text into a value or raise
`argparse.ArgumentTypeError` with the sentence argparse prints after the flag's
name. This module imports only the standard library, so the benchmarks may use
it before any heavy library loads.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import field
from typing import Any, Callable, NoReturn

from stl10_keras.errors import EXIT_USAGE


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error: `PROG: error: MESSAGE (see --help)`, exit 2."""

    def error(self, message: str) -> NoReturn:
        # A sentence's full stop would sit before the "(see --help)".
        self.exit(EXIT_USAGE,
                  f"{self.prog}: error: {message.rstrip('.')} (see --help)\n")


def number(kind: type = float, low: float | None = None, high: float | None = None,
           low_open: bool = False, what: str | None = None) -> Callable[[str], Any]:
    """A finite int or float in `[low, high]` (`(low, high]` with `low_open`).

    NaN and infinities are refused: every comparison with NaN is false, and an
    infinite count or time ends in an overflow far from the flag.
    """
    name = what or ("an integer" if kind is int else "a number")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got '{text}'") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(_range_sentence(low, high, low_open, text))
        return value

    return parse


def _range_sentence(low, high, low_open: bool, text: str) -> str:
    if high is None:
        return f"must be {'above' if low_open else 'at least'} {low:g}, got {text}"
    if low is None:
        return f"must be at most {high:g}, got {text}"
    return f"must be in {'(' if low_open else '['}{low:g}, {high:g}], got {text}"


def positive(kind: type = float, most: float | None = None) -> Callable[[str], Any]:
    """A positive finite number (at most `most`)."""
    return number(kind, 0, most, low_open=True)


def int_list(text: str) -> tuple[int, ...]:
    """`64,128` -> `(64, 128)`."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 64,128, got '{text}'") from None


def float_pair(text: str) -> tuple[float, float]:
    """`1.0,1.4` -> `(1.0, 1.4)`."""
    try:
        lo, hi = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MIN,MAX like 1.0,1.4, got '{text}'") from None
    return lo, hi


def image_size(text: str) -> tuple[int, int]:
    """`96,96` or `96` -> `(96, 96)`."""
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(
            f"expected H,W like 96,96 (or one number for a square), got '{text}'")
    return values * 2 if len(values) == 1 else values


def port(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port)."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port (0..65535)")
    return int(text)


def option(default: Any, help: str, flag: str | None = None, **argparse: Any) -> Any:
    """A config field with its help text and command-line flag beside it.

    The train, ablation and pipeline commands build their flags from these
    (`cli.add_config_arguments`), with the type from the field's annotation.
    Config sections (`stl10_keras.config`) and the training methods' own
    sections (`stl10_keras.methods`) declare their fields with it.

    Args:
        default: the field's default (immutable: tuples, not lists).
        help: what the field means; the flag's `--help` line (or a function
            returning it, for text made from a registry).
        flag: the field's flag: `--name` (a boolean that is false by default:
            a switch that sets it), `--no-name` (a boolean that is true by
            default: a switch that clears it), or None (set from a config file
            only).
        **argparse: further `add_argument` keywords: `choices` (or a function
            returning them, called when the parser is built), `metavar`,
            `type` (instead of the annotation's), `negatable` (a boolean with
            both `--name` and `--no-name`), `also` (a second field of the
            section set from the same flag, which then gives a pair).
    """
    return field(default=default,
                 metadata={"help": help, "flag": flag, "argparse": argparse})
