"""Shared bits of the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The processor's model name, for the tables' machine line."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
