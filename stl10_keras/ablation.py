"""`python -m stl10_keras.ablation`: the lab's Table 1 and Figure 8.

Trains the lab's four variants (baseline, +A, +A+Kmeans1, +A+Kmeans1&2; with
`--variants all` also every training method that learns from the unlabeled
images, beyond the lab: fixmatch, freematch, self_training) with everything else
identical, N seeds each, one run directory per run:

    DIR/VARIANT_sSEED/      an ordinary training run (see `stl10_keras.train`)
    DIR/ablation.json       per variant: mean, std, per-seed accuracies, wall time;
                            the protocol
    DIR/ablation.md         Table 1 (for STL-10 beside the lab's reported numbers)
    DIR/figure8.png         Figure 8: improvement over the baseline, absolute %
    DIR/curves.png          validation accuracy per epoch of every run (convergence)
    DIR/logs/               TensorBoard HParams: one session per run

Rerunning the same command skips finished runs and resumes an interrupted one
from its last completed epoch.

The module reads as the command runs, plan -> train -> summarise -> write
(table, Figure 8, curves, HParams); at about 640 lines it is kept whole
because each output is a few small functions that only this command uses.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from stl10_keras import config as cfg
from stl10_keras import errors, flags, runtime, sources
from stl10_keras.config import Config
from stl10_keras.errors import ConfigError, UserError
from stl10_keras.io_utils import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    import_tensorflow,
)

VARIANT_LABELS = {
    "baseline": "baseline",
    "augment": "+A",
    "kmeans1": "+A+Kmeans1",
    "kmeans12": "+A+Kmeans1&2",
}
METHOD_LABELS = {"fixmatch": "FixMatch", "freematch": "FreeMatch",
                 "self_training": "self-training"}


def variant_label(variant: str) -> str:
    """The table's name of a variant: the lab's, or a method on top of its base
    (`+A+Kmeans1&2+FixMatch (beyond the lab)`)."""
    if variant in VARIANT_LABELS:
        return VARIANT_LABELS[variant]
    from stl10_keras import methods

    base = VARIANT_LABELS[methods.get(variant).base_variant]
    name = METHOD_LABELS.get(variant, variant)
    return f"{'' if base == 'baseline' else base}+{name} (beyond the lab)"
# The lab's Table 1: STL-10 validation accuracy (%), 4,000 train / 1,000 validation.
LAB_VAL_ACCURACY_PCT = {"baseline": 71.4, "augment": 80.9, "kmeans1": 83.9,
                        "kmeans12": 84.4}


def lab_reference(dataset: str) -> bool:
    """Whether the lab reported Table 1 on `dataset` (its source's `lab_reference`),
    so the table and Figure 8 show the lab's numbers beside ours. False for a
    name no source has (a summary written with a source since removed)."""
    return dataset in sources.names() and sources.get(dataset).lab_reference


# Convergence: mean validation accuracy of the last N epochs minus that of the N
# before (a run still rising shows a clearly positive value).
CONVERGENCE_WINDOW = 5
# Config fields that are meant to differ between the variants (`apply_variant`).
VARIANT_FIELDS = ("variant", "augment.enabled", "kmeans.stages",
                  "semi_supervised.method")
# train's flags that an ablation refuses: it trains every variant and seed.
REFUSED_FLAGS = {"--variant", "--seed", "--augment", "--no-augment",
                 "--semi-supervised"}


def parse_variants(text: str) -> tuple[str, ...]:
    """`--variants`: `all`, or comma-separated names; always in the table's order."""
    names = cfg.all_variants() if text.strip() == "all" else tuple(
        t.strip() for t in text.split(",") if t.strip())
    unknown = [n for n in names if n not in cfg.all_variants()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected 'all' or names from {','.join(cfg.all_variants())}, got '{text}'")
    if "baseline" not in names:
        raise argparse.ArgumentTypeError(
            "the table compares every variant with baseline; include baseline")
    return tuple(v for v in cfg.all_variants() if v in names)


def parse_variant_seeds(text: str) -> dict[str, int]:
    """`--variant-seeds fixmatch=1[,kmeans1=2]`: fewer seeds for costly variants."""
    out: dict[str, int] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, count = item.partition("=")
        name = name.strip()
        if name not in cfg.all_variants() or not count.strip().isdigit() \
                or int(count) < 1:
            raise argparse.ArgumentTypeError(
                f"expected VARIANT=N with N >= 1 and VARIANT from "
                f"{','.join(cfg.all_variants())}, e.g. fixmatch=1; got '{item}'")
        if name == "baseline":
            raise argparse.ArgumentTypeError(
                "baseline trains every seed of --seeds (each variant is compared "
                "with the baseline of its seed); leave it out")
        out[name] = int(count)
    if not out:
        raise argparse.ArgumentTypeError("expected VARIANT=N, e.g. fixmatch=1")
    return out


# --- command line ---------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from stl10_keras.cli import add_config_arguments

    parser = flags.ArgumentParser(
        prog="python -m stl10_keras.ablation",
        description="The lab's Table 1 and Figure 8: train the four variants "
                    "(baseline, augment, kmeans1, kmeans12; --variants all adds "
                    "every training method) with everything else "
                    "identical, N seeds each, and tabulate their accuracies. "
                    "Every variant of --variants and seeds 0..N-1 are trained, so "
                    "train's variant, seed and augmentation switches do not apply.",
    )
    add_config_arguments(parser)
    # Shared with train but refused here (`plan_configs` says why): kept so the
    # refusal is a sentence rather than argparse's "unrecognized arguments".
    for action in parser._actions:
        if set(action.option_strings) & REFUSED_FLAGS:
            action.help = argparse.SUPPRESS
    g = parser.add_argument_group("ablation")
    g.add_argument("--variants", type=parse_variants, default=cfg.VARIANTS,
                   help="the table's columns: comma-separated, or all (the lab's "
                        "four + every training method); default the lab's four")
    g.add_argument("--seeds", type=int, default=3,
                   help="seeds per variant: 0..N-1 (default 3)")
    g.add_argument("--variant-seeds", type=parse_variant_seeds, default={},
                   metavar="VARIANT=N[,...]",
                   help="fewer seeds (0..N-1) for the named variants, e.g. "
                        "fixmatch=1 for a costly one; N <= --seeds")
    g.add_argument("--run-dir", default=None,
                   help="ablation directory (default runs/ablation_DATASET[_PRESET])")
    g.add_argument("--verbose", type=int, choices=(0, 1, 2), default=2,
                   help="keras progress: 0 silent, 1 progress bar, 2 one line/epoch "
                        "(default)")
    return parser


def plan_configs(args: argparse.Namespace) -> dict[tuple[str, int], Config]:
    """The ablation's runs: `{(variant, seed): Config}`, all validated.

    Raises:
        ConfigError: a flag does not apply to an ablation or a value is invalid.
    """
    if args.variant is not None:
        raise ConfigError(
            f"--variant {args.variant} does not apply to an ablation, which trains "
            "every variant of --variants; drop it (or use python -m "
            "stl10_keras.train)."
        )
    if args.seed is not None:
        raise ConfigError(
            "--seed does not apply to an ablation; use --seeds N to train seeds "
            "0..N-1 of each variant."
        )
    if args.augment is not None:
        raise ConfigError(
            "--augment/--no-augment do not apply to an ablation: the variant decides "
            "augmentation (off for baseline, on for the others); drop the flag."
        )
    if args.semi_supervised is not None:
        raise ConfigError(
            "--semi-supervised does not apply to an ablation: the variant decides it "
            "(fixmatch for --variants all); drop the flag.")
    if args.seeds < 1:
        raise ConfigError("--seeds must be at least 1.")
    variant_seeds = getattr(args, "variant_seeds", {}) or {}
    for variant, count in variant_seeds.items():
        if variant not in args.variants:
            raise ConfigError(f"--variant-seeds names {variant}, which is not in "
                              "--variants; add it there or drop it here.")
        if count > args.seeds:
            raise ConfigError(f"--variant-seeds {variant}={count} asks for more "
                              f"seeds than --seeds {args.seeds}; lower it or raise "
                              "--seeds.")
    from stl10_keras.cli import config_from_args

    # Resolve the flags on the baseline, which any valid model can train; each
    # variant is then checked on its own, so an error names the variant.
    base_args = argparse.Namespace(**vars(args))
    base_args.variant = "baseline"
    base = config_from_args(base_args)
    plan = {}
    for seed in range(args.seeds):
        for variant in args.variants:
            if seed >= variant_seeds.get(variant, args.seeds):
                continue
            config = Config.from_dict(base.to_dict())
            config.variant = variant
            config.train.seed = seed
            cfg.apply_variant(config)
            stages = config.kmeans.stages
            if stages and max(stages) > len(config.model.widths):
                raise ConfigError(
                    f"variant {variant} initialises stage(s) {list(stages)} with "
                    f"k-means, so the model needs at least {max(stages)} stages; "
                    "give --widths more entries."
                )
            try:
                cfg.validate(config)
            except ConfigError as e:
                raise ConfigError(f"variant {variant}: {e}") from None
            plan[(variant, seed)] = config
    return plan


def default_ablation_dir(config: Config) -> Path:
    suffix = "" if config.preset == "default" else f"_{config.preset}"
    return Path("runs") / f"ablation_{config.data.dataset}{suffix}"


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_s{seed}"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def differing_fields(configs: Sequence[Config]) -> list[str]:
    """Config fields (dotted names) whose value is not the same in all `configs`."""
    flat = [_flatten(c.to_dict()) for c in configs]
    return sorted(k for k in flat[0] if any(f[k] != flat[0][k] for f in flat[1:]))


def _read_run_file(path: Path) -> Any:
    """A run's config.json or metrics.json; unreadable, a `ConfigError` naming the fix."""
    from stl10_keras.train import read_run_json

    return read_run_json(path, fix=f"delete {path.parent} to train that run again")


def check_existing_runs(
    plan: dict[tuple[str, int], Config], ablation_dir: Path
) -> None:
    """Refuse a directory whose runs were made with another config.

    `train` refuses such a run dir too, but only when it reaches that run and
    without naming the field; this check runs before anything trains (a rerun
    with, say, other `--epochs`) and names the differing fields.
    """
    import json

    for (variant, seed), config in plan.items():
        path = ablation_dir / run_name(variant, seed) / "config.json"
        if not path.exists():
            continue
        old = _flatten(cfg.with_later_sections(_read_run_file(path), config))
        new = _flatten(json.loads(config.to_json()))
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:3])
            raise ConfigError(
                f"{path.parent} was trained with another config ({shown}); pass "
                "another --run-dir, or delete that directory to train it again."
            )


