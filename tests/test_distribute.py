"""`--distribution`: MirroredStrategy (TF) and keras.distribution.DataParallel (JAX).

Devices have to be configured before TensorFlow or JAX starts, so every run
that trains on several devices is a subprocess. The references are independent
of the code under test: a one-device run with the same global batch, and numpy
slicing for the per-process batch shards.
"""

import importlib.util
import json
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import FAST_XLA, ROOT, subprocess_env
from stl10_keras import distribute
from stl10_keras.config import ConfigError
from stl10_keras.distribute import Distributed, DistributionOptions

needs_jax = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="jax is not installed (an optional dev dependency: "
           "pip install -r requirements-dev.txt)")

# A model small enough that a run is mostly start-up: 2 stages of 4 filters,
# no dropout (its masks are drawn per replica), no augmentation.
TINY = ["--dataset", "digits", "--preset", "smoke", "--variant", "baseline",
        "--widths", "4,4", "--fc-units", "16", "--dropout", "0",
        "--learning-rate", "0.05", "--batch-size", "40", "--epochs", "1",
        "--no-export", "--verbose", "0"]
# TensorFlow made unimportable, as on a JAX-only install (a finder, not
# sys.modules["tensorflow"] = None: keras treats a key there as TF loaded).
NO_TENSORFLOW = """
import importlib.abc, sys
class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _NoTensorFlow())
"""


