"""Small file helpers: atomic writes (of a file, a copy, a folder), so an interrupted
run never leaves half of one; the check of a folder a command will write, made
before any work; and a quiet TensorFlow import, so a command's output starts with
its own lines."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

from stl10_keras.errors import ConfigError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temp path beside `path`; on success rename it onto `path`.

    A reader (TensorBoard, a browser, a resumed run) sees the old file or the
    new one, never half of one; on an exception the temp file is removed.

    Args:
        path: the file to write; its folder is created if missing.
        suffix: the temp file's suffix (some writers infer the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (temp file in the same folder, rename)."""
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy the file `source` to `target` atomically (temp file, then rename)."""
    with atomic_output(target) as tmp:
        shutil.copyfile(source, tmp)


def replace_directory(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the folder `source` onto `target`, replacing a folder already there.

    A folder cannot be renamed onto a non-empty one, so an existing `target` is
    first renamed aside (a hidden name beside it) and removed afterwards: a
    reader sees the old folder or the new one (for an instant neither), never
    a mix of the two.
    """
    target = Path(target)
    old = None
    if os.path.lexists(target):
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, temp: str | os.PathLike | None = None,
                     replace: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; on success rename it onto `path`.

    A reader (TensorBoard, TF Serving, a resumed run) sees the old folder or the
    new one, never a half-written one. On an exception the temp folder is
    removed; a process killed before the rename leaves it, and the next writer
    of `path` removes it first (its name is fixed).

    Args:
        path: the folder to write; its parent is created if missing.
        temp: the temp folder (default `.NAME.partial` beside `path`); a name
            that is not an integer keeps it out of TF Serving's versions.
        replace: replace a folder already at `path` (`replace_directory`);
            with False the rename fails (`OSError`) where one that is not
            empty is there, and the folder there is kept.
    """
    path = Path(path)
    tmp = Path(temp) if temp is not None else path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if replace:
            replace_directory(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


#: Test hook, not a user setting: `STL10_CRASH_AT=evaluation` makes a command
#: kill itself with SIGKILL when it reaches that `crash_point` (a hard crash
#: there, with no chance to clean up), so tests can check what a rerun does.
CRASH_ENV = "STL10_CRASH_AT"


def crash_point(name: str) -> None:
    """Die here, as a `kill -9` would, when `CRASH_ENV` names this point (tests)."""
    if os.environ.get(CRASH_ENV) == name:
        import signal

        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Refuse a folder a command will write that is a file or cannot be written.

    Checked before any work (and before TensorFlow loads): a file or a read-only
    place used to be found only when the run wrote its results or its export.
    Writability is tried, not inferred from permission bits (which a read-only
    mount or an administrator would pass), in the folder itself or, when it
    does not exist yet, in the nearest folder above it that does.

    Args:
        path: the folder (it need not exist).
        flag: the flag that named it, for the message.

    Raises:
        ConfigError: naming `flag` and the fix.
    """
    target = Path(path)
    # os.path's tests, unlike Path's, are False (not an error) for a path
    # whose folders cannot be searched; the write below then says why.
    if os.path.exists(target) and not os.path.isdir(target):
        raise ConfigError(f"{flag} {target} is a file, not a directory; pass "
                          f"another {flag}.")
    existing = target.absolute()
    while not os.path.exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {target} cannot be created because {existing} "
                          f"is a file; pass another {flag}.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {target} cannot be written ({existing}: "
                          f"{e.strerror or e}); pass another {flag}.") from None


# --- native start-up logs ---------------------------------------------------------

# A line of absl's C++ log format (`I0000 00:00:1795793494.485599   22436
# cudart_stub.cc:31] ...`) or TensorFlow's own (`2025-09-17 14:44:05.157831: I
# external/.../cudart_stub.cc:32] ...`); the letter is the severity.
_NATIVE_LOG_LINE = re.compile(
    r"(?:(?P<absl>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ "
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: (?P<tf>[IWEF]) )\S+:\d+\] ")
# absl prints this (a warning) before the first message of each library that
# logs before absl::InitializeLog().
_ABSL_PREINIT = ("WARNING: All log messages before absl::InitializeLog() is called "
                 "are written to STDERR")
_SEVERITIES = "IWEF"  # TF_CPP_MIN_LOG_LEVEL 0..3 hides the severities before it


def _min_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def _filter_log_lines(lines: list[str], level: int) -> str:
    """`lines` without the native log lines below `level` (other text is kept)."""
    kept = []
    for i, line in enumerate(lines):
        if line.rstrip("\r\n") == _ABSL_PREINIT:
            # A preface to the next line: it goes where that line goes.
            following = lines[i + 1:i + 2]
            if following and _filter_log_lines(following, level):
                kept.append(line)
            continue
        m = _NATIVE_LOG_LINE.match(line)
        if m and _SEVERITIES.index(m.group("absl") or m.group("tf")) < level:
            continue
        kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def filtered_startup_logs() -> Iterator[None]:
    """Apply `TF_CPP_MIN_LOG_LEVEL` to what native libraries print while loading.

    TensorFlow's shared libraries log from their load-time initialisers, through
    absl, before TensorFlow reads `TF_CPP_MIN_LOG_LEVEL` (TF 2.21 on a machine
    without CUDA: "All log messages before absl::InitializeLog() ..." and
    `cudart_stub.cc] Could not find cuda drivers`, twice, even at level 3). C++
    writes them to file descriptor 2, out of reach of Python's logging, so the
    block runs with fd 2 redirected to a temporary file. Afterwards the captured
    log lines below `TF_CPP_MIN_LOG_LEVEL` are dropped and everything else (other
    severities, Python warnings, any text that is not a log line) is written to
    stderr. If the block raises, all the captured text is written back first:
    a failing import keeps its explanation. Unset or 0 captures nothing.
    """
    level = _min_log_level()
    if level <= 0:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 to redirect
        yield
        return
    with tempfile.TemporaryFile() as captured:
        failed = True
        try:
            os.dup2(captured.fileno(), 2)
            try:
                yield
                failed = False
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
        finally:
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(True)
            kept = "".join(lines) if failed else _filter_log_lines(lines, level)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def import_tensorflow() -> ModuleType:
    """Import TensorFlow under `filtered_startup_logs` (a no-op once imported).

    Entry points call it before anything else imports TensorFlow (tensorflow-
    datasets, keras with the TensorFlow backend), after the checks that need no
    TensorFlow, so that an error a user caused is the only line they see.

    Returns:
        The `tensorflow` module.

    Raises:
        ImportError: TensorFlow is not installed or does not load; what it
            printed while failing is on stderr.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with filtered_startup_logs():
        return importlib.import_module("tensorflow")
