"""Benchmark: the model server's two front ends (REST and gRPC) under load on
loopback, beside the in-process signature call on the same batches.

    PYTHONPATH=. python benchmarks/serve.py [--preset default|smoke] \\
        [--clients 1,4,16] [--batches 1,32] [--seconds 10] \\
        [--signatures default,bytes] [--threads 8] [--batching off,on] \\
        [--batching-parameters-file FILE] [--model-base-path saved_models/NAME]

Exports a digits-sized model (32x32x3 input; the `default` preset's widths
64..512, or `smoke`; untrained weights, which do not change the speed) into a
temp dir, or takes an existing `--model-base-path` (its input shape is read from
the served signature), and starts `python -m stl10_keras.serve` with REST and
gRPC on free 127.0.0.1 ports in a subprocess (so the clients and the server do
not share one Python GIL). For each row, that many client threads send the same
prepared request in a loop for `--seconds` (after one second of warm-up that is
not counted): a keep-alive HTTP connection each (REST, `{"instances": ...}`),
a channel each (gRPC, `PredictionServiceStub.Predict` with
`tf.make_tensor_proto`), or the SavedModel's signature called in this process
(`in-process`: no transport, no request parsing; the upper bound). Requests:
`--batches` random images per request, as uint8 (`serving_default`) or PNG
bytes (`serving_bytes`).

`--batching off,on` runs the REST and gRPC rows against two servers, one
started without and one with `--enable-batching` (and the
`--batching-parameters-file`, by default max_batch_size 32,
batch_timeout_micros 2000, max_enqueued_batches 1000, num_batch_threads 1).
First, the upper bound is measured: the in-process signature on batches of 32
images, one client; each row's images/s is also given as a fraction of it.

Prints a markdown table: requests, req/s, images/s, its fraction of the bound,
p50 and p99 latency, and errors (a failed call or a wrong number of
predictions); the exit code is 1 if any error occurred.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from stl10_keras import flags
from _common import cpu_name

ROOT = Path(__file__).resolve().parents[1]
NAME = "bench"
FRONT_ENDS = ("in-process", "REST", "gRPC")
#: The in-process batch size whose images/s is the upper bound.
BOUND_BATCH = 32
#: The batching file of the `on` rows unless --batching-parameters-file: one
#: batch thread (TensorFlow already spreads one batch over the cores), 2 ms for
#: a batch to fill (TF Serving's guide suggests trying 1-10 ms on CPUs), and a
#: queue long enough never to refuse the benchmark's clients.
BATCHING = """max_batch_size { value: 32 }
batch_timeout_micros { value: 2000 }
max_enqueued_batches { value: 1000 }
num_batch_threads { value: 1 }
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = flags.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("default", "smoke"), default="default",
                        help="the exported model's widths (default: the lab's)")
    parser.add_argument("--model-base-path", default=None,
                        help="benchmark this export instead of a fresh one")
    parser.add_argument("--clients", default="1,4,16",
                        help="concurrent clients per row, comma-separated")
    parser.add_argument("--threads", type=flags.number(int, 1), default=8,
                        help="server threads")
    parser.add_argument("--seconds", type=flags.positive(float), default=10.0,
                        help="per row")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--signatures", default="default",
                        help="default (uint8 images) and/or bytes (PNG)")
    parser.add_argument("--front-ends", default=",".join(FRONT_ENDS),
                        help="in-process, REST and/or gRPC")
    parser.add_argument("--batching", default="off",
                        help="off and/or on: servers without and with "
                             "--enable-batching")
    parser.add_argument("--batching-parameters-file", default=None,
                        help="the batching server's file (default: max_batch_size "
                             "32, batch_timeout_micros 2000, num_batch_threads 1)")
    args = parser.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
        args.clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        parser.error("--batches takes integers separated by commas, e.g. 1,32; "
                     "--clients too, e.g. 1,4,16.")
    args.signatures = args.signatures.split(",")
    args.front_ends = args.front_ends.split(",")
    args.batching = args.batching.split(",")
    if (min(args.batches) < 1 or min(args.clients) < 1
            or not set(args.signatures) <= {"default", "bytes"}
            or not set(args.front_ends) <= set(FRONT_ENDS)
            or not set(args.batching) <= {"off", "on"}):
        parser.error("--clients and --batches must be positive; --signatures takes "
                     "default and/or bytes; --front-ends takes in-process, REST "
                     "and/or gRPC; --batching takes off and/or on.")
    return args


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, threads: int, extra: list[str] | None = None
                 ) -> tuple[subprocess.Popen, str, str]:
    """The server in a subprocess; returns it, its REST `host:port` and gRPC's."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    # stderr to a file, not a pipe: nobody reads it while the server runs, and
    # a full pipe would block it; if it does not start, its error line is there.
    stderr = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stl10_keras.serve", "--model-base-path", str(base),
         "--model-name", NAME, "--port", "0", "--grpc-port", str(_free_port()),
         "--threads", str(threads), "--max-body-mb", "64", *(extra or [])],
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
    rest = line.split("http://", 1)[1].split("/", 1)[0]
    grpc_address = line.split("gRPC at ", 1)[1].split(";", 1)[0]
    return proc, rest, grpc_address


def input_shape(rest: str, signature: str) -> list[int]:
    """The served `serving_default` input's shape, without the batch axis."""
    connection = http.client.HTTPConnection(*rest.rsplit(":", 1), timeout=60)
    connection.request("GET", f"/v1/models/{NAME}/metadata")
    defs = json.loads(connection.getresponse().read())["metadata"]["signature_def"]
    connection.close()
    [spec] = defs["signature_def"]["serving_default"]["inputs"].values()
    return [int(d["size"]) for d in spec["tensor_shape"]["dim"]][1:]


