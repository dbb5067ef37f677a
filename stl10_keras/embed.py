"""`python -m stl10_keras.embed`: per-layer features -> TensorBoard projector, t-SNE.

The lab clusters test images with t-SNE on raw pixels and on the output of each
conv stage, to show that deeper features separate the classes better. For a
trained run this module takes a stratified sample of a split, extracts raw
pixels, every stage's output (its max-pool) and `fc1` (the penultimate layer),
and writes:

    RUN/logs/projector/   TensorBoard projector: one checkpointed variable per
                          layer, metadata.tsv, sprite.png, projector_config.pbtxt
    RUN/figures/          tsne_LAYER.png per layer, tsne_grid.png, embed_knn.png
    RUN/embed.json        per layer: dims, kNN accuracy in the feature space and
                          in the 2-D t-SNE space

`tensorboard --logdir RUN/logs` then shows every layer in the Projector tab,
with thumbnails and colours by class.

Flattened stage outputs can be wide (STL-10's first pool is 48x48x64 = 147,456
values per image). Layers wider than `--max-dims` are reduced batch by batch
with a seeded sparse random projection, which keeps pairwise distances within
a few percent (Johnson-Lindenstrauss), so the sample stays small in memory, in
the checkpoint and in the browser.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stl10_keras import errors, flags, runtime
from stl10_keras.config import Config, ConfigError
from stl10_keras.io_utils import atomic_write_json
from stl10_keras.projector import PROJECTOR_DIR, EmbedError, write_projector

SPLITS = ("test", "validation", "train")
POOLS = ("flatten", "avg")
PIXELS = "pixels"
FC = "fc1"
KNN_NEIGHBORS = 10
KNN_FOLDS = 5
PCA_DIMS = 50
TRAIN_HINT = "python -m stl10_keras.train ... --run-dir {run_dir}"


# --- layers and sampling --------------------------------------------------------

def layer_names(num_stages: int) -> list[str]:
    """All layer names for a model with `num_stages` stages, shallow to deep.

    Returns:
        `["pixels", "stage1", ..., "stageN", "fc1"]`; `stageK` is the output
        of stage K's max-pool (`stageK_pool`), whatever its number of convs.
    """
    return [PIXELS] + [f"stage{s}" for s in range(1, num_stages + 1)] + [FC]


def parse_layers(text: str, num_stages: int) -> list[str]:
    """Resolve a `--layers` value (`all` or comma-separated names).

    Args:
        text: `all`, or names like `pixels,stage1,stage3,fc1`.
        num_stages: the model's number of stages.

    Returns:
        The chosen names, in network order, without duplicates.

    Raises:
        EmbedError: a name is not a layer of this model.
    """
    valid = layer_names(num_stages)
    wanted = [t.strip() for t in text.split(",") if t.strip()]
    if not wanted:
        raise EmbedError(f"--layers is empty; choose 'all' or some of "
                         f"{', '.join(valid)}.")
    if wanted == ["all"]:
        return valid
    unknown = [w for w in wanted if w not in valid]
    if unknown:
        raise EmbedError(
            f"Unknown layer(s) {', '.join(repr(u) for u in unknown)}; this model's "
            f"layers are {', '.join(valid)} (or all)."
        )
    return [v for v in valid if v in wanted]


def stratified_sample(labels: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    """Pick up to `max_points` indices, equally many per class as far as possible.

    Classes take turns (round robin over a seeded shuffle of each class), so
    every class gets `max_points // classes` images, or all it has when it has
    fewer; the points left over go to the classes that still have images.

    Args:
        labels: integer labels of the split.
        max_points: how many points to pick at most.
        seed: seeds the choice.

    Returns:
        Sorted indices into `labels`.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    # A point's turn is its rank inside its (shuffled) class; ties between
    # classes at the same turn are broken by a seeded class order.
    turn = np.empty(len(labels), np.int64)
    for c in classes:
        idx = np.flatnonzero(labels == c)
        turn[rng.permutation(idx)] = np.arange(len(idx))
    class_order = np.empty(int(classes.max()) + 1 if len(classes) else 0, np.int64)
    class_order[classes] = rng.permutation(len(classes))
    order = np.lexsort((class_order[labels], turn))
    return np.sort(order[:max_points])


