"""Input pipelines and inference, the same under every Keras backend: batches of images and of
backbone features as `keras.utils.PyDataset`s (NumPy in, NumPy out, loaded ahead by threads),
the seeded order of each epoch's batches, and a compiled forward pass run over batches.

A dataset here is one flat stream of batches numbered from 0: a training stream holds every
epoch still to run, one after the other (fit() is told `steps_per_epoch`), so batch `n` is
always batch `n % steps` of epoch `first_epoch + n // steps`, whatever Keras's iterators do
between epochs, and loading runs ahead across the end of an epoch as it does within one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import threading
import time
import warnings
from typing import Callable, Iterable, Sequence

import numpy as np

from symbol_trainer.backend import BACKEND, keras, tf
from symbol_trainer import checkpoints
from symbol_trainer import decoding
from symbol_trainer.images import ImageGeometry, load_image_array
from symbol_trainer.pixel_store import PixelStore

log = logging.getLogger(__name__)

# Threads that load batches ahead of the model: Pillow releases the GIL while it decodes, and
# a read from the pixel store is one pread. One per usable core (a job's share of the node,
# decoding.usable_cores), at least 2, so one batch loads while one is used.
LOADING_THREADS = max(2, min(16, decoding.usable_cores()))
BATCHES_AHEAD = 2 * LOADING_THREADS


class BatchOrder:
    """Which rows each batch of a stream holds: `steps` batches per epoch, for epochs
    `first_epoch` to `epochs - 1`. With a seed, each epoch in its own shuffled order
    (`checkpoints.epoch_order`: it depends only on the seed and the epoch's number, so a
    resumed run repeats it exactly); without one, rows in order. `batches`, when given, are
    the index batches of one epoch, listed. With `multiple` above 1, a batch whose length is
    not a multiple of it (the last of an epoch) is filled up with the epoch's first rows:
    keras.distribution (JAX) splits every batch evenly over its devices. `share`
    (index, count), set by distribution.local_share when several JAX processes train
    together, keeps part `index` of `count` equal parts of every batch: this process's."""

    def __init__(self, items: int, batch_size: int, seed: int | None = None,
                 first_epoch: int = 0, epochs: int = 1,
                 batches: Sequence[np.ndarray] | None = None, multiple: int = 1):
        self.items, self.batch_size, self.seed = int(items), int(batch_size), seed
        self.multiple = int(multiple)
        self.share = (0, 1)
        self.first_epoch, self.epochs = int(first_epoch), int(epochs)
        self._listed = None if batches is None else [np.asarray(b, np.int64) for b in batches]
        self.steps = len(self._listed) if batches is not None else \
            math.ceil(self.items / self.batch_size)
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.steps * max(0, self.epochs - self.first_epoch)

    def rows(self, number: int) -> np.ndarray:
        """The rows of batch `number` of the stream."""
        epoch, step = self.first_epoch + number // self.steps, number % self.steps
        if self._listed is not None:
            return self._shared(self._listed[step])
        if self.seed is None:
            order = np.arange(self.items)
        else:
            with self._lock:
                if epoch not in self._orders:
                    # Two epochs at most: threads loading ahead cross from one to the next.
                    self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
                    self._orders[epoch] = checkpoints.epoch_order(self.items, self.seed, epoch)
                order = self._orders[epoch]
        rows = order[step * self.batch_size:(step + 1) * self.batch_size]
        short = -len(rows) % self.multiple
        return self._shared(np.concatenate([rows, order[:short]]) if short else rows)

    def _shared(self, rows: np.ndarray) -> np.ndarray:
        index, count = self.share
        if count > 1:
            if len(rows) % count:
                raise ValueError(f"a batch of {len(rows)} rows does not split into {count} "
                                 f"equal shares")
            part = len(rows) // count
            rows = rows[index * part:(index + 1) * part]
        return rows


def epoch_batches(items: int, batch_size: int, seed: int, first_epoch: int,
                  epochs: int, multiple: int = 1) -> BatchOrder:
    """Index batches of epochs `first_epoch` to `epochs - 1`, one epoch after the other, each
    in its own shuffled order (`checkpoints.epoch_order`): an epoch's batches depend only on
    the seed and its number, so a resumed run repeats them exactly. `multiple`: see
    BatchOrder."""
    return BatchOrder(items, batch_size, seed, first_epoch, epochs, multiple=multiple)


