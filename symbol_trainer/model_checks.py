"""Checks of a model directory's two files before they are used: `metadata.json` has every
field prediction relies on, with the right types and values, and agrees with the model;
`model.keras` is a complete archive. A damaged, truncated or hand-edited file stops with one
InputError (exit code 2) naming the file, the field and what to do, instead of a ValueError
deep inside Keras or the decoding threads."""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import Sequence

from symbol_trainer.errors import InputError
from symbol_trainer.model_format import MODEL_FORMAT_VERSION
from symbol_trainer.output_dir import METADATA_FILE, MODEL_FILE
from symbol_trainer.settings import RESIZE_METHODS

RESTORE = ("Restore the model directory from a backup or copy it again, or train the model "
           "again")


def _problem(path: Path, field: str | None, what: str) -> InputError:
    where = f"{path}: field {field!r}" if field else str(path)
    return InputError(f"{where} {what}. {RESTORE}.")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def read_metadata(path: Path) -> dict:
    """The parsed metadata.json, checked field by field (not yet against the model)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror or error}).") from None
    if not data.strip():
        raise _problem(path, None, f"is empty ({len(data)} bytes), so it is not the model's "
                                   "description; the copy was probably interrupted")
    try:
        metadata = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise _problem(path, None, f"is not UTF-8 text (byte {error.start}), so it is not "
                                   "valid JSON") from None
    except ValueError as error:
        raise _problem(path, None, f"is not valid JSON ({error}); the file is damaged or "
                                   "truncated") from None
    if not isinstance(metadata, dict):
        raise _problem(path, None, f"holds a JSON {type(metadata).__name__}, not the JSON "
                                   "object (with symbols, input, thresholds, ...) of a model "
                                   "directory")
    _check_fields(metadata, path)
    return metadata


def _check_fields(metadata: dict, path: Path) -> None:
    version = metadata.get("format_version")
    if isinstance(version, bool) or version != MODEL_FORMAT_VERSION:
        raise InputError(
            f"{path}: model directory format version {version!r} (field 'format_version') is "
            f"not supported by this version of the tool (it reads version "
            f"{MODEL_FORMAT_VERSION}). Use the version of the tool that trained the "
            "model, or train it again.")
    symbols = metadata.get("symbols")
    if (not isinstance(symbols, list) or not symbols
            or not all(isinstance(s, str) and s for s in symbols)):
        raise _problem(path, "symbols", f"must be a non-empty list of symbol names; found "
                                        f"{symbols!r}")
    repeated = sorted({s for s in symbols if symbols.count(s) > 1})
    if repeated:
        raise _problem(path, "symbols", f"names {repeated[0]!r} more than once")
    geometry = metadata.get("input")
    if not isinstance(geometry, dict):
        raise _problem(path, "input", f"must be an object with height, width and resize; "
                                      f"found {geometry!r}")
    for side in ("height", "width"):
        if not _is_count(geometry.get(side)):
            raise _problem(path, f"input.{side}", f"must be a whole number of pixels, 1 or "
                                                  f"more; found {geometry.get(side)!r}")
    resize = geometry.get("resize", "squash")  # older model directories had only 'squash'
    if resize not in RESIZE_METHODS:
        raise _problem(path, "input.resize", f"must be one of "
                                             f"{', '.join(RESIZE_METHODS)}; found {resize!r}")
    training = metadata.get("training")
    config = training.get("config") if isinstance(training, dict) else None
    trained_with = config.get("resize") if isinstance(config, dict) else None
    if isinstance(trained_with, str) and trained_with != resize:
        raise _problem(path, "input.resize", f"is {resize!r}, but the model was trained with "
                                             f"--resize {trained_with} (field "
                                             "'training.config.resize'); frames would be resized "
                                             "differently from training")
    thresholds = metadata.get("thresholds")
    if thresholds is None:  # older model directories; decision_thresholds warns and uses 0.5
        return
    if not isinstance(thresholds, dict):
        raise _problem(path, "thresholds", f"must be an object with one probability per symbol; "
                                           f"found {thresholds!r}")
    for symbol, value in thresholds.items():
        if not _is_number(value) or not math.isfinite(value) or not 0 <= value <= 1:
            raise _problem(path, f"thresholds.{symbol}",
                           f"must be a probability between 0 and 1; found {value!r}"
                           + (" (the training that wrote it chose no threshold, which happens "
                              "when its loss was not finite)" if value is None else ""))


def _check_threshold_names(metadata: dict, path: Path) -> None:
    symbols, thresholds = metadata["symbols"], metadata.get("thresholds")
    if thresholds is None:
        return
    for symbol in symbols:
        if symbol not in thresholds:
            raise _problem(path, "thresholds", f"has no threshold for the symbol {symbol!r}")
    unknown = sorted(set(thresholds) - set(symbols))
    if unknown:
        raise _problem(path, "thresholds", f"names {', '.join(map(repr, unknown))}, which "
                                           f"{'is' if len(unknown) == 1 else 'are'} not among "
                                           f"the symbols {symbols}")


def check_model_file(path: Path) -> None:
    """Refuse a model.keras that is empty, truncated or damaged before Keras reads it (Keras
    reports all of these as 'File not found')."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb"):
            pass
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror or error}).") from None
    if size == 0:
        raise _problem(path, None, "is empty (0 bytes); the copy or the training that wrote "
                                   "it was probably interrupted")
    if not zipfile.is_zipfile(path):
        raise _problem(path, None, f"is not a complete .keras file ({size:,} bytes; a .keras "
                                   "file is a zip archive, and this one's end is missing or "
                                   "damaged, as when a copy is cut short)")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise _problem(path, None, f"is a damaged .keras archive ({error})") from None
    if damaged is not None:
        raise _problem(path, None, f"is a damaged .keras archive: its member {damaged!r} fails "
                                   "its checksum")


def check_against_model(metadata: dict, path: Path, outputs: Sequence[str],
                        input_shapes: Sequence[Sequence[int | None]]) -> None:
    """Refuse metadata whose symbols or input size disagree with the loaded model's output
    names and input shapes, or whose thresholds are not one per symbol."""
    symbols = metadata["symbols"]
    if sorted(outputs) != sorted(symbols):
        raise _problem(path, "symbols", f"is {symbols}, but the model in {MODEL_FILE} "
                                        f"has the outputs {list(outputs)}; they do not match the "
                                        f"symbols in {METADATA_FILE}, so the two files do "
                                        "not belong to the same model")
    _check_threshold_names(metadata, path)
    if len(input_shapes) != 1 or len(input_shapes[0]) != 4:
        raise InputError(
            f"{path.parent / MODEL_FILE}: the model takes inputs of shapes "
            f"{[tuple(s) for s in input_shapes]}, not one batch of images; it was not written by "
            f"this tool. {RESTORE}.")
    _, height, width, channels = input_shapes[0]
    expected = {"input.height": (height, metadata["input"]["height"]),
                "input.width": (width, metadata["input"]["width"])}
    for field, (model_value, stored) in expected.items():
        if model_value is not None and model_value != stored:
            raise _problem(path, field, f"is {stored}, but the model in {MODEL_FILE} "
                                        f"takes images of {height}x{width} pixels (height x "
                                        "width)")
    if channels is not None and channels != 3:
        raise InputError(
            f"{path.parent / MODEL_FILE}: the model takes images with {channels} "
            f"channels, not 3 (RGB); it was not written by this tool. {RESTORE}.")