# --- statistics -----------------------------------------------------------------

def _stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof=1; None for one value), values."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "per_seed": list(values)}


def summarize(
    metrics: dict[tuple[str, int], dict], plan: dict[tuple[str, int], Config],
    ablation_dir: Path,
) -> dict[str, Any]:
    """The content of `ablation.json` from every run's metrics."""
    seeds = sorted({seed for _, seed in plan})
    first = plan[("baseline", seeds[0])]
    data = metrics[("baseline", seeds[0])]["data"]
    differ = differing_fields(list(plan.values()))
    unexpected = [f for f in differ if f not in VARIANT_FIELDS + ("train.seed",)]
    if unexpected:  # plan_configs builds every run from one base config
        raise AssertionError(f"variants differ in more than the variant: {unexpected}")
    base = first.to_dict()
    base.pop("variant")
    base["train"].pop("seed")
    base["augment"].pop("enabled")
    base["kmeans"].pop("stages")
    base["semi_supervised"].pop("method")
    order = [v for v in cfg.all_variants() if (v, seeds[0]) in plan]
    protocol = {
        "dataset": first.data.dataset,
        "data_source": data.get("source"),
        "splits": {k: data.get(k)
                   for k in ("train", "validation", "test", "unlabeled")},
        "preset": first.preset,
        "epochs": first.train.epochs,
        "seeds": seeds,
        "seeds_per_variant": {v: len(_variant_seeds(plan, v)) for v in order},
        "metric": "accuracy of the final model on the held-out validation split "
                  "(the lab's Table 1 metric) and on the test split",
        "std": "sample standard deviation over seeds (ddof=1); null for one seed",
        "seed_controls": "the train/validation split, weight init, augmentation "
                         "and k-means",
        "variants": order,  # the table's order (JSON keys are sorted)
        "differs_between_variants": list(VARIANT_FIELDS),
        "identical_config": base,
        "wall_seconds": "per run, from its metrics.json: data, k-means, training, "
                        "evaluation; a resumed run counts only its last session",
    }
    variants: dict[str, Any] = {}
    baseline_val = {s: metrics[("baseline", s)]["val_accuracy"] for s in seeds}
    for variant in order:
        vseeds = _variant_seeds(plan, variant)
        runs = [metrics[(variant, s)] for s in vseeds]
        val = [m["val_accuracy"] for m in runs]
        walls = [m["wall_seconds"] for m in runs]
        entry = {
            "label": variant_label(variant),
            "seeds": vseeds,
            "run_dirs": [str(ablation_dir / run_name(variant, s)) for s in vseeds],
            "val_accuracy": _stats(val),
            "test_accuracy": _stats([m["test_accuracy"] for m in runs]),
            "improvement_over_baseline_pct": _stats(
                [100.0 * (v - baseline_val[s]) for v, s in zip(val, vseeds)]),
            "wall_seconds": {**_stats(walls), "total": sum(walls)},
            "val_curves": [[h["val_accuracy"] for h in m.get("history", [])
                            if "val_accuracy" in h] for m in runs],
        }
        window = min(CONVERGENCE_WINDOW, len(entry["val_curves"][0]) // 2)
        if window:
            entry["late_change_pp"] = _stats([late_change_pp(c, window)
                                              for c in entry["val_curves"]])
            entry["late_change_pp"]["window"] = window
        if lab_reference(first.data.dataset):  # None: beyond the lab
            entry["lab_val_accuracy_pct"] = LAB_VAL_ACCURACY_PCT.get(variant)
        variants[variant] = entry
    return {"protocol": protocol, "variants": variants,
            "total_wall_seconds": sum(v["wall_seconds"]["total"]
                                      for v in variants.values())}


def _variant_seeds(plan: dict[tuple[str, int], Config], variant: str) -> list[int]:
    return sorted(s for v, s in plan if v == variant)


def late_change_pp(curve: Sequence[float], window: int) -> float:
    """Mean of the last `window` values minus the mean of the `window` before, in
    percentage points (accuracy still rising at the end: clearly positive)."""
    last, before = curve[-window:], curve[-2 * window:-window]
    return 100.0 * (sum(last) / len(last) - sum(before) / len(before))


# --- outputs --------------------------------------------------------------------

def _pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100.0 * x:.{digits}f}"


