import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, assert_same_run, saved_model_vs_keras, subprocess_env
from stl10_keras.config import Config, ConfigError, preset
from stl10_keras.cli import build_train_parser as build_parser, config_from_args


def _cli(*args, timeout=600, **env):
    return subprocess.run(
        [sys.executable, "-m", "stl10_keras.train", *args], cwd=ROOT,
        env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout,
    )


# --- config ---------------------------------------------------------------------

def test_flags_override_the_preset_and_round_trip_through_json():
    args = build_parser().parse_args(
        ["--dataset", "digits", "--preset", "smoke", "--epochs", "3",
         "--widths", "4,8", "--scale-range", "1.1,1.2", "--variant", "kmeans1",
         "--no-flip", "--learning-rate", "0.2"])
    config = config_from_args(args)
    assert config.train.epochs == 3 and config.train.learning_rate == 0.2
    assert config.model.widths == (4, 8) and config.model.convs_per_stage == (1, 1)
    assert (config.augment.scale_min, config.augment.scale_max) == (1.1, 1.2)
    assert config.augment.flip is False and config.kmeans.stages == (1,)
    assert Config.from_json(config.to_json()) == config


def test_paper_preset_is_the_labs_values():
    t = preset("paper").train
    assert (t.batch_size, t.learning_rate, t.lr_decay, t.weight_decay, t.momentum) \
        == (32, 1.0, 1e-7, 5e-4, 0.5)


def test_variants_set_augmentation_and_kmeans_stages():
    got = {v: (preset("default", variant=v).augment.enabled,
               preset("default", variant=v).kmeans.stages)
           for v in ("baseline", "augment", "kmeans1", "kmeans12")}
    assert got == {"baseline": (False, ()), "augment": (True, ()),
                   "kmeans1": (True, (1,)), "kmeans12": (True, (1, 2))}


