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
- `model.onnx`: ONNX, written by Keras's own exporter under every backend (tf2onnx under
  TensorFlow, jax2onnx under JAX, torch.onnx under PyTorch). One input, `image`: the
  (batch, height, width, 3) uint8 pixels the Keras model takes, any batch size; one float32
  output of shape (batch, 1) per symbol, named after it.

Before the run succeeds each export is loaded back and run on a few validation images: its
probabilities must match the Keras model's on the same input, and the SavedModel's decoding
must give the model the pixels training gave it; a mismatch fails the run and leaves no
file of that export behind. `check_formats` tells before training whether each asked-for
export can be written under this backend and with this Python's packages.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from symbol_trainer import dependencies
from symbol_trainer.backend import BACKEND, keras, require_tensorflow, tf
from symbol_trainer.errors import InputError, SymbolTrainerError
from symbol_trainer.images import ImageGeometry, load_image_array
from symbol_trainer.settings import EXPORT_FORMATS

log = logging.getLogger(__name__)

SAVED_MODEL_FOLDER = "saved_model"
TFLITE_FILE = "model.tflite"
PIXELS_SIGNATURE = "serve_pixels"
# Largest difference in probability allowed against the Keras model on the same input.
PIXELS_TOLERANCE = 1e-3
# Largest mean difference, in 0-255 levels, between the input TensorFlow's decoder and resizer
# give the model and the one Pillow's gave it in training (rounding differs by a level).
DECODING_TOLERANCE = 2.0
ONNX_FILE = "model.onnx"
ONNX_INPUT = "image"  # the name of the ONNX model's one input
ONNX_TOLERANCE = 1e-4  # as PIXELS_TOLERANCE, for the ONNX export run through onnxruntime
# What --export onnx needs under each Keras backend (import name -> pip name): the converter
# that Keras's exporter calls there, onnx to name the outputs, onnxruntime to check the file.
ONNX_PACKAGES = {"tensorflow": {"onnx": "onnx", "onnxruntime": "onnxruntime",
                                "tf2onnx": "tf2onnx"},
                 "jax": {"onnx": "onnx", "onnxruntime": "onnxruntime", "jax2onnx": "jax2onnx"},
                 "torch": {"onnx": "onnx", "onnxruntime": "onnxruntime"}}
# The checkout's requirements file that pins them, per backend (an installed copy has none).
ONNX_REQUIREMENTS = {"tensorflow": "requirements-onnx.txt", "jax": "requirements-onnx-jax.txt",
                     "torch": "requirements-onnx.txt"}


class ExportCheckError(SymbolTrainerError):
    """An export does not give the Keras model's predictions."""


def check_formats(formats: Sequence[str]) -> None:
    """Raise InputError (exit 2) before any training when one of `formats` cannot be written
    here: an unknown name, a TensorFlow-only export under another backend (BackendError), or
    --export onnx without the packages it needs under this backend."""
    for name in formats:
        if name not in EXPORT_FORMATS:
            raise InputError(f"--export {name!r}: choose from {', '.join(EXPORT_FORMATS)}.")
        if name in ("saved_model", "tflite"):
            require_tensorflow(f"--export {name}")
    if "onnx" in formats:
        missing = dependencies.missing_packages(ONNX_PACKAGES[BACKEND])
        if missing:
            requirements = dependencies.REQUIREMENTS_FILE.parent / ONNX_REQUIREMENTS[BACKEND]
            how = (f"-r {requirements}" if requirements.is_file() else " ".join(missing))
            raise InputError(
                f"--export onnx under KERAS_BACKEND={BACKEND} needs {', '.join(missing)}, "
                f"which this Python ({sys.executable}) lacks. Install them with "
                f"'{sys.executable} -m pip install {how}', or leave --export "
                "onnx out.")


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