def _mean_std(stats: dict) -> str:
    """`mean ± std` in percent; the mean alone for one seed."""
    if stats["std"] is None:
        return _pct(stats["mean"])
    return f"{_pct(stats['mean'])} ± {_pct(stats['std'])}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _seed_range(n: int) -> str:
    return "seed 0" if n == 1 else f"seeds 0–{n - 1}"


def protocol_sentence(summary: dict) -> str:
    p = summary["protocol"]
    s = p["splits"]
    seeds = p["seeds"]
    seed_text = (f"seed {seeds[0]}" if len(seeds) == 1
                 else f"seeds {seeds[0]}–{seeds[-1]} ({len(seeds)} per variant)")
    fewer = {v: n for v, n in p.get("seeds_per_variant", {}).items()
             if n < len(seeds)}
    if fewer:
        seed_text += " except " + ", ".join(
            f"{v} ({_seed_range(n)})" for v, n in fewer.items())
    widths = ",".join(str(w) for w in p["identical_config"]["model"]["widths"])
    return (f"Protocol: dataset {p['dataset']} ({p['data_source']}); trained on "
            f"{s['train']:,} labeled images, validation accuracy on "
            f"{s['validation']:,} "
            f"held out of the labeled set (split by seed), test accuracy on "
            f"{s['test']:,} test images; preset {p['preset']}, "
            f"{_plural(p['epochs'], 'epoch')}, "
            f"widths {widths}, {seed_text}; the variants differ only in "
            "augmentation and k-means initialisation"
            + (" (and the methods beyond the lab in training on the unlabeled "
               "images too, docs/semi-supervised.md)."
               if set(p["variants"]) - set(cfg.VARIANTS) else "."))


