"""`python -m stl10_keras.ablation`: Table 1 and Figure 8.

One smoke ablation on digits (4 runs, 1 seed, 1 epoch) is shared by the
end-to-end tests: it is killed with SIGKILL after its second run, resumed, and
then rerun; the other tests read its files.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, subprocess_env
from stl10_keras import ablation
from stl10_keras.config import VARIANTS

SMOKE = ["--dataset", "digits", "--preset", "smoke", "--seeds", "1", "--epochs", "1"]


def _cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "stl10_keras.ablation", *args], cwd=ROOT,
        env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
    )


def _mtimes(folder):
    return {v: os.stat(folder / f"{v}_s0" / "metrics.json").st_mtime_ns
            for v in VARIANTS if (folder / f"{v}_s0" / "metrics.json").exists()}


def _flatten(d, prefix=""):
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A smoke ablation killed after two finished runs, then resumed."""
    folder = tmp_path_factory.mktemp("ablation") / "abl"
    args = [*SMOKE, "--run-dir", str(folder), "--verbose", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "stl10_keras.ablation", *args],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    second = folder / "augment_s0" / "metrics.json"
    deadline = time.time() + 400
    try:
        while not second.exists():
            if proc.poll() is not None:
                pytest.fail(f"the ablation ended (exit {proc.returncode}) before it "
                            "could be interrupted")
            if time.time() > deadline:
                pytest.fail("the ablation made no progress")
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a hard crash: no cleanup
        proc.wait()
    killed = {"finished": _mtimes(folder),
              "ablation_json": (folder / "ablation.json").exists()}
    resumed = _cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"dir": folder, "args": args, "killed": killed, "resumed": resumed}


# --- end to end -----------------------------------------------------------------

@pytest.mark.e2e
def test_interrupted_ablation_trains_only_the_missing_runs(smoke):
    killed, out = smoke["killed"], smoke["resumed"].stdout
    assert set(killed["finished"]) >= {"baseline", "augment"}
    assert not killed["ablation_json"]
    # The runs finished before the kill were not touched by the resume ...
    now = _mtimes(smoke["dir"])
    for variant, mtime in killed["finished"].items():
        assert now[variant] == mtime
        assert re.search(rf"\({variant}\), seed 0: skipped \(finished\)", out)
    # ... and the missing ones were trained (the interrupted one resumed).
    missing = [v for v in VARIANTS if v not in killed["finished"]]
    assert missing and set(now) == set(VARIANTS)
    # One device line for the ablation, not one per run; no retracing warnings.
    assert out.count("training on ") == 1, out
    assert "retracing" not in smoke["resumed"].stderr, smoke["resumed"].stderr
    for variant in missing:
        assert re.search(rf"\({variant}\), seed 0: (training|resuming) ->", out)
        assert not (smoke["dir"] / f"{variant}_s0" / "backup").exists()


