"""Exports of a trained model for other runtimes, each checked against the Keras model.

- `saved_model/`: a TensorFlow SavedModel for TensorFlow Serving. Its default signature,
  `serving_default`, takes a batch of encoded images (`image_bytes`, JPEG, PNG, GIF or BMP
  file contents) and returns one probability per symbol, named after it; it decodes and
  resizes the images in TensorFlow as training did in Pillow (same geometry and resize
  method, bilinear with antialiasing); pixels may differ by a level of rounding, so its
  probabilities are close to, not bit-equal with, predict.py's. Unlike predict.py it does not
  apply EXIF orientation and drops transparency instead of compositing it onto white. `serve_pixels` takes the (batch, height, width, 3) uint8 input the
  Keras model takes, and agrees with it to float precision.
- `model.tflite`: TensorFlow Lite, with the `serve_pixels` signature.

Before the run succeeds each export is loaded back and run on a few validation images: its
probabilities must match the Keras model's on the same input, and the SavedModel's decoding
must give the model the pixels training gave it; a mismatch fails the run.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from symbol_trainer.backend import keras, tf
from symbol_trainer.errors import SymbolTrainerError
from symbol_trainer.images import ImageGeometry, load_image_array

log = logging.getLogger(__name__)

SAVED_MODEL_FOLDER = "saved_model"
TFLITE_FILE = "model.tflite"
PIXELS_SIGNATURE = "serve_pixels"
# Largest difference in probability allowed against the Keras model on the same input.
PIXELS_TOLERANCE = 1e-3
# Largest mean difference, in 0-255 levels, between the input TensorFlow's decoder and resizer
# give the model and the one Pillow's gave it in training (rounding differs by a level).
DECODING_TOLERANCE = 2.0


class ExportCheckError(SymbolTrainerError):
    """An export does not give the Keras model's predictions."""