def render_markdown(summary: dict) -> str:
    """`ablation.md`: the protocol, then Table 1."""
    p = summary["protocol"]
    with_lab = lab_reference(p["dataset"])
    n = len(p["seeds"])
    lines = [f"# Ablation (the lab's Table 1) on {p['dataset']}", "",
             protocol_sentence(summary), ""]
    if with_lab:
        lines += [
            "The lab's column is its reported validation accuracy on a 4,000 / 1,000 "
            "split of STL-10's 5,000 labeled images, which is what our validation "
            "column measures. Published STL-10 results instead use 10 folds of "
            "1,000 labeled images and the 8,000-image test set: our test column "
            "uses that test set but trains on 4,000 images, so neither column "
            "compares with published STL-10 numbers.", ""]
    header = ["variant"]
    if with_lab:
        header.append("lab val %")
    header += ["val % (mean ± std)", "val % per seed", "test % (mean ± std)",
               "test % per seed", "val vs baseline (pp)", "wall s per run (mean)"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for variant, v in summary["variants"].items():
        val, test, imp = (v["val_accuracy"], v["test_accuracy"],
                          v["improvement_over_baseline_pct"])
        row = [f"{v['label']} (`{variant}`)"]
        if with_lab:
            lab = v["lab_val_accuracy_pct"]
            row.append("–" if lab is None else f"{lab:.1f}")
        row += [
            _mean_std(val),
            ", ".join(_pct(x) for x in val["per_seed"]),
            _mean_std(test),
            ", ".join(_pct(x) for x in test["per_seed"]),
            "–" if variant == "baseline" else (
                f"{imp['mean']:+.2f}" + ("" if imp["std"] is None
                                          else f" ± {imp['std']:.2f}")),
            f"{v['wall_seconds']['mean']:.1f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"± is the sample standard deviation over "
        + (f"the {_plural(n, 'seed')}" if len(set(
            p.get("seeds_per_variant", {}).values()) | {n}) == 1
           else "each variant's seeds")
        + " (none for one seed); "
        "\"vs baseline\" is the mean over seeds of the variant's validation "
        "accuracy minus the baseline's with the same seed (same split), in "
        "percentage points. Total wall time of the runs: "
        f"{summary['total_wall_seconds']:.0f} s.",
        "",
    ]
    late = [(v["label"], v["late_change_pp"]) for v in summary["variants"].values()
            if "late_change_pp" in v]
    if late:
        w = late[0][1]["window"]
        lines += [
            f"Convergence: mean validation accuracy of the last {w} epochs minus "
            f"that of the {w} before, percentage points (per seed): "
            + "; ".join(f"{label} " + ", ".join(f"{x:+.2f}" for x in c["per_seed"])
                        for label, c in late)
            + ". The curves are in curves.png.",
            "",
        ]
    return "\n".join(lines)


def save_figure8(summary: dict, path: Path) -> None:
    """Figure 8: each variant's validation accuracy gain over the baseline (pp)."""
    import numpy as np
    from matplotlib.figure import Figure

    from stl10_keras.visualize import figure_to_array, save_png

    p = summary["protocol"]
    variants = [v for v in p["variants"] if v != "baseline"]
    entries = [summary["variants"][v] for v in variants]
    means = [e["improvement_over_baseline_pct"]["mean"] for e in entries]
    stds = [e["improvement_over_baseline_pct"]["std"] for e in entries]
    with_lab = lab_reference(p["dataset"])
    x = np.arange(len(variants))
    width = 0.38 if with_lab else 0.6
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    offset = -width / 2 if with_lab else 0.0
    has_std = all(s is not None for s in stds)
    ax.bar(x + offset, means, width, yerr=stds if has_std else None, capsize=5,
           color="#4477aa",
           label=f"ours ({p['dataset']}, mean over seeds)")
    for i, e in enumerate(entries):
        per_seed = e["improvement_over_baseline_pct"]["per_seed"]
        ax.plot([x[i] + offset] * len(per_seed), per_seed, "o", ms=4, color="black",
                zorder=3, label="single seeds" if i == 0 else None)
    if with_lab:
        lab = [(i, LAB_VAL_ACCURACY_PCT[v] - LAB_VAL_ACCURACY_PCT["baseline"])
               for i, v in enumerate(variants) if v in LAB_VAL_ACCURACY_PCT]
        ax.bar([x[i] + width / 2 for i, _ in lab], [d for _, d in lab], width,
               color="#cc6677", label="lab (STL-10)")
    ax.axhline(0.0, color="gray", lw=0.8)
    # Beyond the lab's table: its bar is hatched and its label says so.
    for i, v in enumerate(variants):
        if v not in LAB_VAL_ACCURACY_PCT:
            ax.patches[i].set_hatch("//")
    ax.set_xticks(x, [variant_label(v).replace(" (beyond", "\n(beyond")
                      for v in variants], fontsize=8)
    ax.set_ylabel("validation accuracy over baseline (pp)")
    bars = "error bars: std over seeds" if has_std else "one seed: no error bars"
    ax.set_title(f"Figure 8: improvement over the baseline\n{p['dataset']}, "
                 f"{p['preset']} preset, {_plural(p['epochs'], 'epoch')}; {bars}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    save_png(figure_to_array(fig), str(path))


def save_curves(summary: dict, path: Path) -> None:
    """Validation accuracy per epoch: one panel per variant, one line per seed."""
    from matplotlib.figure import Figure

    from stl10_keras.visualize import figure_to_array, save_png

    p = summary["protocol"]
    entries = [summary["variants"][v] for v in p["variants"]]
    fig = Figure(figsize=(2.5 * len(entries) + 0.5, 3.2), dpi=100)
    axes = fig.subplots(1, len(entries), sharey=True, squeeze=False)[0]
    lows = [min(c) for e in entries for c in e["val_curves"] if c]
    for ax, e in zip(axes, entries):
        for seed, curve in zip(e.get("seeds", p["seeds"]), e["val_curves"]):
            ax.plot(range(1, len(curve) + 1), [100.0 * x for x in curve], lw=1.2,
                    label=f"seed {seed}")
        ax.set_title(e["label"].replace(" (beyond", "\n(beyond"), fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    if lows:
        axes[0].set_ylim(max(0.0, 100.0 * min(lows) - 2.0), None)
    axes[0].legend(fontsize=8, loc="lower right")  # baseline: every seed
    fig.suptitle(f"Validation accuracy per epoch: {p['dataset']}, {p['preset']} "
                 f"preset, {p['splits']['train']:,} training images", fontsize=10)
    fig.tight_layout()
    save_png(figure_to_array(fig), str(path))


def write_hparams(ablation_dir: Path, name: str, config: Config,
                  metrics: dict) -> None:
    """One TensorBoard HParams session per run, at DIR/logs/NAME (atomic)."""
    tf = import_tensorflow()
    from tensorboard.plugins.hparams import api as hp

    logs = ablation_dir / "logs"
    if not any(logs.glob("events.out.tfevents.*")):
        writer = tf.summary.create_file_writer(str(logs))
        with writer.as_default():
            hp.hparams_config(
                hparams=[
                    hp.HParam("variant", hp.Discrete(list(cfg.all_variants()))),
                    hp.HParam("seed"),
                    hp.HParam("augment", hp.Discrete([False, True])),
                    hp.HParam("kmeans_stages", hp.Discrete(["none", "1", "1,2"])),
                    hp.HParam("epochs"),
                ],
                metrics=[
                    hp.Metric("val_accuracy", display_name="validation accuracy"),
                    hp.Metric("test_accuracy", display_name="test accuracy"),
                    hp.Metric("wall_seconds", display_name="wall time (s)"),
                ],
            )
        writer.close()
    stages = ",".join(str(s) for s in config.kmeans.stages) or "none"
    with atomic_directory(logs / name, temp=logs / f".tmp-{name}") as tmp:
        writer = tf.summary.create_file_writer(str(tmp))
        with writer.as_default():
            hp.hparams({"variant": config.variant, "seed": config.train.seed,
                        "augment": config.augment.enabled, "kmeans_stages": stages,
                        "epochs": config.train.epochs}, trial_id=name)
            step = config.train.epochs
            for key in ("val_accuracy", "test_accuracy", "wall_seconds"):
                tf.summary.scalar(key, metrics[key], step=step)
        writer.close()


def _hparams_current(ablation_dir: Path, name: str, run_dir: Path) -> bool:
    """True when DIR/logs/NAME was written after the run's metrics.json."""
    events = list((ablation_dir / "logs" / name).glob("events.out.tfevents.*"))
    return bool(events) and min(e.stat().st_mtime for e in events) >= \
        (run_dir / "metrics.json").stat().st_mtime


# --- the ablation ---------------------------------------------------------------

def run_ablation(
    plan: dict[tuple[str, int], Config], ablation_dir: str | os.PathLike,
    verbose: int = 2, log=print,
) -> dict[str, Any]:
    """Train (or skip, or resume) every planned run, then write the outputs.

    Args:
        plan: `{(variant, seed): Config}` from `plan_configs`.
        ablation_dir: the ablation directory; runs go to `DIR/VARIANT_sSEED`.
        verbose: keras verbosity of each run.
        log: where progress lines go.

    Returns:
        The summary also written to `DIR/ablation.json`.
    """
    ablation_dir = Path(ablation_dir)
    check_existing_runs(plan, ablation_dir)
    seeds = sorted({seed for _, seed in plan})
    total = len(plan)
    metrics: dict[tuple[str, int], dict] = {}
    index = 0
    order = [v for v in cfg.all_variants() if (v, seeds[0]) in plan]
    announced = False  # the device line, once for the whole ablation
    for seed in seeds:
        splits = None  # loaded once per seed, only if a run needs training
        for variant in order:
            if (variant, seed) not in plan:  # --variant-seeds: fewer seeds
                continue
            index += 1
            config = plan[(variant, seed)]
            name = run_name(variant, seed)
            run_dir = ablation_dir / name
            prefix = (f"[{index}/{total}] {variant_label(variant)} ({variant}), "
                      f"seed {seed}")
            if (run_dir / "metrics.json").exists():
                log(f"{prefix}: skipped (finished)")
                metrics[(variant, seed)] = _read_run_file(run_dir / "metrics.json")
            else:
                resuming = (run_dir / "config.json").exists()
                log(f"{prefix}: {'resuming' if resuming else 'training'} -> {run_dir}")
                if splits is None:
                    from stl10_keras import data as data_lib

                    splits = data_lib.load_splits_for(config, seed)
                keras = runtime.load_keras()

                from stl10_keras.train import train

                if not announced:  # a status line, like the ones around it
                    log(f"training on {runtime.device_summary()}")
                    announced = True
                keras.backend.clear_session()  # free the previous run's graphs
                t0 = time.perf_counter()
                m = train(config, run_dir, export_dir=None, verbose=verbose,
                          splits=splits, device_line=False)
                metrics[(variant, seed)] = m
                log(f"{prefix}: validation {_pct(m['val_accuracy'])} %, test "
                    f"{_pct(m['test_accuracy'])} % ({time.perf_counter() - t0:.0f} s)")
            if not _hparams_current(ablation_dir, name, run_dir):
                write_hparams(ablation_dir, name, config, metrics[(variant, seed)])

    summary = summarize(metrics, plan, ablation_dir)
    atomic_write_json(ablation_dir / "ablation.json", summary)
    atomic_write_text(ablation_dir / "ablation.md", render_markdown(summary))
    save_figure8(summary, ablation_dir / "figure8.png")
    save_curves(summary, ablation_dir / "curves.png")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    runtime.start()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = plan_configs(args)
        first = next(iter(plan.values()))
        ablation_dir = Path(args.run_dir) if args.run_dir else \
            default_ablation_dir(first)
        check_output_dir(ablation_dir, "--run-dir")
        fewer = "".join(f", {v} {_plural(n, 'seed')}"
                        for v, n in args.variant_seeds.items())
        print(f"ablation of {len(args.variants)} variants x "
              f"{_plural(args.seeds, 'seed')}{fewer} on {first.data.dataset} "
              f"({first.preset} "
              f"preset, {_plural(first.train.epochs, 'epoch')}) in {ablation_dir}")
        summary = run_ablation(plan, ablation_dir, verbose=args.verbose)
    except UserError as e:
        return errors.report(e)
    except KeyboardInterrupt:
        print("\nInterrupted. Rerun the same command to resume: finished runs are "
              "skipped and the interrupted one continues from its last completed "
              "epoch.", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    print()
    print(render_markdown(summary))
    print(f"wrote {ablation_dir / 'ablation.json'}, {ablation_dir / 'ablation.md'}, "
          f"{ablation_dir / 'figure8.png'}; tensorboard --logdir {ablation_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
