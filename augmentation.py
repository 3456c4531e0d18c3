"""Training-time augmentation that suits symbols, as Keras preprocessing layers.

Logos, text and emblems are chiral: a mirrored logo is a different logo, so nothing here
flips unless asked (`--flip`). What does vary between frames of a TV series is handled: the
camera turns and zooms a little, a symbol is partly cut off at the frame edge, the grade
changes brightness, contrast and saturation, focus and compression soften the picture.

The layers only act in training mode. Training wraps the model as
`Model(image, model(augment(image)))`, so the saved model never contains them and two
predictions of one image are identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import ops

POLICIES = ("none", "light", "default", "heavy")


@dataclass(frozen=True)
class Policy:
    rotation_degrees: float
    zoom: tuple[float, float]       # RandomZoom height factor: negative zooms in
    translation: float              # share of the side
    brightness: float               # share of the value range
    contrast: float
    saturation: float               # distance from RandomSaturation's neutral 0.5
    blur_sigma: float               # most Gaussian blur, in pixels
    low_resolution: float           # relative resolution of the softened images
    degrade_probability: float      # share of images softened that way


SETTINGS = {
    "light": Policy(2, (-0.1, 0.05), 0.04, 0.1, 0.1, 0.1, 0.5, 0.75, 0.2),
    "default": Policy(5, (-0.2, 0.1), 0.1, 0.2, 0.2, 0.2, 1.0, 0.5, 0.3),
    "heavy": Policy(10, (-0.35, 0.2), 0.2, 0.3, 0.35, 0.35, 1.5, 0.35, 0.5),
}


class RandomLowResolution(keras.layers.Layer):
    """Softens a share of the images as low-bitrate video does: each chosen image is scaled
    down to `scale` of its size and back up. Active in training only. The scale is fixed so
    that every shape is static (XLA compiles it on GPUs)."""

    def __init__(self, scale: float, probability: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.probability = float(scale), float(probability)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training or self.probability <= 0:
            return images
        height, width = images.shape[1], images.shape[2]
        small = (max(1, round(height * self.scale)), max(1, round(width * self.scale)))
        degraded = ops.image.resize(ops.image.resize(images, small, interpolation="area"),
                                    (height, width), interpolation="bilinear")
        chosen = keras.random.uniform((ops.shape(images)[0], 1, 1, 1),
                                      seed=self.seed_generator) < self.probability
        return ops.where(chosen, ops.cast(degraded, images.dtype), images)

    def compute_output_shape(self, input_shape):
        return input_shape


def augmentation_layers(policy: str, flip: bool, seed: int) -> keras.Sequential | None:
    """The augmentation of `policy` (one of POLICIES), with a horizontal flip when `flip`;
    None when there is nothing to do. Works on 0-255 RGB batches."""
    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}; choose one of {POLICIES}")
    layers = [keras.layers.RandomFlip("horizontal", seed=seed)] if flip else []
    if policy != "none":
        p = SETTINGS[policy]
        edge = dict(fill_mode="constant", fill_value=0.0)  # like letterbox bars, never a mirror
        layers += [
            keras.layers.RandomRotation(p.rotation_degrees / 360, seed=seed + 1, **edge),
            keras.layers.RandomZoom(p.zoom, seed=seed + 2, **edge),
            keras.layers.RandomTranslation(p.translation, p.translation, seed=seed + 3, **edge),
            keras.layers.RandomBrightness(p.brightness, value_range=(0, 255), seed=seed + 4),
            keras.layers.RandomContrast(p.contrast, value_range=(0, 255), seed=seed + 5),
            keras.layers.RandomSaturation((0.5 - p.saturation, 0.5 + p.saturation),
                                          value_range=(0, 255), seed=seed + 6),
            keras.layers.RandomGaussianBlur(factor=(0.0, 1.0), kernel_size=3,
                                            sigma=(0.01, p.blur_sigma), value_range=(0, 255),
                                            seed=seed + 7),
            RandomLowResolution(p.low_resolution, p.degrade_probability, seed=seed + 8),
        ]
    if not layers:
        return None
    return keras.Sequential(layers, name="augmentation")
