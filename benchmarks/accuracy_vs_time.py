"""Validation accuracy against wall time, one line per finished training run.

Reads each run's `metrics.json` (its per-epoch `history` and `wall_seconds`);
a self-training run's own teacher (`RUN/teacher/`) and rounds (`RUN/round_N/`)
come first on its time axis, since the run waited for them. Epochs are spread
evenly over a run's wall time (runs record their total, not each epoch's), so
read the curves' ends and slopes, not single points. Prints one table row per
run (final validation and test accuracy, wall seconds) and writes the figure.

Usage:
    python benchmarks/accuracy_vs_time.py RUN [RUN ...] --out FIGURE.png
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stl10_keras import flags  # noqa: E402


def stages(run: Path) -> list[Path]:
    """The runs whose time `run`'s accuracy waited for, in order, then `run`."""
    nested = [run / "teacher"] + sorted(run.glob("round_*"),
                                        key=lambda p: int(p.name.split("_")[1]))
    return [p for p in nested if (p / "metrics.json").exists()] + [run]


def curve(run: Path) -> tuple[list[float], list[float], dict]:
    """`(seconds, validation accuracy %, the run's metrics)` over its stages."""
    seconds, accuracy, start, metrics = [], [], 0.0, {}
    for stage in stages(run):
        metrics = json.loads((stage / "metrics.json").read_text())
        history, wall = metrics["history"], metrics["wall_seconds"]
        for i, row in enumerate(history, start=1):
            seconds.append(start + wall * i / len(history))
            accuracy.append(100 * row["val_accuracy"])
        start += wall
    return seconds, accuracy, metrics


def main(argv: list[str] | None = None) -> int:
    p = flags.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="finished run directories")
    p.add_argument("--out", required=True, help="the figure (PNG)")
    p.add_argument("--title", default="validation accuracy against wall time")
    args = p.parse_args(argv)
    missing = [r for r in args.runs if not (Path(r) / "metrics.json").exists()]
    if missing:
        p.error(f"{missing[0]} holds no metrics.json (a finished run's directory)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    print("| run | validation % | test % | wall s (with its teacher) |")
    print("|---|---:|---:|---:|")
    for run in map(Path, args.runs):
        seconds, accuracy, metrics = curve(run)
        label = f"{run.parent.name}/{run.name} ({metrics['variant']})"
        ax.plot(seconds, accuracy, label=label)
        print(f"| {label} | {100 * metrics['val_accuracy']:.2f} | "
              f"{100 * metrics['test_accuracy']:.2f} | {seconds[-1]:.0f} |")
    ax.set_xlabel("wall seconds (epochs spread evenly over each run)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
