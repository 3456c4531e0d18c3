"""The batch streams of datasets.py: every epoch's batches from the seed and the epoch number
alone (a resumed stream repeats them), loading ahead in threads without changing what comes
out, batches filled up to a multiple of the devices, and inference of any batch length."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from symbol_trainer import checkpoints, datasets
from symbol_trainer.backend import keras


def _rows_of(stream) -> list[list[int]]:
    return [list(batch[1][:, 0].astype(int)) for batch in stream]


def _stream(order: datasets.BatchOrder, calls=None) -> datasets.Batches:
    targets = np.arange(order.items, dtype=np.float32)[:, None]

    def load(rows):
        if calls is not None:
            calls.append(threading.current_thread().name)
        return np.zeros((len(rows), 2, 2, 3), np.uint8), targets[rows]
    return datasets.Batches(order, load)


def test_each_epoch_is_its_seeded_order_and_a_resumed_stream_repeats_it():
    full = _rows_of(_stream(datasets.epoch_batches(10, 4, seed=7, first_epoch=0, epochs=3)))
    assert len(full) == 9 and [len(b) for b in full[:3]] == [4, 4, 2]
    for epoch in range(3):
        assert sum(full[3 * epoch:3 * epoch + 3], []) == \
            list(checkpoints.epoch_order(10, 7, epoch))
    assert full[:3] != full[3:6]  # reshuffled every epoch
    resumed = _rows_of(_stream(datasets.epoch_batches(10, 4, seed=7, first_epoch=1, epochs=3)))
    assert resumed == full[3:]


def test_batches_load_ahead_in_threads_and_come_out_in_order():
    calls = []
    stream = _stream(datasets.BatchOrder(20, 3), calls)
    assert _rows_of(stream) == [list(range(i, min(i + 3, 20))) for i in range(0, 20, 3)]
    assert all(name.startswith("batches") for name in calls)
    assert len(stream) == 7 and _rows_of([stream[6]]) == [[18, 19]]
    with pytest.raises(IndexError):
        stream[7]
    stream.close()
    stream.close()


def test_a_short_batch_is_filled_up_to_a_multiple_of_the_devices():
    order = datasets.epoch_batches(10, 4, seed=1, first_epoch=0, epochs=1, multiple=4)
    rows = [order.rows(n) for n in range(order.steps)]
    assert [len(r) for r in rows] == [4, 4, 4]
    epoch = checkpoints.epoch_order(10, 1, 0)
    np.testing.assert_array_equal(rows[2], np.concatenate([epoch[8:], epoch[:2]]))


def test_run_inference_gives_numpy_in_dataset_order_from_a_stream():
    inputs = keras.Input((2, 2, 3), dtype="uint8")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, name="s")(x))
    pixels = np.random.default_rng(0).integers(0, 256, (7, 2, 2, 3)).astype(np.uint8)
    stream = datasets.Batches(datasets.BatchOrder(7, 3), lambda rows: pixels[rows])
    got = datasets.run_inference(model, stream)
    assert isinstance(got, np.ndarray) and got.shape == (7, 1)
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(model(pixels)), rtol=1e-5,
                               atol=1e-6)