def min_points(num_classes: int) -> int:
    """The fewest points a k-fold, k-neighbour score can be computed on."""
    return max(KNN_FOLDS * num_classes, 2 * KNN_NEIGHBORS)


# --- features -------------------------------------------------------------------

class _Reducer:
    """Flatten or average-pool a batch, then project it if it is too wide."""

    def __init__(self, pool: str, max_dims: int, seed: int):
        self.pool, self.max_dims, self.seed = pool, max_dims, seed
        self.dims: int | None = None
        self.projection = None

    def __call__(self, batch: np.ndarray, spatial: bool) -> np.ndarray:
        batch = np.asarray(batch, np.float32)
        if spatial and self.pool == "avg":
            batch = batch.mean(axis=(1, 2))
        batch = batch.reshape(len(batch), -1)
        if self.dims is None:
            self.dims = batch.shape[1]
            if self.max_dims and self.dims > self.max_dims:
                from sklearn.random_projection import SparseRandomProjection

                # Only the input width matters to fit(); one zero row gives it.
                self.projection = SparseRandomProjection(
                    n_components=self.max_dims, random_state=self.seed,
                    dense_output=True,
                ).fit(np.zeros((1, self.dims), np.float32))
        if self.projection is not None:
            batch = self.projection.transform(batch)
        return np.asarray(batch, np.float32)


def extract_features(
    model,
    images: np.ndarray,
    layers: Sequence[str],
    pool: str = "flatten",
    max_dims: int = 4096,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Per-layer features of `images`, computed batch by batch.

    Each batch's activations are pooled or flattened (and projected to
    `max_dims` when wider) before batches are concatenated, so memory holds
    one batch of full activations and the reduced features only.

    Args:
        model: an inference model from `build_model` (images in 0..255).
        images: `(N, H, W, C)` uint8 images.
        layers: names from `layer_names` (`pixels`, `stageK`, `fc1`).
        pool: `flatten` (every activation) or `avg` (global average per
            channel) for the stage outputs; pixels are always flattened.
        max_dims: project layers wider than this to this many dims (0: never).
        batch_size: images per forward pass.
        seed: seeds the random projections.
        progress: show a progress bar.

    Returns:
        `(features, dims)`: `{layer: (N, D) float32}` in `layers` order, and
        each layer's width before any projection.
    """
    from tqdm import tqdm

    from stl10_keras.model import feature_extractor, stage_output_names

    stages = stage_output_names(model)
    source = {f"stage{s}": name for s, name in enumerate(stages, start=1)}
    source[FC] = FC
    extractor = feature_extractor(model, include_fc=FC in layers)
    needs_model = any(name != PIXELS for name in layers)
    reducers = {name: _Reducer(pool, max_dims, seed + k)
                for k, name in enumerate(layers)}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="features", unit="batch", disable=not progress):
        batch = images[start:start + batch_size]
        outputs = (extractor.predict_on_batch(batch.astype(np.float32))
                   if needs_model else {})
        for name in layers:
            if name == PIXELS:
                # Raw pixels in [0, 1]: the lab's baseline representation.
                part = reducers[name](batch.astype(np.float32) / 255.0, spatial=False)
            else:
                activation = np.asarray(outputs[source[name]]).astype(np.float32)
                part = reducers[name](activation, spatial=activation.ndim == 4)
            parts[name].append(part)
    features = {name: np.concatenate(parts[name]) for name in layers}
    dims = {name: int(reducers[name].dims) for name in layers}
    return features, dims


# --- scores and t-SNE -----------------------------------------------------------

def knn_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Mean accuracy of a 10-nearest-neighbour classifier, 5-fold stratified CV."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    folds = StratifiedKFold(KNN_FOLDS, shuffle=True, random_state=seed)
    scores = cross_val_score(KNeighborsClassifier(n_neighbors=KNN_NEIGHBORS),
                             features, labels, cv=folds)
    return float(np.mean(scores))


def tsne_2d(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """2-D t-SNE of `features` (PCA to 50 dims first when wider), seeded."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = features.astype(np.float64)
    if x.shape[1] > PCA_DIMS:
        x = PCA(min(PCA_DIMS, len(x)), random_state=seed).fit_transform(x)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca",
                learning_rate="auto", random_state=seed)
    return tsne.fit_transform(x).astype(np.float32)


# --- outputs --------------------------------------------------------------------

def _rounded(score: float) -> float:
    return round(score, 4)


