"""The pipeline end to end on digits with the smoke preset.

The tests share one pipeline root and serving dir and run in file order, as a
user would: first run, rerun, a changed Trainer parameter, a crashing Trainer
and its resume, a better model served from elsewhere. References are
independent of the pipeline: `stl10_keras.data.load_splits`, TFRecords parsed
with `tf.train.Example`, `kmeans_init` on the original arrays, numpy argmax of
`model.predict`, a nearest-class-mean classifier, and the REST server.
"""

import contextlib
import io
import json
import shutil
import subprocess
import sys
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, rest_server, subprocess_env
from pipelines import components as c
from pipelines.pipeline import FAIL_ENV
from pipelines.run import main
from stl10_keras.data import load_splits
from stl10_keras.export import export_saved_model, list_versions

FLAGS = ["--dataset", "digits", "--preset", "smoke", "--accuracy-threshold", "0",
         "--num-shards", "3", "--verbose", "0"]
COMPONENTS = ["ExampleGen", "Transform", "Trainer", "Evaluator", "Pusher"]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    return {"root": base / "root", "serving": base / "serving" / "digits"}


def run(dirs, *extra):
    """`python -m pipelines.run` in-process: (exit code, stdout, stderr, summary)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*FLAGS, "--pipeline-root", str(dirs["root"]),
                     "--serving-dir", str(dirs["serving"]), *extra])
    summary_path = dirs["root"] / "pipeline_run.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return code, out.getvalue(), err.getvalue(), summary


def statuses(summary):
    return [row["status"] for row in summary["components"]]


def artifact(summary, name):
    found = c.read_artifact(summary["artifacts"][name])
    assert found is not None, name
    return found


@pytest.fixture(scope="module")
def first(dirs):
    code, out, err, summary = run(dirs)
    assert code == 0, err[-3000:]
    return summary


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits", seed=0)


# --- first run ------------------------------------------------------------------------

def test_first_run_writes_five_artifacts_and_pushes_version_1(first, dirs):
    assert statuses(first) == ["ran"] * 5 and first["status"] == "succeeded"
    types = {n: artifact(first, n).type for n in COMPONENTS}
    assert types == {"ExampleGen": "Examples", "Transform": "TransformOutput",
                     "Trainer": "Model", "Evaluator": "ModelBlessing",
                     "Pusher": "PushedModel"}
    for name in COMPONENTS:
        a = artifact(first, name)
        assert a.uri == dirs["root"] / name / a.fingerprint[:12]
        assert a.metadata["producer"] == name and a.metadata["created"]
    examples = artifact(first, "ExampleGen")
    for split in c.SPLITS:
        assert sorted(p.name for p in (examples.uri / f"Split-{split}").iterdir()) == [
            f"data_tfrecord-0000{i}-of-00003.gz" for i in range(3)]
    blessing = artifact(first, "Evaluator")
    reason = blessing.properties["reason"]
    assert (blessing.uri / "BLESSED").read_text().strip() == reason
    assert not (blessing.uri / "NOT_BLESSED").exists()
    assert (blessing.uri / "confusion_matrix.png").stat().st_size > 1000
    assert list_versions(dirs["serving"]) == [1]
    record = c.read_push_record(dirs["serving"] / "1")
    assert record["model_fingerprint"] == artifact(first, "Trainer").fingerprint
    assert first["pushed"]["version"] == 1 and first["pushed"]["pushed_now"]
    # No temp folder is left anywhere.
    leftovers = [p for p in dirs["root"].rglob(".*")] + [
        p for p in dirs["serving"].iterdir() if not p.name.isdigit()]
    assert leftovers == []


def _parse_shards(files):
    images, labels = [], []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        f = tf.train.Example.FromString(record.numpy()).features.feature
        shape = list(f["shape"].int64_list.value)
        images.append(np.frombuffer(f["image"].bytes_list.value[0], np.uint8)
                      .reshape(shape))
        labels.append(f["label"].int64_list.value[0])
    return np.stack(images), np.array(labels)


def test_examples_decode_to_the_datasets_arrays_and_hash_their_content(first, digits):
    examples = artifact(first, "ExampleGen")
    unlabeled = np.concatenate(list(digits.unlabeled_batches(100)))
    expected = {"train": (digits.x_train, digits.y_train),
                "validation": (digits.x_val, digits.y_val),
                "test": (digits.x_test, digits.y_test),
                "unlabeled": (unlabeled, np.full(len(unlabeled), -1))}
    for split, (x, y) in expected.items():
        images, labels = _parse_shards(c.split_files(examples, split))
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y)
        assert examples.properties["counts"][split] == len(y)

    def content_hash(arrays):
        h = c.ContentHash()
        for split, (x, y) in arrays.items():
            for i in range(0, len(x), 97):  # batches cut differently from ExampleGen's
                h.update(split, x[i:i + 97], y[i:i + 97])
        return h.hexdigest()

    assert content_hash(expected) == examples.properties["content_hash"]
    changed = {k: (x.copy(), y) for k, (x, y) in expected.items()}
    changed["unlabeled"][0][500, 3, 4, 1] ^= 1  # one pixel, one bit
    assert content_hash(changed) != examples.properties["content_hash"]


def test_transform_equals_what_training_computes_itself(first, digits):
    from stl10_keras.config import preset
    from stl10_keras.kmeans import kmeans_init
    from stl10_keras.model import build_model

    transform = artifact(first, "Transform")
    stats = transform.properties["statistics"]["train"]
    np.testing.assert_allclose(stats["mean"], digits.x_train.mean(axis=(0, 1, 2)))
    np.testing.assert_allclose(stats["std"], digits.x_train.std(axis=(0, 1, 2)))
    # As stl10_keras.train does it, on the original arrays (not the TFRecords).
    config = preset("smoke", "digits")
    keras.utils.set_random_seed(config.train.seed)
    model = build_model(config, digits.image_shape)
    reference = kmeans_init(model, config, lambda: digits.unlabeled_batches(256),
                            progress=False)
    got = c.load_kmeans_result(transform)
    assert sorted(got["weights"]) == ["stage1_conv", "stage2_conv"]
    for name, (kernel, bias) in reference["weights"].items():
        got_kernel, got_bias = got["weights"][name]
        np.testing.assert_allclose(got_kernel, kernel, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got_bias, bias, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got["centroids"][name], reference["centroids"][name],
                                   rtol=1e-6, atol=1e-7)
    # The Trainer's run used them (its k-means record is the Transform's).
    run_dir = artifact(first, "Trainer").uri / "model_run"
    assert json.loads((run_dir / "kmeans.json").read_text()) == json.loads(
        (transform.uri / "kmeans.json").read_text())
    assert (run_dir / "figures" / "kmeans_centroids_3x3.png").exists()


def test_evaluator_accuracy_is_the_argmax_of_the_keras_model(first, digits):
    from stl10_keras.model import load_model

    evaluation = json.loads(
        (artifact(first, "Evaluator").uri / "evaluation.json").read_text())
    model = load_model(artifact(first, "Trainer").uri / c.MODEL_PATH)
    for split, x, y in (("validation", digits.x_val, digits.y_val),
                        ("test", digits.x_test, digits.y_test)):
        predicted = np.argmax(model.predict(x, verbose=0), axis=-1)
        assert evaluation[split]["accuracy"] == np.mean(predicted == y)
        matrix = np.array(evaluation[split]["confusion_matrix"])
        for i in range(10):
            for j in range(10):
                assert matrix[i, j] == np.sum((y == i) & (predicted == j))
        per_class = evaluation[split]["per_class_accuracy"]
        assert per_class["3"] == np.mean(predicted[y == 3] == 3)


def test_the_pushed_model_is_served_by_stl10_keras_serve(first, dirs, digits,
                                                         tmp_path):
    from stl10_keras.model import load_model
    from stl10_keras.serve import ModelRepository

    base = tmp_path / "digits"  # the pushed version alone, whatever is pushed later
    shutil.copytree(dirs["serving"] / "1", base / "1")
    repository = ModelRepository(base, "digits")
    repository.start()
    with rest_server(repository, threads=2) as server:
        body = json.dumps({"instances": digits.x_val[:8].tolist()}).encode()
        request = urllib.request.Request(
            f"{server.url}/v1/models/digits:predict", data=body)
        with _OPENER.open(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
    model = load_model(artifact(first, "Trainer").uri / c.MODEL_PATH)
    logits = model.predict(digits.x_val[:8], verbose=0)
    np.testing.assert_allclose([p["probabilities"] for p in predictions],
                               tf.nn.softmax(logits).numpy(), atol=1e-5)
    assert [p["class_ids"] for p in predictions] == list(np.argmax(logits, -1))


# --- caching, parameters, failures ----------------------------------------------------

def test_a_rerun_does_no_work(first, dirs):
    code, out, _, summary = run(dirs)
    assert code == 0
    assert statuses(summary) == ["cached"] * 5
    assert summary["artifacts"] == first["artifacts"]
    for name in COMPONENTS:
        assert artifact(summary, name).metadata == artifact(first, name).metadata
    assert list_versions(dirs["serving"]) == [1]
    assert out.count("cached") == 5


def test_the_python_api_with_a_whole_number_threshold_is_the_same_run(first, dirs):
    # `accuracy_threshold=0` is the CLI's `--accuracy-threshold 0` (0.0): same run.
    from pipelines.pipeline import create_pipeline, run_pipeline
    from pipelines.run import build_parser
    from stl10_keras.cli import config_from_args

    config = config_from_args(build_parser().parse_args(FLAGS))
    pipeline = create_pipeline(config, dirs["root"], dirs["serving"],
                               accuracy_threshold=0, num_shards=3, verbose=0)
    summary = run_pipeline(pipeline, log=lambda line: None)
    assert statuses(summary) == ["cached"] * 5
    assert summary["artifacts"] == first["artifacts"]


def test_a_new_trainer_parameter_reruns_trainer_evaluator_and_pusher(first, dirs):
    code, _, err, summary = run(dirs, "--learning-rate", "0.02")
    assert code == 0, err[-3000:]
    assert statuses(summary) == ["cached", "cached", "ran", "ran", "ran"]
    assert summary["artifacts"]["Transform"] == first["artifacts"]["Transform"]
    assert summary["artifacts"]["Trainer"] != first["artifacts"]["Trainer"]
    # Compared with version 1, which the first run pushed, on the same images.
    evaluation = artifact(summary, "Evaluator").properties
    assert evaluation["baseline"]["version"] == 1
    assert evaluation["baseline"]["accuracy"] == artifact(
        first, "Evaluator").properties["val_accuracy"]
    blessed = evaluation["val_accuracy"] >= evaluation["baseline"]["accuracy"]
    assert evaluation["blessed"] is blessed
    assert list_versions(dirs["serving"]) == ([1, 2] if blessed else [1])
    # The first run's artifacts stay, cached for when its parameters come back.
    assert c.read_artifact(first["artifacts"]["Trainer"]) is not None


def test_a_failing_trainer_pushes_nothing_and_the_next_run_resumes_there(
        dirs, monkeypatch):
    versions = list_versions(dirs["serving"])
    trainers = sorted(p.name for p in (dirs["root"] / "Trainer").iterdir())
    monkeypatch.setenv(FAIL_ENV, "Trainer")
    code, out, err, summary = run(dirs, "--learning-rate", "0.03")
    assert code == 1
    assert statuses(summary) == ["cached", "cached", "failed", "skipped", "skipped"]
    assert summary["failed_component"] == "Trainer"
    assert err.startswith("error: Trainer failed: ") and err.count("\n") == 1
    assert "Traceback" not in out + err
    assert list_versions(dirs["serving"]) == versions
    # Nothing that looks like a finished Trainer: only its unfinished folder is new.
    now = sorted(p.name for p in (dirs["root"] / "Trainer").iterdir())
    new = set(now) - set(trainers)
    assert len(new) == 1 and new.pop().startswith(".partial-")

    monkeypatch.delenv(FAIL_ENV)
    code, _, err, summary = run(dirs, "--learning-rate", "0.03")
    assert code == 0, err[-3000:]
    assert statuses(summary) == ["cached", "cached", "ran", "ran", "ran"]
    # Resumed: the finished training in the unfinished folder was not redone.
    history = artifact(summary, "Trainer").uri / "model_run" / "history.csv"
    assert len(history.read_text().splitlines()) == 1 + 1  # header + 1 epoch
    assert not any(p.name.startswith(".") for p in (dirs["root"] / "Trainer").iterdir())


def _nearest_class_mean_model(x, y):
    """logits_c = x . mu_c - |mu_c|^2 / 2: the nearest class mean, as a Keras model."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    means = np.stack([flat[y == k].mean(0) for k in range(10)])
    inputs = keras.Input(x.shape[1:])
    dense = keras.layers.Dense(10)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([means.T.astype(np.float32),
                       (-0.5 * (means ** 2).sum(1)).astype(np.float32)])
    return model, means


