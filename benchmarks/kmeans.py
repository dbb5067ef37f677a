"""Benchmark: k-means initialisation of stages 1 and 2 on a CPU.

    PYTHONPATH=. python benchmarks/kmeans.py [--images 10000] [--out figures/]

STL-10 is not available offline, so the unlabeled images are synthetic
96x96x3 "dead leaves" pictures (overlapping discs of random colour and
power-law radii on a 1/f noise background: sharp edges, flat regions and
texture, as in natural images), generated once into memory before timing
(like reading a cached split). Model: the default 5-stage widths, so stage 1
clusters 3x3x3 patches into 64 centroids and stage 2 3x3x64 patches into 128.

Prints a table: `kmeans_init` per stage (sampling + forward + preprocessing +
MiniBatchKMeans) and, on the same preprocessed patches, MiniBatchKMeans
against full `sklearn.cluster.KMeans` (time and inertia), and the process's
resident memory before and at its peak during `kmeans_init` (sampled every
10 ms from /proc/self/statm; Linux).
"""

from __future__ import annotations

import datetime
import os
import resource
import threading
import time

# Only light imports here: keras, TensorFlow and scikit-learn load after the
# flags are parsed, so a bad flag is refused in a fraction of a second.
import numpy as np

from stl10_keras import flags
from stl10_keras.config import preset
from _common import cpu_name


