"""The errors a user can cause, each carrying its command-line exit code.

Every error a user can cause (a bad flag or config value, missing data, a
training run that cannot go on, a model that cannot be exported or served)
derives from `UserError`, so that each command's `main` catches one type and
exits with `error.exit_code`: 2 for a usage mistake (`UsageError`, as
argparse), 1 for data and runtime failures. The message is one sentence that
names the fix. This module imports nothing of the project, so every module may
import it (the bottom of the dependency graph).
"""

from __future__ import annotations

import sys

#: Exit codes of every command (absl's `app.run` uses the same two).
EXIT_USAGE = 2
EXIT_FAILURE = 1


class UserError(Exception):
    """A failure the user can fix; the message is one sentence naming the fix."""

    exit_code = EXIT_FAILURE


class UsageError(UserError):
    """A flag or config value is invalid (exit code 2, as argparse's)."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError, ValueError):
    """A configuration value a user gave is invalid; the message names the fix."""


class DataUnavailableError(UserError, RuntimeError):
    """The dataset cannot be found or read; the message says what to do."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on; the message says what to change."""


class DistributionError(UserError, RuntimeError):
    """The processes of a multi-host job could not form it; the message says why."""


class ExportError(UserError, RuntimeError):
    """The run cannot be exported; the message names the fix."""


class EmbedError(UserError, RuntimeError):
    """The embedding cannot be made; the message names the fix."""


class ModelError(UserError):
    """A model to predict with or serve cannot be loaded; the message names the fix."""


class NoVersionError(ModelError):
    """A model base path holds no version that loads; the message names the fix."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """The informative line of an exception's message (TensorFlow's span many lines).

    Args:
        error: any exception.
        limit: the most characters returned (a longer line is cut with "...").

    Returns:
        The last line that is not TensorFlow's graph-execution boilerplate,
        without a trailing full stop; the exception's type name when its
        message is empty.
    """
    lines = [ln.strip() for ln in str(error).splitlines()]
    skip = ("Graph execution error", "Detected at node", "<stack traces", "[[")
    useful = [ln for ln in lines if ln and not ln.startswith(skip)]
    text = (useful[-1] if useful else type(error).__name__).rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def report(error: UserError) -> int:
    """Print `error` as a command's one `error:` line; return its exit code."""
    print(f"error: {error}", file=sys.stderr)
    return error.exit_code


#: What every command prints when Ctrl-C stops it, and its exit code (128 + SIGINT).
EXIT_INTERRUPTED = 130
