"""`io_utils.filtered_startup_logs`: what native code writes to fd 2 while loading.

The reference is TF_CPP_MIN_LOG_LEVEL's documented meaning (1 hides INFO, 2 also
WARNING, 3 also ERROR), applied by hand to lines in the formats TensorFlow 2.21
prints at `import tensorflow`.
"""

import os

import pytest

from stl10_keras.io_utils import filtered_startup_logs

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