def make_images(shape: list[int], n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)


def png_bytes(images: np.ndarray) -> list[bytes]:
    import io

    from PIL import Image

    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
            buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def in_process_client(base: Path, images: np.ndarray, signature: str
                      ) -> Callable[[], Callable[[], bool]]:
    import tensorflow as tf

    from stl10_keras.export import list_versions

    loaded = tf.saved_model.load(str(base / str(list_versions(base)[-1])))
    if signature == "default":
        fn, inputs = loaded.signatures["serving_default"], {
            "images": tf.constant(images)}
    else:
        fn, inputs = loaded.signatures["serving_bytes"], {
            "image_bytes": tf.constant(png_bytes(images))}

    def make():
        def send():
            return int(fn(**inputs)["probabilities"].shape[0]) == len(images)
        return send
    return make


def rest_client(rest: str, images: np.ndarray, signature: str
                ) -> Callable[[], Callable[[], bool]]:
    import base64

    if signature == "default":
        body = json.dumps({"instances": images.tolist()}).encode()
    else:
        body = json.dumps({"signature_name": "serving_bytes", "instances": [
            {"b64": base64.b64encode(b).decode()} for b in png_bytes(images)]}
            ).encode()
    host, port = rest.rsplit(":", 1)
    path = f"/v1/models/{NAME}:predict"

    def make():
        state = {"c": http.client.HTTPConnection(host, int(port), timeout=60)}

        def send():
            try:
                state["c"].request("POST", path, body,
                                   {"Content-Type": "application/json"})
                response = state["c"].getresponse()
                data = response.read()
                return (response.status == 200 and
                        len(json.loads(data)["predictions"]) == len(images))
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                state["c"].close()
                state["c"] = http.client.HTTPConnection(host, int(port), timeout=60)
                return False
        return send
    return make


def grpc_client(address: str, images: np.ndarray, signature: str
                ) -> Callable[[], Callable[[], bool]]:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = NAME
    if signature == "default":
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    else:
        request.model_spec.signature_name = "serving_bytes"
        request.inputs["image_bytes"].CopyFrom(
            tf.make_tensor_proto(np.array(png_bytes(images), dtype=object)))
    options = [("grpc.max_send_message_length", -1),
               ("grpc.max_receive_message_length", -1)]

    def make():
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(address, options=options))

        def send():
            try:
                response = stub.Predict(request, timeout=60)
            except grpc.RpcError:
                return False
            shape = response.outputs["probabilities"].tensor_shape.dim
            return shape[0].size == len(images)
        return send
    return make


