"""Finding and reading images: the image files of a folder, decoding (EXIF orientation,
alpha composited onto white, size limits), the model's input geometry and the resize to it,
and the parallel scan that reads every image once before training.

No TensorFlow here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from symbol_trainer import duplicates
from symbol_trainer.errors import ImageReadError, InputError
from symbol_trainer.settings import RESIZE_METHODS

log = logging.getLogger(__name__)


# read_image refuses every image above Image.MAX_IMAGE_PIXELS itself, with the file's name;
# Pillow's own warning for the same images would only add an anonymous line.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
# Transparent pixels are composited onto this colour; recorded in metadata.json.
ALPHA_BACKGROUND = "white"


def find_images(directory: str | os.PathLike, *, quiet: bool = False) -> list[Path]:
    """Image files below `directory`, recursively, sorted; hidden files and folders skipped.

    Symbolic links are followed (also out of `directory`), but every real folder is searched
    once and every file listed once, however many links or hard links lead to it; the paths
    left out, and folders that cannot be listed, are logged as a warning (with `quiet`, where
    the caller only looks the files up, at debug level)."""
    root = Path(directory)
    if not root.exists():
        raise InputError(f"{directory}: no such directory.")
    if not root.is_dir():
        raise InputError(f"{directory}: is a file, expected a directory of images.")
    walk = duplicates.walk_image_files(root, IMAGE_EXTENSIONS)
    level = logging.DEBUG if quiet else logging.WARNING
    repeats = duplicates.describe_repeats(walk, root)
    if repeats:
        log.log(level, "%s", repeats)
    for folder, reason in walk.unsearchable:
        log.log(level, "Cannot search the folder %s (%s); its images are left out. Check its "
                "permissions.", folder, reason)
    return walk.files


@dataclass(frozen=True)
class ImageGeometry:
    """How a decoded image becomes a model input: the target size and the resize method."""

    height: int
    width: int
    resize: str = "squash"

    def to_json(self) -> dict:
        return {"height": self.height, "width": self.width, "resize": self.resize}

    @classmethod
    def from_json(cls, data: dict) -> "ImageGeometry":
        return cls(int(data["height"]), int(data["width"]), str(data.get("resize", "squash")))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto ALPHA_BACKGROUND."""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit data (I;16 and I as Pillow opens 16-bit PNGs) is scaled, not clipped.
        if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def read_image(source: str | os.PathLike | bytes, min_size: tuple[int, int] | None = None,
               *, path_for_errors: str | os.PathLike | None = None) -> Image.Image:
    """Decode one image to an upright 8-bit RGB Pillow image.

    `source` is a path or the file's bytes. With `min_size` (width, height), a JPEG is decoded
    at the smallest DCT scale that still covers it, which is several times faster for large
    frames. EXIF orientation is honoured. Images that claim more pixels than
    `PIL.Image.MAX_IMAGE_PIXELS` are refused before they are decoded. Raises ImageReadError.
    """
    name = path_for_errors if path_for_errors is not None else source
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        width, height = image.size
        if width * height > Image.MAX_IMAGE_PIXELS:
            raise ImageReadError(
                name, f"claims {width}x{height} pixels, more than the limit of "
                      f"{Image.MAX_IMAGE_PIXELS:,}; refused without decoding (possible "
                      "decompression bomb)")
        if min_size is not None and image.format == "JPEG":
            side = max(min_size)  # square request: the EXIF rotation may swap the sides
            image.draft("RGB", (side, side))
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(name, "file not found") from None
    except Image.DecompressionBombError as error:
        raise ImageReadError(name, f"refused without decoding: {error}") from None
    except Exception as error:  # Pillow raises many types on corrupt data; all mean "unreadable"
        reason = str(error) or type(error).__name__
        raise ImageReadError(name, f"cannot be decoded as an image ({reason})") from None