class Batches(keras.utils.PyDataset):
    """A stream of batches, batch `n` being `load(order.rows(n))` passed through each of
    `transforms` (function(batch, n + first_number) -> batch, added by `map_batches`).

    Keras's fit(), evaluate() and predict() take it under every backend; iterating over it
    (`run_inference`) gives the batches in order. Either way threads load up to
    BATCHES_AHEAD batches ahead of the one asked for. Keras's own worker pool is not used:
    it restarts at batch 0 every epoch, where this stream goes on."""

    def __init__(self, order: BatchOrder, load: Callable[[np.ndarray], object]):
        super().__init__(workers=1, use_multiprocessing=False)
        self.order, self.load = order, load
        self.transforms: list[tuple[Callable, int]] = []
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def map_batches(self, transform: Callable, first_number: int = 0) -> "Batches":
        """Apply `transform(batch, number)` to every batch, numbering them from
        `first_number`; returns this stream."""
        self.transforms.append((transform, int(first_number)))
        return self

    def keep_share(self, index: int, count: int) -> "Batches":
        """Keep part `index` of `count` equal parts of every batch (BatchOrder.share): one
        process's share when several train together. Each transform then numbers the batch
        `number x count + index`, so that the shares of one batch draw apart (the pastes of
        symbol_paste depend on the number), not alike; returns this stream."""
        self.order.share = (index, count)
        self.transforms = [
            (lambda batch, number, transform=transform: transform(batch, number * count + index),
             first) for transform, first in self.transforms]
        return self

    def __len__(self) -> int:
        return len(self.order)

    def _make(self, number: int):
        batch = self.load(self.order.rows(number))
        for transform, first in self.transforms:
            batch = transform(batch, first + number)
        return batch

    def __getitem__(self, number: int):
        if not 0 <= number < len(self):
            raise IndexError(f"batch {number} of a stream of {len(self)}")
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    LOADING_THREADS, thread_name_prefix="batches")
            for ahead in range(number, min(number + BATCHES_AHEAD + 1, len(self))):
                if ahead not in self._pending:
                    self._pending[ahead] = self._pool.submit(self._make, ahead)
            future = self._pending.pop(number)
            # Batches behind the one asked for are not asked for again in a pass (Keras asks
            # for the first ones twice when it builds a tf.data signature: made again then).
            for stale in [n for n in self._pending if n < number]:
                self._pending.pop(stale).cancel()
            if number == len(self) - 1 and not self._pending:
                self._pool.shutdown(wait=False)
                self._pool = None
        return future.result()

    def __iter__(self):
        for number in range(len(self)):
            yield self[number]

    def close(self) -> None:
        """Stop loading ahead; safe to call twice."""
        with self._lock:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None


def image_dataset(paths: Sequence[str], geometry: ImageGeometry, batch_size: int, *,
                  targets: np.ndarray | None = None, order: BatchOrder | None = None,
                  store: PixelStore | None = None) -> Batches:
    """Batches of uint8 images (batch, height, width, 3) loaded from disk; with `targets`
    (one row per path, see `fused_targets`), (images, targets) pairs. `order` says which
    paths each batch holds (see `epoch_batches`); without it, every path once, in order,
    `batch_size` at a time. With `store`, images come from it when it has them and are added
    to it when they do not.

    Each batch is loaded by one Python call, and several load at once in threads (Pillow
    releases the GIL while it decodes): one call per batch rather than per image keeps the
    pipeline's own overhead small next to the model's step when images come from `store`."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("image_dataset needs at least one path")
    order = order if order is not None else BatchOrder(len(paths), batch_size)
    y = None if targets is None else np.asarray(targets, np.float32)

    def load(rows):
        if store is not None:
            images = np.stack([store.load(paths[i]) for i in rows])
        else:
            images = np.stack([load_image_array(paths[i], geometry) for i in rows])
        return images if y is None else (images, y[rows])

    return Batches(order, load)


def feature_dataset(features: np.ndarray, targets: np.ndarray, batch_size: int,
                    order: BatchOrder | None = None) -> Batches:
    """(features, targets) batches gathered in `order` (index batches), or in row order.
    Feature maps are gathered by NumPy row by row of the batch, so that they are neither
    copied whole nor read whole from a memory-mapped file."""
    y = np.asarray(targets, np.float32)
    order = order if order is not None else BatchOrder(len(features), batch_size)
    return Batches(order, lambda rows: (np.asarray(features[rows]), y[rows]))


def _to_numpy(outputs):
    return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), outputs)


@contextlib.contextmanager
def _bare_batch_accepted():
    """A loaded model's one input is the list ['image'] to Keras, and a bare batch means the
    same; the warning about it would only alarm users of predict.py."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The structure of `inputs`")
        yield


