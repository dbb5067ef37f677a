"""Wiring and running: `create_pipeline(...)` and `run_pipeline(pipeline)`.

`create_pipeline` connects the five components of `pipelines.components`
(ExampleGen -> Transform -> Trainer -> Evaluator -> Pusher) and gives each the
parameters that shape its output. `run_pipeline` is the local runner (TFX's
`LocalDagRunner`): for each component in order it computes the fingerprint of
its parameters and input artifacts, and

- skips it (`cached`) when `PIPELINE_ROOT/<Component>/<fingerprint[:12]>/`
  holds a complete `metadata.json` with that fingerprint;
- otherwise runs it (`ran`) into `PIPELINE_ROOT/<Component>/.partial-<fp[:12]>/`,
  writes `metadata.json` last and renames the folder into place, so a crash
  never leaves an artifact that looks complete;
- after a failure (`failed`) skips the rest (`skipped`); the next run finds
  the finished components cached and so resumes at the failed one (the
  Trainer's partial folder is kept: `train` resumes from its last epoch).

Every run writes `PIPELINE_ROOT/pipeline_run.json`: each component's status,
seconds, artifact and fingerprint, and the failed component with its error.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines import components as c
from stl10_keras.config import Config, ConfigError
from stl10_keras.data import default_val_per_class, source_files_signature
from stl10_keras.errors import UserError, one_line
from stl10_keras.io_utils import atomic_write_json, replace_directory

#: Test hook, not a user setting: `STL10_PIPELINE_FAIL=Trainer` makes the runner
#: fail that component after its payload is written and before its artifact is
#: committed (a crash at the worst moment).
FAIL_ENV = "STL10_PIPELINE_FAIL"
RUN_SUMMARY = "pipeline_run.json"
DEFAULT_ACCURACY_THRESHOLD = 0.5
DEFAULT_NUM_SHARDS = 4


class InjectedFailure(RuntimeError):
    """Raised by the `FAIL_ENV` test hook."""


@dataclass
class Node:
    """One component in a pipeline.

    Attributes:
        name: the component's name (`Trainer`), also its folder under the root.
        run: `run(output_dir, inputs, parameters) -> properties`; `inputs`
            maps each name in `inputs` to that component's artifact;
            `parameters` holds the runtime parameters too.
        parameters: what shapes its output (JSON-ready; in the fingerprint).
        inputs: names of upstream components.
        runtime_parameters: more parameters known only once the inputs exist
            (the Evaluator's served model); in the fingerprint too.
        resumable: keep an unfinished output folder for the next attempt.
        still_valid: an extra check that a cached artifact still holds.
    """

    name: str
    run: Callable[[Path, dict[str, c.Artifact], dict[str, Any]], dict[str, Any]]
    parameters: dict[str, Any]
    inputs: tuple[str, ...] = ()
    runtime_parameters: Callable[[dict[str, c.Artifact]], dict[str, Any]] | None = None
    resumable: bool = False
    still_valid: Callable[[c.Artifact], bool] | None = None


@dataclass
class Pipeline:
    """Components in run order, and where their artifacts go."""

    name: str
    root: Path
    serving_dir: Path
    nodes: list[Node] = field(default_factory=list)


def example_gen_parameters(config: Config, num_shards: int) -> dict[str, Any]:
    """ExampleGen's fingerprint: the data it reads and the split's seed."""
    d = config.data
    return {
        "dataset": d.dataset,
        "data_dir": (str(Path(d.data_dir).expanduser().resolve()) if d.data_dir
                     else None),
        "val_per_class": (d.val_per_class if d.val_per_class is not None
                          else default_val_per_class(d.dataset, d.labeled_per_class)),
        "labeled_per_class": d.labeled_per_class,
        "image_size": list(d.image_size) if d.image_size else None,
        "channels": d.channels,
        # A folder's images (or the IDX files) added, removed or edited make
        # a new Examples artifact.
        "files": source_files_signature(d.dataset, d.data_dir),
        "seed": config.train.seed,
        "num_shards": num_shards,
    }


def _pusher_output_present(artifact: c.Artifact) -> bool:
    # A pushed version deleted from the serving dir is pushed again.
    p = artifact.properties
    return not p.get("pushed") or (Path(p["destination"]) / "saved_model.pb").is_file()


def create_pipeline(
    config: Config,
    pipeline_root: str | os.PathLike,
    serving_dir: str | os.PathLike,
    accuracy_threshold: float = DEFAULT_ACCURACY_THRESHOLD,
    num_shards: int = DEFAULT_NUM_SHARDS,
    verbose: int = 1,
    name: str | None = None,
) -> Pipeline:
    """ExampleGen -> Transform -> Trainer -> Evaluator -> Pusher for one config.

    Args:
        config: the validated run config (every training flag).
        pipeline_root: where the artifacts and `pipeline_run.json` go.
        serving_dir: the TF Serving model base path the Pusher pushes to and
            the Evaluator compares with (`saved_models/NAME`).
        accuracy_threshold: the lowest validation accuracy the Evaluator blesses.
        num_shards: TFRecord files per split.
        verbose: 0 quiet, 1 progress bars, 2 one line per epoch.
        name: the pipeline's name (default: the serving dir's folder name).

    Returns:
        A `Pipeline` for `run_pipeline`.

    Raises:
        ConfigError: a parameter is out of range.
    """
    if not 0.0 <= accuracy_threshold <= 1.0:
        raise ConfigError(
            f"--accuracy-threshold must be in [0, 1] (a validation accuracy), got "
            f"{accuracy_threshold:g}; e.g. --accuracy-threshold 0.5.")
    if num_shards < 1:
        raise ConfigError(f"--num-shards must be at least 1, got {num_shards}.")
    # 0 and 0.0 are one threshold; as written in JSON they would be two fingerprints.
    accuracy_threshold = float(accuracy_threshold)
    root = Path(pipeline_root)
    serving = Path(serving_dir)
    if serving.exists() and not serving.is_dir():
        raise ConfigError(
            f"--serving-dir {serving} is a file, not a TF Serving model base path; "
            "pass a folder such as saved_models/NAME.")
    progress = verbose > 0
    d = config.data
    eg = example_gen_parameters(config, num_shards)
    served_key = str(serving.expanduser().resolve())

    def run_example_gen(out, inputs, parameters):
        return c.example_gen(out, d.dataset, d.data_dir, eg["val_per_class"],
                             eg["seed"], num_shards, d.download, progress,
                             labeled_per_class=d.labeled_per_class,
                             image_size=d.image_size, channels=d.channels)

    def run_transform(out, inputs, parameters):
        return c.transform(out, inputs["ExampleGen"], config, progress)

    def run_trainer(out, inputs, parameters):
        return c.trainer(out, inputs["ExampleGen"], inputs["Transform"], config,
                         verbose)

    def baseline(inputs):
        return {"served": c.served_baseline(served_key, inputs["Trainer"].fingerprint)}

    def run_evaluator(out, inputs, parameters):
        return c.evaluator(out, inputs["ExampleGen"], inputs["Trainer"],
                           parameters["served"], accuracy_threshold)

    def run_pusher(out, inputs, parameters):
        return c.pusher(out, inputs["Trainer"], inputs["Evaluator"], serving)

    nodes = [
        Node("ExampleGen", run_example_gen, eg),
        Node("Transform", run_transform, c.transform_parameters(config),
             ("ExampleGen",)),
        Node("Trainer", run_trainer, config.to_dict(), ("ExampleGen", "Transform"),
             resumable=True),
        Node("Evaluator", run_evaluator, {"accuracy_threshold": accuracy_threshold},
             ("ExampleGen", "Trainer"), runtime_parameters=baseline),
        Node("Pusher", run_pusher, {"serving_dir": served_key},
             ("Trainer", "Evaluator"), still_valid=_pusher_output_present),
    ]
    # JSON has no tuples: parameters are compared as they are written.
    for node in nodes:
        node.parameters = _jsonable(node.parameters)
    return Pipeline(name or serving.resolve().name, root, serving, nodes)


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(c.canonical_json(value))


# --- the runner ------------------------------------------------------------------

def _summary_line(name: str, properties: dict[str, Any]) -> str:
    """What a component produced, in a few words, for its status line."""
    p = properties
    if name == "ExampleGen":
        counts = "/".join(str(p["counts"][s]) for s in c.SPLITS)
        return (f"{counts} train/val/test/unlabeled images, content "
                f"{p['content_hash'][:12]}")
    if name == "Transform":
        mean = ", ".join(f"{m:.1f}" for m in p["statistics"]["train"]["mean"])
        km = p.get("kmeans")
        layers = f"k-means {', '.join(km['layers'])}" if km else "no k-means"
        return f"channel mean ({mean}); {layers}"
    if name == "Trainer":
        return (f"validation accuracy {p['val_accuracy']:.4f}, test "
                f"{p['test_accuracy']:.4f}")
    if name == "Evaluator":
        return f"{'BLESSED' if p['blessed'] else 'NOT_BLESSED'}: {p['reason']}"
    if name == "Pusher":
        return p["reason"]
    return ""


def _one_sentence(error: BaseException) -> str:
    """A component's failure in one line: a user's error (its sentence names the
    fix) as it is, anything else by its type and informative line."""
    if isinstance(error, (UserError, InjectedFailure)):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "Interrupted; run the same command again to resume."
    where = f"(the traceback is in {RUN_SUMMARY})"
    if not str(error).strip():
        return f"{type(error).__name__} {where}"
    return f"{type(error).__name__}: {one_line(error, limit=200)} {where}"


def _commit(partial: Path, final: Path, metadata: dict[str, Any]) -> None:
    """metadata.json last, then the folder renamed into place (replacing an
    incomplete or stale folder under the same name)."""
    atomic_write_json(partial / c.METADATA_FILE, metadata)
    replace_directory(partial, final)


def _run_node(pipeline: Pipeline, node: Node,
              artifacts: dict[str, c.Artifact]) -> tuple[str, c.Artifact]:
    """Run one component unless cached; returns `(status, artifact)`."""
    inputs = {n: artifacts[n] for n in node.inputs}
    parameters = dict(node.parameters)
    if node.runtime_parameters is not None:
        parameters.update(_jsonable(node.runtime_parameters(inputs)))
    fingerprint = c.compute_fingerprint(
        node.name, parameters, {n: a.fingerprint for n, a in inputs.items()})
    folder = pipeline.root / node.name
    final = folder / fingerprint[:12]
    cached = c.read_artifact(final)
    if cached is not None and cached.fingerprint == fingerprint and (
            node.still_valid is None or node.still_valid(cached)):
        return "cached", cached
    partial = folder / f".partial-{fingerprint[:12]}"
    if partial.exists() and not node.resumable:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / c.METADATA_FILE).unlink(missing_ok=True)
    start = time.perf_counter()
    properties = node.run(partial, inputs, parameters)
    if os.environ.get(FAIL_ENV) == node.name:
        raise InjectedFailure(
            f"{node.name} failed on purpose ({FAIL_ENV}={node.name}, a test hook).")
    metadata = {
        "type": c.ARTIFACT_TYPES.get(node.name, node.name),
        "producer": node.name,
        "pipeline": pipeline.name,
        "code_version": c.CODE_VERSION,
        "fingerprint": fingerprint,
        "parameters": parameters,
        "inputs": {n: {"fingerprint": a.fingerprint, "uri": str(a.uri)}
                   for n, a in inputs.items()},
        "created": c._now(),
        "seconds": time.perf_counter() - start,
        "properties": _jsonable(properties),
    }
    _commit(partial, final, metadata)
    return "ran", c.Artifact(final, metadata)


def run_pipeline(pipeline: Pipeline,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the pipeline's components in order (cached ones are skipped).

    Prints one line per component (name, status, seconds, what it produced or
    the error) and writes `PIPELINE_ROOT/pipeline_run.json`.

    Args:
        pipeline: from `create_pipeline`.
        log: where the status lines go (default: stdout, flushed).

    Returns:
        The run summary (what `pipeline_run.json` holds): `status`
        (`succeeded` or `failed`), `failed_component`, `error`, `components`
        (name, status, seconds, uri, fingerprint, summary), `blessed`, `pushed`.
    """
    log = log or (lambda line: print(line, flush=True))
    pipeline.root.mkdir(parents=True, exist_ok=True)
    started, wall0 = c._now(), time.perf_counter()
    artifacts: dict[str, c.Artifact] = {}
    rows: list[dict[str, Any]] = []
    failed: tuple[str, BaseException, str] | None = None
    for node in pipeline.nodes:
        if failed is not None:
            rows.append({"name": node.name, "status": "skipped", "seconds": 0.0})
            log(f"{node.name:<11} skipped")
            continue
        t0 = time.perf_counter()
        try:
            status, artifact = _run_node(pipeline, node, artifacts)
        except BaseException as e:  # noqa: BLE001 - every failure is reported
            seconds = time.perf_counter() - t0
            failed = (node.name, e, traceback.format_exc())
            rows.append({"name": node.name, "status": "failed", "seconds": seconds,
                         "error": _one_sentence(e)})
            log(f"{node.name:<11} failed  {seconds:7.1f} s  {_one_sentence(e)}")
            continue
        seconds = time.perf_counter() - t0
        artifacts[node.name] = artifact
        summary = _summary_line(node.name, artifact.properties)
        rows.append({"name": node.name, "status": status, "seconds": seconds,
                     "uri": str(artifact.uri), "fingerprint": artifact.fingerprint,
                     "summary": summary})
        log(f"{node.name:<11} {status:<7} {seconds:7.1f} s  {summary}")
    blessing = artifacts.get("Evaluator")
    push = artifacts.get("Pusher")
    result = {
        "pipeline": pipeline.name,
        "pipeline_root": str(pipeline.root),
        "serving_dir": str(pipeline.serving_dir),
        "started": started,
        "seconds": time.perf_counter() - wall0,
        "status": "failed" if failed else "succeeded",
        "failed_component": failed[0] if failed else None,
        "error": _one_sentence(failed[1]) if failed else None,
        "traceback": failed[2] if failed else None,
        "components": rows,
        "artifacts": {n: str(a.uri) for n, a in artifacts.items()},
        "blessed": blessing.properties["blessed"] if blessing else None,
        "pushed": ({k: push.properties[k] for k in ("pushed", "pushed_now", "version",
                                                   "destination", "reason")}
                   if push else None),
    }
    atomic_write_json(pipeline.root / RUN_SUMMARY, result)
    if failed and isinstance(failed[1], KeyboardInterrupt):
        raise failed[1]
    return result

