"""Input pipelines and inference: tf.data datasets of images and of backbone features, the
seeded order of each epoch's batches, and a compiled forward pass run over a dataset.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Callable, Iterable, Sequence

import numpy as np

from symbol_trainer.backend import keras, tf
from symbol_trainer import checkpoints
from symbol_trainer.images import ImageGeometry, load_image_array
from symbol_trainer.pixel_store import PixelStore

log = logging.getLogger(__name__)


def image_dataset(paths: Sequence[str], geometry: ImageGeometry, batch_size: int, *,
                  targets: np.ndarray | None = None, order: tf.data.Dataset | None = None,
                  store: PixelStore | None = None) -> tf.data.Dataset:
    """Stream images from disk in batches of uint8 tensors; with `targets` (one row per path,
    see `fused_targets`), yield (images, targets). `order` is a dataset of index batches to
    load (see `epoch_batches`); without it, every path once, in order, `batch_size` at a time.
    With `store`, images come from it when it has them and are added to it when it does not.

    Each map call loads a whole batch, and several batches load in parallel (Pillow releases
    the GIL while it decodes): one Python call per batch rather than per image keeps the
    pipeline's own overhead small next to the model's step when images come from `store`."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("image_dataset needs at least one path")

    def load_batch(indices):
        if store is not None:
            return np.stack([store.load(paths[i]) for i in indices])
        return np.stack([load_image_array(paths[i], geometry) for i in indices])

    def decode(indices):
        images = tf.numpy_function(load_batch, [indices], tf.uint8, stateful=False)
        images.set_shape((None, geometry.height, geometry.width, 3))
        return images

    dataset = order if order is not None else tf.data.Dataset.range(len(paths)).batch(batch_size)
    if targets is None:
        dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        y = tf.constant(np.asarray(targets, dtype=np.float32))

        def decode_labelled(indices):
            return decode(indices), tf.gather(y, indices)

        dataset = dataset.map(decode_labelled, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
    return _distributable(dataset.prefetch(tf.data.AUTOTUNE))


def _distributable(dataset: tf.data.Dataset) -> tf.data.Dataset:
    # Across workers, tf.data would first try to split the input by file, which an index
    # pipeline has none of; saying so up front splits it by batch without the warning.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def epoch_batches(items: int, batch_size: int, seed: int, first_epoch: int,
                  epochs: int) -> tf.data.Dataset:
    """Index batches of epochs `first_epoch` to `epochs - 1`, one epoch after the other, each
    in its own shuffled order (`checkpoints.epoch_order`): an epoch's batches depend only on
    the seed and its number, so a resumed run repeats them exactly."""
    orders = np.stack([checkpoints.epoch_order(items, seed, e) for e in range(first_epoch, epochs)])
    return tf.data.Dataset.from_tensor_slices(orders).flat_map(
        lambda order: tf.data.Dataset.from_tensor_slices(order).batch(batch_size))


def feature_dataset(features: np.ndarray, targets: np.ndarray, batch_size: int,
                    order: tf.data.Dataset | None = None) -> tf.data.Dataset:
    """(features, targets) batches gathered in `order` (index batches), or in row order.
    Feature maps (more than two dimensions) are gathered by NumPy, so that they are neither
    copied into a tensor whole nor read whole from a memory-mapped file."""
    y = tf.constant(np.asarray(targets, np.float32))
    if order is None:
        order = tf.data.Dataset.range(len(features)).batch(batch_size)
    if features.ndim > 2:
        dtype = tf.as_dtype(features.dtype)

        def gather_maps(indices):
            maps = tf.numpy_function(lambda i: np.asarray(features[i]), [indices], dtype)
            return tf.ensure_shape(maps, (None, *features.shape[1:]))
        dataset = order.map(lambda indices: (gather_maps(indices), tf.gather(y, indices)))
        return _distributable(dataset.prefetch(tf.data.AUTOTUNE))
    x = tf.constant(features)
    dataset = order.map(lambda indices: (tf.gather(x, indices), tf.gather(y, indices)))
    return _distributable(dataset.prefetch(tf.data.AUTOTUNE))


def compiled_inference(model: keras.Model):
    """`model` in inference mode as one compiled function of an image batch of any length.

    It is traced once per image shape and dtype, for any number of images: left to itself,
    tf.function traces again for the first batch of another length (the last, shorter batch
    of nearly every pass), which costs as long as a hundred images of MobileNetV2-0.35 at
    224 px on 2 CPU cores."""
    @tf.function(autograph=False)
    def infer(images):
        with warnings.catch_warnings():
            # A loaded model's one input is the list ['image'] to Keras, and a bare batch
            # means the same; the warning about it would only alarm users of predict.py.
            warnings.filterwarnings("ignore", message="The structure of `inputs`")
            return model(images, training=False)

    traced = {}

    def any_length(images):
        images = tf.convert_to_tensor(images)
        key = (images.dtype, tuple(images.shape[1:]))
        if key not in traced:
            traced[key] = infer.get_concrete_function(tf.TensorSpec((None, *key[1]), key[0]))
        return traced[key](images)
    any_length.tracing_count = infer.experimental_get_tracing_count
    return any_length


def run_inference(model: keras.Model | Callable, dataset: Iterable,
                  progress_label: str | None = None, total: int | None = None,
                  into: np.ndarray | None = None):
    """Apply `model` in inference mode to every batch of `dataset` (a tf.data.Dataset or
    any iterable of batches, either of which may be (images, targets) pairs); returns a
    numpy array, or a dict of them for a dict-output model, in dataset order. `model` may
    also be a function from `compiled_inference`, for passes that should not trace anew.
    With `into` (single-output models), each batch's result is written into its rows, in
    its dtype, and `into` is returned: no second copy of the results is made."""
    infer = model if not isinstance(model, keras.Model) else compiled_inference(model)
    chunks = []
    done, last_report, start = 0, time.monotonic(), time.monotonic()
    for batch in dataset:
        images = batch[0] if isinstance(batch, tuple) else batch
        result = tf.nest.map_structure(lambda t: t.numpy(), infer(images))
        if into is None:
            chunks.append(result)
        else:
            into[done:done + len(result)] = result
        done += int(images.shape[0])
        if progress_label and time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            rate = done / (last_report - start)
            log.info("%s: %s of %s images (%.1f images/s)", progress_label, f"{done:,}",
                     f"{total:,}" if total else "?", rate)
    if into is not None:
        if done != len(into):
            raise ValueError(f"{done} results for {len(into)} rows")
        return into
    if not chunks:
        raise ValueError("no batches to run")
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts, axis=0), *chunks)