def dead_leaves_images(num: int, size: int = 96, seed: int = 0,
                       batch: int = 250, discs: int = 30) -> np.ndarray:
    """`(num, size, size, 3)` uint8 synthetic natural-ish images."""
    rng = np.random.default_rng(seed)
    out = np.empty((num, size, size, 3), np.uint8)
    grid = np.arange(size, dtype=np.float32)[None, None]
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.rfftfreq(size)[None] ** 2)
    f[0, 0] = 1.0
    for s in range(0, num, batch):
        b = min(batch, num - s)
        # Amplitude ~ 1/f^1.5: smooth texture with natural-image-like spectra.
        spec = (rng.standard_normal((b, 3, size, size // 2 + 1))
                + 1j * rng.standard_normal((b, 3, size, size // 2 + 1))) / f**1.5
        noise = np.fft.irfft2(spec, s=(size, size)).transpose(0, 2, 3, 1)
        noise = (noise / noise.std(axis=(1, 2, 3), keepdims=True)).astype(np.float32)
        # Dead leaves: discs of random colour, radii with density ~ r^-3
        # between 3 and 60 pixels; a later disc covers an earlier one.
        cy, cx = rng.uniform(-20, size + 20, (2, discs, b, 1)).astype(np.float32)
        u = rng.uniform(size=(discs, b, 1, 1))
        r2 = 1.0 / (1 / 3.0**2 - u * (1 / 3.0**2 - 1 / 60.0**2))
        inside = ((grid - cy) ** 2)[..., None] + ((grid - cx) ** 2)[:, :, None, :] < r2
        top = discs - 1 - np.argmax(inside[::-1], axis=0)  # (b, size, size)
        covered = inside.any(axis=0)
        colours = rng.uniform(0, 255, (b, discs, 3)).astype(np.float32)
        leaves = colours[np.arange(b)[:, None, None], top] + 8 * noise
        img = np.where(covered[..., None], leaves, 128 + 40 * noise)
        out[s:s + b] = np.clip(img, 0, 255).astype(np.uint8)
    return out


class PeakRSS:
    """Samples the process's resident memory every 10 ms while in a `with`."""

    def __enter__(self):
        self.before = self.peak = _current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _current_rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss_mb())


def _current_rss_mb() -> float:
    # Linux: resident pages are the second field of /proc/self/statm.
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _timed_fit(algo: str, z: np.ndarray, k: int, kconfig, seed: int):
    from sklearn.cluster import KMeans

    from stl10_keras import kmeans as km

    start = time.perf_counter()
    if algo == "MiniBatchKMeans":
        _, inertia, n_iter = km.fit_centroids(z, k, kconfig, seed)
    else:
        full = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(z)
        inertia, n_iter = float(full.inertia_), int(full.n_iter_)
    return time.perf_counter() - start, inertia, n_iter


def main() -> None:
    parser = flags.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=flags.number(int, 1), default=10000)
    parser.add_argument("--patches-per-image", type=flags.number(int, 1), default=20)
    parser.add_argument("--no-full-kmeans", action="store_true",
                        help="skip the full KMeans comparison")
    parser.add_argument("--out", default=None,
                        help="folder for the centroid/filter figures")
    args = parser.parse_args()

    import keras

    from stl10_keras import kmeans as km
    from stl10_keras import patches as patch_lib
    from stl10_keras.model import build_model

    config = preset("default", variant="kmeans12")
    config.kmeans.num_images = args.images
    config.kmeans.patches_per_image = args.patches_per_image
    kc, seed = config.kmeans, config.train.seed

    t0 = time.perf_counter()
    images = dead_leaves_images(args.images)
    gen_s = time.perf_counter() - t0

    def batches():
        for s in range(0, len(images), 256):
            yield images[s:s + 256]

    model = build_model(config, images.shape[1:])
    load_before = os.getloadavg()[0]
    cpu = time.process_time()
    with PeakRSS() as rss:
        result = km.kmeans_init(model, config, batches, stages=(1, 2), progress=False)
    cpu = time.process_time() - cpu
    load_after = os.getloadavg()[0]

    rows = []
    for name, info in result["layers"].items():
        rows.append((name, info))
    print(f"# k-means initialisation benchmark, {datetime.date.today()}, "
          f"{cpu_name()}, "
          f"{len(images)} synthetic 96x96x3 images ({gen_s:.1f} s to generate)")
    print(f"resident memory: {rss.before:.0f} MB before kmeans_init (TensorFlow, "
          f"model, the {images.nbytes / 2**20:.0f} MB of images), peak during it "
          f"{rss.peak:.0f} MB (+{rss.peak - rss.before:.0f} MB); "
          f"1-min load average {load_before:.1f} before, {load_after:.1f} after; "
          f"{os.cpu_count()} CPUs\n")
    print("| stage | patches | dim | K | kmeans_init s (all steps) | MiniBatchKMeans "
          "passes | inertia |")
    print("|---|---|---|---|---|---|---|")
    for name, info in rows:
        d = info["patch_size"] ** 2 * info["in_channels"]
        print(f"| {name} | {info['num_patches']:,} | {d} | {info['filters']} | "
              f"{info['seconds']:.1f} | {info['n_iter']} | {info['inertia']:.4g} |")
    print(f"| total | | | | {result['kmeans_seconds']:.1f} "
          f"(CPU time {cpu:.1f}) | | |\n", flush=True)

    if args.no_full_kmeans:
        return
    print("Same preprocessed patches, clustering only:\n")
    print("| stage | algorithm | seconds | iterations | inertia | "
          "inertia / MiniBatch |")
    print("|---|---|---|---|---|---|")
    for name, info in rows:
        patches, _ = patch_lib.sample_patches(
            batches(), info["patch_size"], kc.patches_per_image, kc.num_images,
            [seed, 0], layers=patch_lib.prefix_layers(model, name), progress=False,
        )
        z, _ = km.preprocess_patches(patches, kc.normalize, kc.whiten, kc.zca_epsilon)
        base = None
        for algo in ("MiniBatchKMeans", "KMeans"):
            sec, inertia, n_iter = _timed_fit(algo, z, info["filters"], kc, seed)
            base = base or inertia
            print(f"| {name} | {algo} | {sec:.1f} | {n_iter} | {inertia:.4g} | "
                  f"{inertia / base:.3f} |", flush=True)

    if args.out:
        from stl10_keras.visualize import save_centroid_grid, save_filter_grid

        save_centroid_grid(result["centroids"]["stage1_conv"], 3, 3,
                           f"{args.out}/kmeans_centroids_3x3.png")
        c7, _ = km.image_patch_centroids(batches(), kc, 64, seed, patch_size=7,
                                         progress=False)
        save_centroid_grid(c7, 7, 3, f"{args.out}/kmeans_centroids_7x7.png")
        kernel = model.get_layer("stage1_conv").kernel
        save_filter_grid(keras.ops.convert_to_numpy(kernel),
                         f"{args.out}/kmeans_stage1_filters.png")


if __name__ == "__main__":
    main()
