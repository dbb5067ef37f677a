"""Unsupervised pre-training: k-means centroids of unlabeled patches as conv kernels.

The lab's recipe (after Coates, Ng & Lee 2011, "An analysis of single-layer
networks in unsupervised feature learning"): crop `patches_per_image` random
`k x k` patches from each of `num_images` unlabeled images, normalise each
patch's brightness and contrast, ZCA-whiten the set, cluster it with k-means
into as many centroids as the conv layer has filters, and use the centroids
as the layer's filters. Stage `n >= 2` does the same on the output of the
already initialised stages `1..n-1`.

The network's input is neither normalised per patch nor whitened, so the
preprocessing is folded into the kernel and bias (`kmeans_conv_kernel`):

- folded exactly: ZCA whitening `z = W (p - mu)` (a linear map and an offset)
  and the per-patch mean removal `p - mean(p)` (a linear projection `M`), so the
  layer computes `c . W (M p / s - mu)` for a raw patch `p`;
- not folded: the division of each patch by its own contrast
  `sqrt(var(p) + eps)` is nonlinear. It is replaced by the division by the
  sample's mean contrast `s`, a constant. A patch's response therefore scales
  with its contrast; the batch norm after the conv rescales the channel.

Each filter is then rescaled so its norm is the one `glorot_uniform` gives in
expectation (training starts at the usual scale); the bias gets the same
factor. Because a batch norm follows every conv, a per-channel bias and a
per-channel scale change nothing in training-mode outputs.

Two ways to put the result into a model:

- `kmeans_init(model, config, batches_factory)` initialises stages of a built
  model in place (kernel and bias, via `apply_kmeans_weights`); it is the only
  way for stage 2, whose patches come from stage 1's output.
- `build_model(config, shape, kernel_initializers=kmeans_initializers(info))`
  builds a fresh model from a previous `kmeans_init`'s kernels with
  `KMeansInitializer` (kernel only; the bias stays zero, which the following
  batch norm makes irrelevant in training).

Backend-agnostic: keras, numpy and scikit-learn (patches: `stl10_keras.patches`); never
tensorflow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import keras
import numpy as np
from keras import ops
from sklearn.cluster import MiniBatchKMeans, kmeans_plusplus

from stl10_keras.config import Config, ConfigError, KMeansConfig
from stl10_keras.model import conv_layer_names
from stl10_keras.patches import prefix_layers, sample_patches

# Per-patch contrast normalisation divides by `sqrt(var(p) + eps)` with
# `eps = CONTRAST_EPSILON * mean_i var(p_i)`. Coates et al. add a constant (10
# on 0..255 pixels); a fraction of the sample's mean patch variance does the
# same job (low-contrast patches are not blown up to unit contrast) at every
# stage, whatever the scale of that stage's input.
CONTRAST_EPSILON = 0.1

# Rows per step when patches are modified in place (bounds temporaries).
_ROW_CHUNK = 16384


@dataclass
class PatchPreprocessing:
    """What was done to the patches before clustering (what the kernel folds in).

    Args:
        normalize: the per-patch mean was removed and the patch divided by its
            contrast `sqrt(var(p) + contrast_epsilon)`.
        contrast_epsilon: the absolute epsilon used (0 without `normalize`).
        mean_contrast: the sample's mean contrast `s` (1 without `normalize`).
        mean: `(d,)` mean of the (normalised) patches that whitening removed,
            or None without whitening.
        zca: `(d, d)` symmetric ZCA matrix `W`, or None without whitening.
    """

    normalize: bool
    contrast_epsilon: float = 0.0
    mean_contrast: float = 1.0
    mean: np.ndarray | None = None
    zca: np.ndarray | None = None


def preprocess_patches(
    patches: np.ndarray,
    normalize: bool = True,
    whiten: bool = True,
    zca_epsilon: float = 0.01,
) -> tuple[np.ndarray, PatchPreprocessing]:
    """Per-patch brightness/contrast normalisation and ZCA whitening, in place.

    `normalize`: `p <- (p - mean(p)) / sqrt(var(p) + eps)` per patch (mean and
    variance over its `k * k * C` values), `eps = CONTRAST_EPSILON * mean_i
    var(p_i)`. `whiten`: `z = W (p - mu)` with `mu` the patches' mean and
    `W = U diag(1 / sqrt(lambda + zca_epsilon)) U^T` from the eigenvectors `U`
    and eigenvalues `lambda` of their covariance (divided by `n`).

    Args:
        patches: float32 `(n, d)`; overwritten with the result (it is the
            largest array of the whole procedure, so no copy is made).
        normalize: per-patch brightness/contrast normalisation.
        whiten: ZCA whitening.
        zca_epsilon: added to the covariance's eigenvalues.

    Returns:
        `(patches, preprocessing)`: the preprocessed patches (the same array)
        and the `PatchPreprocessing` that `kmeans_conv_kernel` folds in.
    """
    x = patches
    if x.dtype != np.float32 or x.ndim != 2:
        raise ValueError("patches must be a float32 array of shape (n, d).")
    n = len(x)
    prep = PatchPreprocessing(normalize=normalize)
    if normalize:
        var = np.empty(n, np.float64)
        for s in range(0, n, _ROW_CHUNK):
            rows = x[s:s + _ROW_CHUNK]
            rows -= rows.mean(axis=1, keepdims=True)
            var[s:s + _ROW_CHUNK] = np.mean(np.square(rows), axis=1)
        # A floor keeps a sample of flat patches (variance 0) finite.
        eps = max(CONTRAST_EPSILON * float(var.mean()), 1e-12)
        contrast = np.sqrt(var + eps)
        x /= contrast[:, None].astype(np.float32)
        prep.contrast_epsilon = eps
        prep.mean_contrast = float(contrast.mean())
    if whiten:
        mean = x.mean(axis=0, dtype=np.float64)
        x -= mean.astype(np.float32)
        cov = (x.T @ x).astype(np.float64) / n
        evals, evecs = np.linalg.eigh(cov)
        zca = (evecs / np.sqrt(np.maximum(evals, 0.0) + zca_epsilon)) @ evecs.T
        zca = (zca + zca.T) / 2
        zca32 = zca.astype(np.float32)
        for s in range(0, n, _ROW_CHUNK):
            x[s:s + _ROW_CHUNK] = x[s:s + _ROW_CHUNK] @ zca32
        prep.mean, prep.zca = mean, zca
    return x, prep


def fit_centroids(
    patches: np.ndarray, num_clusters: int, kconfig: KMeansConfig, seed: int
) -> tuple[np.ndarray, float, int]:
    """Cluster patches with scikit-learn's `MiniBatchKMeans`.

    Args:
        patches: `(n, d)` preprocessed patches.
        num_clusters: `K`, the conv layer's filter count.
        kconfig: `batch_size` and `max_iter` (passes over the patches) of
            MiniBatchKMeans.
        seed: its `random_state`.

    Returns:
        `(centroids, inertia, n_iter)`: `(K, d)` float32 centroids, the sum of
        squared distances of all patches to their centroid, and the passes run.
    """
    if len(patches) < num_clusters:
        raise ConfigError(
            f"k-means needs at least {num_clusters} patches but got {len(patches)}; "
            "raise --kmeans-images or --kmeans-patches-per-image."
        )
    # k-means++ seeding on 3 * batch_size patches, as MiniBatchKMeans does by
    # default, but in float64: scikit-learn's float32 path of it is ~20x slower.
    rng = np.random.default_rng(seed)
    init_size = min(3 * kconfig.batch_size, len(patches))
    subset = patches[np.sort(rng.choice(len(patches), init_size, replace=False))]
    init, _ = kmeans_plusplus(subset.astype(np.float64), num_clusters,
                              random_state=seed)
    km = MiniBatchKMeans(
        n_clusters=num_clusters,
        init=init.astype(patches.dtype),
        n_init=1,
        batch_size=kconfig.batch_size,
        max_iter=kconfig.max_iter,
        random_state=seed,
    )
    km.fit(patches)
    return km.cluster_centers_.astype(np.float32), float(km.inertia_), int(km.n_iter_)


def glorot_filter_norm(patch_size: int, in_channels: int, filters: int) -> float:
    """`sqrt(E ||w_j||^2)` of one filter drawn by `glorot_uniform`.

    Glorot uniform draws from `U(-l, l)`, `l = sqrt(6 / (fan_in + fan_out))`,
    variance `2 / (fan_in + fan_out)`, with `fan_in = k * k * C_in` and
    `fan_out = k * k * K` for a conv; a filter has `fan_in` entries.
    """
    fan_in = patch_size * patch_size * in_channels
    fan_out = patch_size * patch_size * filters
    return float(np.sqrt(2.0 * fan_in / (fan_in + fan_out)))


def kmeans_conv_kernel(
    centroids: np.ndarray,
    patch_size: int,
    in_channels: int,
    preprocessing: PatchPreprocessing | None = None,
    target_norm: float | str | None = "glorot_uniform",
) -> tuple[np.ndarray, np.ndarray]:
    """Turn k-means centroids into a conv kernel and bias for the raw layer input.

    The filter of centroid `c` is `w = M W c / s` and its bias
    `b = -(W c) . mu` (see the module docstring), so that `w . p + b =
    c . W (M p / s - mu)` for a patch `p` of the layer's actual input; without
    preprocessing `w = c`, `b = 0`.

    Args:
        centroids: `(K, k * k * C_in)`, each flattened in `(k, k, C)` order.
        patch_size: `k`.
        in_channels: `C_in`.
        preprocessing: what `preprocess_patches` did, or None (nothing).
        target_norm: each filter (and its bias) is rescaled to this norm;
            `"glorot_uniform"` means `glorot_filter_norm(k, C_in, K)`; None
            keeps the exact folded response.

    Returns:
        `(kernel, bias)`: float32 `(k, k, C_in, K)` (Keras' channels-last
        layout) and float32 `(K,)`.
    """
    c = np.asarray(centroids, np.float64)
    k, d = patch_size, patch_size * patch_size * in_channels
    if c.ndim != 2 or c.shape[1] != d:
        raise ValueError(
            f"centroids must be (K, {d}) for {k}x{k}x{in_channels} patches, "
            f"got {c.shape}."
        )
    w = c.T  # (d, K)
    bias = np.zeros(c.shape[0])
    if preprocessing is not None:
        if preprocessing.zca is not None:
            w = preprocessing.zca @ w  # W is symmetric: (W c) as columns
            bias = -(preprocessing.mean @ w)
        if preprocessing.normalize:
            # Mean removal M = I - 11^T/d is symmetric: M W c centres each filter.
            w = (w - w.mean(axis=0, keepdims=True)) / preprocessing.mean_contrast
    if target_norm is not None:
        if target_norm == "glorot_uniform":
            target_norm = glorot_filter_norm(k, in_channels, c.shape[0])
        norms = np.linalg.norm(w, axis=0)
        scale = float(target_norm) / np.maximum(norms, 1e-12)
        w, bias = w * scale, bias * scale
    kernel = w.reshape(k, k, in_channels, c.shape[0])
    return kernel.astype(np.float32), bias.astype(np.float32)


@keras.saving.register_keras_serializable(package="stl10_keras")
class KMeansInitializer(keras.initializers.Initializer):
    """Returns fixed values (a k-means kernel) for exactly their shape.

    Args:
        values: the array to return, e.g. a `(k, k, C_in, K)` kernel from
            `kmeans_conv_kernel`.

    Example:

    >>> kernel, _ = kmeans_conv_kernel(centroids, 3, 3)
    >>> init = {"stage1_conv": KMeansInitializer(kernel)}
    >>> model = build_model(config, (96, 96, 3), kernel_initializers=init)
    """

    def __init__(self, values):
        self.values = np.asarray(values, dtype=np.float32)

    def __call__(self, shape, dtype=None):
        shape = tuple(int(s) for s in shape)
        if shape != self.values.shape:
            raise ValueError(
                f"KMeansInitializer holds values of shape {self.values.shape} but "
                f"the layer asked for {shape}; compute the k-means kernel for this "
                "layer's kernel size, input channels and filter count."
            )
        dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
        return ops.convert_to_tensor(self.values, dtype=dtype)

    def get_config(self):
        return {"values": self.values.tolist()}


def image_patch_centroids(
    batches: Iterable,
    kconfig: KMeansConfig,
    num_clusters: int = 64,
    seed: int = 0,
    patch_size: int | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, dict]:
    """k-means centroids of image patches without a model (e.g. 7x7 for a figure).

    The same path as stage 1 of `kmeans_init`: patches are cut from the
    images rescaled to the model's input range `x / 127.5 - 1`, then
    preprocessed and clustered as `kconfig` says.

    Args:
        batches: iterable of uint8 `(B, H, W, C)` image batches.
        kconfig: the k-means settings.
        num_clusters: `K`.
        seed: seeds the patch positions and k-means.
        patch_size: side of the patches; None uses `kconfig.patch_size`.
        progress: show a progress bar.

    Returns:
        `(centroids, info)`: `(K, k * k * C)` centroids in the preprocessed
        space, and a dict with `num_images`, `num_patches`, `inertia`,
        `n_iter`, `seconds` and `preprocessing`.
    """
    k = kconfig.patch_size if patch_size is None else patch_size
    start = time.perf_counter()
    patches, read = sample_patches(
        batches, k, kconfig.patches_per_image, kconfig.num_images, [seed, 0],
        layers=[keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)],
        progress=progress, desc=f"k-means {k}x{k} patches",
    )
    centroids, info = _cluster(patches, num_clusters, kconfig, seed)
    info.update(num_images=read, seconds=time.perf_counter() - start)
    return centroids, info


def _cluster(
    patches: np.ndarray, num_clusters: int, kconfig: KMeansConfig, seed: int
) -> tuple[np.ndarray, dict]:
    num_patches = len(patches)
    z, prep = preprocess_patches(
        patches, kconfig.normalize, kconfig.whiten, kconfig.zca_epsilon
    )
    centroids, inertia, n_iter = fit_centroids(z, num_clusters, kconfig, seed)
    return centroids, {"num_patches": num_patches, "inertia": inertia,
                       "n_iter": n_iter, "preprocessing": prep}


def kmeans_layer(
    model: keras.Model,
    layer_name: str,
    batches: Iterable,
    kconfig: KMeansConfig,
    seed: int,
    patch_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Compute the k-means kernel and bias of one conv layer (model unchanged).

    Args:
        model: a built model (`build_model`); the layers before `layer_name`
            must already hold their final initial weights.
        layer_name: a `Conv2D` layer, e.g. `stage2_conv`.
        batches: iterable of uint8 `(B, H, W, C)` unlabeled image batches.
        kconfig: the k-means settings.
        seed: seeds the patch positions and k-means.
        patch_size: must equal the layer's kernel size; None uses it.
        progress: show a progress bar.

    Returns:
        A dict with `kernel`, `bias`, `centroids` (arrays), and `seconds`,
        `inertia`, `n_iter`, `num_images`, `num_patches`, `patch_size`,
        `in_channels`, `filters`.
    """
    start = time.perf_counter()
    layer = model.get_layer(layer_name)
    if not isinstance(layer, keras.layers.Conv2D):
        raise ValueError(f"Layer '{layer_name}' is not a Conv2D layer.")
    kh, kw = layer.kernel_size
    if kh != kw:
        raise ValueError(f"Layer '{layer_name}' has a non-square {kh}x{kw} kernel.")
    if patch_size is not None and patch_size != kh:
        raise ConfigError(
            f"k-means patches of {patch_size}x{patch_size} cannot initialise "
            f"'{layer_name}', whose kernel is {kh}x{kh}; set --kmeans-patch-size "
            f"{kh} (or give the model {patch_size}x{patch_size} kernels)."
        )
    in_channels, filters = int(layer.kernel.shape[2]), int(layer.kernel.shape[3])
    layer_index = [ly.name for ly in model.layers].index(layer_name)
    patches, read = sample_patches(
        batches, kh, kconfig.patches_per_image, kconfig.num_images,
        [seed, layer_index], layers=prefix_layers(model, layer_name),
        progress=progress, desc=f"k-means {layer_name} patches",
    )
    centroids, info = _cluster(patches, filters, kconfig, seed)
    kernel, bias = kmeans_conv_kernel(
        centroids, kh, in_channels, info.pop("preprocessing")
    )
    info.update(
        kernel=kernel, bias=bias, centroids=centroids, num_images=read,
        patch_size=kh, in_channels=in_channels, filters=filters,
        seconds=time.perf_counter() - start,
    )
    return info