def metrics_of(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def _losses(run_dir):
    return [h["loss"] for h in json.loads((run_dir / "metrics.json").read_text())
            ["history"]]


# --- flags and their errors (no device is set up) ---------------------------------

@pytest.mark.parametrize("options, backend, needle", [
    (DistributionOptions("data-parallel"), "tensorflow", "KERAS_BACKEND=jax"),
    (DistributionOptions("mirrored"), "jax", "KERAS_BACKEND=tensorflow"),
    (DistributionOptions("none", devices="2"), "tensorflow", "--distribution"),
    (DistributionOptions("mirrored", coordinator_address="h:1", num_processes=2,
                         process_id=0), "tensorflow", "keras-team/keras#20585"),
    (DistributionOptions("data-parallel", coordinator_address="h:1"), "jax",
     "all three"),
    (DistributionOptions("data-parallel", coordinator_address="h:1",
                         num_processes=2, process_id=2), "jax", "--process-id"),
    (DistributionOptions("data-parallel", coordinator_address="nohost",
                         num_processes=2, process_id=0), "jax", "HOST:PORT"),
    (DistributionOptions("data-parallel", devices="gpu0"), "jax", "--devices"),
    (DistributionOptions("data-parallel", devices="gpu:0,cpu:1"), "jax", "one kind"),
])
def test_impossible_flag_combinations_are_refused_with_the_fix(options, backend,
                                                                needle):
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-")):
        distribute.check_options(options, backend)


def test_devices_flag_parses_counts_and_names():
    assert distribute.parse_devices("4") == distribute.DeviceRequest("gpu", count=4)
    assert distribute.parse_devices("GPU:0, gpu:2") == \
        distribute.DeviceRequest("gpu", indices=(0, 2))
    assert distribute.parse_devices("cpu:0,cpu:1").size == 2


@pytest.mark.parametrize("flags, needle", [
    (["--distribution", "data-parallel"], "KERAS_BACKEND=jax"),
    (["--distribution", "mirrored", "--devices", "cpu:0,cpu:1", "--batch-size", "31"],
     "--batch-size 30"),
    (["--distribution", "mirrored", "--coordinator-address", "127.0.0.1:1234",
      "--num-processes", "2", "--process-id", "0"], "keras-team/keras#20585"),
])
def test_cli_refuses_bad_distribution_flags_with_exit_code_2(flags, needle, capsys,
                                                             tmp_path):
    from stl10_keras.cli import main

    # The test process runs the TensorFlow backend (conftest); all three are
    # refused before any device is set up, so running main here is safe.
    code = main(["--dataset", "digits", "--preset", "smoke", "--run-dir",
                 str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@needs_jax
def test_jax_devices_that_do_not_exist_are_refused_naming_the_fix(tmp_path):
    # JAX_PLATFORMS=cpu: JAX has no GPU on any machine, so the sentence must
    # say what to pass instead (it used to stop at "but JAX has none").
    proc = subprocess.run(
        [sys.executable, "-m", "stl10_keras.train", *TINY, "--distribution",
         "data-parallel", "--devices", "gpu:63", "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, env=subprocess_env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "--devices" in errors[0] and "pass cpu:0,cpu:1" in errors[0]


# --- per-process shards of each global batch ----------------------------------------

def _reference_shard(batch, replicas, processes, process_id):
    # Independent of distribute.rows_for_process: cut the batch to a multiple
    # of the replica count, split it into `processes` equal parts, take one.
    n = len(batch) // replicas * replicas
    return np.array_split(batch[:n], processes)[process_id] if n else None


@pytest.mark.parametrize("processes, process_id", [(1, 0), (2, 0), (2, 1)])
@pytest.mark.parametrize("kind", ["tf.data", "tf.data of known length", "numpy"])
@pytest.mark.parametrize("n, sizes", [
    (22, [8, 8, 4]),  # global batches 8, 8, 6: the last one cut to 4 (4 replicas)
    (19, [8, 8]),     # 8, 8, 3: the last one cut to nothing
])
def test_each_process_gets_its_equal_share_of_every_batch(n, sizes, kind, processes,
                                                          process_id):
    from stl10_keras.data import make_batches

    images = np.zeros((n, 2, 2, 3), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int32)
    replicas = 4
    batches = make_batches(images, labels, 8, use_tensorflow=kind != "numpy")
    dist = Distributed("data-parallel", replicas, processes, process_id)
    if kind == "tf.data of known length":
        sharded = dist.shard_batches(batches, n, 8)
        assert int(sharded.cardinality()) == len(sizes)
    else:
        sharded = dist.shard_batches(batches)
    if kind != "numpy":
        got = [y for _, y in sharded.as_numpy_iterator()]
    else:
        got = [sharded[i][1] for i in range(len(sharded))]
    expected = [_reference_shard(labels[i:i + 8], replicas, processes, process_id)
                for i in range(0, n, 8)]
    expected = [e for e in expected if e is not None]
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    # Every process gets the same number of batches, of the same sizes.
    assert [len(g) for g in got] == [size // processes for size in sizes]


def test_numpy_batches_cover_every_image_once_per_epoch_in_a_new_order():
    from stl10_keras.data import make_batches

    labels = np.arange(50, dtype=np.int32)
    images = np.zeros((50, 2, 2, 3), np.uint8)
    batches = make_batches(images, labels, 16, shuffle=True, seed=3,
                           use_tensorflow=False)
    epochs = []
    for _ in range(2):
        order = np.concatenate([batches[i][1] for i in range(len(batches))])
        assert sorted(order.tolist()) == list(range(50))
        assert [len(batches[i][1]) for i in range(len(batches))] == [16, 16, 16, 2]
        epochs.append(order.tolist())
        batches.on_epoch_end()
    assert epochs[0] != epochs[1] and epochs[0] != list(range(50))
    again = make_batches(images, labels, 16, shuffle=True, seed=3,
                         use_tensorflow=False)
    assert np.concatenate([again[i][1] for i in range(len(again))]).tolist() \
        == epochs[0]


# --- training on several devices -------------------------------------------------

_COMPARE = """
    import json, sys
    from stl10_keras import distribute
    from stl10_keras.cli import build_train_parser as build_parser, config_from_args
    from stl10_keras.train import train
    from stl10_keras.data import load_splits
    out, mode, devices, flags = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4:]
    dist = distribute.setup(distribute.DistributionOptions(mode, devices))
    config = config_from_args(build_parser().parse_args(flags))
    splits = load_splits("digits", seed=0)
    runs = {"one": None, mode: dist}
    losses = {name: [h["loss"] for h in train(config, f"{out}/{name}", None,
                                              verbose=0, splits=splits,
                                              distribution=d)["history"]]
              for name, d in runs.items()}
    print(json.dumps({"losses": losses, "replicas": dist.replicas,
                      "tensorflow_imported": "tensorflow" in sys.modules}))
"""


def test_mirrored_over_two_cpu_devices_matches_one_device(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_COMPARE), str(tmp_path), "mirrored",
         "cpu:0,cpu:1", *TINY], cwd=ROOT, env=subprocess_env(
            KERAS_BACKEND="tensorflow"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    one, mirrored = result["losses"]["one"], result["losses"]["mirrored"]
    # Not bit-equal: ManualBatchNorm normalises with each replica's own
    # statistics (20 images each, not 40), as keras' BatchNormalization does
    # without synchronisation. Measured on this run's setup: epoch-1 losses
    # 2.2305 vs 2.2230 (0.3 %). The mistakes this guards against move the
    # epoch-1 loss much more: twice the learning rate (gradients summed, not
    # averaged) 2.3540 (+5.9 %), --batch-size per replica instead of global
    # (80 in all) 2.3820 (+7.2 %).
    assert mirrored[0] == pytest.approx(one[0], rel=0.02)
    assert metrics_of(tmp_path / "mirrored")["replicas"] == 2
    assert metrics_of(tmp_path / "one")["replicas"] == 1


@needs_jax
def test_jax_data_parallel_over_two_host_devices_matches_one_device(tmp_path):
    # Without TensorFlow (a JAX-only install): the batches come from numpy.
    # The two-process test below feeds tf.data.
    proc = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW + textwrap.dedent(_COMPARE),
         str(tmp_path), "data-parallel", "", *TINY, "--epochs", "2"], cwd=ROOT,
        env=subprocess_env(KERAS_BACKEND="jax", XLA_FLAGS=(
            f"--xla_force_host_platform_device_count=2 {FAST_XLA}")),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2  # every host device, by default
    assert result["tensorflow_imported"] is False
    one, parallel = result["losses"]["one"], result["losses"]["data-parallel"]
    # One program over the global batch (XLA all-reduces, also the batch-norm
    # statistics): the same as one device up to the order of float sums.
    np.testing.assert_allclose(parallel, one, rtol=1e-4)
    assert one[1] < one[0]  # it trains
    m = metrics_of(tmp_path / "data-parallel")
    assert (m["distribution"], m["replicas"], m["processes"]) == \
        ("data-parallel", 2, 1)


def test_mirrored_with_sync_batch_norm_is_closer_to_one_device(tmp_path):
    # Synchronised statistics remove the replicas' own-half normalisation.
    # Measured on this setup, epoch-1 loss relative to one device: without
    # --sync-batch-norm +4.6e-3, with it -3.0e-4 (keras' BatchNormalization
    # with synchronized=True on one device moves the loss by as much: this
    # tiny net's near-constant channels amplify how a statistic is summed).
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_COMPARE), str(tmp_path), "mirrored",
         "cpu:0,cpu:1", *TINY, "--sync-batch-norm"], cwd=ROOT,
        env=subprocess_env(KERAS_BACKEND="tensorflow"), capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one, mirrored = result["losses"]["one"], result["losses"]["mirrored"]
    np.testing.assert_allclose(mirrored, one, rtol=1e-3)
    model = json.loads((tmp_path / "mirrored" / "config.json").read_text())["model"]
    assert model["sync_batch_norm"] is True


@pytest.mark.parametrize("flags, env", [
    (["--sync-batch-norm"], {"KERAS_BACKEND": "jax"}),
    (["--sync-batch-norm", "--distribution", "data-parallel"],
     {"KERAS_BACKEND": "jax"}),
])
def test_sync_batch_norm_where_it_cannot_apply_is_one_sentence(tmp_path, flags, env):
    proc = subprocess.run(
        [sys.executable, "-m", "stl10_keras.train", "--dataset", "digits",
         "--preset", "smoke", *flags, "--run-dir", str(tmp_path / "run"),
         "--no-export"], cwd=ROOT, env=subprocess_env(**env),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: --sync-batch-norm") and \
        "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# FixMatch on the same tiny net: 40 labeled + 80 unlabeled images a step, the
# weak (flip + shift) and strong views drawn on the devices.
FIXMATCH_TINY = [*TINY, "--variant", "augment", "--semi-supervised", "fixmatch"]


def test_fixmatch_mirrored_over_two_cpu_devices_matches_one_device(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_COMPARE), str(tmp_path), "mirrored",
         "cpu:0,cpu:1", *FIXMATCH_TINY], cwd=ROOT,
        env=subprocess_env(KERAS_BACKEND="tensorflow"), capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one, mirrored = result["losses"]["one"], result["losses"]["mirrored"]
    # As the supervised test above: each replica normalises with its own half
    # of the (1 + 2 mu) B views and draws its own augmentations, so not
    # bit-equal; gradients summed, not averaged, or --batch-size taken per
    # replica would move the loss more. That the replicas' losses add up to
    # the batch's (the unlabeled term too) is tested in test_fixmatch.
    np.testing.assert_allclose(mirrored, one, rtol=0.02)
    m = metrics_of(tmp_path / "mirrored")
    assert m["replicas"] == 2 and m["semi_supervised"] == "fixmatch"
    assert {"mask_rate", "unlabeled_loss", "pseudo_label_accuracy"} <= \
        set(m["history"][-1])


@needs_jax
def test_fixmatch_jax_data_parallel_over_two_host_devices_matches_one_device(
        tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW + textwrap.dedent(_COMPARE),
         str(tmp_path), "data-parallel", "", *FIXMATCH_TINY,
         # every weak view above tau (1/10 classes): the unlabeled term counts
         # from the first step. One epoch: later, where a pseudo-label's
         # argmax is a near tie, the order of float sums can flip it.
         "--confidence-threshold", "0.1"],
        cwd=ROOT, env=subprocess_env(KERAS_BACKEND="jax", XLA_FLAGS=(
            f"--xla_force_host_platform_device_count=2 {FAST_XLA}")),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    one, parallel = result["losses"]["one"], result["losses"]["data-parallel"]
    # One program over the global batch: the same views, the same batch
    # statistics, the same loss as one device up to the order of float sums.
    np.testing.assert_allclose(parallel, one, rtol=1e-4)
    m = metrics_of(tmp_path / "data-parallel")
    assert (m["distribution"], m["replicas"], m["semi_supervised"]) == \
        ("data-parallel", 2, "fixmatch")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_jax
@pytest.mark.e2e
def test_two_process_jax_run_on_loopback(tmp_path):
    run, export = tmp_path / "run", tmp_path / "export"
    address = f"127.0.0.1:{_free_port()}"
    flags = [f for f in TINY if f != "--no-export"]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "stl10_keras.train", *flags, "--run-dir", str(run),
         "--export-dir", str(export),
         "--distribution", "data-parallel", "--coordinator-address", address,
         "--num-processes", "2", "--process-id", str(i)],
        cwd=ROOT, env=subprocess_env(KERAS_BACKEND="jax", XLA_FLAGS=FAST_XLA),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    m = metrics_of(run)
    assert (m["distribution"], m["processes"], m["replicas"]) == ("data-parallel", 2, 2)
    assert (run / "model.keras").exists()
    # Process 1 kept its own records (for resuming) in a subfolder, and saw the
    # same global loss.
    assert not (run / "process_1" / "model.keras").exists()
    assert _losses(run / "process_1") == _losses(run)
    assert "process 1 of 2 done" in outputs[1][0]
    # Process 0 exported once; the SavedModel (written by a TensorFlow-backend
    # subprocess from model.keras) gives the JAX-trained model's probabilities.
    assert sorted(p.name for p in export.iterdir()) == ["1"]
    import tensorflow as tf

    from stl10_keras.data import load_splits
    from stl10_keras.model import load_model

    x = load_splits("digits", seed=0).x_val[:64]
    served = tf.saved_model.load(str(export / "1")).signatures["serving_default"]
    probabilities = served(images=tf.constant(x))["probabilities"].numpy()
    logits = load_model(run / "model.keras").predict(x.astype("float32"), verbose=0)
    np.testing.assert_allclose(probabilities, tf.nn.softmax(logits).numpy(),
                               atol=1e-5)


@pytest.mark.parametrize("flags, needle", [
    ([], "--no-export"),
    (["--no-export", "--variant", "augment", "--augment-on", "cpu"],
     "--augment-on device"),
])
def test_without_tensorflow_what_needs_it_is_refused_up_front(flags, needle,
                                                              monkeypatch, tmp_path):
    from stl10_keras import runtime
    from stl10_keras.cli import build_train_parser, config_from_args
    from stl10_keras.train import train

    # train asks whether TensorFlow is installed before importing it.
    monkeypatch.setattr(runtime, "tensorflow_installed", lambda: False)
    monkeypatch.setattr(runtime, "tensorflow_available", lambda: False)
    args = build_train_parser().parse_args(["--dataset", "digits", "--preset",
                                            "smoke", *flags])
    export_dir = None if args.no_export else tmp_path / "export"
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-")):
        train(config_from_args(args), tmp_path / "run", export_dir)
    assert not (tmp_path / "run").exists()