def _quiet_call(model: keras.Model, images):
    with _bare_batch_accepted():
        return model(images, training=False)


def _tensorflow_inference(model: keras.Model):
    # Traced once per image shape and dtype with the batch length left open (None), so the
    # short last batch runs the same graph.
    @tf.function(autograph=False)
    def infer(images):
        return _quiet_call(model, images)

    traced = {}

    def any_length(images):
        images = tf.convert_to_tensor(images)
        key = (images.dtype, tuple(images.shape[1:]))
        if key not in traced:
            traced[key] = infer.get_concrete_function(tf.TensorSpec((None, *key[1]), key[0]))
        return _to_numpy(traced[key](images))
    any_length.tracing_count = infer.experimental_get_tracing_count
    return any_length


def _jax_forward(model: keras.Model, traces: list):
    import jax

    @jax.jit
    def forward(trainable, non_trainable, images):
        traces.append(images.shape)  # runs only while jax traces
        with _bare_batch_accepted():
            outputs, _ = model.stateless_call(trainable, non_trainable, images, training=False)
        return outputs

    def call(images):
        # The variables' current values, passed in: a model still training changes them.
        return forward([v.value for v in model.trainable_variables],
                       [v.value for v in model.non_trainable_variables], images)
    return call


def _torch_forward(model: keras.Model):
    import torch

    def call(images):
        with torch.no_grad():
            return _quiet_call(model, images)
    return call


def compiled_inference(model: keras.Model):
    """`model` in inference mode as one compiled function of an image batch of any length,
    returning NumPy arrays (a dict of them for a dict-output model).

    It is compiled once per image shape and dtype, for any number of images: left to itself,
    a compiled function is traced again for the first batch of another length (the last,
    shorter batch of nearly every pass), which costs as long as a hundred images of
    MobileNetV2-0.35 at 224 px on 2 CPU cores. Under TensorFlow the function is traced with
    the batch length left open; under JAX (and torch) a batch shorter than the first one of
    its shape is padded to that length and the result cut back. `tracing_count()` says how
    many times it was compiled."""
    if BACKEND == "tensorflow":
        return _tensorflow_inference(model)
    traces: list = []
    forward = _jax_forward(model, traces) if BACKEND == "jax" else _torch_forward(model)
    lengths: dict = {}

    def padded(images):
        images = np.asarray(images)
        key = (images.dtype.str, images.shape[1:])
        length = lengths.setdefault(key, len(images))
        if len(images) >= length:
            return _to_numpy(forward(images))
        filler = np.zeros((length - len(images), *images.shape[1:]), images.dtype)
        outputs = _to_numpy(forward(np.concatenate([images, filler])))
        return keras.tree.map_structure(lambda a: a[:len(images)], outputs)
    # torch runs eagerly: a "trace" per image shape and dtype, for the count.
    padded.tracing_count = (lambda: len(traces)) if BACKEND == "jax" else (lambda: len(lengths))
    return padded


def run_inference(model: keras.Model | Callable, dataset: Iterable,
                  progress_label: str | None = None, total: int | None = None,
                  into: np.ndarray | None = None):
    """Apply `model` in inference mode to every batch of `dataset` (a `Batches` stream or any
    iterable of batches, either of which may be (images, targets) pairs); returns a numpy
    array, or a dict of them for a dict-output model, in dataset order. `model` may also be
    a function from `compiled_inference`, for passes that should not compile anew.
    With `into` (single-output models), each batch's result is written into its rows, in
    its dtype, and `into` is returned: no second copy of the results is made."""
    infer = model if not isinstance(model, keras.Model) else compiled_inference(model)
    chunks = []
    done, last_report, start = 0, time.monotonic(), time.monotonic()
    try:
        for batch in dataset:
            images = batch[0] if isinstance(batch, tuple) else batch
            result = infer(images)
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
    finally:
        if isinstance(dataset, Batches):
            dataset.close()
    if into is not None:
        if done != len(into):
            raise ValueError(f"{done} results for {len(into)} rows")
        return into
    if not chunks:
        raise ValueError("no batches to run")
    return keras.tree.map_structure(lambda *parts: np.concatenate(parts, axis=0), *chunks)
