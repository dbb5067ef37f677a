"""SavedModel export in TF Serving's layout: `EXPORT_DIR/VERSION/`.

The exported `serving_default` signature takes uint8 images `[None, H, W, 3]`
(input name `images`) and returns `probabilities` (float32 `[None, classes]`),
`class_ids` (int64 `[None]`) and `class_names` (string `[None]`).

The `serving_bytes` signature takes encoded JPEG, PNG, GIF, BMP or WebP images of
any size (string `[None]`, input name `image_bytes`: TF Serving's REST API decodes
`{"b64": ...}` values for it), turns them into the model's input in the graph
with `stl10_keras.images.preprocess` (decode, EXIF orientation, channels,
resize: the path training read its image files with) and returns the same
three outputs.

Each version also holds `assets.extra/class_names.txt` (all class names, one a
line), which `stl10_keras.predict` reads to name its top-k classes.

`python -m stl10_keras.export --run-dir RUN` exports a finished run's
`model.keras` again, as the next version (docs/export.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from stl10_keras import errors, flags, images, runtime
from stl10_keras.errors import ConfigError, ExportError
from stl10_keras.io_utils import (atomic_directory, check_output_dir, crash_point,
                                  read_json)

if TYPE_CHECKING:
    import keras

# keras and tensorflow are imported inside the functions that need them, so the
# serve and predict commands can check their paths before loading TensorFlow.

#: The signature that takes encoded images, and the name of its input.
BYTES_SIGNATURE = "serving_bytes"
IMAGE_BYTES_INPUT = "image_bytes"
#: The class names, one a line (index = class id), inside each version:
#: TF Serving's `assets.extra/` holds files for clients, not for the graph.
CLASS_NAMES_FILE = "assets.extra/class_names.txt"
#: Formats `check_encoded_image` lets through to the graph's decoder, as
#: Pillow names them (MPO: a camera's multi-picture JPEG).
IMAGE_FORMATS = images.FORMATS
#: Larger images are refused before decoding (a small PNG can hold a huge image).
MAX_IMAGE_PIXELS = 2**25


def _version_dirs(export_dir: str | os.PathLike) -> list[Path]:
    # Folders that are not integers (such as an export's temp folder) are skipped.
    path = Path(export_dir)
    if not path.is_dir():
        return []
    return [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()]


def next_version(export_dir: str | os.PathLike) -> int:
    """The next integer version under a TF Serving model base path (1 if none).

    Counts every integer folder, loadable or not, so an export never reuses one.
    """
    return max((int(p.name) for p in _version_dirs(export_dir)), default=0) + 1


def list_versions(export_dir: str | os.PathLike) -> list[int]:
    """The versions under a model base path that hold a `saved_model.pb`, ascending."""
    return sorted(int(p.name) for p in _version_dirs(export_dir)
                  if (p / "saved_model.pb").is_file())


def base_path_hint(path: str | os.PathLike, flag: str) -> str | None:
    """The sentence for a path that is not a model base path but leads to one.

    A version folder (`saved_models/NAME/1`, holding `saved_model.pb`) names
    its parent; a training run's folder (`runs/NAME`) names the base path its
    `metrics.json` records, or the export command when it exported none.

    Args:
        path: what the user passed.
        flag: the flag they passed it with (`--model`, `--model-base-path`).

    Returns:
        One sentence naming the path to pass, or None when `path` is neither.
    """
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        return (f"{path} is one version of an exported model, not its base path; "
                f"pass {flag} {path.parent}, the folder that holds the versions.")
    if not ((path / "metrics.json").is_file() or (path / "config.json").is_file()):
        return None
    try:
        exported = read_json(path / "metrics.json").get("export_path")
    except (OSError, ValueError, AttributeError):
        exported = None
    if exported:
        return (f"{path} is a training run, not a model base path; its model was "
                f"exported to {Path(exported).parent}: pass {flag} "
                f"{Path(exported).parent}.")
    return (f"{path} is a training run with no exported model; export it with "
            f"python -m stl10_keras.export --run-dir {path}, then pass {flag} "
            "with the base path it prints.")


def check_encoded_image(data: bytes) -> tuple[str, int, int]:
    """Check, from its header only, that `data` is an image `serving_bytes` decodes.

    Pillow reads the header (no pixels are decoded), so this is cheap, and it
    gives one clear sentence where the graph's decoder would fail with a graph
    error. A corrupt body behind a valid header still fails in the graph.

    Args:
        data: the encoded image.

    Returns:
        `(format, width, height)`.

    Raises:
        ValueError: not a JPEG, PNG, GIF, BMP or WebP image, or more than
            `MAX_IMAGE_PIXELS` pixels.
    """
    import io
    import re
    import warnings

    from PIL import Image, UnidentifiedImageError

    too_many = (f"more than the {MAX_IMAGE_PIXELS:,} allowed; scale it down first")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format, image.size
                compressed_bmp = fmt == "BMP" and image.info.get("compression") in (
                    images.BMP_RLE8, images.BMP_RLE4)
    except Image.DecompressionBombError as e:
        # Past twice Pillow's own limit it refuses the header; its message
        # holds the pixel count ("Image size (400000000 pixels) exceeds ...").
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        count = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
        raise ValueError(f"has {count}, {too_many}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ValueError("is not a JPEG, PNG, GIF, BMP or WebP image") from None
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"is a {fmt} image; send JPEG, PNG, GIF, BMP or WebP")
    if compressed_bmp:
        raise ValueError("is a run-length compressed BMP, which is not decoded; "
                         "send it as PNG")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"is {width}x{height} pixels, {too_many}")
    return fmt, width, height


def decode_image_bytes(image_bytes, height: int, width: int, channels: int = 3):
    """One encoded image -> the model's uint8 input `[height, width, channels]`.

    `stl10_keras.images.preprocess`, the one path from image bytes to pixels:
    the `serving_bytes` signature runs it in its graph, training runs it on
    the folder's files, `stl10_keras.predict` runs it eagerly for exports made
    before `serving_bytes` existed.
    """
    return images.preprocess(image_bytes, height, width, channels)


def export_saved_model(
    model: keras.Model,
    export_dir: str | os.PathLike,
    class_names: Sequence[str],
    version: int | None = None,
) -> Path:
    """Export the inference model as a SavedModel version, atomically.

    Two signatures: `serving_default` (uint8 `images`) and `serving_bytes`
    (encoded `image_bytes`), see the module docstring, and the class names in
    `CLASS_NAMES_FILE`. The SavedModel is
    written to a temporary folder beside the versions and renamed into place,
    so a failed export leaves no partial version that TF Serving could pick up.

    Args:
        model: the inference model (images 0..255 -> logits), no augmentation.
        export_dir: the model base path, e.g. `saved_models/NAME`.
        class_names: class names, index = class id.
        version: the version number; None picks the next one.

    Returns:
        The path of the written version folder.
    """
    import keras
    import tensorflow as tf

    base = Path(export_dir)
    base.mkdir(parents=True, exist_ok=True)
    version = next_version(base) if version is None else int(version)
    final = base / str(version)
    if final.exists():
        raise FileExistsError(f"{final} already exists; pick another --export-dir.")
    h, w, c = model.input_shape[1:]
    names = tf.constant(list(class_names))

    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(images):
        logits = model(tf.cast(images, tf.float32), training=False)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        class_ids = tf.argmax(probabilities, axis=-1)
        return {
            "probabilities": probabilities,
            "class_ids": class_ids,
            "class_names": tf.gather(names, class_ids),
        }

    archive.add_endpoint(
        name="serving_default",
        fn=serve,
        input_signature=[tf.TensorSpec([None, h, w, c], tf.uint8, name="images")],
    )

    def serve_bytes(image_bytes):
        images = tf.map_fn(
            lambda one: decode_image_bytes(one, h, w, c),
            image_bytes,
            fn_output_signature=tf.TensorSpec([h, w, c], tf.uint8),
        )
        return serve(images)

    archive.add_endpoint(
        name=BYTES_SIGNATURE,
        fn=serve_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES_INPUT)],
    )
    # One temporary folder name per version: what an export killed before its
    # rename left behind is removed by the next export of that version (the
    # rerun of the run, or the next export, which picks the same number). A
    # version is never replaced: TF Serving may be serving it.
    with atomic_directory(final, temporary_dir(base, version), replace=False) as tmp:
        archive.write_out(str(tmp), verbose=False)
        (tmp / CLASS_NAMES_FILE).parent.mkdir()
        (tmp / CLASS_NAMES_FILE).write_text(
            "".join(f"{n}\n" for n in class_names), encoding="utf-8")
        crash_point("export")
    return final


def temporary_dir(export_dir: str | os.PathLike, version: int) -> Path:
    """Where version `version` is written before it is renamed into place.

    Its name is not an integer, so TF Serving and `list_versions` skip it.
    """
    return Path(export_dir) / f".tmp-{int(version)}"


def export_keras_file(
    model_path: str | os.PathLike,
    export_dir: str | os.PathLike,
    class_names: Sequence[str],
    version: int | None = None,
) -> Path:
    """`export_saved_model` of a saved `model.keras` (TensorFlow backend only).

    The export graph is TensorFlow, so a model trained under another Keras
    backend is exported by a TensorFlow-backend process from its `model.keras`
    (`stl10_keras.train` does that in a subprocess).

    Args:
        model_path: a `model.keras` written by `stl10_keras.train`.
        export_dir: the model base path.
        class_names: class names, index = class id.
        version: the version number; None picks the next one.

    Returns:
        The path of the written version folder.
    """
    from stl10_keras.model import load_model

    return export_saved_model(load_model(model_path), export_dir, class_names,
                              version)


def export_from_any_backend(model, model_path: str | os.PathLike,
                            export_dir: str | os.PathLike,
                            class_names: Sequence[str], version: int) -> Path:
    """Export the SavedModel; under another backend, from model.keras in TensorFlow.

    The export graph (serving signatures, image decoding) is TensorFlow, so a
    model trained under JAX is exported by a TensorFlow-backend subprocess from
    the `model.keras` just saved: the same weights, the same layers.

    Raises:
        ExportError: the subprocess failed (its last line says why).
    """
    import subprocess

    import keras

    if keras.backend.backend() == "tensorflow":
        return export_saved_model(model, export_dir, class_names, version)
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, KERAS_BACKEND="tensorflow",
               PYTHONPATH=os.pathsep.join(
                   p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    script = ("import sys; from stl10_keras.export import export_keras_file; "
              "print(export_keras_file(sys.argv[1], sys.argv[2], sys.argv[4:], "
              "int(sys.argv[3])))")
    proc = subprocess.run(
        [sys.executable, "-c", script, str(model_path), str(export_dir),
         str(version), *class_names], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(
            f"The SavedModel export (a TensorFlow-backend process reading "
            f"{model_path}) failed: {last}; the trained model is in {model_path}."
        )
    return Path(proc.stdout.strip().splitlines()[-1])


# --- python -m stl10_keras.export ----------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = flags.ArgumentParser(
        prog="python -m stl10_keras.export",
        description="Export a finished run's model.keras again, as the next version "
                    "of a TF Serving model base path, with the signatures and class "
                    "names that train exports.",
    )
    parser.add_argument("--run-dir", required=True,
                        help="a finished training run (RUN/model.keras and "
                             "RUN/metrics.json)")
    parser.add_argument("--export-dir", default=None,
                        help="TF Serving model base path (default: the one the run "
                             "exported to, else saved_models/ and the run dir's name)")
    return parser


def run_export_inputs(run_dir: str | os.PathLike, export_dir: str | None
                      ) -> tuple[Path, Path, list[str]]:
    """What exporting a run needs: `(model.keras, model base path, class names)`.

    Args:
        run_dir: a finished run of `stl10_keras.train`.
        export_dir: the model base path, or None for the run's default.

    Raises:
        ConfigError: `run_dir` is not a directory.
        ExportError: it holds no finished run, or one whose class names are
            not recorded.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"--run-dir {run} is not a directory; pass the run "
                          "directory a training run wrote (runs/NAME).")
    model_path, metrics_path = run / "model.keras", run / "metrics.json"
    missing = [p.name for p in (model_path, metrics_path) if not p.is_file()]
    if missing:
        raise ExportError(f"{run} holds no finished run (no {' or '.join(missing)}); "
                          "rerun its train command to finish it, or pass another "
                          "--run-dir.")
    try:
        metrics = read_json(metrics_path)
    except (OSError, ValueError) as e:
        raise ExportError(f"{metrics_path} cannot be read ({e}); rerun the run's "
                          "train command with --overwrite.") from None
    previous = metrics.get("export_path")
    class_names = metrics.get("class_names")
    names_file = Path(previous) / CLASS_NAMES_FILE if previous else None
    if class_names is None and names_file is not None and names_file.is_file():
        # Runs from before metrics.json recorded them: their last export has them.
        class_names = names_file.read_text(encoding="utf-8").splitlines()
    if not class_names:
        raise ExportError(f"{metrics_path} does not record the class names; export "
                          "from Python with stl10_keras.export.export_keras_file.")
    if export_dir is None:
        export_dir = Path(previous).parent if previous else \
            Path("saved_models") / run.resolve().name
    return model_path, Path(export_dir), list(class_names)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m stl10_keras.export`: the exit code (0, 1 run/export, 2 flags)."""
    runtime.start()
    args = build_parser().parse_args(argv)
    try:
        model_path, base, class_names = run_export_inputs(args.run_dir,
                                                          args.export_dir)
        check_output_dir(base, "--export-dir")
        if not runtime.tensorflow_installed():
            raise ExportError("Exporting a SavedModel needs TensorFlow, which is not "
                              "installed; install it (requirements.txt).")
        # The export graph is TensorFlow; model.keras loads under any backend.
        if "keras" not in sys.modules:
            os.environ["KERAS_BACKEND"] = "tensorflow"
        if runtime.load_keras().backend.backend() != "tensorflow":
            raise ExportError("Exporting needs the TensorFlow backend; rerun with "
                              "KERAS_BACKEND=tensorflow.")
        try:
            path = export_keras_file(model_path, base, class_names)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ExportError(f"{model_path} cannot be exported ({e}); retrain the "
                              "run with --overwrite.") from None
    except errors.UserError as e:
        return errors.report(e)
    except KeyboardInterrupt:
        print("\nInterrupted; no partial version was left behind.", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    print(f"SavedModel: {path}")
    print("next:")
    print(f"  python -m stl10_keras.serve --model-base-path {base}")
    print(f"  python -m stl10_keras.predict --model {base} IMAGE.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