def _decode_and_resize(image_bytes: tf.Tensor, geometry: ImageGeometry) -> tf.Tensor:
    """One encoded image -> the (height, width, 3) uint8 model input, as resize_to_geometry."""
    height, width = geometry.height, geometry.width
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    if geometry.resize == "squash":
        resized = tf.image.resize(image, (height, width), antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    fit = tf.minimum if geometry.resize == "letterbox" else tf.maximum
    scale = fit(height / size[0], width / size[1])
    scaled = tf.maximum(1, tf.cast(tf.round(size * scale), tf.int32))
    resized = tf.image.resize(image, scaled, antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    if geometry.resize == "crop":
        top, left = (scaled[0] - height) // 2, (scaled[1] - width) // 2
        return tf.image.crop_to_bounding_box(resized, top, left, height, width)
    top, left = (height - scaled[0]) // 2, (width - scaled[1]) // 2
    return tf.image.pad_to_bounding_box(resized, top, left, height, width)


def write_saved_model(model: keras.Model, symbols: Sequence[str],
                      geometry: ImageGeometry, path: Path) -> None:
    """A SavedModel with the `serving_default` (encoded bytes) and `serve_pixels` signatures."""
    shape = (geometry.height, geometry.width, 3)

    def probabilities(images):
        outputs = model(images, training=False)
        return {s: tf.reshape(outputs[s], [-1]) for s in symbols}

    def from_bytes(image_bytes):
        images = tf.map_fn(lambda b: _decode_and_resize(b, geometry), image_bytes,
                           fn_output_signature=tf.TensorSpec(shape, tf.uint8))
        return probabilities(images)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", from_bytes,
                         [tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint(PIXELS_SIGNATURE, probabilities,
                         [tf.TensorSpec([None, *shape], tf.uint8, name="image")])
    archive.write_out(str(path), verbose=False)


def write_tflite(saved_model: Path, path: Path) -> None:
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model),
                                                         signature_keys=[PIXELS_SIGNATURE])
    path.write_bytes(converter.convert())


def _largest_difference(expected: dict, got: dict, symbols: Sequence[str]) -> float:
    return max(float(np.max(np.abs(np.ravel(expected[s]) - np.ravel(got[s])))) for s in symbols)


def _check_decoding(decoded: np.ndarray, pixels: np.ndarray, paths: Sequence[str]) -> None:
    """TensorFlow's decoding and resizing must give the model the input Pillow's gave it."""
    differences = np.abs(decoded.astype(np.int16) - pixels.astype(np.int16))
    per_image = differences.reshape(len(paths), -1).mean(axis=1)
    worst = int(np.argmax(per_image))
    if per_image[worst] > DECODING_TOLERANCE:
        raise ExportCheckError(
            f"the saved_model export decodes {paths[worst]} differently from training (pixels "
            f"differ by {per_image[worst]:.1f} levels on average; allowed: "
            f"{DECODING_TOLERANCE}); it was not kept. Leave out --export saved_model, or "
            "report this with the file.")
    log.info("Checked the saved_model export's decoding: pixels differ from Pillow's by %.2f "
             "levels on average (at most %d).", float(per_image.mean()), int(differences.max()))


def _check(name: str, difference: float, tolerance: float) -> None:
    if not difference <= tolerance:
        raise ExportCheckError(
            f"the {name} export gives probabilities up to {difference:.4f} away from the Keras "
            f"model's on the same images (allowed: {tolerance}); it was not kept. Run again "
            "with --debug and report this, or leave out --export.")
    log.info("Checked the %s export: largest difference from the Keras model %.2g.", name,
             difference)


def export_and_check(directory: Path, model: keras.Model, symbols: Sequence[str],
                     geometry: ImageGeometry, formats: Sequence[str],
                     sample_paths: Sequence[str]) -> dict[str, Path]:
    """Write each of `formats` ('saved_model', 'tflite') into `directory`, load it back and
    compare its probabilities with `model`'s on `sample_paths`; returns format -> path."""
    pixels = np.stack([load_image_array(p, geometry) for p in sample_paths])
    expected = {s: np.ravel(v) for s, v in model(pixels, training=False).items()}
    written = {}
    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        saved = directory / SAVED_MODEL_FOLDER if "saved_model" in formats \
            else Path(scratch) / SAVED_MODEL_FOLDER
        write_saved_model(model, symbols, geometry, saved)
        if "saved_model" in formats:
            loaded = tf.saved_model.load(str(saved))
            got = loaded.signatures[PIXELS_SIGNATURE](image=tf.constant(pixels))
            _check("saved_model (pixels)", _largest_difference(expected, got, symbols),
                   PIXELS_TOLERANCE)
            encoded = [Path(p).read_bytes() for p in sample_paths]
            decoded = np.stack([_decode_and_resize(b, geometry).numpy() for b in encoded])
            _check_decoding(decoded, pixels, sample_paths)
            got = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded))
            on_decoded = {s: np.ravel(v) for s, v in model(decoded, training=False).items()}
            _check("saved_model (encoded images)", _largest_difference(on_decoded, got, symbols),
                   PIXELS_TOLERANCE)
            log.info("On the same files, the encoded-image signature's probabilities differ from "
                     "predict.py's by up to %.2g (TensorFlow's decoder and resizer against "
                     "Pillow's).", _largest_difference(expected, got, symbols))
            written["saved_model"] = saved
        if "tflite" in formats:
            path = directory / TFLITE_FILE
            write_tflite(saved, path)
            interpreter = tf.lite.Interpreter(model_path=str(path))
            runner = interpreter.get_signature_runner(PIXELS_SIGNATURE)
            got = {s: [] for s in symbols}
            for image in pixels:  # one at a time: the converted model has a batch of 1
                for s, value in runner(image=image[None]).items():
                    got[s].append(np.ravel(value))
            _check("tflite", _largest_difference(expected, {s: np.concatenate(v) for s, v in
                                                            got.items()}, symbols),
                   PIXELS_TOLERANCE)
            written["tflite"] = path
    if "saved_model" not in formats:
        shutil.rmtree(directory / SAVED_MODEL_FOLDER, ignore_errors=True)
    return written