def apply_kmeans_weights(
    model: keras.Model, weights: dict[str, tuple[np.ndarray, np.ndarray]]
) -> None:
    """Set conv kernels and biases in place: `{layer_name: (kernel, bias)}`."""
    for name, (kernel, bias) in weights.items():
        layer = model.get_layer(name)
        if tuple(layer.kernel.shape) != tuple(np.shape(kernel)):
            raise ValueError(
                f"The k-means kernel for '{name}' has shape {np.shape(kernel)} but "
                f"the layer's is {tuple(layer.kernel.shape)}; recompute it for "
                "this model."
            )
        layer.kernel.assign(kernel)
        if layer.bias is not None:
            layer.bias.assign(bias)


def kmeans_init(
    model: keras.Model,
    config: Config,
    unlabeled_batches_factory: Callable[[], Iterator],
    stages: Sequence[int] | None = None,
    progress: bool = True,
) -> dict:
    """Initialise the convs of the given stages with k-means, in place.

    Stages run in increasing order, and the convs of a stage in order (one
    per stage by default); each clusters patches of its own input, i.e. the
    output of everything before it as initialised just before
    (see `sample_patches`).
    Stage 1's patch side is `config.kmeans.patch_size` and must equal the
    conv's kernel size; later stages use their kernel size. Seeded from
    `config.train.seed`.

    Args:
        model: a built model from `build_model(config, ...)`.
        config: `config.kmeans` (sampling, preprocessing, MiniBatchKMeans)
            and `config.train.seed`.
        unlabeled_batches_factory: zero-argument callable returning a fresh
            iterator of uint8 `(B, H, W, C)` unlabeled batches; called once per
            stage, each reads `config.kmeans.num_images` images from it.
        stages: 1-based stages; None uses `config.kmeans.stages`.
        progress: show progress bars.

    Returns:
        `{"kmeans_seconds": total, "layers": {name: scalars}, "centroids":
        {name: (K, d) array}, "weights": {name: (kernel, bias)}}`; `layers`
        holds `stage`, `seconds`, `inertia`, `n_iter`, `num_images`,
        `num_patches`, `patch_size`, `in_channels`, `filters` (JSON-ready, for
        metrics.json); `centroids` feeds `save_centroid_grid`; `weights` feeds
        `apply_kmeans_weights` or `kmeans_initializers`.
    """
    stages = tuple(config.kmeans.stages if stages is None else stages)
    names = conv_layer_names(config.model)
    if any(s < 1 or s > len(names) for s in stages):
        raise ConfigError(f"k-means stages {stages} must lie in 1..{len(names)}.")
    start = time.perf_counter()
    result: dict = {"kmeans_seconds": 0.0, "layers": {}, "centroids": {}, "weights": {}}
    for stage in sorted(set(stages)):
        for j, name in enumerate(names[stage - 1]):
            first = stage == 1 and j == 0
            info = kmeans_layer(
                model, name, unlabeled_batches_factory(), config.kmeans,
                config.train.seed,
                patch_size=config.kmeans.patch_size if first else None,
                progress=progress,
            )
            weights = (info.pop("kernel"), info.pop("bias"))
            apply_kmeans_weights(model, {name: weights})
            result["weights"][name] = weights
            result["centroids"][name] = info.pop("centroids")
            result["layers"][name] = {"stage": stage, **info}
    result["kmeans_seconds"] = time.perf_counter() - start
    return result


def kmeans_initializers(result: dict) -> dict[str, KMeansInitializer]:
    """`build_model`'s `kernel_initializers` from a `kmeans_init` result."""
    return {name: KMeansInitializer(kernel)
            for name, (kernel, _) in result["weights"].items()}