@pytest.mark.e2e
def test_table_json_and_figure_hold_each_runs_numbers(smoke):
    folder = smoke["dir"]
    summary = json.loads((folder / "ablation.json").read_text())
    table = (folder / "ablation.md").read_text()
    assert set(summary["variants"]) == set(VARIANTS)
    assert summary["protocol"]["variants"] == list(VARIANTS)
    rows = {line.split("`")[1]: line for line in table.splitlines()
            if line.startswith("| ") and "`" in line}
    assert set(rows) == set(VARIANTS)
    runs = {}
    for variant in VARIANTS:
        with open(folder / f"{variant}_s0" / "metrics.json") as f:
            runs[variant] = json.load(f)
        with open(folder / f"{variant}_s0" / "config.json") as f:
            config = json.load(f)
        assert config["variant"] == variant and config["train"]["epochs"] == 1
        assert config["model"]["widths"] == [8, 16, 16, 32, 32]  # the smoke preset
        entry, m = summary["variants"][variant], runs[variant]
        assert entry["val_accuracy"]["per_seed"] == [m["val_accuracy"]]
        assert entry["test_accuracy"]["per_seed"] == [m["test_accuracy"]]
        assert entry["val_accuracy"]["mean"] == m["val_accuracy"]
        assert entry["val_accuracy"]["std"] is None  # one seed
        assert entry["wall_seconds"]["per_seed"] == [m["wall_seconds"]]
        cells = [c.strip() for c in rows[variant].strip("|").split("|")]
        assert f"{100 * m['val_accuracy']:.2f}" in cells
        assert f"{100 * m['test_accuracy']:.2f}" in cells
    for variant in VARIANTS[1:]:
        gain = 100 * (runs[variant]["val_accuracy"] - runs["baseline"]["val_accuracy"])
        assert summary["variants"][variant]["improvement_over_baseline_pct"]["mean"] \
            == pytest.approx(gain, abs=1e-9)
        assert f"{gain:+.2f}" in rows[variant]
    # Only the variant's own fields differ between the runs' configs.
    configs = [json.loads((folder / f"{v}_s0" / "config.json").read_text())
               for v in VARIANTS]
    flat = [_flatten(c) for c in configs]
    differ = {k for k in flat[0] if any(f[k] != flat[0][k] for f in flat)}
    assert differ == {"variant", "augment.enabled", "kmeans.stages"}
    # The protocol is stated: dataset, splits, epochs, seeds, preset.
    p = summary["protocol"]
    assert (p["dataset"], p["preset"], p["epochs"], p["seeds"]) == \
        ("digits", "smoke", 1, [0])
    assert p["splits"] == {"train": 400, "validation": 200, "test": 300,
                           "unlabeled": 897}
    assert "Protocol: dataset digits" in table and "preset smoke, 1 epoch," in table
    assert "400 labeled images" in table and "seed 0" in table
    assert "lab val" not in table  # no lab column beside digits
    import matplotlib.image

    figure = matplotlib.image.imread(folder / "figure8.png")
    assert figure.ndim == 3 and figure.shape[0] > 200 and figure.std() > 0


@pytest.mark.e2e
def test_hparams_summaries_are_readable_with_the_variant(smoke):
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )
    from tensorboard.plugins.hparams import metadata

    logs = smoke["dir"] / "logs"
    events = EventAccumulator(str(logs), size_guidance={"tensors": 0})
    events.Reload()
    experiment = metadata.parse_experiment_plugin_data(
        events.SummaryMetadata(metadata.EXPERIMENT_TAG).plugin_data.content)
    assert "variant" in {h.name for h in experiment.hparam_infos}
    assert {m.name.tag for m in experiment.metric_infos} >= {"val_accuracy",
                                                             "test_accuracy"}
    for variant in VARIANTS:
        run = EventAccumulator(str(logs / f"{variant}_s0"),
                               size_guidance={"tensors": 0})
        run.Reload()
        info = metadata.parse_session_start_info_plugin_data(
            run.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content)
        assert info.hparams["variant"].string_value == variant
        assert info.hparams["seed"].number_value == 0
        metrics = json.loads((smoke["dir"] / f"{variant}_s0" / "metrics.json")
                             .read_text())
        for key in ("val_accuracy", "test_accuracy"):
            (event,) = run.Tensors(key)
            assert float(tf.make_ndarray(event.tensor_proto)) == \
                pytest.approx(metrics[key], abs=1e-6)


