"""--download-weights-only: fetch the backbone's ImageNet weights into the Keras cache, for a
machine that trains offline later.
"""

from __future__ import annotations

from pathlib import Path

from symbol_trainer.errors import InputError
from symbol_trainer.model import build_backbone, keras_models_cache
from symbol_trainer.settings import TrainingConfig


def download_weights(config: TrainingConfig) -> tuple[Path, list[str]]:
    """Fetch the ImageNet weights of `config`'s backbone into the Keras cache, for a later run
    on a machine without internet; returns the cache folder and the files it gained (none
    when they were there already)."""
    if config.weights_source != "imagenet":
        raise InputError(f"--download-weights-only fetches ImageNet weights; --weights is "
                         f"{config.weights!r}. Leave --weights at its default (imagenet).")
    cache = keras_models_cache()
    before = set(cache.iterdir()) if cache.is_dir() else set()
    build_backbone(config, (config.image_size, config.image_size, 3))
    gained = sorted(p.name for p in set(cache.iterdir()) - before) if cache.is_dir() else []
    return cache, gained