def test_a_better_served_model_is_not_blessed_and_nothing_is_pushed(dirs, digits):
    model, means = _nearest_class_mean_model(digits.x_train, digits.y_train)
    val = digits.x_val.reshape(len(digits.x_val), -1).astype(np.float64)
    distances = ((val[:, None, :] - means[None]) ** 2).sum(-1)
    reference = np.mean(np.argmin(distances, 1) == digits.y_val)
    better = export_saved_model(model, dirs["serving"], [str(i) for i in range(10)])
    versions = list_versions(dirs["serving"])
    assert versions[-1] == int(better.name)

    code, out, err, summary = run(dirs, "--learning-rate", "0.03")
    assert code == 0, err[-3000:]
    # A new served model re-evaluates; nothing upstream runs again.
    assert statuses(summary) == ["cached", "cached", "cached", "ran", "ran"]
    blessing = artifact(summary, "Evaluator")
    served = blessing.properties["baseline"]
    assert served["version"] == int(better.name)
    assert served["accuracy"] == pytest.approx(reference, abs=1e-12)
    assert blessing.properties["val_accuracy"] < reference
    assert blessing.properties["blessed"] is False
    reason = (blessing.uri / "NOT_BLESSED").read_text().strip()
    assert f"served version {better.name}" in reason and "\n" not in reason
    assert not (blessing.uri / "BLESSED").exists()
    assert summary["pushed"]["pushed"] is False
    assert summary["pushed"]["reason"] == f"not pushed: {reason}"
    assert list_versions(dirs["serving"]) == versions
    assert "NOT_BLESSED" in out


