"""`none`: the labeled images alone, as the lab trains (with `RandomAffine`).

The lab's four variants (baseline, augment, kmeans1, kmeans12) train with it;
the augmentation runs on the accelerator as the training model's first layer,
or in tf.data with `--augment-on cpu`.
"""

from __future__ import annotations

from pathlib import Path

from stl10_keras.methods.base import Method, register


@register
class Supervised(Method):
    name = "none"
    summary = "labeled images only"
    uses_unlabeled = False
    averages_weights = False

    def prepare(self, splits, verbose: int = 1):
        self.map_fn = cpu_augmentation(self.config, splits, self.run_dir)
        return splits

    def training_model(self, model, splits):
        from stl10_keras.model import build_training_model

        a, augmentation = self.config.augment, None
        if a.enabled and a.on == "device":
            augmentation = augmentation_layer(self.config, splits, self.run_dir)
        return build_training_model(model, augmentation)

    def batches(self, splits, epochs, dist):
        from stl10_keras import data as data_lib

        t = self.config.train
        return dist.shard_batches(data_lib.make_batches(
            splits.x_train, splits.y_train, t.batch_size, shuffle=True, seed=t.seed,
            shuffle_buffer=self.config.data.shuffle_buffer, map_fn=self.map_fn,
            epochs=epochs,
        ), len(splits.y_train), t.batch_size, epochs=epochs[1] - epochs[0])


def augmentation_layer(config, splits, run_dir: Path | None):
    """The run's `RandomAffine` (seeded from the config), after drawing Figure 3
    into `run_dir` (None: no figure)."""
    from stl10_keras.augment import random_affine_from_config
    from stl10_keras.visualize import augmentation_figure

    layer = random_affine_from_config(config.augment, seed=config.train.seed)
    if run_dir is not None:
        augmentation_figure(layer, splits.x_train, run_dir, splits.y_train,
                            splits.class_names)
    return layer


def cpu_augmentation(config, splits, run_dir: Path | None):
    """`--augment-on cpu`: the tf.data map that augments; None otherwise."""
    if not (config.augment.enabled and config.augment.on == "cpu"):
        return None
    import tensorflow as tf

    # A tf.data map, not part of the model: built outside any strategy
    # scope, whose variables would live on the replicas' devices.
    layer = augmentation_layer(config, splits, run_dir)

    # Compiled with XLA: 3-5x faster than a plain map (benchmarks/augment.py).
    @tf.function(jit_compile=True)
    def map_fn(images, labels):
        return layer(images, training=True), labels

    return map_fn