_POOL_WORDS = {"flatten": "flattened", "avg": "averaged per channel"}


def _summary_markdown(result: dict) -> str:
    lines = [
        f"{result['num_points']} {result['split']} images, stage outputs "
        f"{_POOL_WORDS[result['pool']]}; kNN: {KNN_NEIGHBORS} neighbours, "
        f"{KNN_FOLDS}-fold stratified CV.", "",
        "| layer | dims | kNN (features) | kNN (t-SNE) |", "|---|---|---|---|",
    ]
    for r in result["layers"]:
        dims = str(r["dims"])
        if r["stored_dims"] != r["dims"]:
            dims += f" -> {r['stored_dims']}"
        tsne = r["tsne_knn_accuracy"]
        tsne = "" if tsne is None else f"{tsne:.3f}"
        lines.append(f"| {r['name']} | {dims} | {r['knn_accuracy']:.3f} | {tsne} |")
    return "\n".join(lines)


# --- the whole step -------------------------------------------------------------

def _read_run_config(run_dir: Path) -> Config:
    if not (run_dir / "model.keras").is_file():
        raise EmbedError(
            f"{run_dir} holds no model.keras; train first: "
            f"{TRAIN_HINT.format(run_dir=run_dir)}."
        )
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise EmbedError(
            f"{config_path} is missing; embed a run made by python -m "
            "stl10_keras.train (it writes config.json beside model.keras)."
        )
    try:
        return Config.from_file(config_path)
    except ConfigError as e:
        raise EmbedError(str(e)) from None


@dataclass(frozen=True)
class EmbedOptions:
    """What to embed and how; `check` validates it once, before any work.

    Args: as `embed`'s, of which this is the part that does not name the run.
    """

    split: str = "test"
    layers: str = "all"
    max_points: int = 2000
    pool: str = "flatten"
    perplexity: float = 30.0
    seed: int = 0
    tsne: bool = True
    max_dims: int = 4096
    batch_size: int = 64
    threads: int | None = None

    def check(self, config: Config) -> list[str]:
        """Raise `EmbedError` for a bad option; the layer names for this run's model.

        The checks that need the sample (enough images per class, a perplexity
        below the number of points) are `_sample`'s.
        """
        if self.split not in SPLITS:
            raise EmbedError(f"Unknown split '{self.split}'; choose one of "
                             f"{', '.join(SPLITS)}.")
        if self.pool not in POOLS:
            raise EmbedError(f"Unknown pool '{self.pool}'; choose one of "
                             f"{', '.join(POOLS)}.")
        names = parse_layers(self.layers, len(config.model.widths))
        needed = min_points(config.model.num_classes)
        if self.max_points < needed:
            raise EmbedError(
                f"--max-points must be at least {needed} ({KNN_FOLDS} per class for "
                f"{KNN_FOLDS}-fold cross-validation of the kNN score), got "
                f"{self.max_points}."
            )
        if self.max_dims < 0 or self.batch_size < 1 or (
                self.threads is not None and self.threads < 1):
            raise EmbedError("--max-dims must be 0 or more, --batch-size and "
                             "--threads at least 1.")
        if self.tsne and self.perplexity <= 0:
            raise EmbedError(f"--perplexity must be positive, got {self.perplexity}.")
        if not 0 <= self.seed < 2**32:  # numpy's seeds; a negative one was a traceback
            raise EmbedError(f"--seed must be an integer in 0..4294967295, got "
                             f"{self.seed}.")
        return names


