"""Mixed precision: whether --mixed-precision means float16 compute on this machine, Keras's
dtype policy for a block, and the float32 copy of a model trained in mixed precision (what is
saved). Used by the pipeline and by the refit (refit.py)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

from symbol_trainer.backend import keras, tf
from symbol_trainer.images import ImageGeometry
from symbol_trainer.model import ModelParts, build_model
from symbol_trainer.settings import TrainingConfig


def mixed_precision_enabled(setting: str) -> bool:
    """Whether --mixed-precision `setting` means float16 compute on this machine."""
    if setting != "auto":
        return setting == "on"
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return False
    for gpu in gpus:
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if not capability or tuple(capability) < (7, 0):
            return False
    return True


@contextlib.contextmanager
def dtype_policy(name: str):
    """Keras's global dtype policy set to `name` for the block, and restored after it."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def float32_twin(parts: ModelParts, symbols: Sequence[str], config: TrainingConfig,
                 geometry: ImageGeometry) -> ModelParts:
    """The same model computing in float32, with the trained weights: what is saved after
    mixed-precision training, so that the model runs at full speed on any CPU."""
    with dtype_policy("float32"):
        twin = build_model(symbols, dataclasses.replace(config, weights="none"), geometry)
    twin.model.set_weights(parts.model.get_weights())
    return twin
