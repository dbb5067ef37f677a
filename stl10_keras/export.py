"""SavedModel export in TF Serving's layout: `EXPORT_DIR/VERSION/`.

The exported `serving_default` signature takes uint8 images `[None, H, W, 3]`
(input name `images`) and returns `probabilities` (float32 `[None, classes]`),
`class_ids` (int64 `[None]`) and `class_names` (string `[None]`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import keras


def next_version(export_dir: str | os.PathLike) -> int:
    """The next integer version under a TF Serving model base path (1 if none)."""
    path = Path(export_dir)
    versions = [int(p.name) for p in path.iterdir()
                if p.is_dir() and p.name.isdigit()] if path.exists() else []
    return max(versions, default=0) + 1


def export_saved_model(
    model: keras.Model,
    export_dir: str | os.PathLike,
    class_names: Sequence[str],
    version: int | None = None,
) -> Path:
    """Export the inference model as a SavedModel version, atomically.

    The SavedModel is written to a temporary folder beside the versions and
    renamed into place, so a failed export leaves no partial version that TF
    Serving could pick up.

    Args:
        model: the inference model (images 0..255 -> logits), no augmentation.
        export_dir: the model base path, e.g. `saved_models/NAME`.
        class_names: class names, index = class id.
        version: the version number; None picks the next one.

    Returns:
        The path of the written version folder.
    """
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
    tmp = base / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    try:
        archive.write_out(str(tmp), verbose=False)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