@pytest.mark.e2e
def test_rerun_is_a_no_op(smoke):
    folder = smoke["dir"]
    before = _mtimes(folder)
    outputs = {n: (folder / n).read_bytes()
               for n in ("ablation.json", "ablation.md", "figure8.png")}
    hparams = sorted(str(p) for p in (folder / "logs").rglob("events.out.*"))
    again = _cli(*smoke["args"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped (finished)") == 4
    assert "training ->" not in again.stdout and "resuming" not in again.stdout
    assert _mtimes(folder) == before
    assert sorted(str(p) for p in (folder / "logs").rglob("events.out.*")) == hparams
    for name, content in outputs.items():
        assert (folder / name).read_bytes() == content, name


@pytest.mark.e2e
def test_a_changed_config_in_the_same_dir_is_refused(smoke, capsys):
    before = _mtimes(smoke["dir"])
    code = ablation.main([*SMOKE[:-1], "2", "--run-dir", str(smoke["dir"])])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "train.epochs 1 -> 2" in err
    assert _mtimes(smoke["dir"]) == before


# --- command line ---------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--variant", "augment"], "--variant augment does not apply"),
    (["--seed", "3"], "--seeds N"),
    (["--no-augment"], "the variant decides augmentation"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--widths", "8", "--convs-per-stage", "1"],
     "variant kmeans12 initialises stage(s) [1, 2]"),
])
def test_bad_flags_say_one_sentence_and_exit_2(flags, needle, tmp_path, capsys):
    code = ablation.main(["--dataset", "digits", *flags, "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and needle in err
    assert err.count("\n") == 1 and not any(tmp_path.iterdir())


def test_help_lists_no_flag_that_the_ablation_refuses():
    # --variant, --seed and --augment/--no-augment are train's flags, refused
    # here; --help used to list them as ordinary flags.
    proc = _cli("--help")
    assert proc.returncode == 0
    listed = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", proc.stdout))
    assert not listed & {"--variant", "--seed", "--augment", "--no-augment"}
    assert {"--seeds", "--augment-on", "--epochs", "--run-dir"} <= listed


def test_a_run_dir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    assert ablation.main([*SMOKE, "--run-dir", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --run-dir {mine} is a file, not a directory; pass "
                   "another --run-dir.\n")
    assert mine.read_text() == "mine"


def test_bad_flag_from_the_command_line_has_no_traceback(tmp_path):
    proc = _cli("--dataset", "digits", "--variant", "baseline", "--run-dir",
                str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("broken", ["config.json", "metrics.json"])
def test_a_corrupted_run_file_is_one_sentence(broken, tmp_path, capsys):
    # Was a JSONDecodeError traceback. baseline_s0 is the first run, so the
    # error comes before anything trains.
    plan = ablation.plan_configs(ablation.build_parser().parse_args(SMOKE))
    run = tmp_path / "baseline_s0"
    run.mkdir()
    (run / "config.json").write_text(plan[("baseline", 0)].to_json())
    (run / "metrics.json").write_text('{"val_accuracy": 0.')  # cut short
    (run / broken).write_text('{"val_accuracy": 0.')
    code = ablation.main([*SMOKE, "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert f"{run / broken} cannot be read" in err and f"delete {run}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline_s0"]


def test_ctrl_c_says_a_rerun_resumes(monkeypatch, tmp_path, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablation, "run_ablation", interrupted)
    code = ablation.main([*SMOKE, "--run-dir", str(tmp_path)])
    assert code == 130 and "Rerun the same command to resume" in capsys.readouterr().err


# --- summary, table and figure without training ---------------------------------

def test_stl10_table_has_the_labs_column_and_honest_statistics(tmp_path):
    args = ablation.build_parser().parse_args(["--dataset", "stl10", "--seeds", "3",
                                               "--epochs", "30"])
    plan = ablation.plan_configs(args)
    rng = np.random.default_rng(0)
    data = {"dataset": "stl10", "source": "test", "image_shape": [96, 96, 3],
            "train": 4000, "validation": 1000, "test": 8000, "unlabeled": 100000}
    metrics = {key: {"val_accuracy": float(rng.integers(600, 900)) / 1000,
                     "test_accuracy": float(rng.integers(4800, 7200)) / 8000,
                     "wall_seconds": float(rng.uniform(100, 200)), "data": data}
               for key in plan}
    summary = ablation.summarize(metrics, plan, tmp_path)
    for variant in VARIANTS:
        val = np.array([metrics[(variant, s)]["val_accuracy"] for s in range(3)])
        base = np.array([metrics[("baseline", s)]["val_accuracy"] for s in range(3)])
        entry = summary["variants"][variant]
        assert entry["val_accuracy"]["mean"] == pytest.approx(val.mean())
        assert entry["val_accuracy"]["std"] == pytest.approx(val.std(ddof=1))
        gain = entry["improvement_over_baseline_pct"]
        assert gain["std"] == pytest.approx((100 * (val - base)).std(ddof=1))
    table = ablation.render_markdown(summary)
    header = next(line for line in table.splitlines() if line.startswith("| variant"))
    assert header.split("|")[2].strip() == "lab val %"
    for variant, lab in zip(VARIANTS, ("71.4", "80.9", "83.9", "84.4")):
        row = next(line for line in table.splitlines() if f"`{variant}`" in line)
        assert row.split("|")[2].strip() == lab
    assert "4,000 labeled images" in table and "1,000 held out" in table
    assert "8,000 test images" in table and "10 folds" in table
    assert "30 epochs" in table and "seeds 0–2 (3 per variant)" in table
    ablation.save_figure8(summary, tmp_path / "figure8.png")
    assert (tmp_path / "figure8.png").stat().st_size > 5000


def test_variants_all_adds_fixmatch_beyond_the_labs_table(tmp_path):
    from stl10_keras.config import ALL_VARIANTS

    args = ablation.build_parser().parse_args(["--dataset", "stl10", "--seeds", "2",
                                               "--variants", "all"])
    plan = ablation.plan_configs(args)
    assert sorted({v for v, _ in plan}) == sorted(ALL_VARIANTS)
    fixmatch = plan[("fixmatch", 0)]
    assert fixmatch.semi_supervised.method == "fixmatch"
    assert fixmatch.kmeans.stages == (1, 2) and fixmatch.augment.enabled
    assert all(plan[(v, 0)].semi_supervised.method == "none" for v in VARIANTS)
    rng = np.random.default_rng(1)
    data = {"dataset": "stl10", "source": "test", "image_shape": [96, 96, 3],
            "train": 4000, "validation": 1000, "test": 8000, "unlabeled": 100000}
    metrics = {key: {"val_accuracy": float(rng.integers(600, 900)) / 1000,
                     "test_accuracy": float(rng.integers(4800, 7200)) / 8000,
                     "wall_seconds": 1.0, "data": data} for key in plan}
    summary = ablation.summarize(metrics, plan, tmp_path)
    assert summary["protocol"]["variants"] == list(ALL_VARIANTS)
    entry = summary["variants"]["fixmatch"]
    assert entry["lab_val_accuracy_pct"] is None
    gains = [100 * (metrics[("fixmatch", s)]["val_accuracy"]
                    - metrics[("baseline", s)]["val_accuracy"]) for s in (0, 1)]
    assert entry["improvement_over_baseline_pct"]["per_seed"] == pytest.approx(gains)
    table = ablation.render_markdown(summary)
    row = next(line for line in table.splitlines() if "`fixmatch`" in line)
    assert "beyond the lab" in row and row.split("|")[2].strip() == "–"
    assert "training on the unlabeled images too" in table
    ablation.save_figure8(summary, tmp_path / "figure8.png")
    assert (tmp_path / "figure8.png").stat().st_size > 5000


@pytest.mark.parametrize("flags, needle", [
    (["--variants", "augment,kmeans1"], "include baseline"),
    (["--variants", "mixmatch"], "expected 'all' or names"),
])
def test_bad_variants_are_one_argparse_line(flags, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ablation.main(["--dataset", "digits", *flags, "--run-dir", str(tmp_path)])
    assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_semi_supervised_flag_does_not_apply_to_an_ablation(tmp_path, capsys):
    code = ablation.main(["--dataset", "digits", "--semi-supervised", "fixmatch",
                          "--run-dir", str(tmp_path)])
    assert code == 2 and "--variants all" in capsys.readouterr().err


def _digits_runs(plan, seed, epochs=12):
    """Random validation curves per planned run, and metrics.json-like dicts."""
    rng = np.random.default_rng(seed)
    data = {"dataset": "digits", "source": "test", "image_shape": [32, 32, 3],
            "train": 400, "validation": 200, "test": 300, "unlabeled": 897}
    curves = {key: rng.uniform(0.5, 1.0, epochs).round(3).tolist() for key in plan}
    metrics = {key: {"val_accuracy": curves[key][-1], "test_accuracy": 0.5,
                     "wall_seconds": 1.0, "data": data,
                     "history": [{"epoch": i + 1, "loss": 1.0, "val_accuracy": v}
                                 for i, v in enumerate(curves[key])]}
               for key in plan}
    return curves, metrics


def test_convergence_numbers_and_curves_come_from_each_runs_history(tmp_path):
    args = ablation.build_parser().parse_args(["--dataset", "digits", "--seeds", "2",
                                               "--epochs", "12"])
    plan = ablation.plan_configs(args)
    curves, metrics = _digits_runs(plan, seed=1)
    summary = ablation.summarize(metrics, plan, tmp_path)
    for variant in VARIANTS:
        entry = summary["variants"][variant]
        assert entry["val_curves"] == [curves[(variant, s)] for s in range(2)]
        expected = [100 * (np.mean(curves[(variant, s)][-5:])
                           - np.mean(curves[(variant, s)][-10:-5])) for s in range(2)]
        np.testing.assert_allclose(entry["late_change_pp"]["per_seed"], expected)
        assert entry["late_change_pp"]["window"] == 5
    table = ablation.render_markdown(summary)
    line = next(x for x in table.splitlines() if x.startswith("Convergence"))
    first = summary["variants"]["baseline"]["late_change_pp"]["per_seed"][0]
    assert f"baseline {first:+.2f}" in line and "curves.png" in line
    ablation.save_curves(summary, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 5000


def test_variant_seeds_gives_a_costly_variant_fewer_seeds(tmp_path):
    args = ablation.build_parser().parse_args(
        ["--dataset", "digits", "--seeds", "3", "--epochs", "12", "--variants", "all",
         "--variant-seeds", "fixmatch=2"])
    plan = ablation.plan_configs(args)
    assert sorted(s for v, s in plan if v == "fixmatch") == [0, 1]
    assert all(sorted(s for v, s in plan if v == name) == [0, 1, 2]
               for name in VARIANTS)
    curves, metrics = _digits_runs(plan, seed=2)
    summary = ablation.summarize(metrics, plan, tmp_path)
    entry = summary["variants"]["fixmatch"]
    assert entry["seeds"] == [0, 1] and len(entry["val_curves"]) == 2
    val = [curves[("fixmatch", s)][-1] for s in (0, 1)]
    assert entry["val_accuracy"]["mean"] == pytest.approx(np.mean(val))
    assert entry["val_accuracy"]["std"] == pytest.approx(np.std(val, ddof=1))
    gains = [100 * (curves[("fixmatch", s)][-1] - curves[("baseline", s)][-1])
             for s in (0, 1)]  # paired with the baseline of the same seed
    assert entry["improvement_over_baseline_pct"]["per_seed"] == pytest.approx(gains)
    # `all`: the lab's four and every registered method, 3 seeds each but fixmatch.
    from stl10_keras.config import all_variants

    assert summary["protocol"]["seeds_per_variant"] == {
        **{v: 3 for v in all_variants()}, "fixmatch": 2}
    table = ablation.render_markdown(summary)
    assert "seeds 0–2 (3 per variant) except fixmatch (seeds 0–1)" in table
    assert "over each variant's seeds" in table
    row = next(line for line in table.splitlines() if "`fixmatch`" in line)
    assert len(row.split("|")[3].split(",")) == 2  # two per-seed values
    ablation.save_curves(summary, tmp_path / "curves.png")
    ablation.save_figure8(summary, tmp_path / "figure8.png")
    from PIL import Image

    wide = Image.open(tmp_path / "curves.png").size[0]
    assert wide > 1200  # five panels, fixmatch's beside the lab's four


@pytest.mark.parametrize("flags, needle", [
    (["--variants", "all", "--variant-seeds", "fixmatch=4"], "more seeds than"),
    (["--variant-seeds", "fixmatch=1"], "not in --variants"),
])
def test_bad_variant_seeds_are_one_sentence(flags, needle, tmp_path, capsys):
    code = ablation.main(["--dataset", "digits", "--seeds", "3", *flags,
                          "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and needle in err
    assert err.count("\n") == 1 and not any(tmp_path.iterdir())


@pytest.mark.parametrize("value, needle", [
    ("baseline=1", "baseline trains every seed"), ("fixmatch=0", "N >= 1"),
    ("mixmatch=1", "VARIANT from"), ("fixmatch", "VARIANT=N")])
def test_variant_seeds_values_are_one_argparse_line(value, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        ablation.main(["--dataset", "digits", "--variant-seeds", value,
                       "--run-dir", str(tmp_path)])
    assert exc.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.e2e
def test_variant_seeds_trains_only_the_planned_runs(tmp_path):
    proc = _cli("--dataset", "digits", "--preset", "smoke", "--epochs", "1",
                "--seeds", "2", "--variants", "baseline,augment",
                "--variant-seeds", "augment=1", "--verbose", "0",
                "--run-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()
                  and (p / "metrics.json").exists()) == [
        "augment_s0", "baseline_s0", "baseline_s1"]
    assert "[3/3]" in proc.stdout and "[4/" not in proc.stdout
    summary = json.loads((tmp_path / "ablation.json").read_text())
    assert summary["variants"]["augment"]["seeds"] == [0]
