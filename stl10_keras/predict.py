"""`python -m stl10_keras.predict`: classify image files with an exported SavedModel.

Loads the highest version under `--model` (or `--version V`) and runs each file's
bytes through the `serving_bytes` signature: the graph the REST server runs for
`{"b64": ...}` requests (`stl10_keras.images.preprocess`: decode, EXIF
orientation, channels, resize to the model's input; then classify), so this
command, the server and training see the same pixels for the same file.
Versions exported before `serving_bytes` existed are run through the same
path (eagerly) and `serving_default`.

For each image it prints the top-k classes with their probabilities. A file
that is missing or is not an image is reported on stderr and the others are
still classified; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from stl10_keras import errors, flags, runtime
from stl10_keras.errors import ModelError
from stl10_keras.export import (BYTES_SIGNATURE, CLASS_NAMES_FILE, IMAGE_BYTES_INPUT,
                                base_path_hint, check_encoded_image,
                                decode_image_bytes, list_versions)


def build_parser() -> argparse.ArgumentParser:
    parser = flags.ArgumentParser(
        prog="python -m stl10_keras.predict",
        description="Classify image files (JPEG, PNG, GIF, BMP, WebP; any size) with "
                    "an exported SavedModel and print the top-k classes.")
    parser.add_argument("--model", required=True,
                        help="the model base path, saved_models/NAME (holds 1/, "
                             "2/, ...)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--top-k", type=flags.number(int, 1), default=3,
                        help="classes printed per image (default 3)")
    parser.add_argument("--version", type=flags.number(int, 1), default=None,
                        help="the version to load (default: the highest)")
    return parser


def resolve_version(base: str | os.PathLike, version: int | None) -> Path:
    """The version folder to load: `version`, or the highest one.

    Raises:
        ModelError: the base path or the version does not exist.
    """
    base = Path(base)
    versions = list_versions(base)
    if not base.is_dir():
        raise ModelError(f"{base} does not exist; pass --model saved_models/NAME of "
                         "an exported model.")
    if not versions:
        raise ModelError(base_path_hint(base, "--model") or (
            f"{base} holds no version folder with a saved_model.pb (1/, 2/, ...); "
            "pass --model saved_models/NAME of an exported model."))
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise ModelError(f"{base} has no version {version}; it has "
                         f"{', '.join(map(str, versions))}.")
    return base / str(version)


def load_classifier(path: Path) -> tuple[Callable[[bytes], dict[str, Any]],
                                         list[str] | None]:
    """Load a version; return `classify(image_bytes) -> outputs` and the class names.

    Raises:
        ModelError: the SavedModel does not load or has no usable signature.
    """
    from stl10_keras.io_utils import import_tensorflow

    tf = import_tensorflow()
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:  # a corrupt or foreign SavedModel
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load {path} ({first.rstrip('.')}).") from None
    names_file = path / CLASS_NAMES_FILE
    names = (names_file.read_text(encoding="utf-8").splitlines()
             if names_file.is_file() else None)
    signatures = loaded.signatures
    if BYTES_SIGNATURE in signatures:
        fn = signatures[BYTES_SIGNATURE]
        return (lambda data: fn(**{IMAGE_BYTES_INPUT: tf.constant([data])})), names
    if "serving_default" not in signatures:
        raise ModelError(f"{path} has neither a {BYTES_SIGNATURE} nor a "
                         "serving_default signature; export it with "
                         "stl10_keras.export.export_saved_model.")
    fn = signatures["serving_default"]
    (name, spec), = fn.structured_input_signature[1].items()
    h, w, c = spec.shape[1:]

    def classify(data: bytes) -> dict[str, Any]:
        image = decode_image_bytes(tf.constant(data), h, w, c)
        return fn(**{name: image[tf.newaxis]})

    return classify, names


def format_top_k(probabilities: np.ndarray, top_name: str, names: list[str] | None,
                 k: int) -> list[tuple[str, float]]:
    """The `k` most probable classes, most probable first, as (name, probability)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    result = []
    for rank, i in enumerate(order):
        if names is not None and i < len(names):
            label = names[i]
        elif rank == 0:
            label = top_name  # older exports: only the top class has its name
        else:
            label = f"class {i}"
        result.append((label, float(probabilities[i])))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runtime.start()  # before TensorFlow loads
    try:
        path = resolve_version(args.model, args.version)
        classify, names = load_classifier(path)
    except errors.UserError as e:
        return errors.report(e)
    except KeyboardInterrupt:
        return errors.EXIT_INTERRUPTED
    import tensorflow as tf

    print(f"model {path} (version {path.name})", flush=True)
    failed = 0
    for image in args.images:
        try:
            data = Path(image).read_bytes()
            check_encoded_image(data)
            outputs = classify(data)
        except OSError as e:
            print(f"error: cannot read {image} ({e.strerror or e}).", file=sys.stderr)
        except ValueError as e:
            print(f"error: {image} {e}.", file=sys.stderr)
        except tf.errors.InvalidArgumentError:
            print(f"error: {image} could not be decoded (a corrupt or truncated "
                  "image).", file=sys.stderr)
        except KeyboardInterrupt:
            return errors.EXIT_INTERRUPTED
        else:
            probabilities = outputs["probabilities"].numpy()[0]
            top_name = outputs["class_names"].numpy()[0].decode("utf-8", "replace")
            top = format_top_k(probabilities, top_name, names, args.top_k)
            width = max(len(label) for label, _ in top)
            print(image)
            for rank, (label, p) in enumerate(top, start=1):
                print(f"  {rank}. {label:<{width}}  {p:.4f}")
            sys.stdout.flush()
            continue
        failed += 1
        sys.stderr.flush()
    if failed:
        print(f"error: {failed} of {len(args.images)} images could not be classified.",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