# --- bad input ------------------------------------------------------------------------

def test_train_refuses_a_kmeans_result_for_other_stages(first, digits, tmp_path):
    from stl10_keras.config import ConfigError, preset
    from stl10_keras.train import train

    result = c.load_kmeans_result(artifact(first, "Transform"))  # stages 1 and 2
    config = preset("smoke", "digits", variant="kmeans1")
    with pytest.raises(ConfigError, match="recompute it"):
        train(config, tmp_path / "run", verbose=0, splits=digits, kmeans_result=result)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_fingerprints_ignore_key_order_and_see_every_value():
    a = c.compute_fingerprint("Trainer", {"x": 1, "y": [1, 2]}, {"T": "f"})
    assert a == c.compute_fingerprint("Trainer", {"y": [1, 2], "x": 1}, {"T": "f"})
    assert a != c.compute_fingerprint("Trainer", {"x": 1, "y": [1, 3]}, {"T": "f"})
    assert a != c.compute_fingerprint("Evaluator", {"x": 1, "y": [1, 2]}, {"T": "f"})
    assert a != c.compute_fingerprint("Trainer", {"x": 1, "y": [1, 2]}, {"T": "g"})


def test_a_bad_flag_is_one_sentence_and_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.run", *FLAGS[:4], "--accuracy-threshold", "2",
         "--pipeline-root", str(tmp_path / "root"),
         "--serving-dir", str(tmp_path / "serving")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --accuracy-threshold must be in [0, 1]")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "root").exists()


