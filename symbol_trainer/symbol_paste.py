"""More positives from a clean image of a symbol: `--symbol-image NAME=FILE`.

When the user has the symbol itself (a logo file), fine-tuning pastes it into training frames
that do not show it, at a random position, size, small rotation, colour, opacity and blur,
and labels those frames as showing it. Only the fine-tuning stream of training images is
changed: validation frames, the head phase's cached features and the saved model never see
a pasted symbol.

The paste works on the decoded uint8 batches and their targets (labels beside weights, see
common.fused_targets) with NumPy and Pillow, in the input pipeline's worker threads, like the
decoding before it: it must change labels, which a layer inside the model cannot, and it
needs no backend tensors, so it runs the same under every Keras backend. Its randomness is a
NumPy generator seeded by (--seed, the batch's number in the run), so a run and its resumed
continuation paste the same symbols in the same places. See docs/symbol-image.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from symbol_trainer.errors import InputError
from symbol_trainer.settings import TrainingConfig, parse_size_range

log = logging.getLogger(__name__)

# A symbol image larger than this (longest side, pixels) is reduced once when it is read:
# it is pasted at most a fraction of a model input in size.
MAX_SYMBOL_SIDE = 1024


@dataclass(frozen=True)
class PasteRanges:
    """How varied the pasted symbols are; every value is drawn uniformly from its range
    for each paste (the size log-uniformly)."""

    size: tuple[float, float] = (0.08, 0.5)   # the symbol's longer side / the frame's shorter
                                              # (--symbol-image-size)
    inside: float = 0.8                       # least share of each side inside the frame
    rotation_degrees: float = 15.0            # most rotation either way
    brightness: float = 0.3                   # most relative change of the symbol's brightness
    channel_gain: float = 0.15                # most relative change of each colour channel
    recolour_share: float = 0.3               # share of pastes in two random colours instead
    opacity: tuple[float, float] = (0.6, 1.0)  # alpha blend with the frame
    blur_sigma: tuple[float, float] = (0.0, 1.5)  # Gaussian blur of the symbol, pixels
    soft_border: float = 0.04                 # feathered edge of symbols without alpha, share


RANGES = PasteRanges()


@dataclass(frozen=True)
class SymbolImage:
    """One decoded --symbol-image: RGBA pixels whose alpha says which pixels are the symbol."""

    symbol: str
    path: str
    sha1: str
    width: int
    height: int
    has_alpha: bool
    pixels: np.ndarray  # (height, width, 4) uint8; alpha 255 everywhere when the file had none

    def describe(self) -> dict:
        return {"symbol": self.symbol, "path": str(Path(self.path).resolve()), "sha1": self.sha1,
                "width": self.width, "height": self.height, "alpha_mask": self.has_alpha}


def load_symbol_images(pairs: Sequence[Sequence[str]],
                       symbols: Sequence[str]) -> tuple[SymbolImage, ...]:
    """Decode every (symbol, path) of --symbol-image once. Raises InputError naming the flag
    and the file when the symbol is not one of `symbols` or the file is not a readable image."""
    loaded = []
    for name, path in pairs:
        shown = f"--symbol-image {name}={path}"
        if name not in symbols:
            raise InputError(f"{shown}: {name!r} is not a symbol of this run; the symbols are "
                             f"{', '.join(symbols)}. Write NAME=FILE with one of them.")
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise InputError(f"{shown}: cannot read the file ({error.strerror or error}).") \
                from None
        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                has_alpha = image.mode in ("RGBA", "LA", "PA") or (
                    image.mode == "P" and "transparency" in image.info)
                image = image.convert("RGBA")
                image.thumbnail((MAX_SYMBOL_SIDE, MAX_SYMBOL_SIDE), Image.LANCZOS)
                pixels = np.array(image)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) \
                as error:
            raise InputError(f"{shown}: not an image that can be read ({error}). Give a PNG "
                             "(with transparency around the symbol, best) or a JPEG.") from None
        if has_alpha and not (pixels[..., 3] > 0).any():
            raise InputError(f"{shown}: the image is fully transparent, so it has no symbol "
                             "pixels to paste.")
        if min(pixels.shape[:2]) < 4:
            raise InputError(f"{shown}: the image is {pixels.shape[1]}x{pixels.shape[0]} "
                             "pixels; give one at least 4 pixels on each side.")
        loaded.append(SymbolImage(name, str(path), hashlib.sha1(data).hexdigest(),
                                  pixels.shape[1], pixels.shape[0], has_alpha, pixels))
    return tuple(loaded)


def description(images: Sequence[SymbolImage], config: TrainingConfig) -> dict:
    """What metadata.json records of the pasted symbols: the images, the rate and the range
    of sizes (empty images: nothing was pasted)."""
    return {"images": [image.describe() for image in images], "rate": config.symbol_image_rate,
            "size": list(parse_size_range(config.symbol_image_size))}


# --------------------------------------------------------------------------------------------
# Pasting


def _soft_rectangle(height: int, width: int, border: float) -> np.ndarray:
    """An alpha of 255 inside, falling linearly to 0 over `border` of the shorter side at
    the edges: a symbol without alpha then has no hard rectangular outline."""
    ramp = max(1.0, border * min(height, width))
    y = np.minimum(np.arange(height) + 0.5, height - np.arange(height) - 0.5) / ramp
    x = np.minimum(np.arange(width) + 0.5, width - np.arange(width) - 0.5) / ramp
    return (np.clip(np.minimum(y[:, None], x[None, :]), 0, 1) * 255).astype(np.uint8)


def symbol_patch(symbol: SymbolImage, frame_short_side: int, rng: np.random.Generator,
                 ranges: PasteRanges = RANGES) -> tuple[np.ndarray, np.ndarray]:
    """The symbol as it will be pasted: (colour, alpha), float32 arrays of (h, w, 3) in
    0-255 and (h, w, 1) in 0-1, resized, rotated, recoloured and blurred at random."""
    low, high = ranges.size
    longer = math.exp(rng.uniform(math.log(low), math.log(high))) * frame_short_side
    scale = longer / max(symbol.width, symbol.height)
    size = (max(2, round(symbol.width * scale)), max(2, round(symbol.height * scale)))
    # Premultiplied alpha ('RGBa'), so that resampling does not pull the colour of the
    # transparent surroundings into the symbol's edge.
    image = Image.fromarray(symbol.pixels, "RGBA").convert("RGBa").resize(size, Image.LANCZOS)
    if not symbol.has_alpha:  # the border is softened at the size it is pasted
        rgba = np.array(image.convert("RGBA"))
        rgba[..., 3] = _soft_rectangle(size[1], size[0], ranges.soft_border)
        image = Image.fromarray(rgba, "RGBA").convert("RGBa")
    angle = rng.uniform(-ranges.rotation_degrees, ranges.rotation_degrees)
    image = image.rotate(angle, Image.BICUBIC, expand=True)
    sigma = rng.uniform(*ranges.blur_sigma)
    if sigma > 0.2:
        image = image.filter(ImageFilter.GaussianBlur(sigma))
    rgba = np.asarray(image.convert("RGBA"), np.float32)
    colour, alpha = rgba[..., :3], rgba[..., 3:] / 255.0
    if rng.random() < ranges.recolour_share:
        # Two random colours along the symbol's own light and dark parts: a logo printed,
        # embroidered or shown in another colour scheme.
        luminance = colour @ np.array([0.299, 0.587, 0.114], np.float32)
        shown = luminance[alpha[..., 0] > 0.5]
        lo, hi = (np.percentile(shown, (5, 95)) if shown.size else (0.0, 255.0))
        # A one-colour symbol (little spread) stays one colour, not its noise stretched.
        t = np.clip((luminance - lo) / max(hi - lo, 60.0), 0, 1)[..., None]
        dark, light = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        colour = dark * (1 - t) + light * t
    else:
        gain = (1 + rng.uniform(-ranges.brightness, ranges.brightness)) * \
            (1 + rng.uniform(-ranges.channel_gain, ranges.channel_gain, 3))
        colour = colour * gain
    alpha = alpha * rng.uniform(*ranges.opacity)
    return np.clip(colour, 0, 255).astype(np.float32), alpha.astype(np.float32)


def paste_patch(frame: np.ndarray, colour: np.ndarray, alpha: np.ndarray, top: int,
                left: int) -> np.ndarray:
    """`frame` (uint8, changed in place and returned) with the patch blended in at (top,
    left), which may lie partly outside the frame: frame * (1 - alpha) + colour * alpha."""
    height, width = frame.shape[:2]
    h, w = alpha.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, height), min(left + w, width)
    if y1 <= y0 or x1 <= x0:
        return frame
    a = alpha[y0 - top:y1 - top, x0 - left:x1 - left]
    c = colour[y0 - top:y1 - top, x0 - left:x1 - left]
    region = frame[y0:y1, x0:x1].astype(np.float32)
    frame[y0:y1, x0:x1] = np.clip(np.rint(region * (1 - a) + c * a), 0, 255).astype(np.uint8)
    return frame


def paste_position(frame_shape: tuple[int, int], patch_shape: tuple[int, int],
                   rng: np.random.Generator, inside: float = RANGES.inside) -> tuple[int, int]:
    """A random (top, left) that keeps at least `inside` of each side of the patch in the
    frame (all of it where the patch is small enough)."""
    (height, width), (h, w) = frame_shape, patch_shape
    top = rng.integers(-round((1 - inside) * h), max(height - round(inside * h), 0) + 1)
    left = rng.integers(-round((1 - inside) * w), max(width - round(inside * w), 0) + 1)
    return int(top), int(left)


class SymbolPaster:
    """Pastes `images` into a batch's frames that are annotated negatives of their symbol.

    `symbols` are the columns of the targets, which hold the labels and then the weights of
    every symbol (common.fused_targets). Each frame that is a negative (label 0, weight above
    0) of at least one symbol with an image gets, with probability `rate`, one of those
    symbols (chosen uniformly, then one of its images) pasted, and that symbol's label set
    to 1; its weight, and every other symbol's label, stay as they were."""

    def __init__(self, images: Sequence[SymbolImage], symbols: Sequence[str], rate: float,
                 seed: int, ranges: PasteRanges = RANGES):
        self.symbols = list(symbols)
        self.rate = float(rate)
        self.seed = int(seed)
        self.ranges = ranges
        self.by_column = {self.symbols.index(s): [i for i in images if i.symbol == s]
                          for s in sorted({i.symbol for i in images})}

    def paste_batch(self, images: np.ndarray, targets: np.ndarray,
                    batch_number: int) -> tuple[np.ndarray, np.ndarray]:
        """A copy of (images, targets) with symbols pasted; batch `batch_number` of the run
        gets the same pastes every time."""
        images, targets = np.array(images, np.uint8), np.array(targets, np.float32)
        count = len(self.symbols)
        rng = np.random.default_rng([self.seed, int(batch_number), 0x5A57E])
        columns = np.array(sorted(self.by_column), int)
        for row in range(len(images)):
            draw = rng.random()  # drawn for every frame, so frames do not shift each other's
            labels, weights = targets[row, columns], targets[row, count + columns]
            candidates = columns[(labels == 0) & (weights > 0)]
            if draw >= self.rate or not len(candidates):
                continue
            column = int(rng.choice(candidates))
            choices = self.by_column[column]
            symbol = choices[int(rng.integers(len(choices)))]
            colour, alpha = symbol_patch(symbol, min(images.shape[1:3]), rng, self.ranges)
            top, left = paste_position(images.shape[1:3], alpha.shape[:2], rng,
                                       self.ranges.inside)
            paste_patch(images[row], colour, alpha, top, left)
            targets[row, column] = 1.0
        return images, targets