def embed(
    run_dir: str | os.PathLike,
    split: str = "test",
    layers: str | Sequence[str] = "all",
    max_points: int = 2000,
    pool: str = "flatten",
    perplexity: float = 30.0,
    seed: int = 0,
    tsne: bool = True,
    max_dims: int = 4096,
    batch_size: int = 64,
    threads: int | None = None,
    progress: bool = True,
    splits=None,
) -> dict[str, Any]:
    """Features of every layer of a trained run -> projector, t-SNE figures, scores.

    Args:
        run_dir: a run directory holding `model.keras` and `config.json`.
        split: `test`, `validation` or `train`.
        layers: `all`, comma-separated names, or a list of names
            (`pixels`, `stage1`..`stageN`, `fc1`).
        max_points: sample size (stratified by class; the whole split when
            it is smaller).
        pool: `flatten` or `avg` (global average) for the stage outputs.
        perplexity: t-SNE perplexity (below the number of points).
        seed: seeds the sample, PCA, t-SNE, projections and CV folds.
        tsne: compute the t-SNE maps and their figures.
        max_dims: random-project wider layers to this many dims (0: never).
        batch_size: images per forward pass.
        threads: OpenMP/BLAS threads for kNN and t-SNE (None: all cores).
        progress: show progress bars.
        splits: preloaded `data.Splits` (None: load the run's dataset).

    Returns:
        The dict written to `RUN/embed.json`.

    Raises:
        EmbedError: a bad argument, or a run dir without a trained model.
    """
    run_dir = Path(run_dir)
    config = _read_run_config(run_dir)
    options = EmbedOptions(
        split, layers if isinstance(layers, str) else ",".join(layers), max_points,
        pool, perplexity, seed, tsne, max_dims, batch_size, threads)
    names = options.check(config)
    splits = _load_splits(config, splits)
    images, labels, counts = _sample(options, splits, config.model.num_classes)
    model = _load_run_model(run_dir, len(config.model.widths))
    features, dims = extract_features(model, images, names, pool, max_dims,
                                      batch_size, seed, progress)
    rows, maps = _score_layers(names, features, dims, labels, options, progress)
    result: dict[str, Any] = {
        "split": split,
        "num_points": int(len(labels)),
        "per_class": {splits.class_names[c]: int(n) for c, n in enumerate(counts)},
        "pool": pool,
        "max_dims": max_dims,
        "perplexity": perplexity if tsne else None,
        "seed": seed,
        "knn": {"neighbors": KNN_NEIGHBORS, "folds": KNN_FOLDS,
                "cv": "StratifiedKFold(shuffle=True, random_state=seed)"},
        "layers": rows,
        "projector": str(Path("logs") / PROJECTOR_DIR),
    }
    write_projector(run_dir / "logs", features, labels, splits.class_names, images,
                    _summary_markdown(result))
    figures = _write_figures(run_dir, maps, rows, labels, splits.class_names, options)
    result["figures"] = [str(p.relative_to(run_dir)) for p in figures]
    atomic_write_json(run_dir / "embed.json", result)
    return result


def _load_splits(config: Config, splits):
    """The run's dataset (`splits` when preloaded); missing data is an `EmbedError`."""
    if splits is not None:
        return splits
    from stl10_keras import data as data_lib

    try:
        return data_lib.load_splits_for(config)
    except data_lib.DataUnavailableError as e:
        raise EmbedError(str(e)) from None


def _sample(options: EmbedOptions, splits, num_classes: int):
    """The stratified sample: `(images, labels, images per class)`, checked."""
    images, labels = {
        "test": (splits.x_test, splits.y_test),
        "validation": (splits.x_val, splits.y_val),
        "train": (splits.x_train, splits.y_train),
    }[options.split]
    chosen = stratified_sample(labels, options.max_points, options.seed)
    images, labels = images[chosen], np.asarray(labels[chosen])
    counts = np.bincount(labels, minlength=len(splits.class_names))
    if counts[counts > 0].min(initial=len(labels)) < KNN_FOLDS \
            or len(labels) < min_points(num_classes):
        raise EmbedError(
            f"The {options.split} split gives too few images per class for "
            f"{KNN_FOLDS}-fold cross-validation ({counts.tolist()}); use a larger "
            "split."
        )
    if options.tsne and options.perplexity >= len(labels):
        raise EmbedError(
            f"--perplexity ({options.perplexity:g}) must be below the number of "
            f"points ({len(labels)}); lower it or raise --max-points."
        )
    return images, labels, counts


def _load_run_model(run_dir: Path, num_stages: int):
    """The run's `model.keras`, which must have the stages its config describes."""
    runtime.load_keras()
    from stl10_keras.model import load_model, stage_output_names

    try:
        model = load_model(run_dir / "model.keras")
    except Exception as e:  # a corrupt or foreign file: say which, not how
        raise EmbedError(
            f"Cannot load {run_dir / 'model.keras'} ({type(e).__name__}); train the "
            f"run again: {TRAIN_HINT.format(run_dir=run_dir)}."
        ) from None
    model_stages = len(stage_output_names(model))
    if model_stages != num_stages:
        raise EmbedError(
            f"model.keras has {model_stages} stages but config.json describes "
            f"{num_stages}; the run dir is inconsistent, train it again."
        )
    return model


