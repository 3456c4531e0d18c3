"""Backbone features of the head phase: computed once per image in chunks of decoded images,
kept in the on-disk feature cache (feature_cache) and the decoded-image store (pixel_store).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import shutil
import tempfile
import time
from typing import Sequence

import numpy as np
import pandas as pd

from symbol_trainer import decoding
from symbol_trainer import feature_cache
from symbol_trainer import heads
from symbol_trainer.datasets import run_inference
from symbol_trainer.errors import InputError
from symbol_trainer.images import ALPHA_BACKGROUND, ImageGeometry, load_image_array
from symbol_trainer.model import ModelParts
from symbol_trainer.pixel_store import PixelStore
from symbol_trainer.settings import BACKBONES, TrainingConfig

log = logging.getLogger(__name__)


def feature_description(config: TrainingConfig, geometry: ImageGeometry,
                        compute_dtype: str = "float32") -> dict:
    """Everything that turns an image file into a pooled feature vector (or, for a spatial
    `config.pooling`, a float16 feature map), for the cache key. A weights file is identified
    by its content, so a replaced file is never mistaken."""
    weights = config.weights_source
    if weights not in ("imagenet", "none"):
        weights = f"sha256:{feature_cache.file_sha256(weights)}"
    description = {"backbone": config.backbone, "alpha": config.alpha, "weights": weights,
                   "input": geometry.to_json(),
                   "preprocessing": BACKBONES[config.backbone].preprocessing,
                   "pooling": "global_average", "alpha_background": ALPHA_BACKGROUND}
    if compute_dtype != "float32":  # float32 keys stay as they were before this field existed
        description["compute_dtype"] = compute_dtype
    if heads.is_spatial(config.pooling):  # maps, never mixed with vectors; every spatial
        description["pooling"] = "none: feature map"  # pooling trains on the same maps
        description["stored_dtype"] = np.dtype(heads.MAP_DTYPE).name
    return description


def decoded_image_store(paths: Sequence[str], geometry: ImageGeometry,
                        config: TrainingConfig) -> PixelStore | None:
    """A PixelStore for `paths` in $TMPDIR when fine-tuning will read the images again and
    they fit both `config.decoded_cache_gb` and the free disk space; else None (decode
    every epoch), with the reason logged."""
    if config.fine_tune_epochs == 0 or config.decoded_cache_gb == 0:
        return None
    shape = (geometry.height, geometry.width, 3)
    needed = PixelStore.bytes_needed(len(paths), shape)
    directory = tempfile.gettempdir()
    free = shutil.disk_usage(directory).free
    gb = 1e9
    if needed > config.decoded_cache_gb * gb:
        log.info("Decoding images every fine-tuning epoch: keeping them decoded would take "
                 "%.1f GB, more than --decoded-cache-gb %g.", needed / gb, config.decoded_cache_gb)
        return None
    if needed + 2 * gb > free:
        log.info("Decoding images every fine-tuning epoch: keeping them decoded would take "
                 "%.1f GB and %s has %.1f GB free (2 GB are left spare).", needed / gb,
                 directory, free / gb)
        return None
    store = PixelStore(paths, shape, lambda path: load_image_array(path, geometry), directory)
    log.info("Keeping decoded images for fine-tuning in %s (%.2f GB; a nameless file, freed "
             "when the run ends however it ends).", store.directory, needed / gb)
    return store


def backbone_features(parts: ModelParts, table: pd.DataFrame, geometry: ImageGeometry,
                      config: TrainingConfig, store: PixelStore | None = None) -> np.ndarray:
    """Pooled backbone features of every image in `table` (which has `path` and
    `image_sha1`), from `config.cache_dir` where present there, computed and added otherwise.
    Images decoded to compute features are also put in `store`."""
    paths = table["path"].tolist()
    if config.cache_dir is None:
        return extract_features(parts, paths, geometry, config.batch_size, store)
    if config.weights_source == "none":
        log.info("Not using --cache-dir: random backbone weights (--weights none) differ per run.")
        return extract_features(parts, paths, geometry, config.batch_size, store)
    try:
        cache = feature_cache.FeatureCache(
            config.cache_dir, feature_description(config, geometry, parts.features.compute_dtype),
            tuple(parts.features.output_shape[1:]),
            heads.MAP_DTYPE if parts.spatial else np.float32)
    except OSError as error:
        raise InputError(f"--cache-dir {config.cache_dir}: cannot be used ({error.strerror or error}); "
                         "choose a folder you can write, or leave the flag out.") from None
    sha1s = table["image_sha1"].tolist()
    features, found = cache.load(sha1s, feature_array(parts, len(sha1s)))
    missing = np.flatnonzero(~found)
    log.info("Feature cache %s: %s of %s images found, %s to compute", cache.directory,
             f"{int(found.sum()):,}", f"{len(sha1s):,}", f"{len(missing):,}")
    if len(missing):
        computed = extract_features(parts, [paths[i] for i in missing], geometry,
                                    config.batch_size, store)
        features[missing] = computed
        try:
            cache.store([sha1s[i] for i in missing], computed)
        except OSError as error:
            log.warning("Could not write to the feature cache %s (%s); training goes on without "
                        "storing these features.", cache.directory, error)
    return features


# Batches per chunk of decoded images in feature extraction: big enough that the backbone
# runs several steps between hand-overs, small enough to keep memory flat (two chunks of 128
# images at 224x384 are 66 MB).
FEATURE_CHUNK_BATCHES = 4


def decoded_chunks(paths: Sequence[str], geometry: ImageGeometry, chunk_size: int,
                   store: PixelStore | None = None, pool_kind: str | None = None):
    """The model inputs of `paths` in order, as uint8 arrays of `chunk_size` images (the last
    may be shorter). While the caller works on one chunk, a decoding pool decodes the next
    (decoding.decode_pool: one worker per usable core, threads or processes as `pool_kind`,
    default decoding.POOL_KIND, says), so at most two chunks are in memory. With `store`,
    images come from it when it has them and are added to it when it does not (by this
    process, when the pool's workers are processes). A file that cannot be read raises
    ImageReadError."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    decode = functools.partial(load_image_array, geometry=geometry)  # picklable for processes
    pool = decoding.decode_pool(kind=pool_kind)
    separate = decoding.in_processes(pool)
    try:
        def submit(first: int) -> list:
            """One entry per image: a future, or the image itself when the store has it and
            this process reads it (a process pool: a read costs less than the hand-over)."""
            chunk = [str(path) for path in paths[first:first + chunk_size]]
            if store is None:
                return [pool.submit(decode, path) for path in chunk]
            if not separate:
                return [pool.submit(store.load, path) for path in chunk]
            entries = []
            for path in chunk:
                image = store.cached(path)
                entries.append((path, image if image is not None else pool.submit(decode, path)))
            return entries

        def result(entry) -> np.ndarray:
            if not isinstance(entry, tuple):
                return entry.result()
            path, image = entry
            if isinstance(image, concurrent.futures.Future):
                image = image.result()
                store.put(path, image)
            return image

        pending = submit(0)
        for number, first in enumerate(range(0, len(paths), chunk_size)):
            images = np.stack([result(entry) for entry in pending])
            pending = submit(first + chunk_size)
            # bench/gpu.py times the pass after the first chunk (model tracing) from these.
            log.debug("Decoded chunk %d (images %d to %d of %d) handed over", number, first,
                      first + len(images), len(paths))
            yield images
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def feature_array(parts: ModelParts, count: int) -> np.ndarray:
    """Room for the features of `count` images: float32 vectors, or for a spatial head
    float16 feature maps (heads.feature_map_array: in memory, or a mapped file if large)."""
    shape = tuple(parts.features.output_shape[1:])
    if parts.spatial:
        return heads.feature_map_array(count, shape)
    return np.zeros((count, *shape), np.float32)


def extract_features(parts: ModelParts, paths: Sequence[str], geometry: ImageGeometry,
                     batch_size: int, store: PixelStore | None = None) -> np.ndarray:
    """Backbone features of every image, computed once: (images, feature size), or float16
    feature maps (images, height, width, channels) for a spatial head.

    The backbone runs on in-memory chunks of a few batches while threads decode the next
    chunk (`decoded_chunks`). A `tf.data` pipeline decoding a batch per Python call beside
    the backbone reached only 40-75 % of the in-memory inference rate on 2 CPU cores
    (29 against 69 images/s at 224x384 in one run of bench/train_speed.py); decoding a
    chunk ahead reached 75-79 % in the next run (55-59 against 74 images/s)."""
    start = time.monotonic()
    # Closed on the way out, so that an error or SIGTERM here also stops the decoding threads
    # at once instead of when the generator is garbage-collected.
    with contextlib.closing(decoded_chunks(paths, geometry, FEATURE_CHUNK_BATCHES * batch_size,
                                           store)) as decoded:
        batches = (images[first:first + batch_size] for images in decoded
                   for first in range(0, len(images), batch_size))
        features = run_inference(parts.features, batches, "Computing backbone features",
                                 len(paths), into=feature_array(parts, len(paths)))
    seconds = time.monotonic() - start
    log.info("Computed backbone features of %s images in %.1f s (%.1f images/s)",
             f"{len(paths):,}", seconds, len(paths) / max(seconds, 1e-9))
    return features