def run_row(make: Callable[[], Callable[[], bool]], batch: int, clients: int,
            seconds: float, warmup: float = 1.0) -> dict:
    """`clients` threads call `send()` until the time is up; returns the statistics."""
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    results: list[list] = [[] for _ in range(clients)]  # (t_end, latency, ok)

    def client(i: int) -> None:
        send = make()
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            ok = send()
            t1 = time.perf_counter()
            results[i].append((t1, t1 - t0, ok))

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + warmup + 120)
    done = [r for rs in results for r in rs if measure_from <= r[0] <= stop_at]
    latencies = np.array([r[1] for r in done if r[2]]) * 1000
    return {
        "requests": len(done),
        "rps": len(done) / seconds,
        "ips": len(done) * batch / seconds,
        "p50": float(np.percentile(latencies, 50)) if latencies.size else float("nan"),
        "p99": float(np.percentile(latencies, 99)) if latencies.size else float("nan"),
        "errors": sum(1 for r in done if not r[2]),
    }


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def print_row(front: str, label: str, batch: int, clients: int, batching: str,
              row: dict, bound: float) -> None:
    print(f"| {front} | {label} | {batch} | {clients} | {batching} | "
          f"{row['requests']} | {row['rps']:.1f} | {row['ips']:.1f} | "
          f"{row['ips'] / bound:.2f} | {row['p50']:.1f} | {row['p99']:.1f} | "
          f"{row['errors']} |", flush=True)


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_base_path:
            base, what = Path(args.model_base_path), args.model_base_path
        else:
            base, what = export_model(args.preset, Path(tmp)), f"{args.preset} preset"
        batching_file = args.batching_parameters_file
        if batching_file is None:
            batching_file = Path(tmp) / "batching.txt"
            batching_file.write_text(BATCHING)
        servers: dict[str, tuple[subprocess.Popen, str, str]] = {}
        errors = 0
        try:
            for mode in args.batching:
                extra = (["--enable-batching", "--batching-parameters-file",
                          str(batching_file)] if mode == "on" else [])
                servers[mode] = start_server(base, args.threads, extra)
            rest = next(iter(servers.values()))[1]
            shape = input_shape(rest, "serving_default")
            images = make_images(shape, max(*args.batches, BOUND_BATCH))
            load_before = os.getloadavg()[0]
            bound_row = run_row(in_process_client(base, images[:BOUND_BATCH],
                                                  "default"),
                                BOUND_BATCH, 1, args.seconds)
            bound = bound_row["ips"]
            print(f"# Model server benchmark, {datetime.date.today()}, {cpu_name()}, "
                  f"{os.cpu_count()} CPUs; model {what} "
                  f"({'x'.join(map(str, shape))} uint8 input), {args.threads} server "
                  f"threads, {args.seconds:g} s per row\n", flush=True)
            print(f"Upper bound: the in-process signature on batches of "
                  f"{BOUND_BATCH}, 1 client: {bound:.1f} images/s (p50 "
                  f"{bound_row['p50']:.1f} ms, p99 {bound_row['p99']:.1f} ms).\n")
            if "on" in servers:
                print("Batching (the `on` rows): " + " ".join(
                    Path(batching_file).read_text().split()) + "\n")
            print("| front end | request | batch | clients | batching | requests | "
                  "req/s | images/s | of bound | p50 ms | p99 ms | errors |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
            for signature in args.signatures:
                label = "uint8" if signature == "default" else "PNG bytes"
                for batch in args.batches:
                    x = images[:batch]
                    for front in args.front_ends:
                        runs = ([("-", None)] if front == "in-process" else
                                [(mode, servers[mode]) for mode in args.batching])
                        for mode, server in runs:
                            if front == "in-process":
                                make = in_process_client(base, x, signature)
                            elif front == "REST":
                                make = rest_client(server[1], x, signature)
                            else:
                                make = grpc_client(server[2], x, signature)
                            for clients in args.clients:
                                row = run_row(make, batch, clients, args.seconds)
                                errors += row["errors"]
                                print_row(front, label, batch, clients, mode, row,
                                          bound)
            print(f"\n1-min load average {load_before:.1f} before, "
                  f"{os.getloadavg()[0]:.1f} after")
        finally:
            for proc, _, _ in servers.values():
                stop_server(proc)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
