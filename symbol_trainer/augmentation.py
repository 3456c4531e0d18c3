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

import math
from dataclasses import dataclass

from symbol_trainer.backend import keras  # TensorFlow first, quietly
from keras import ops  # noqa: E402

from symbol_trainer.settings import AUGMENT_POLICIES as POLICIES


@dataclass(frozen=True)
class Policy:
    rotation_degrees: float         # most rotation either way
    scale: tuple[float, float]      # content scale: below 1 zooms out, above 1 zooms in
    translation: float              # most shift, as a share of each side
    brightness: float               # most change, as a share of the 0-255 range
    contrast: float                 # most relative change of the spread around the mean
    saturation: float               # most relative change of the colour around grey
    blur: float                     # most mix towards a 3x3 Gaussian blur (sigma 1 pixel)
    low_resolution: int             # factor of the softened images' lower resolution
    low_resolution_share: float     # share of images softened that way


# Broadcasters put logos near the corners, about 5 % of the width from the edges: zoom and
# shift stay small enough to cut such a symbol partly, not remove it (which would make its
# "visible" label wrong).
SETTINGS = {
    "light": Policy(2, (0.95, 1.05), 0.03, 0.1, 0.1, 0.1, 0.5, 2, 0.2),
    "default": Policy(5, (0.9, 1.1), 0.05, 0.2, 0.2, 0.2, 1.0, 2, 0.3),
    "heavy": Policy(10, (0.8, 1.2), 0.1, 0.3, 0.35, 0.35, 1.0, 3, 0.5),
}


class SymbolAugmentation(keras.layers.Layer):
    """One layer for the whole policy, because on a CPU each separate Keras augmentation
    layer costs about as much as a rotation of the whole batch (a batch of 32 at 224 px:
    400 ms through eight standard layers, against 250 ms for the model's training step).
    Here rotation, zoom and shift are one affine resampling, and brightness, contrast and
    saturation one elementwise expression. Active in training only."""

    def __init__(self, policy: Policy, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy
        self.seed_generator = keras.random.SeedGenerator(seed)
        gaussian = [0.27901, 0.44198, 0.27901]  # sigma 1, normalised
        kernel = [[a * b for b in gaussian] for a in gaussian]
        self._blur_kernel = ops.tile(ops.reshape(ops.convert_to_tensor(kernel, "float32"),
                                                 (3, 3, 1, 1)), (1, 1, 3, 1))

    def _uniform(self, shape, low, high):
        return keras.random.uniform(shape, low, high, seed=self.seed_generator)

    def _geometry(self, images):
        p, n = self.policy, ops.shape(images)[0]
        height, width = images.shape[1], images.shape[2]
        angle = self._uniform((n,), -1.0, 1.0) * (p.rotation_degrees * math.pi / 180)
        scale = self._uniform((n,), *p.scale)
        shift_x = self._uniform((n,), -1.0, 1.0) * p.translation * width
        shift_y = self._uniform((n,), -1.0, 1.0) * p.translation * height
        cx, cy = (width - 1) / 2, (height - 1) / 2
        # Maps each output pixel to the input pixel it samples: about the centre, rotate by
        # the angle, divide by the scale, then shift.
        a0, a1 = ops.cos(angle) / scale, ops.sin(angle) / scale
        b0, b1 = -ops.sin(angle) / scale, ops.cos(angle) / scale
        a2 = cx - shift_x - (a0 * cx + a1 * cy)
        b2 = cy - shift_y - (b0 * cx + b1 * cy)
        zeros = ops.zeros_like(angle)
        transform = ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        # Uncovered borders are black, like letterbox bars, never a mirror of the frame.
        return ops.image.affine_transform(images, transform, interpolation="bilinear",
                                          fill_mode="constant", fill_value=0)

    def _colour(self, images):
        p, n = self.policy, ops.shape(images)[0]
        brightness = self._uniform((n, 1, 1, 1), -p.brightness, p.brightness) * 255
        contrast = 1 + self._uniform((n, 1, 1, 1), -p.contrast, p.contrast)
        saturation = 1 + self._uniform((n, 1, 1, 1), -p.saturation, p.saturation)
        grey = ops.sum(images * ops.convert_to_tensor([0.299, 0.587, 0.114]), axis=-1,
                       keepdims=True)
        images = grey + saturation * (images - grey)
        mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
        return (images - mean) * contrast + mean + brightness

    def _softening(self, images):
        p, n = self.policy, ops.shape(images)[0]
        height, width = images.shape[1], images.shape[2]
        blurred = ops.depthwise_conv(images, self._blur_kernel, padding="same")
        images = images + self._uniform((n, 1, 1, 1), 0.0, p.blur) * (blurred - images)
        k = p.low_resolution
        small = ops.average_pool(images, k, strides=k, padding="same")
        low = ops.image.resize(small, (height, width), interpolation="bilinear")
        chosen = self._uniform((n, 1, 1, 1), 0.0, 1.0) < p.low_resolution_share
        return ops.where(chosen, low, images)

    def call(self, images, training=None):
        if not training:
            return images
        images = ops.cast(images, "float32")
        images = self._softening(self._colour(self._geometry(images)))
        return ops.clip(images, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape


def augments(policy: str, flip: bool) -> bool:
    """Whether `policy` and `flip` change the training images at all."""
    return flip or policy != "none"


def augmentation_layers(policy: str, flip: bool, seed: int) -> keras.Sequential | None:
    """The augmentation of `policy` (one of POLICIES), with a horizontal flip when `flip`;
    None when there is nothing to do. Works on 0-255 RGB batches."""
    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}; choose one of {POLICIES}")
    if not augments(policy, flip):
        return None
    layers = [keras.layers.RandomFlip("horizontal", seed=seed)] if flip else []
    if policy != "none":
        layers.append(SymbolAugmentation(SETTINGS[policy], seed=seed + 1))
    return keras.Sequential(layers, name="augmentation")
