"""benchmarks/train_throughput.py: a tiny run, the PyTorch peer, no TF under JAX."""

import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import FAST_XLA, ROOT, subprocess_env

SCRIPT = ROOT / "benchmarks" / "train_throughput.py"
TINY = ["--quick", "--batch-sizes", "4", "--precisions", "float32", "--steps", "1",
        "--rounds", "1", "--warmup", "1", "--torch-modes", "eager"]


def _script():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch():
    try:
        import torch
    except ImportError as err:
        pytest.skip(f"torch is not importable ({err}); the peer is benchmark-only")
    return torch


def test_tiny_run_prints_every_row_with_positive_rates(capsys, tmp_path):
    import json

    import keras

    bench = _script()
    result = bench.main(TINY + ["--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out

    rows = result["rows"]
    keras_rows = [r for r in rows if r["framework"] == "keras"]
    assert [(r["batch"], r["precision"], r["augment"]) for r in keras_rows] == [
        (4, "float32", True), (4, "float32", False)]
    torch_rows = [r for r in rows if r["framework"] == "torch"]
    assert len(torch_rows) == 2
    for r in torch_rows:  # measured, or skipped with the reason
        assert "images_per_sec" in r or r["skipped"].startswith(
            ("skipped: ", "failed: "))
    for r in keras_rows + [r for r in torch_rows if "images_per_sec" in r]:
        assert math.isfinite(r["images_per_sec"]) and r["images_per_sec"] > 0
    assert out.count("| keras | ") >= 2 and out.count("| torch | ") >= 2
    assert "| framework | mode | batch | precision |" in out
    assert json.loads((tmp_path / "out.json").read_text())["rows"] == json.loads(
        json.dumps(rows))
    # The run leaves the global dtype policy as it found it.
    assert keras.mixed_precision.global_policy().name == "float32"


def test_torch_peer_has_the_keras_models_parameters():
    torch = _torch()
    bench = _script()
    from stl10_keras.model import build_model

    for widths, size in [((8, 16, 16, 32, 32), 32), ((64, 128, 256, 512, 512), 96),
                         ((4, 8, 8, 8, 8), 40)]:  # 40 -> 20, 10, 5, 3, 2: odd pools
        model = build_model(bench.make_config(widths), (size, size, 3))
        net = bench.torch_net(widths, image_size=size)
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        assert sum(p.numel() for p in net.parameters()) == trainable
        moving = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights
                     if "moving" in w.path)
        running = sum(b.numel() for name, b in net.named_buffers() if "running" in name)
        assert running == moving
        out = net(torch.zeros(2, 3, size, size))
        assert tuple(out.shape) == (2, 10)


def test_torch_augmentation_is_random_affines_warp():
    torch = _torch()
    bench = _script()
    from keras import ops

    from stl10_keras.augment import affine_matrices, warp_affine

    rng = np.random.default_rng(1)
    h, w = 20, 28  # not square: the normalised coordinates must be rescaled
    images = rng.uniform(0, 255, (6, h, w, 3)).astype("float32")
    u = rng.uniform(0, 1, (6, 5)).astype("float32")
    got = bench.torch_random_affine(
        torch.from_numpy(images).permute(0, 3, 1, 2), u=torch.from_numpy(u)
    ).permute(0, 2, 3, 1).numpy()
    # The same draws as RandomAffine's sample_parameters uses them.
    transforms = affine_matrices(
        flip=u[:, 0] < 0.5, angle_deg=(2 * u[:, 1] - 1) * 15.0,
        scale=1.0 + 0.4 * u[:, 2], tx=(2 * u[:, 3] - 1) * 0.2 * w,
        ty=(2 * u[:, 4] - 1) * 0.2 * h, height=h, width=w)
    want = ops.convert_to_numpy(warp_affine(images, transforms, fill_mode="reflect"))
    np.testing.assert_allclose(got, want, atol=0.05)


def test_no_tensorflow_under_jax():
    pytest.importorskip("jax", reason="jax is not installed")
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['x'] + {TINY + ['--augment', 'on', '--no-torch']!r}\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "print('NO_TENSORFLOW')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env(KERAS_BACKEND="jax", XLA_FLAGS=FAST_XLA), timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NO_TENSORFLOW" in proc.stdout
    assert "| keras | jax fit" in proc.stdout


def test_trace_summary_counts_gpu_streams_once(tmp_path):
    import gzip
    import json

    bench = _script()
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name",
         "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name",
         "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "pid": 2, "tid": 8, "name": "thread_name",
         "args": {"name": "XLA Ops"}},
        {"ph": "X", "pid": 2, "tid": 7, "name": "sm90_xmma_fprop_conv", "dur": 30.0},
        {"ph": "X", "pid": 2, "tid": 7, "name": "loop_gather_fusion", "dur": 10.0},
        {"ph": "X", "pid": 2, "tid": 7, "name": "MemcpyH2D", "dur": 10.0},
        {"ph": "X", "pid": 2, "tid": 8, "name": "convolution.3", "dur": 30.0},  # repeat
        {"ph": "X", "pid": 1, "tid": 3, "name": "PjitFunction", "dur": 500.0},  # host
    ]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)

    summary = bench.summarize_trace(str(tmp_path))
    assert summary["total_ms"] == pytest.approx(0.05)
    shares = {c["category"]: c["share"] for c in summary["categories"]}
    assert shares == pytest.approx({"conv / matmul": 0.6, "host<->device copy": 0.2,
                                    "gather (RandomAffine's sampler)": 0.2})
    assert "| conv / matmul | 0.03 | 60.0% |" in bench.format_trace(summary)


@pytest.mark.parametrize("flags, needle", [
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--batch-sizes", "4,-8"], "--batch-sizes"),
    (["--widths", "8,0,16,32,32"], "--widths"),
    (["--image-size", "0"], "--image-size"),
    (["--no-keras", "--no-torch"], "nothing to time"),
])
def test_flags_that_would_time_nothing_are_refused_before_any_work(flags, needle,
                                                                   capsys):
    bench = _script()
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--quick", *flags])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert needle in last and "Traceback" not in last
