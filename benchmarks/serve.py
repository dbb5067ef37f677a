"""Benchmark: the REST server (`python -m stl10_keras.serve`) under load on loopback.

    PYTHONPATH=. python benchmarks/serve.py [--preset default|smoke] [--clients 8] \\
        [--seconds 10] [--batches 1,32] [--signatures default,bytes] \\
        [--model-base-path saved_models/NAME]

Exports a digits-sized model (32x32x3 input; the `default` preset's widths
64..512, or `smoke`; untrained weights, which do not change the speed) into a
temp dir, or takes an existing `--model-base-path`, and starts the server on a
free 127.0.0.1 port in a subprocess (so the clients and the server do not share
one Python GIL). For each row, `--clients` threads, each with its own keep-alive
HTTP connection, send the same prepared request in a loop for `--seconds`
(after one second of warm-up that is not counted), then stop by themselves.
Requests: `--batches` images per request, as uint8 instances
(`serving_default`) or as base64 PNGs (`serving_bytes`); the images are
scikit-learn's digits upsampled to 32x32x3, as `--dataset digits` trains on.

Prints a markdown table per row: requests, req/s, images/s, p50 and p99
latency, and errors (a non-200 answer, a wrong number of predictions, or a
connection error); the exit code is 1 if any error occurred.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import io
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import cpu_name

from stl10_keras.sources.digits import digits_images

ROOT = Path(__file__).resolve().parents[1]
NAME = "bench"


def export_model(preset_name: str, folder: Path) -> Path:
    import keras

    from stl10_keras.config import preset
    from stl10_keras.export import export_saved_model
    from stl10_keras.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(preset(preset_name, "digits"), (32, 32, 3))
    base = folder / NAME
    export_saved_model(model, base, [str(i) for i in range(10)])
    return base


def request_body(images: np.ndarray, signature: str) -> bytes:
    if signature == "default":
        return json.dumps({"instances": images.tolist()}).encode()
    from PIL import Image

    instances = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        instances.append({"b64": base64.b64encode(buffer.getvalue()).decode()})
    return json.dumps({"signature_name": "serving_bytes",
                       "instances": instances}).encode()


def start_server(base: Path, threads: int) -> tuple[subprocess.Popen, str, int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    # stderr to a file, not a pipe: nobody reads it while the server runs, and
    # a full pipe would block it; if it does not start, its error line is there.
    stderr = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stl10_keras.serve", "--model-base-path", str(base),
         "--model-name", NAME, "--port", "0", "--threads", str(threads),
         "--max-body-mb", "64"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    if not select.select([proc.stdout], [], [], 300)[0]:
        proc.kill()
        raise SystemExit("error: the server printed nothing in 300 s.")
    line = proc.stdout.readline()
    if not line.startswith("Serving"):
        proc.kill()
        proc.wait()
        stderr.seek(0)
        errors = [ln for ln in stderr.read().splitlines() if ln.startswith("error:")]
        raise SystemExit(errors[-1] if errors else
                         f"error: the server did not start ({line.strip()!r}).")
    stderr.close()
    address = line.split("http://", 1)[1].split("/", 1)[0]
    host, port = address.rsplit(":", 1)
    return proc, host, int(port)


def run_row(host: str, port: int, body: bytes, batch: int, clients: int,
            seconds: float, warmup: float = 1.0) -> dict:
    """`clients` threads send `body` until the time is up; returns the statistics."""
    path = f"/v1/models/{NAME}:predict"
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    results: list[list] = [[] for _ in range(clients)]  # (t_end, latency, ok)

    def client(i: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=60)
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    connection.request("POST", path, body,
                                       {"Content-Type": "application/json"})
                    response = connection.getresponse()
                    data = response.read()
                    ok = (response.status == 200 and
                          len(json.loads(data)["predictions"]) == batch)
                except (OSError, http.client.HTTPException, ValueError, KeyError):
                    ok = False
                    connection.close()
                    connection = http.client.HTTPConnection(host, port, timeout=60)
                t1 = time.perf_counter()
                results[i].append((t1, t1 - t0, ok))
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + warmup + 120)
    done = [r for rs in results for r in rs if r[0] >= measure_from and r[0] <= stop_at]
    latencies = np.array([r[1] for r in done if r[2]]) * 1000
    return {
        "requests": len(done),
        "rps": len(done) / seconds,
        "ips": len(done) * batch / seconds,
        "p50": float(np.percentile(latencies, 50)) if latencies.size else float("nan"),
        "p99": float(np.percentile(latencies, 99)) if latencies.size else float("nan"),
        "errors": sum(1 for r in done if not r[2]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("default", "smoke"), default="default",
                        help="the exported model's widths (default: the lab's)")
    parser.add_argument("--model-base-path", default=None,
                        help="benchmark this export instead of a fresh one")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=8, help="server threads")
    parser.add_argument("--seconds", type=float, default=10.0, help="per row")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--signatures", default="default,bytes")
    args = parser.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error("--batches takes integers separated by commas, e.g. 1,32.")
    signatures = args.signatures.split(",")
    if (args.clients < 1 or args.threads < 1 or not 0 < args.seconds < math.inf
            or min(batches) < 1 or not set(signatures) <= {"default", "bytes"}):
        parser.error("--clients, --threads, --seconds and --batches must be positive; "
                     "--signatures takes default and/or bytes.")

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_base_path:
            base, what = Path(args.model_base_path), args.model_base_path
        else:
            base, what = export_model(args.preset, Path(tmp)), f"{args.preset} preset"
        images = digits_images()[0][:max(batches)]
        proc, host, port = start_server(base, args.threads)
        try:
            load_before = os.getloadavg()[0]
            print(f"# REST server benchmark, {datetime.date.today()}, {cpu_name()}, "
                  f"{os.cpu_count()} CPUs; digits model ({what}, 32x32x3), "
                  f"{args.clients} clients, {args.threads} server threads, "
                  f"{args.seconds:g} s per row\n", flush=True)
            print("| request | batch | requests | req/s | images/s | p50 ms | p99 ms "
                  "| errors |")
            print("|---|---|---|---|---|---|---|---|", flush=True)
            errors = 0
            for signature in signatures:
                for batch in batches:
                    body = request_body(images[:batch], signature)
                    row = run_row(host, port, body, batch, args.clients, args.seconds)
                    errors += row["errors"]
                    label = ("uint8 instances (serving_default)" if signature ==
                             "default" else "b64 PNG (serving_bytes)")
                    print(f"| {label} | {batch} | {row['requests']} | "
                          f"{row['rps']:.1f} | {row['ips']:.1f} | {row['p50']:.1f} | "
                          f"{row['p99']:.1f} | {row['errors']} |", flush=True)
            print(f"\nrequest body: {len(request_body(images[:1], 'default')):,} bytes "
                  f"per uint8 image as JSON; 1-min load average "
                  f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