def _score_layers(names: list[str], features: dict, dims: dict,
                  labels: np.ndarray, options: EmbedOptions, progress: bool
                  ) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Per layer: its kNN score, and its t-SNE map and that map's score."""
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    rows, maps = [], {}
    seed = options.seed
    # t-SNE's OpenMP threads meet at a barrier every iteration; on a 2-core CPU
    # that other processes kept busy, one thread ran this 3x faster
    # (docs/embeddings.md).
    limit = threadpool_limits(options.threads) if options.threads \
        else contextlib.nullcontext()
    with limit:
        desc = "kNN + t-SNE" if options.tsne else "kNN"
        for name in tqdm(names, desc=desc, unit="layer", disable=not progress):
            row = {"name": name, "dims": dims[name],
                   "stored_dims": int(features[name].shape[1]),
                   "knn_accuracy": _rounded(knn_accuracy(features[name], labels,
                                                         seed)),
                   "tsne_knn_accuracy": None}
            if options.tsne:
                maps[name] = tsne_2d(features[name], options.perplexity, seed)
                row["tsne_knn_accuracy"] = _rounded(knn_accuracy(maps[name], labels,
                                                                 seed))
            rows.append(row)
    return rows, maps


def _write_figures(run_dir: Path, maps: dict, rows: list[dict], labels,
                   class_names, options: EmbedOptions) -> list[Path]:
    """The t-SNE figures (one per layer and the grid) and the kNN chart."""
    from stl10_keras.visualize import save_knn_chart, save_tsne_figure, save_tsne_grid

    fig_dir = run_dir / "figures"
    figures = []
    if options.tsne:
        for row in rows:
            path = fig_dir / f"tsne_{row['name']}.png"
            save_tsne_figure(maps[row["name"]], labels, class_names, row, path)
            figures.append(path)
        path = fig_dir / "tsne_grid.png"
        save_tsne_grid(maps, labels, class_names, rows, path,
                       f"t-SNE of each layer: {len(labels)} {options.split} images, "
                       f"stage outputs {_POOL_WORDS[options.pool]}")
        figures.append(path)
    path = fig_dir / "embed_knn.png"
    save_knn_chart(rows, len(class_names), path,
                   f"{KNN_NEIGHBORS}-NN accuracy ({KNN_FOLDS}-fold CV)")
    figures.append(path)
    return figures


# --- command line ---------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = flags.ArgumentParser(
        prog="python -m stl10_keras.embed",
        description="t-SNE and kNN class separation of raw pixels, every stage and "
                    "fc1 of a trained run, and a TensorBoard projector of them.",
    )
    parser.add_argument("--run-dir", required=True,
                        help="a run directory from python -m stl10_keras.train")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument("--layers", default="all",
                        help="all (default) or e.g. pixels,stage1,stage3,fc1")
    parser.add_argument("--max-points", type=int, default=2000,
                        help="sample size, stratified by class (default 2000)")
    parser.add_argument("--pool", choices=POOLS, default="flatten",
                        help="stage outputs flattened (default) or averaged per "
                             "channel")
    parser.add_argument("--perplexity", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-tsne", action="store_true",
                        help="skip t-SNE (projector and feature-space kNN only)")
    parser.add_argument("--max-dims", type=int, default=4096,
                        help="random-project wider layers to this many dims "
                             "(0: never; default 4096)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per forward pass (default 64)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for kNN and t-SNE (default: all cores; "
                             "1 is faster on a busy machine)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    runtime.start()
    args = build_parser().parse_args(argv)
    try:
        result = embed(args.run_dir, args.split, args.layers, args.max_points,
                       args.pool, args.perplexity, args.seed, not args.no_tsne,
                       args.max_dims, args.batch_size, args.threads)
    except errors.UserError as e:
        return errors.report(e)
    except KeyboardInterrupt:
        print("\nInterrupted; nothing half-written was left behind. Rerun the "
              "command.", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    print(_summary_markdown(result))
    run_dir = Path(args.run_dir)
    print(f"\nwrote {run_dir / 'embed.json'}, {run_dir / 'logs' / PROJECTOR_DIR}/, "
          f"{len(result['figures'])} figures in {run_dir / 'figures'}/")
    print(f"projector: tensorboard --logdir {run_dir / 'logs'}  (Projector tab)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