def paster_for(images: Sequence[SymbolImage], symbols: Sequence[str],
               config: TrainingConfig) -> SymbolPaster | None:
    """The paster of a run with `config` (--symbol-image-rate, --symbol-image-size, --seed),
    or None when there is nothing to paste."""
    rate = config.symbol_image_rate
    if not images or rate <= 0:
        return None
    log.info("Pasting %s into %.0f %% of the fine-tuning frames that do not show them.",
             ", ".join(f"{i.symbol} ({Path(i.path).name}, {i.width}x{i.height}"
                       f"{', alpha mask' if i.has_alpha else ''})" for i in images), 100 * rate)
    ranges = dataclasses.replace(RANGES, size=parse_size_range(config.symbol_image_size))
    return SymbolPaster(images, symbols, rate, config.seed, ranges)


def pasting(dataset, paster: SymbolPaster | None, first_batch: int = 0):
    """`dataset` (a datasets.Batches stream of (images, targets) batches) with `paster`
    applied to each batch in NumPy, in the threads that load them, the batches numbered from
    `first_batch` (an epoch's batches are then the same when a run resumes there); `dataset`
    itself when `paster` is None."""
    if paster is None:
        return dataset
    return dataset.map_batches(lambda batch, number: paster.paste_batch(*batch, number),
                               first_batch)