def _name_outputs(proto, symbols: Sequence[str], batch: str = "batch") -> None:
    """Name the ONNX graph's outputs (the model's, in `symbols` order) after the symbols, and
    its batch dimension `batch` in the input and outputs. The exporters name outputs as they
    please (jax2onnx and torch.onnx by number), so each output the graph has under another
    name gets an Identity node that gives it the symbol's."""
    import onnx

    graph = proto.graph
    if len(graph.output) != len(symbols):
        raise ExportCheckError(f"the onnx export has {len(graph.output)} outputs for "
                               f"{len(symbols)} symbols; it was not kept.")
    for output, symbol in zip(graph.output, symbols):
        if output.name != symbol:
            graph.node.append(onnx.helper.make_node("Identity", [output.name], [symbol],
                                                    name=f"{symbol}_output"))
            output.name = symbol
    for value in (*graph.input, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_param = batch  # also clears a fixed dim_value


# The converters' loggers, whose progress notes (opsets, optimizer passes) are no news to a user.
CONVERTER_LOGGERS = ("tf2onnx", "jax2onnx", "onnx_ir", "onnxscript", "torch.onnx")


class _ConverterNotes(logging.Filter):
    """Drops the converters' notes below WARNING that they log on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(
            name in record.pathname for name in CONVERTER_LOGGERS)


@contextlib.contextmanager
def _quiet_converters():
    """The converters' INFO notes and Python warnings held back for the block, unless the run
    logs at DEBUG (--debug)."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in CONVERTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    notes = _ConverterNotes()
    logging.getLogger().addFilter(notes)
    try:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's TracerWarnings, NumPy 2 notes
            yield
    finally:
        logging.getLogger().removeFilter(notes)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def write_onnx(model: keras.Model, symbols: Sequence[str], geometry: ImageGeometry,
               path: Path) -> None:
    """`path` (model.onnx) through Keras's exporter: input `image`, (batch, height, width, 3)
    uint8 with any batch size; one (batch, 1) float32 output per symbol, named after it."""
    import onnx

    # A list in `symbols` order: how each backend's exporter orders a dict of outputs varies.
    ordered = keras.Model(model.inputs, [model.output[s] for s in symbols])
    spec = keras.InputSpec(shape=(None, geometry.height, geometry.width, 3), dtype="uint8",
                           name=ONNX_INPUT)
    with tempfile.TemporaryDirectory(prefix="onnx-") as scratch:
        raw = Path(scratch) / ONNX_FILE
        with _quiet_converters():
            ordered.export(str(raw), format="onnx", verbose=False, input_signature=[spec])
        proto = onnx.load(str(raw))
    _name_outputs(proto, symbols)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def run_onnx(path: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Output name -> value of the ONNX model at `path` on `pixels`, run by onnxruntime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {ONNX_INPUT: pixels})))


def _check_onnx(path: Path, pixels: np.ndarray, expected: dict,
                symbols: Sequence[str]) -> None:
    """Run the ONNX file on the whole batch and on its first image alone (the batch dimension
    must be free): its outputs must be the symbols, its probabilities the Keras model's."""
    got = run_onnx(path, pixels)
    if sorted(got) != sorted(symbols):
        raise ExportCheckError(f"the onnx export's outputs are {', '.join(sorted(got))}, not "
                               f"the symbols {', '.join(sorted(symbols))}; it was not kept.")
    single = run_onnx(path, pixels[:1])
    difference = max(_largest_difference(expected, got, symbols),
                     _largest_difference({s: v[:1] for s, v in expected.items()}, single,
                                         symbols))
    _check("onnx", difference, ONNX_TOLERANCE)


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
    """Write each of `formats` ('saved_model', 'tflite', 'onnx') into `directory`, load it
    back and compare its probabilities with `model`'s on `sample_paths`; returns format ->
    path. An export that fails its check leaves no file in `directory`."""
    check_formats(formats)
    pixels = np.stack([load_image_array(p, geometry) for p in sample_paths])
    expected = {s: np.ravel(keras.ops.convert_to_numpy(v))
                for s, v in model(pixels, training=False).items()}
    written = {}
    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        if "onnx" in formats:
            # Written and checked in the scratch folder, moved into `directory` once it passed.
            checked = Path(scratch) / ONNX_FILE
            try:
                write_onnx(model, symbols, geometry, checked)
            except ExportCheckError:
                raise
            except Exception as error:  # the converter's own, often many lines long
                first = (str(error).strip().splitlines() or [""])[0][:300]
                raise ExportCheckError(
                    f"Keras's ONNX exporter under KERAS_BACKEND={BACKEND} failed on this model "
                    f"({type(error).__name__}: {first}); no model.onnx was kept. Run again with "
                    "--debug for the traceback, or leave out --export onnx.") from error
            _check_onnx(checked, pixels, expected, symbols)
            written["onnx"] = Path(shutil.move(str(checked), str(directory / ONNX_FILE)))
        if not {"saved_model", "tflite"} & set(formats):
            return written
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
