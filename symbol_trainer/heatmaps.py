"""Where a model sees each symbol: per-location probabilities ("heatmaps") mapped back onto the
frame, and the overlays that the report and `predict.py --heatmaps` show.

A model with a spatial head has a layer named `score_map` (SCORE_MAP_LAYER): a 1x1
convolution whose output is per-location logits, (batch, h, w, symbols), in the order of
metadata["symbols"]. `keras.Model(model.inputs, model.get_layer("score_map").output)` gives
them to any Keras user. Models of earlier versions (a backbone, GlobalAveragePooling2D named
"pooling", one Dense(1) per symbol) get class-activation maps instead: the backbone's feature
map dotted with each symbol's Dense kernel, plus its bias. Their mean over the locations is
exactly the logit of the model's output, because the pooling is an average.

A heatmap covers the model input. `frame_heatmap` maps it onto the frame the input was made
from, undoing the resize of `metadata["input"]`: the bars of 'letterbox' are cut off, and the
parts of the frame that 'crop' cut away are NaN (the model never saw them).

This module sits below report.py and prediction.py (which import it): it imports no module of
this tool at load time; only `heatmaps` and `frame_heatmaps`, given image paths, read them
with images.read_image.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from symbol_trainer import decoding
from symbol_trainer.errors import InputError, printable
from symbol_trainer.output_dir import file_identity

log = logging.getLogger(__name__)

SCORE_MAP_LAYER = "score_map"
# The overlay's colour scale, from probability 0 to 1 (dark blue, cyan, yellow, red), and its
# opacity, which grows with the probability so the frame stays visible where nothing is seen.
COLOURS = np.array([(40, 30, 120), (30, 150, 230), (60, 210, 160), (250, 220, 40),
                    (230, 40, 20)], dtype=np.float64)
OPACITY = (0.1, 0.55)  # at probability 0 and at 1
# predict.py --heatmaps: the frame is reduced to fit in this box (width, height) first.
PNG_SIZE = (960, 960)
RETRAIN = ("Train it again with this version, whose models have a 'score_map' layer, to get "
           "heatmaps")


# --------------------------------------------------------------------------------------------
# Per-location logits


def _layer(model, name: str):
    try:
        return model.get_layer(name)
    except ValueError:
        return None


def _output_symbols(model) -> list[str]:
    output = model.output
    return list(output.keys()) if isinstance(output, dict) else list(model.output_names)


def heatmap_model(model, symbols: Sequence[str] | None = None):
    """A keras.Model from the raw image (the input of `model`) to per-location logits,
    (batch, h, w, len(symbols)), symbols in the order of `symbols` (default: the model's
    outputs). The `score_map` layer's output where there is one; else, for models of earlier
    versions, class-activation maps. Raises InputError for a model that has neither."""
    import keras

    score_map = _layer(model, SCORE_MAP_LAYER)
    if score_map is not None:
        return keras.Model(model.inputs, score_map.output, name="heatmaps")
    symbols = list(symbols) if symbols is not None else _output_symbols(model)
    pooling, backbone = _layer(model, "pooling"), _layer(model, "backbone")
    heads = [_layer(model, s) for s in symbols]
    if (pooling is None or backbone is None
            or not isinstance(pooling, keras.layers.GlobalAveragePooling2D)
            or any(not isinstance(h, keras.layers.Dense) for h in heads)):
        raise InputError(
            f"the model has no '{SCORE_MAP_LAYER}' layer, and it is not one of the earlier "
            "versions' models (a 'backbone', average 'pooling' and a Dense layer per symbol) "
            f"whose class-activation maps stand in for it. {RETRAIN}.")
    features = pooling.input
    kernel = np.concatenate([h.get_weights()[0] for h in heads], axis=1)  # (channels, symbols)
    bias = np.concatenate([h.get_weights()[1] for h in heads])
    layer = keras.layers.Conv2D(len(symbols), 1, name="class_activation", dtype="float32")
    logits = layer(features)
    layer.set_weights([kernel[None, None].astype(np.float32), bias.astype(np.float32)])
    return keras.Model(model.inputs, logits, name="class_activation_maps")


def sigmoid(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # = 1 / (1 + exp(-x)), without overflow


def with_probabilities(model, symbols: Sequence[str]):
    """One model that gives, in one pass, the model's outputs {symbol: probability} and the
    per-location logits: {"probabilities": {...}, "score_map": (batch, h, w, symbols)}."""
    import keras

    maps = heatmap_model(model, symbols)
    outputs = model.output if isinstance(model.output, dict) else dict(
        zip(model.output_names, model.outputs))
    return keras.Model(model.inputs, {"probabilities": {s: outputs[s] for s in symbols},
                                      "score_map": maps.output}, name="with_heatmaps")


# --------------------------------------------------------------------------------------------
# From the model input back to the frame


@dataclass(frozen=True)
class Placement:
    """Where the frame lies on the model input, in input pixels: its left, top, right and
    bottom edges (left and top are negative for 'crop', whose input shows the frame's centre)."""

    left: float
    top: float
    right: float
    bottom: float


def placement(frame_size: tuple[int, int], height: int, width: int, resize: str) -> Placement:
    """The frame of `frame_size` (width, height) on an input of `width` x `height` resized by
    `resize`, with the arithmetic of images.resize_to_geometry."""
    fw, fh = frame_size
    if resize == "squash" or (fw, fh) == (width, height):
        return Placement(0, 0, width, height)
    fit = min if resize == "letterbox" else max
    scale = fit(width / fw, height / fh)
    sw, sh = max(1, round(fw * scale)), max(1, round(fh * scale))
    if resize == "crop":
        left, top = -((sw - width) // 2), -((sh - height) // 2)
    else:
        left, top = (width - sw) // 2, (height - sh) // 2
    return Placement(left, top, left + sw, top + sh)


def _interpolation(cells: int, start: float, end: float, extent: int, pixels: int):
    """(pixels, cells) bilinear weights that sample a row of `cells` map cells, which evenly
    cover `extent` input pixels, at the centres of `pixels` output pixels spanning input
    coordinates `start` to `end`; and which output pixels fall inside the input."""
    centres = start + (np.arange(pixels) + 0.5) * (end - start) / pixels
    inside = (centres >= 0) & (centres <= extent)
    position = np.clip(centres * cells / extent - 0.5, 0, cells - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, cells - 1)
    weight = position - low
    matrix = np.zeros((pixels, cells))
    rows = np.arange(pixels)
    np.add.at(matrix, (rows, low), 1 - weight)
    np.add.at(matrix, (rows, high), weight)
    return matrix, inside


def frame_heatmap(heatmap: np.ndarray, geometry, frame_size: tuple[int, int],
                  size: tuple[int, int] | None = None) -> np.ndarray:
    """One map (h, w) over the model input, bilinearly resampled onto the frame that was
    resized to the input: `frame_size` (width, height) as it was resized, `size` (width,
    height) the output's size (default `frame_size`; a reduced copy of the frame gets the same
    map at its size). `geometry` has `height`, `width` and `resize` (images.ImageGeometry).
    Returns (height, width) float64, NaN where 'crop' cut the frame away."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    out_w, out_h = size or frame_size
    where = placement(frame_size, geometry.height, geometry.width, geometry.resize)
    across, inside_x = _interpolation(heatmap.shape[1], where.left, where.right,
                                      geometry.width, out_w)
    down, inside_y = _interpolation(heatmap.shape[0], where.top, where.bottom,
                                    geometry.height, out_h)
    mapped = down @ heatmap @ across.T
    mapped[~(inside_y[:, None] & inside_x[None, :])] = np.nan
    return mapped


# --------------------------------------------------------------------------------------------
# Heatmaps of images


class FrameHeatmaps:
    """One frame: `image` (the frame, reduced), the model's `probabilities` {symbol: p}, and
    `maps` {symbol: (height, width) probabilities on `image`, NaN where the model did not
    look}, each mapped onto the image when it is first asked for."""

    def __init__(self, image: Image.Image, probabilities: dict[str, float],
                 maps: "_FrameMaps"):
        self.image, self.probabilities, self.maps = image, probabilities, maps


class _FrameMaps(dict):
    """{symbol: map on the image}, each computed by frame_heatmap on first access."""

    def __init__(self, maps: np.ndarray, symbols: Sequence[str], geometry,
                 frame_size: tuple[int, int], size: tuple[int, int]):
        super().__init__()
        self._raw = {s: maps[..., j] for j, s in enumerate(symbols)}
        self._geometry, self._frame_size, self._size = geometry, frame_size, size

    def __missing__(self, symbol: str) -> np.ndarray:
        mapped = self[symbol] = frame_heatmap(self._raw[symbol], self._geometry,
                                              self._frame_size, self._size)
        return mapped


def _geometry(metadata: Mapping):
    from symbol_trainer.images import ImageGeometry  # here: no TensorFlow at load time

    return ImageGeometry.from_json(metadata["input"])


def _read(path, geometry) -> tuple[Image.Image, np.ndarray]:
    from symbol_trainer.images import read_image, resize_to_geometry

    image = read_image(path, (geometry.width, geometry.height))
    return image, resize_to_geometry(image, geometry)


def _call(model, batch: np.ndarray):
    with warnings.catch_warnings():
        # A loaded model's one input is the list ['image'] to Keras, and a bare batch means
        # the same (as in datasets.compiled_inference).
        warnings.filterwarnings("ignore", message="The structure of `inputs`")
        import keras
        # NumPy whatever the backend (a torch tensor that tracks gradients has no __array__).
        return keras.tree.map_structure(keras.ops.convert_to_numpy, model(batch, training=False))


def heatmaps(loaded_model, images: Sequence, *, batch_size: int = 32) -> np.ndarray:
    """Per-location probabilities (the sigmoid of the per-location logits) of every symbol for
    each image, over the model input: (images, h, w, symbols), symbols in the order of
    metadata["symbols"]. `loaded_model` is a model_dir.LoadedModel (model and metadata);
    `images` are paths, or model inputs (height, width, 3) uint8 as images.load_image_array
    makes them. Map one onto its frame with `frame_heatmap`."""
    model, metadata = loaded_model
    geometry = _geometry(metadata)
    maps = heatmap_model(model, metadata["symbols"])
    results = []
    for start in range(0, len(images), batch_size):
        batch = [np.asarray(_read(i, geometry)[1] if isinstance(i, (str, os.PathLike)) else i,
                            dtype=np.uint8) for i in images[start:start + batch_size]]
        results.append(np.asarray(_call(maps, np.stack(batch)), dtype=np.float64))
    if not results:
        return np.zeros((0, 0, 0, len(metadata["symbols"])))
    return sigmoid(np.concatenate(results))


def frame_heatmaps(model, metadata: Mapping, paths: Sequence[str], *,
                   max_size: tuple[int, int], batch_size: int = 32) -> list[FrameHeatmaps | None]:
    """For each image path, its frame reduced to fit in `max_size` (width, height), the
    model's probabilities and each symbol's heatmap on that reduced frame; None for an image
    that cannot be read (it is logged)."""
    from symbol_trainer.errors import ImageReadError

    symbols = list(metadata["symbols"])
    geometry = _geometry(metadata)
    both = with_probabilities(model, symbols)
    results: list[FrameHeatmaps | None] = []
    for start in range(0, len(paths), batch_size):
        frames, pixels = [], []
        for path in paths[start:start + batch_size]:
            try:
                image, inputs = _read(path, geometry)
            except ImageReadError as error:
                log.info("No heatmap of %s: %s", printable(str(path)), error.reason)
                frames.append(None)
                continue
            frames.append(image)
            pixels.append(inputs)
        if pixels:
            outputs = _call(both, np.stack(pixels))
            values = iter(zip(np.concatenate([np.asarray(outputs["probabilities"][s])
                                              for s in symbols], axis=1),
                              sigmoid(np.asarray(outputs["score_map"]))))
        for image in frames:
            if image is None:
                results.append(None)
                continue
            probabilities, maps = next(values)
            results.append(on_frame(reduced(image, max_size), image.size, probabilities, maps,
                                    symbols, geometry))
    return results


def reduced(image: Image.Image, max_size: tuple[int, int]) -> Image.Image:
    """A copy of `image` reduced to fit in `max_size` (width, height), aspect ratio kept."""
    return decoding.reduced_copy(image, max_size)


def on_frame(shown: Image.Image, frame_size: tuple[int, int], probabilities: np.ndarray,
             maps: np.ndarray, symbols: Sequence[str], geometry) -> FrameHeatmaps:
    """A frame's `maps` ((h, w, symbols): probabilities over the model input) on `shown`, a
    reduced copy of the frame of `frame_size` (width, height) that was resized to the input."""
    return FrameHeatmaps(shown, {s: float(probabilities[j]) for j, s in enumerate(symbols)},
                         _FrameMaps(maps, symbols, geometry, frame_size, shown.size))


# --------------------------------------------------------------------------------------------
# Overlays


def colours(values: np.ndarray) -> np.ndarray:
    """Probabilities (any shape) to RGB (shape + (3,)) on the COLOURS scale."""
    position = np.clip(np.nan_to_num(values), 0, 1) * (len(COLOURS) - 1)
    low = np.minimum(np.floor(position).astype(int), len(COLOURS) - 2)
    weight = (position - low)[..., None]
    return COLOURS[low] * (1 - weight) + COLOURS[low + 1] * weight


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _lookup_tables() -> tuple[np.ndarray, np.ndarray]:
    """The colour (256, 3) and opacity (256,) of each probability quantised to 0-255."""
    levels = np.arange(256) / 255
    opacity = OPACITY[0] + (OPACITY[1] - OPACITY[0]) * levels
    return (np.rint(colours(levels)).astype(np.uint8),
            np.rint(255 * opacity).astype(np.uint8))


_COLOUR_TABLE, _OPACITY_TABLE = _lookup_tables()


def overlay(image: Image.Image, heatmap: np.ndarray, label: str | None = None) -> Image.Image:
    """`image` with `heatmap` (its size, probabilities; NaN: not looked at, left as it is)
    laid over it as a semi-transparent colour scale, and `label` in the top-left corner."""
    seen = ~np.isnan(heatmap)
    levels = np.rint(np.clip(np.where(seen, heatmap, 0.0), 0, 1) * 255).astype(np.uint8)
    opacity = np.where(seen, _OPACITY_TABLE[levels], 0).astype(np.uint8)
    result = Image.composite(Image.fromarray(_COLOUR_TABLE[levels], "RGB"),
                             image.convert("RGB"), Image.fromarray(opacity, "L"))
    if label:
        draw = ImageDraw.Draw(result)
        font = _font(max(10, min(result.size) // 14))
        left, top, right, bottom = draw.textbbox((4, 3), label, font=font)
        draw.rectangle((0, 0, right + 4, bottom + 4), fill=(0, 0, 0))
        draw.text((4, 3), label, fill=(255, 255, 255), font=font)
    return result


def label(symbol: str, probability: float) -> str:
    return f"{symbol} p={probability:.3f}" if math.isfinite(probability) else symbol


# --------------------------------------------------------------------------------------------
# predict.py --heatmaps


def heatmap_name(filename: str, symbol: str) -> str:
    """Where `predict.py --heatmaps DIR` writes the heatmap of `symbol` on the frame whose row
    has `filename`, relative to DIR: the filename's path mirrored, with `.<symbol>.png`
    appended (frames/a.jpg -> frames/a.jpg.star.png). A leading / or drive is dropped and `..`
    becomes `__parent__`, so every heatmap lands inside DIR."""
    parts = []
    for part in filename.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        parts.append("__parent__" if part == ".." else part.replace(":", "_"))
    return "/".join(parts) + f".{symbol}.png"


def write_png(image: Image.Image, target: Path) -> None:
    """Write `image` as a PNG at `target` through `target`.partial, renamed when complete,
    so that a crash leaves no half-written PNG under the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        image.save(partial, format="PNG", compress_level=3)  # 3x faster than 6, 10 % larger
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


class HeatmapWriter:
    """Writes `predict.py --heatmaps DIR`'s PNGs: for each frame, one overlay per symbol at or
    above its threshold (every symbol with `every_symbol`). Rendering and PNG encoding run in
    a few threads (zlib releases the GIL), at most a few frames ahead of the model; use it as
    a context manager, which waits for the last PNG and raises the first error."""

    def __init__(self, directory: str | os.PathLike, thresholds: Mapping[str, float],
                 every_symbol: bool = False, max_size: tuple[int, int] = PNG_SIZE,
                 workers: int | None = None):
        self.directory, self.thresholds = Path(directory), dict(thresholds)
        self.every_symbol, self.max_size = every_symbol, max_size
        self.written = 0
        self._workers = workers or min(4, os.cpu_count() or 1)
        self._pool = None
        self._pending: collections.deque = collections.deque()

    def __enter__(self) -> "HeatmapWriter":
        self._pool = concurrent.futures.ThreadPoolExecutor(self._workers,
                                                           thread_name_prefix="heatmaps")
        return self

    def __exit__(self, *error) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)

    def _write(self, filename: str, frame: FrameHeatmaps, symbol: str) -> None:
        write_png(overlay(frame.image, frame.maps[symbol],
                          label(symbol, frame.probabilities[symbol])),
                  self.directory / heatmap_name(filename, symbol))

    def write(self, filename: str, frame: FrameHeatmaps) -> None:
        for symbol, probability in frame.probabilities.items():
            if not self.every_symbol and probability < self.thresholds[symbol]:
                continue
            if self._pool is None:
                self._write(filename, frame, symbol)
            else:
                self._pending.append(self._pool.submit(self._write, filename, frame, symbol))
                while len(self._pending) > 4 * self._workers:
                    self._pending.popleft().result()
            self.written += 1


def check_directory(directory: str | os.PathLike, *, folders: Mapping[str, str],
                    images: Sequence[tuple[str, str]], videos: Sequence[str]) -> None:
    """Refuse, before any work, a `predict.py --heatmaps DIR` that would write into what the
    run reads or collide. `folders` {path: what it is} may not be DIR or hold it, nor any
    folder a heatmap goes to (the INPUT folders, MODEL_DIR, --save-frames); `images` are
    (path, filename) of the input images: no heatmap may land in an input image's folder, and
    two may not share a filename (their heatmaps would overwrite each other); `videos` are
    the videos' names. Compared by device and inode, so links count. Raises InputError."""
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise InputError(f"--heatmaps {directory} is a file; give a folder (it is created).")
    enclosing = {file_identity(Path(p)): (p, what) for p, what in folders.items()}
    enclosing.pop(None, None)
    holding = {}
    for path, _ in images:
        holding.setdefault(file_identity(Path(path).parent), path)
    holding.pop(None, None)
    seen: dict[str, str] = {}
    targets = {root, *(root / name for name in videos)}
    for path, filename in images:
        if seen.setdefault(filename, path) != path:
            raise InputError(
                f"--heatmaps {directory}: the input images {seen[filename]} and {path} are both "
                f"named {filename!r} in the output, so their heatmaps would have the same file "
                "name. Give --image-dir a folder above both, so that their names differ, or "
                "predict them in separate runs.")
        targets.add((root / heatmap_name(filename, "s")).parent)
    for target in sorted(targets):
        real = Path(os.path.realpath(target))
        for ancestor in (real, *real.parents):
            found = enclosing.get(file_identity(ancestor))
            if found is not None:
                raise InputError(
                    f"--heatmaps {directory} would write into {found[1]} {found[0]}"
                    f"{'' if target == root else f' (as {target})'}, which this run reads or "
                    "writes; give the heatmaps a folder of their own.")
        source = holding.get(file_identity(real))
        if source is not None:
            raise InputError(
                f"--heatmaps {directory} would write heatmaps into {target}, the folder of the "
                f"input image {source}, where a later run would take them for frames; give the "
                "heatmaps a folder of their own.")
