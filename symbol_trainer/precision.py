"""Mixed precision: whether --mixed-precision means float16 compute on this machine, Keras's
dtype policy for a block, and the float32 copy of a model trained in mixed precision (what is
saved). Used by the pipeline and by the refit (refit.py)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

from symbol_trainer.backend import BACKEND, keras, tf
from symbol_trainer.images import ImageGeometry
from symbol_trainer.model import ModelParts, build_model
from symbol_trainer.settings import TrainingConfig


def mixed_precision_enabled(setting: str) -> bool:
    """Whether --mixed-precision `setting` means float16 compute on this machine."""
    if setting != "auto":
        return setting == "on"
    capabilities = gpu_capabilities()
    return bool(capabilities) and all(c is not None and c >= (7, 0) for c in capabilities)


def gpu_capabilities() -> list[tuple[int, int] | None]:
    """The CUDA compute capability of each GPU the backend sees (None where it does not say);
    an empty list without GPUs."""
    if BACKEND == "tensorflow":
        capabilities = []
        for gpu in tf.config.list_physical_devices("GPU"):
            capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
            capabilities.append(tuple(capability) if capability else None)
        return capabilities
    if BACKEND == "torch":
        import torch
        if not torch.cuda.is_available():
            return []
        return [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    import jax
    gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
    capabilities = []
    for gpu in gpus:
        text = getattr(gpu, "compute_capability", None)  # "9.0" on CUDA devices
        try:
            capabilities.append(tuple(int(part) for part in str(text).split(".")[:2]))
        except ValueError:
            capabilities.append(None)
    return capabilities


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