def resize_to_geometry(image: Image.Image, geometry: ImageGeometry) -> np.ndarray:
    """An RGB image resized to the model input, as a (height, width, 3) uint8 array.

    'squash' stretches the image to the input; 'letterbox' scales it to fit inside, keeping
    its aspect ratio, and centres it on black bars; 'crop' scales it to cover the input and
    cuts the overflow from both sides equally."""
    if geometry.resize not in RESIZE_METHODS:
        raise ValueError(f"unknown resize method {geometry.resize!r}")
    target = (geometry.width, geometry.height)
    if image.size == target:
        return np.asarray(image, dtype=np.uint8)
    if geometry.resize == "squash":
        return np.asarray(image.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0),
                          dtype=np.uint8)
    width, height = image.size
    fit = min if geometry.resize == "letterbox" else max
    scale = fit(geometry.width / width, geometry.height / height)
    scaled = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = image.resize(scaled, Image.Resampling.BILINEAR, reducing_gap=3.0)
    if geometry.resize == "crop":
        left, top = (scaled[0] - geometry.width) // 2, (scaled[1] - geometry.height) // 2
        return np.asarray(image.crop((left, top, left + geometry.width, top + geometry.height)),
                          dtype=np.uint8)
    canvas = np.zeros((geometry.height, geometry.width, 3), np.uint8)
    left, top = (geometry.width - scaled[0]) // 2, (geometry.height - scaled[1]) // 2
    canvas[top:top + scaled[1], left:left + scaled[0]] = np.asarray(image, dtype=np.uint8)
    return canvas


def input_geometry(image_size: int, resize: str, sizes: Sequence[tuple[int, int]]) -> ImageGeometry:
    """The model input for frames of `sizes` ((width, height) each): the short side is
    `image_size`; with 'letterbox' or 'crop' the long side follows the most common aspect
    ratio among the frames, rounded to a multiple of 32, so that 16:9 frames are not
    squeezed into a square (which shrinks a small corner logo further). 'squash' is square."""
    if resize == "squash" or not len(sizes):
        return ImageGeometry(image_size, image_size, resize)
    ratios = collections.Counter(round(max(w, h) / min(w, h), 2) for w, h in sizes)
    ratio, _ = max(ratios.items(), key=lambda item: (item[1], -item[0]))
    landscape = sum(w >= h for w, h in sizes) >= len(sizes) / 2
    long_side = max(32, int(round(image_size * ratio / 32)) * 32, image_size)
    if landscape:
        return ImageGeometry(image_size, long_side, resize)
    return ImageGeometry(long_side, image_size, resize)


def load_image_array(path: str | os.PathLike, geometry: ImageGeometry) -> np.ndarray:
    """Read one image and return the model input for it: (height, width, 3) uint8."""
    image = read_image(path, (geometry.width, geometry.height))
    return resize_to_geometry(image, geometry)


@dataclass(frozen=True)
class ScanResult:
    """What one pass over the image files found."""

    sha1: list[str | None]           # content hash per path, None where unreadable
    size: list[tuple[int, int] | None]  # (width, height) after EXIF rotation
    errors: list[tuple[str, str]]    # (path, reason) of the unreadable files
    look: list[int | None] = field(default_factory=list)  # perceptual_hash per path

    @property
    def readable(self) -> np.ndarray:
        return np.array([h is not None for h in self.sha1], dtype=bool)


def perceptual_hash(image: Image.Image) -> int:
    """A 64-bit difference hash (dHash): whether each pixel of a 9x8 grey thumbnail is
    brighter than its right neighbour. Frames of one shot differ in a few bits at most;
    unrelated frames in about half of them."""
    grey = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _scan_one(path: str) -> tuple[str, tuple[int, int], int]:
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ImageReadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a folder, not an image file") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied: this user may not read the file "
                                   "(check its permissions, and its folder's)") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot be read ({error.strerror or error})") from None
    # A reduced-scale decode still reads every compressed byte, so truncation is caught.
    image = read_image(data, (64, 64), path_for_errors=path)
    return hashlib.sha1(data).hexdigest(), image.size, perceptual_hash(image)


def scan_images(paths: Sequence[str | os.PathLike], workers: int | None = None,
                progress_every: float = 10.0) -> ScanResult:
    """Read and decode every image once, in parallel threads; never raises for a bad file."""
    workers = workers or min(8, os.cpu_count() or 1)
    sha1: list[str | None] = [None] * len(paths)
    size: list[tuple[int, int] | None] = [None] * len(paths)
    look: list[int | None] = [None] * len(paths)
    errors: list[tuple[str, str]] = []
    last_report = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = pool.map(_scan_one_safely, [str(p) for p in paths])
        for index, (result, error) in enumerate(futures):
            if error is None:
                sha1[index], size[index], look[index] = result
            else:
                errors.append((str(paths[index]), error))
            if time.monotonic() - last_report > progress_every:
                last_report = time.monotonic()
                log.info("Checked %s of %s images", f"{index + 1:,}", f"{len(paths):,}")
    return ScanResult(sha1, size, errors, look)


def _scan_one_safely(path: str):
    try:
        return _scan_one(path), None
    except ImageReadError as error:
        return None, error.reason