@pytest.mark.parametrize("flags, needle", [
    (["--epochs", "0"], "--epochs"),
    (["--widths", "8,16", "--convs-per-stage", "1"], "convs_per_stage"),
    (["--scale-range", "0.5,1.0"], "--scale-range"),
    (["--kmeans-patch-size", "7"], "--kernel-size"),
    # Each of these used to reach keras, numpy or tf.data and end in a traceback
    # (or, for a negative --val-per-class / --weight-decay, train silently on a
    # nonsense split or with an L2 *reward*).
    (["--kernel-size", "0"], "--kernel-size must be at least 1"),
    (["--fc-units", "0"], "--fc-units"),
    (["--fc-units=-5"], "--fc-units"),
    (["--lr-decay=-1"], "--lr-decay"),
    (["--weight-decay=-1"], "--weight-decay"),
    (["--momentum=-0.1"], "--momentum"),
    (["--momentum", "2"], "--momentum"),
    (["--seed=-1"], "--seed"),
    (["--val-per-class", "0"], "--val-per-class"),
    (["--val-per-class=-1"], "--val-per-class"),
    (["--kmeans-images", "0"], "--kmeans-images"),
    (["--kmeans-patches-per-image", "0"], "--kmeans-patches-per-image"),
    # Non-finite values used to train an epoch (NaN) or for ever (inf) first.
    (["--learning-rate", "nan"], "--learning-rate"),
    (["--learning-rate", "inf"], "--learning-rate"),
    (["--lr-decay", "nan"], "--lr-decay"),
    (["--lr-decay", "inf"], "--lr-decay"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--momentum", "nan"], "--momentum"),
    (["--momentum", "inf"], "--momentum"),
    (["--scale-range", "1.0,inf"], "--scale-range"),
    (["--data-dir", "data"], "--data-dir is not used by --dataset digits"),
])
def test_bad_values_raise_a_config_error_naming_the_flag(flags, needle):
    args = build_parser().parse_args(["--dataset", "digits", *flags])
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-")):
        config_from_args(args)


@pytest.mark.parametrize("section, key, value, needle", [
    ("augment", "fill_mode", "mirror", "fill_mode"),
    ("data", "shuffle_buffer", 0, "shuffle_buffer"),
    ("kmeans", "zca_epsilon", 0.0, "zca_epsilon"),
    ("train", "lr_schedule", "step", "lr-schedule"),
])
def test_bad_config_file_values_name_the_field(tmp_path, section, key, value, needle):
    d = preset("smoke", "digits").to_dict()
    d[section][key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=needle):
        Config.from_file(path)


@pytest.mark.parametrize("text, needle", [
    ("[1, 2]", "must be a JSON object"),                      # was an AttributeError
    ('{"data": 5}', "'data' must be an object"),
    ('{"train": {"epochs": "3"}}', 'train.epochs must be an integer, not "3"'),
    ('{"train": {"epochs": 2.5}}', "train.epochs must be an integer"),  # was accepted
    ('{"train": {"epochs": null}}', "train.epochs must be an integer"),
    ('{"model": {"widths": 8}}', "model.widths must be a list of integers"),
    ('{"model": {"widths": [8, 16.5]}}', "model.widths must be a list of integers"),
    ('{"augment": {"flip": "no"}}', "augment.flip must be true or false"),
    ('{"preset": "huge"}', "Unknown preset 'huge'"),
])
def test_a_malformed_config_file_is_one_sentence_naming_the_field(tmp_path, text,
                                                                  needle):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        Config.from_file(path)


def test_config_file_nulls_and_numbers_that_json_allows_still_load(tmp_path):
    # An int where a float is expected is fine, and so are the optional fields'
    # nulls; the result equals the preset built in Python.
    want = preset("smoke", "digits")
    d = want.to_dict()
    d["train"]["learning_rate"] = 1
    want.train.learning_rate = 1.0
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    got = Config.from_file(path)
    assert got == want and got.data.data_dir is None and got.data.val_per_class is None
    assert isinstance(got.train.learning_rate, float)


def test_bad_flag_exits_nonzero_without_traceback(tmp_path):
    proc = _cli("--dataset", "digits", "--epochs", "0", "--run-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_a_config_file_that_is_no_object_exits_2_without_traceback(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    proc = _cli("--config", str(path), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def _stderr_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_missing_data_is_the_only_line_on_stderr(tmp_path):
    # TensorFlow's C++ start-up lines ("WARNING: All log messages before
    # absl::InitializeLog() ...", "cudart_stub.cc:31] Could not find cuda
    # drivers") and tfds' "WARNING:absl:Variant folder ... has no
    # dataset_info.json" used to come before it.
    nowhere = tmp_path / "nowhere"
    proc = _cli("--data-dir", str(nowhere), "--no-download", "--no-export",
                "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 1
    lines = _stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: STL-10 is not on disk")
    assert f"--data-dir {nowhere}" in lines[0]


def test_a_flag_that_needs_distribution_is_the_only_line_on_stderr(tmp_path):
    proc = _cli("--dataset", "digits", "--devices", "2", "--no-export",
                "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert _stderr_lines(proc) == [
        "error: --devices and the coordinator flags need --distribution mirrored "
        "or data-parallel."], proc.stderr


def _fake_finished_run(run, config):
    """A run dir as a finished run leaves it (no training needed to test refusals)."""
    run.mkdir()
    (run / "config.json").write_text(config.to_json())
    (run / "metrics.json").write_text(json.dumps(
        {"val_accuracy": 0.5, "test_accuracy": 0.25, "history": []}))


def test_a_finished_run_with_another_config_is_refused_not_reported(tmp_path, capsys):
    # It used to print the finished run's results as if they were this config's.
    from stl10_keras.cli import main

    run = tmp_path / "run"
    _fake_finished_run(run, preset("smoke", "digits"))
    flags = ["--dataset", "digits", "--preset", "smoke", "--run-dir", str(run),
             "--no-export"]
    assert main([*flags, "--epochs", "3"]) == 2
    captured = capsys.readouterr()
    assert "different config" in captured.err and "accuracy" not in captured.out
    # From the command line, the sentence is all there is on stderr.
    proc = _cli(*flags, "--epochs", "3")
    assert proc.returncode == 2 and len(_stderr_lines(proc)) == 1, proc.stderr
    assert _stderr_lines(proc)[0].startswith("error: ") and \
        "different config" in proc.stderr
    # The same config is still reported as the finished run it is.
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert "already holds a finished run" in out and "test accuracy 0.2500" in out
    assert out.splitlines()[-3:] == [  # what to try next (no SavedModel yet)
        "next:", f"  tensorboard --logdir {run / 'logs'}",
        f"  python -m stl10_keras.export --run-dir {run}"]


@pytest.mark.parametrize("name", ["config.json", "metrics.json"])
def test_a_corrupted_run_file_is_one_sentence(tmp_path, capsys, name):
    from stl10_keras.cli import main

    run = tmp_path / "run"
    _fake_finished_run(run, preset("smoke", "digits"))
    (run / name).write_text('{"train": {"epochs": 1')  # cut short
    rc = main(["--dataset", "digits", "--preset", "smoke", "--run-dir", str(run),
               "--no-export"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "--overwrite" in err
    assert err.count("\n") == 1


def test_missing_data_leaves_no_run_behind_so_a_fixed_data_dir_is_not_refused(
        tmp_path, capsys):
    # The offline error tells the user to pass --data-dir DIR; doing so into the
    # same run dir used to be refused as "a run with a different config".
    from stl10_keras.cli import main

    run = tmp_path / "run"
    flags = ["--preset", "smoke", "--no-download", "--no-export", "--run-dir", str(run)]
    assert main([*flags, "--data-dir", str(tmp_path / "nowhere")]) == 1
    assert not (run / "config.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*flags, "--data-dir", str(empty)]) == 1
    err = capsys.readouterr().err
    assert "different config" not in err and err.count("error: ") == 2


def _tree_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("flags", [
    ["--dataset", "folder", "--data-dir", "typo"],  # no such folder
    ["--dataset", "folder", "--data-dir", "empty"],  # no train/ in it
    ["--dataset", "fashion_mnist", "--data-dir", "empty", "--no-download"],
])
def test_overwrite_with_data_that_does_not_load_leaves_the_old_run_as_it_was(
        tmp_path, capsys, monkeypatch, flags):
    # --overwrite deleted the finished run first and only then found the data
    # missing: the run was lost to a typo.
    from stl10_keras.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    run = tmp_path / "run"
    _fake_finished_run(run, preset("smoke", "digits"))
    (run / "model.keras").write_bytes(b"weights")
    (run / "figures").mkdir()
    (run / "figures" / "filters_stage1.png").write_bytes(b"png")
    before = _tree_bytes(run)
    rc = main([*flags, "--preset", "smoke", "--overwrite", "--no-export",
               "--run-dir", str(run)])
    assert rc == 1 and capsys.readouterr().err.startswith("error: ")
    assert _tree_bytes(run) == before


def test_a_run_dir_that_is_a_file_is_refused(tmp_path, capsys):
    from stl10_keras.cli import main

    path = tmp_path / "notes.txt"
    path.write_text("mine")
    rc = main(["--dataset", "digits", "--preset", "smoke", "--run-dir", str(path),
               "--no-export"])
    assert rc == 2 and "is a file" in capsys.readouterr().err
    assert path.read_text() == "mine"


def _refusal_before_tensorflow(*flags):
    """Run train's main in a fresh process: (exit code, stderr, TF imported)."""
    script = ("import sys; from stl10_keras.cli import main; rc = main(sys.argv[1:]); "
              "print(rc, 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script, *flags], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    rc, tf_loaded, keras_loaded = proc.stdout.split()[-3:]
    return int(rc), proc.stderr, tf_loaded == "True" or keras_loaded == "True"


@pytest.mark.parametrize("flags, needle", [
    (["--learning-rate", "nan"], "--learning-rate must be a positive finite"),
    (["--lr-decay", "inf"], "--lr-decay must be a finite number"),
    (["--momentum", "nan"], "--momentum"),
    (["--data-dir", "/data"], "--data-dir is not used by --dataset digits"),
])
def test_non_finite_values_are_refused_before_tensorflow_loads(tmp_path, flags,
                                                               needle):
    rc, err, loaded = _refusal_before_tensorflow(
        "--dataset", "digits", *flags, "--run-dir", str(tmp_path / "run"))
    assert rc == 2 and not loaded
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("distribution", [
    [], ["--distribution", "mirrored", "--devices", "cpu:0,cpu:1"]])
@pytest.mark.parametrize("flag", ["--export-dir", "--run-dir"])
@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_an_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path, flag,
                                                                 where, distribution):
    # --export-dir naming a file used to train the whole run, then end in a
    # FileExistsError traceback (and, on each rerun, train again).
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    path = mine if where == "file" else mine / "sub"
    dirs = {"--run-dir": str(tmp_path / "run"), "--export-dir": str(tmp_path / "e")}
    dirs[flag] = str(path)
    rc, err, loaded = _refusal_before_tensorflow(
        "--dataset", "digits", "--preset", "smoke", *distribution,
        *(x for item in dirs.items() for x in item))
    assert rc == 2 and not loaded
    want = "is a file, not a directory" if where == "file" else \
        f"because {mine} is a file"
    assert err.startswith(f"error: {flag} {path}") and want in err, err
    assert err.count("\n") == 1 and mine.read_text() == "mine"
    assert not (tmp_path / "run").exists()


def _without_root_file_access():
    """In the child: drop root's power to ignore file modes (Linux capabilities).

    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH leave the bounding set, so the
    command, run as root, meets a read-only folder as any user would.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_output_dir_that_cannot_be_written_is_refused(tmp_path):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    export = readonly / "models" / "digits"
    try:
        script = ("import sys; from stl10_keras.cli import main; "
                  "sys.exit(main(sys.argv[1:]))")
        proc = subprocess.run(
            [sys.executable, "-c", script, "--dataset", "digits", "--preset", "smoke",
             "--run-dir", str(tmp_path / "run"), "--export-dir", str(export)],
            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
            timeout=120,
            preexec_fn=_without_root_file_access if os.geteuid() == 0 else None)
    finally:
        readonly.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"error: --export-dir {export} cannot be written "
                           f"({readonly}: Permission denied); pass another "
                           "--export-dir.\n")
    assert not (tmp_path / "run").exists()


# --- end to end -----------------------------------------------------------------

@pytest.mark.e2e
def test_smoke_run_end_to_end(tmp_path):
    run, export = tmp_path / "run", tmp_path / "export"
    proc = _cli("--dataset", "digits", "--preset", "smoke", "--variant", "baseline",
                "--epochs", "2", "--run-dir", str(run), "--export-dir", str(export),
                "--verbose", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val_accuracy", "test_accuracy", "history", "train_images_per_sec",
                "wall_seconds"):
        assert key in metrics
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    # What `python -m stl10_keras.export` names the classes with.
    assert metrics["class_names"] == [str(i) for i in range(10)]
    config = Config.from_json((run / "config.json").read_text())
    assert config.model.widths == (8, 16, 16, 32, 32)
    # The device line names what TensorFlow sees (its CUDA start-up errors are
    # hidden, so this line is where a GPU machine without a driver shows).
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    device_line = [ln for ln in proc.stdout.splitlines() if ln.startswith("training on")]
    assert len(device_line) == 1, proc.stdout[-2000:]
    assert ("GPU" in device_line[0].split("(")[0]) == bool(gpus), device_line
    if not gpus:
        assert device_line[0].startswith("training on the CPU")
    assert (run / "logs" / "train").is_dir() and (export / "1" / "saved_model.pb").exists()
    # The SavedModel reproduces the saved Keras model and the reported accuracy.
    diff, accuracy = saved_model_vs_keras(export / "1", run / "model.keras")
    assert diff < 1e-5
    assert accuracy == pytest.approx(metrics["val_accuracy"], abs=1e-9)
    # It ends with what to try next, on this run's paths.
    assert proc.stdout.splitlines()[-4:] == [
        "next:", f"  tensorboard --logdir {run / 'logs'}",
        f"  python -m stl10_keras.serve --model-base-path {export}",
        f"  python -m stl10_keras.predict --model {export} IMAGE.png"]
    # Rerunning a finished run does nothing and says so.
    again = _cli("--dataset", "digits", "--preset", "smoke", "--variant", "baseline",
                 "--epochs", "2", "--run-dir", str(run), "--export-dir", str(export))
    assert again.returncode == 0 and "already holds a finished run" in again.stdout
    assert sorted(p.name for p in export.iterdir()) == ["1"]
    # A run dir holding another config is refused, before any training.
    other = tmp_path / "other"
    other.mkdir()
    changed = json.loads((run / "config.json").read_text())
    changed["train"]["epochs"] = 3
    (other / "config.json").write_text(json.dumps(changed))
    clash = _cli("--dataset", "digits", "--preset", "smoke", "--variant", "baseline",
                 "--epochs", "2", "--run-dir", str(other), "--no-export")
    assert clash.returncode == 2 and "different config" in clash.stderr
    assert "Traceback" not in clash.stderr


def _epoch_scalars(log_dir, tag: str) -> list[float]:
    """A scalar per epoch as TensorBoard's own reader sees it."""
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return [float(make_ndarray(event.tensor_proto))
            for event in sorted(events.Tensors(tag), key=lambda e: e.step)]


def test_the_cosine_schedule_reaches_zero_at_the_last_step(tmp_path):
    run = tmp_path / "run"
    proc = _cli("--dataset", "digits", "--preset", "smoke", "--variant", "baseline",
                "--epochs", "3", "--lr-schedule", "cosine", "--learning-rate", "0.05",
                "--run-dir", str(run), "--no-export", "--verbose", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The learning rate keras' TensorBoard callback logs after each epoch
    # (at step e * S of the run's 3 * S) against the formula, S from the data.
    config = Config.from_json((run / "config.json").read_text())
    assert config.train.lr_schedule == "cosine"
    train_images = json.loads((run / "metrics.json").read_text())["data"]["train"]
    steps = -(-train_images // config.train.batch_size)
    total = 3 * steps
    expected = [0.05 * (1 + np.cos(np.pi * e * steps / total)) / 2 for e in (1, 2, 3)]
    logged = _epoch_scalars(run / "logs" / "train", "epoch_learning_rate")
    np.testing.assert_allclose(logged, expected, rtol=1e-5, atol=1e-9)
    assert logged[-1] == 0.0


@pytest.mark.e2e
def test_an_interrupted_run_resumes_from_its_last_epoch(tmp_path):
    run = tmp_path / "run"
    args = ["--dataset", "digits", "--preset", "smoke", "--variant", "baseline",
            "--epochs", "6", "--run-dir", str(run), "--no-export", "--verbose", "2"]
    history = run / "history.csv"
    _kill_after_epochs(args, history, 2)  # no chance to clean up: a hard crash
    assert not (run / "metrics.json").exists()
    done_before = len(history.read_text().splitlines()) - 1
    resumed = _cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(history) as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    # Restarted after the last backed-up epoch, not from scratch: epoch 0 was
    # trained once, and every epoch up to the last is there.
    assert epochs.count(0) == 1
    assert sorted(set(epochs)) == list(range(6))
    assert len(epochs) <= 6 + 1 and done_before >= 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed"] is True
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 7))
    assert np.isfinite(metrics["val_accuracy"])


def _kill_after_epochs(args, history, epochs: int) -> None:
    """Run the CLI and SIGKILL it (a hard crash) once `epochs` epochs are logged."""
    proc = subprocess.Popen([sys.executable, "-m", "stl10_keras.train", *args],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    try:
        while time.time() < deadline:
            if history.exists() and len(history.read_text().splitlines()) > epochs:
                break  # header + `epochs` rows
            if proc.poll() is not None:
                pytest.fail("training ended before it could be interrupted")
            time.sleep(0.05)
        else:
            pytest.fail("training made no progress")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.e2e
def test_a_resumed_run_has_the_history_of_an_uninterrupted_one(tmp_path):
    # It used not to: after a resume, tf.data's reshuffle started over at epoch
    # 0's order, and dropout's and RandomAffine's seed generators (not among
    # the weights BackupAndRestore saves) started over at their first draws.
    # kmeans1: augmentation, dropout and a k-means stage that is not rerun.
    args = ["--dataset", "digits", "--preset", "smoke", "--variant", "kmeans1",
            "--epochs", "5", "--widths", "4,8", "--fc-units", "16", "--no-export",
            "--verbose", "0"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    proc = _cli(*args, "--run-dir", str(whole))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _kill_after_epochs([*args, "--run-dir", str(resumed)], resumed / "history.csv", 2)
    assert not (resumed / "metrics.json").exists()
    proc = _cli(*args, "--run-dir", str(resumed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((resumed / "metrics.json").read_text())
    want = json.loads((whole / "metrics.json").read_text())
    assert got["resumed"] is True and want["resumed"] is False
    assert [h["epoch"] for h in got["history"]] == list(range(1, 6))
    # The same float32 computation on the same inputs in two processes.
    assert_same_run(got, want)


@pytest.mark.e2e
def test_default_variant_kmeans12_writes_the_figures_and_kmeans_record(tmp_path):
    run = tmp_path / "run"
    proc = _cli("--dataset", "digits", "--preset", "smoke", "--run-dir", str(run),
                "--no-export", "--verbose", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["variant"] == "kmeans12" and config["kmeans"]["stages"] == [1, 2]
    assert config["augment"]["enabled"] is True
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["kmeans_seconds"] > 0
    assert set(metrics["kmeans"]) == {"stage1_conv", "stage2_conv"}
    for name in ("augmentation.png", "kmeans_centroids_3x3.png", "filters_stage1.png"):
        assert (run / "figures" / name).stat().st_size > 1000
    # The figures are in TensorBoard too, as images.
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    events = EventAccumulator(str(run / "logs" / "images"),
                              size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"figure3_augmentation", "figure1_kmeans_centroids_3x3",
            "figure2_filters_stage1"} <= tags


def _served_probabilities(version_dir, images):
    import tensorflow as tf

    fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    return fn(images=tf.constant(images))["probabilities"].numpy()


@pytest.mark.e2e
def test_a_run_killed_after_its_last_epoch_is_not_trained_again(tmp_path):
    # keras' BackupAndRestore deletes backup/ when fit returns, so a run killed
    # during evaluation or export used to train again from epoch 1, append a
    # second history to history.csv and leave its .tmp-* export folder forever.
    args = ["--dataset", "digits", "--preset", "smoke", "--variant", "baseline",
            "--epochs", "2", "--verbose", "2"]
    whole_run, whole_export = tmp_path / "whole", tmp_path / "whole_export"
    proc = _cli(*args, "--run-dir", str(whole_run), "--export-dir", str(whole_export))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run, export = tmp_path / "run", tmp_path / "export"
    flags = [*args, "--run-dir", str(run), "--export-dir", str(export)]
    # Killed (SIGKILL) during evaluation; the rerun is killed during the export,
    # after writing the SavedModel's temporary folder and before renaming it.
    for step, trains in (("evaluation", True), ("export", False)):
        proc = _cli(*flags, STL10_CRASH_AT=step)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert ("Epoch 1/2" in proc.stdout) == trains, proc.stdout
        assert not (run / "metrics.json").exists()
    assert sorted(p.name for p in export.iterdir()) == [".tmp-1"]
    proc = _cli(*flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Epoch" not in proc.stdout and "final weights" in proc.stdout
    # No epoch was trained again: one history, no second set of rows.
    with open(run / "history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]
    assert sorted(p.name for p in export.iterdir()) == ["1"]  # temp folder reused
    assert sorted(p.name for p in run.iterdir()) == sorted(
        p.name for p in whole_run.iterdir())  # nothing left for resuming
    got = json.loads((run / "metrics.json").read_text())
    want = json.loads((whole_run / "metrics.json").read_text())
    assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=1e-9)
    assert got["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=1e-9)
    assert [h.keys() for h in got["history"]] == [h.keys() for h in want["history"]]
    for g, w in zip(got["history"], want["history"]):
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9), (g, key)
    # The SavedModel serves what the uninterrupted run's does.
    from stl10_keras.data import load_splits

    images = load_splits("digits", seed=0).x_val
    np.testing.assert_allclose(_served_probabilities(export / "1", images),
                               _served_probabilities(whole_export / "1", images),
                               atol=1e-6)
    # A finished run's rerun still does nothing.
    again = _cli(*flags)
    assert again.returncode == 0 and "already holds a finished run" in again.stdout


def test_accuracy_of_many_runs_in_one_process_warns_of_no_retracing(caplog):
    # An ablation evaluates a new model per run; through model.predict the
    # fifth one made TensorFlow warn about tf.function retracing.
    import logging

    import keras

    from stl10_keras.model import build_model
    from stl10_keras.train import _accuracy

    rng = np.random.default_rng(0)
    config = preset("smoke", "digits")
    config.model.widths, config.model.fc_units = (4, 4), 8
    config.model.convs_per_stage = (1, 1)
    caplog.set_level(logging.WARNING)
    evaluated = []
    for run in range(6):
        keras.backend.clear_session()
        model = build_model(config, (32, 32, 3))
        for n in (200, 300):  # a validation and a test split, partial batches
            images = rng.integers(0, 256, (n, 32, 32, 3)).astype("uint8")
            labels = rng.integers(0, 10, n)
            got = _accuracy(model, images, labels, batch_size=128)
            evaluated.append((model, images, labels, got))
    assert "retracing" not in caplog.text
    # The accuracies are keras' own predictions' (checked after: predict warns).
    for model, images, labels, got in evaluated:
        logits = model.predict(images.astype("float32"), verbose=0)
        assert got == pytest.approx(np.mean(logits.argmax(-1) == labels), abs=1e-12)


# --- the data a run is trained on ------------------------------------------------

def _sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_run_records_its_data_and_a_rerun_on_changed_data_is_refused(tmp_path,
                                                                      capsys):
    # Adding images and rerunning printed the old results without a word.
    from PIL import Image

    from stl10_keras.cli import main
    from test_folder import planted, write_folder

    folder, run = tmp_path / "images", tmp_path / "run"
    write_folder(folder, per_class=5, unlabeled=3)
    (folder / "train" / "cat" / "Thumbs.db").write_bytes(b"junk")
    flags = ["--dataset", "folder", "--data-dir", str(folder), "--preset", "smoke",
             "--variant", "baseline", "--widths", "4,8", "--fc-units", "8",
             "--epochs", "1", "--no-export", "--verbose", "2", "--run-dir", str(run)]
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"data: image folder {folder} (3 classes")
    record = json.loads((run / "data.json").read_text())
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and p.name != "Thumbs.db")
    assert record["files"] == {
        p.relative_to(folder).as_posix(): {
            "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns,
            "sha256": _sha256(p)} for p in files}

    assert main(flags) == 0  # unchanged: the finished run, reported
    assert "already holds a finished run" in capsys.readouterr().out
    before = _tree_bytes(run)
    Image.fromarray(planted(2, 9)).save(folder / "train" / "cat" / "0.png")
    Image.fromarray(planted(1, 9)).save(folder / "train" / "dog" / "new.png")
    assert main(flags) == 2
    captured = capsys.readouterr()
    assert "accuracy" not in captured.out
    assert captured.err.splitlines() == [
        f"error: {run} was trained on other data: since it started, 1 file added "
        f"(train/dog/new.png), 1 file changed (train/cat/0.png) in {folder}; pass "
        "--overwrite to train it again on the data as it is now, or another "
        "--run-dir."]
    assert _tree_bytes(run) == before  # nothing overwritten
    # --overwrite trains it again, on the new data, and records that.
    assert main([*flags, "--overwrite"]) == 0
    record = json.loads((run / "data.json").read_text())
    assert "train/dog/new.png" in record["files"]
    assert record["files"]["train/cat/0.png"]["sha256"] == _sha256(
        folder / "train" / "cat" / "0.png")


def test_a_folder_runs_default_name_holds_the_folders_name():
    # Every folder was folder_kmeans12_s0: a second folder collided with the
    # first's run ("a different config").
    from stl10_keras.cli import default_run_name

    def name(data_dir, preset_name="default"):
        config = preset(preset_name, "folder")
        config.data.data_dir = data_dir
        return default_run_name(config)

    assert name("/data/My Photos") == "folder-My-Photos_kmeans12_s0"
    assert name("/data/pets/", "smoke") == "folder-pets_kmeans12_smoke_s0"
    assert name("/data/\u00f1and\u00fa") == "folder-\u00f1and\u00fa_kmeans12_s0"
    assert name("/a/one") != name("/b/two")
