"""`io_utils`: what native code writes to fd 2 while loading, and atomic writes.

The reference of `filtered_startup_logs` is TF_CPP_MIN_LOG_LEVEL's documented
meaning (1 hides INFO, 2 also WARNING, 3 also ERROR), applied by hand to lines
in the formats TensorFlow 2.21 prints at `import tensorflow`. The atomic writes
are checked by what a folder holds afterwards: the new content or the old,
and nothing else.
"""

import os

import pytest

from stl10_keras.io_utils import atomic_copy, atomic_directory, filtered_startup_logs

PREINIT = ("WARNING: All log messages before absl::InitializeLog() is called are "
           "written to STDERR\n")
INFO = ("I0000 00:00:1795793494.485599   22436 cudart_stub.cc:31] Could not find "
        "cuda drivers on your machine, GPU will not be used.\n")
WARNING = "W0000 00:00:1795793494.485599   22436 some_file.cc:12] a warning\n"
ERROR = ("2025-09-17 14:44:05.176998: E external/local_xla/xla/stream_executor/"
         "cuda/cuda_fft.cc:467] Unable to register cuFFT factory\n")
OTHER = "/x/y.py:3: DeprecationWarning: not a log line\n"
NATIVE = PREINIT + INFO + WARNING + ERROR + OTHER


def _write_natively(text):
    os.write(2, text.encode())  # as C++ does: below Python's sys.stderr


@pytest.mark.parametrize("level, expected", [
    ("1", WARNING + ERROR + OTHER),  # the preface went with the INFO line
    ("2", ERROR + OTHER),
    ("3", OTHER),
])
def test_lines_below_the_level_are_dropped_and_the_rest_kept(
        monkeypatch, capfd, level, expected):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
    with filtered_startup_logs():
        _write_natively(NATIVE)
    assert capfd.readouterr().err == expected


def test_the_absl_preface_stays_with_a_line_that_is_kept(monkeypatch, capfd):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    with filtered_startup_logs():
        _write_natively(PREINIT + ERROR + PREINIT + INFO)
    assert capfd.readouterr().err == PREINIT + ERROR


@pytest.mark.parametrize("level", [None, "0"])
def test_unset_or_0_shows_everything(monkeypatch, capfd, level):
    if level is None:
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", level)
    with filtered_startup_logs():
        _write_natively(NATIVE)
    assert capfd.readouterr().err == NATIVE


def test_a_failure_gets_everything_it_printed_back(monkeypatch, capfd):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    with pytest.raises(ImportError, match="no such thing"):
        with filtered_startup_logs():
            _write_natively(NATIVE)
            raise ImportError("no such thing")
    assert capfd.readouterr().err == NATIVE


def test_fd_2_is_restored(monkeypatch, capfd):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    with filtered_startup_logs():
        _write_natively(INFO)
    _write_natively(INFO)  # after the block: not filtered
    assert capfd.readouterr().err == INFO


# --- atomic writes ----------------------------------------------------------------

def _tree(folder):
    """Every entry under `folder` (hidden ones too): a file's text, a folder's None."""
    return {str(p.relative_to(folder)): p.read_text() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_atomic_directory_replaces_a_folder_and_leaves_nothing_beside_it(tmp_path):
    (tmp_path / "out" / "old.txt").parent.mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with atomic_directory(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and list(tmp.iterdir()) == []
        (tmp / "new.txt").write_text("new")
        assert _tree(tmp_path / "out") == {"old.txt": "old"}  # not yet swapped
    assert _tree(tmp_path) == {"out": None, "out/new.txt": "new"}


def test_atomic_directory_keeps_the_old_folder_when_the_writer_fails(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert _tree(tmp_path) == {"out": None, "out/old.txt": "old"}


def test_atomic_directory_removes_what_a_killed_writer_left(tmp_path):
    stale = tmp_path / ".tmp-1"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "half.txt").write_text("half")
    with atomic_directory(tmp_path / "1", stale) as tmp:
        assert tmp == stale and list(tmp.iterdir()) == []
        (tmp / "a.txt").write_text("a")
    assert _tree(tmp_path) == {"1": None, "1/a.txt": "a"}


def test_atomic_directory_without_replace_keeps_what_is_there(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "served.txt").write_text("served")
    with pytest.raises(OSError):
        with atomic_directory(tmp_path / "1", replace=False) as tmp:
            (tmp / "other.txt").write_text("other")
    assert _tree(tmp_path) == {"1": None, "1/served.txt": "served"}


def test_atomic_copy_copies_and_leaves_no_temp_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01" * 1000)
    (tmp_path / "b.bin").write_bytes(b"older")
    atomic_copy(tmp_path / "a.bin", tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]