def test_a_serving_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "serving").write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.run", *FLAGS,
         "--pipeline-root", str(tmp_path / "root"),
         "--serving-dir", str(tmp_path / "serving")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: --serving-dir {tmp_path / 'serving'} is a "
                                  "file")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "root").exists()


def test_missing_stl10_fails_at_example_gen_naming_the_fix(tmp_path):
    dirs = {"root": tmp_path / "root", "serving": tmp_path / "serving"}
    (tmp_path / "empty").mkdir()
    code, out, err, summary = run(dirs, "--dataset", "stl10", "--variant", "baseline",
                                  "--data-dir", str(tmp_path / "empty"),
                                  "--no-download")
    assert code == 1
    assert statuses(summary) == ["failed"] + ["skipped"] * 4
    assert err.startswith("error: ExampleGen failed: STL-10 is not on disk")
    assert "--data-dir" in err and err.count("\n") == 1
    assert "Traceback" not in out + err
    assert not (tmp_path / "serving").exists()


def test_missing_stl10_is_the_only_line_on_stderr_of_the_command(tmp_path):
    # tfds' "WARNING:absl:Variant folder DIR/stl10/1.0.0 has no
    # dataset_info.json" used to come first (the in-process test above does not
    # see it: logging's handler writes to the real stderr).
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.run", "--dataset", "stl10", "--preset",
         "smoke", "--variant", "baseline", "--data-dir", str(tmp_path / "empty"),
         "--no-download", "--verbose", "0", "--pipeline-root", str(tmp_path / "root"),
         "--serving-dir", str(tmp_path / "serving")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ExampleGen failed: STL-10 is not on disk")


def test_help_gives_the_default_paths_with_their_preset_part():
    # It used to say runs/pipelines/DATASET_VARIANT_sSEED, while a smoke or
    # paper run goes to ..._smoke_s0 / ..._paper_s0.
    from pipelines.run import build_parser
    from stl10_keras.cli import default_run_name
    from stl10_keras.config import preset

    text = " ".join(build_parser().format_help().split())
    assert "runs/pipelines/DATASET_VARIANT[_PRESET]_sSEED" in text
    assert "saved_models/DATASET_VARIANT[_PRESET]_sSEED" in text
    assert default_run_name(preset("smoke", "digits")) == "digits_kmeans12_smoke_s0"
