"""Shared library of the symbol trainers: data, model, training and the model directory.

Both command-line scripts (`build_binary_classifier.py`, `build_multi_hot_model.py`) are thin
wrappers around this module. It never reads flags and never exits the process: it logs through
`logging` and raises `InputError` (the user must fix something; exit code 2) or other
exceptions (exit code 1).

The training loop:

1. `scan_images` reads every image once, in parallel: content hash, size, and a full decode at
   reduced scale, so a corrupt file is found (and skipped) before training, never in epoch 3.
2. `split_train_validation` makes a seeded, stratified split (iterative stratification over
   groups of frames; with no groups each frame is its own group).
3. `build_model` builds raw pixels -> backbone preprocessing -> pretrained backbone -> pooling
   -> dropout -> one named sigmoid output per symbol.
4. Head phase: the backbone is frozen, so its pooled features are computed once per image
   (`extract_features`) and the head is trained on them for many cheap epochs.
5. Fine-tuning phase: the top of the backbone is unfrozen (BatchNorm stays frozen and in
   inference mode) and the whole model trains on streamed images at a lower learning rate.
6. The validation set is scored with the final model and everything is written to a temporary
   sibling of the model directory, which is renamed into place only at the end.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import datetime
import difflib
import hashlib
import io
import json
import logging
import math
import os
import platform
import posixpath
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageOps



def _import_tensorflow_quietly():
    """Import TensorFlow with its start-up lines on stderr held back.

    TensorFlow 2.20+ prints oneDNN and CUDA notices before its logging is initialised, so no
    environment variable silences them, and they bury the one error line a user must read.
    They are replayed if the import fails, and not captured at all when the user asked for
    TensorFlow's logs by setting TF_CPP_MIN_LOG_LEVEL to 0 or 1.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("0", "1"):
        import tensorflow
        return tensorflow
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow
            tensorflow.config.list_physical_devices()  # the CUDA probe prints here, once
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return tensorflow


tf = _import_tensorflow_quietly()
import keras  # noqa: E402

import augmentation  # noqa: E402
import checkpoints  # noqa: E402
import distribution  # noqa: E402
import duplicates  # noqa: E402
import evaluation  # noqa: E402
import heads  # noqa: E402
import report  # noqa: E402
import run_warnings  # noqa: E402
import feature_cache  # noqa: E402
import run_lock  # noqa: E402
import symbol_paste  # noqa: E402
from pixel_store import PixelStore  # noqa: E402

log = logging.getLogger(__name__)

# read_image refuses every image above Image.MAX_IMAGE_PIXELS itself, with the file's name;
# Pillow's own warning for the same images would only add an anonymous line.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

MODEL_FORMAT_VERSION = 1
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
SPLIT_FILE = "split.csv"
EVALUATION_FILE = "evaluation.csv"
# How the CSV files of a model directory are encoded: UTF-8, and a file name that is not
# valid UTF-8 (Python holds its bytes as lone surrogates) keeps its original bytes, so
# `pd.read_csv(path, encoding_errors="surrogateescape")` and os.fsencode give them back.
CSV_FILE_NAMES = {"encoding": "utf-8", "errors": "surrogateescape"}

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
# Transparent pixels are composited onto this colour; recorded in metadata.json.
ALPHA_BACKGROUND = "white"
# Layer names the model uses itself; a symbol may not take one of them.
RESERVED_LAYER_NAMES = frozenset({"image", "preprocessing", "backbone", "pooling", "head_dropout",
                                  "score_map", "attention_map"})
# Columns of LabelledImages.table that the tool fills in itself; no symbol may take these names.
TABLE_COLUMNS = frozenset({"path", "filename", "folder", "image_sha1", "image_width", "image_height"})
SYMBOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")


from errors import (  # noqa: E402,F401  (re-exported: common.InputError ...)
    ImageReadError, InputError, SymbolTrainerError, Terminated, WeightsUnavailableError,
    listing, printable)
from settings import (  # noqa: E402,F401  (re-exported: common.TrainingConfig ...)
    BACKBONES, EXPORT_FORMATS, RESIZE_METHODS, SWITCH_SETTINGS, BackboneSpec, TrainingConfig,
    add_training_arguments, config_from_args, flag_of)
import output_dir as output_dir_checks  # noqa: E402
from output_dir import METADATA_FILE, MODEL_FILE, check_output_dir  # noqa: E402,F401
from command import configure_logging, run_command, sigterm_raises  # noqa: E402,F401  (re-exported)

# --------------------------------------------------------------------------------------------
# Finding and reading images


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


# --------------------------------------------------------------------------------------------
# Labelled image tables


@dataclass
class LabelledImages:
    """Images with their labels, as both scripts produce them before training.

    `table` has a `path` column (the file to read), a `filename` column (how the user names
    the file in messages and outputs), one float column per symbol holding 1, 0 or NaN (not
    annotated), and any other columns the source had (kept for grouping and reports).
    """

    table: pd.DataFrame
    symbols: list[str]
    source: str  # where the labels came from, for metadata.json
    details: dict = field(default_factory=dict)  # how the source was read, for metadata.json
    # True where each label is the folder a file is in (the binary task): identical pictures
    # with different labels are then a copy in the wrong folder, an error rather than a warning.
    labels_from_folders: bool = False

    def labels(self) -> np.ndarray:
        return self.table[self.symbols].to_numpy(dtype=np.float32)


def clean_symbol_name(raw: str) -> str:
    """The output name for a symbol: runs of characters other than letters, digits and '_'
    become one '_', and leading/trailing '_' are dropped."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", raw.strip()).strip("_")


def check_symbol_names(names: Sequence[str], origin: str) -> None:
    """Raise InputError unless every name is a usable, unique output name."""
    for name in names:
        if not SYMBOL_NAME_PATTERN.match(name):
            raise InputError(
                f"{origin}: symbol name {name!r} is not a valid output name; use letters, digits "
                "and '_', starting with a letter or digit.")
        if name in RESERVED_LAYER_NAMES | TABLE_COLUMNS:
            raise InputError(
                f"{origin}: symbol name {name!r} is reserved for the tool's own use; rename it "
                f"(reserved: {', '.join(sorted(RESERVED_LAYER_NAMES | TABLE_COLUMNS))}).")
    seen = {}
    for name in names:
        if name in seen:
            raise InputError(f"{origin}: symbol name {name!r} appears twice.")
        seen[name] = True


def symbol_from_directory(with_dir: str | os.PathLike) -> str:
    """`with_pentagram/` or `pentagram/` gives `pentagram`."""
    name = Path(os.path.abspath(with_dir)).name
    name = re.sub(r"^(with)[_\- ]+", "", name, flags=re.IGNORECASE)
    return clean_symbol_name(name)


def images_from_directories(with_dir: str | os.PathLike, without_dir: str | os.PathLike,
                            symbol: str | None = None, *, group_by: str | None = None,
                            groups_csv: str | os.PathLike | None = None) -> LabelledImages:
    """The labelled table of a binary task: images in `with_dir` are positives.

    `groups_csv` (--groups-csv) adds the column of a CSV that groups the split, its file
    names relative to the CSV's own folder (or absolute), matched by real path; `group_by`
    (--group-by) names that column when it has several (see split_groups.add_groups)."""
    with_path, without_path = Path(with_dir).resolve(), Path(without_dir).resolve()
    for path, role in ((with_dir, "WITH_DIR"), (without_dir, "WITHOUT_DIR")):
        if not Path(path).is_dir():
            raise InputError(f"{role} {path}: no such directory.")
    if with_path == without_path or with_path in without_path.parents \
            or without_path in with_path.parents:
        raise InputError(
            f"WITH_DIR {with_dir} and WITHOUT_DIR {without_dir} overlap; the images of the "
            "two classes must be in separate folders, neither inside the other.")
    if symbol is None:
        symbol = symbol_from_directory(with_dir)
        origin = f"symbol name derived from WITH_DIR {with_dir} (pass --symbol NAME to choose)"
    else:
        origin = "--symbol"
    check_symbol_names([symbol], origin)
    positives, negatives = find_images(with_dir), find_images(without_dir)
    log.info("Found %s images with the symbol, %s without", f"{len(positives):,}",
             f"{len(negatives):,}")
    for found, role, path in ((positives, "WITH_DIR", with_dir),
                              (negatives, "WITHOUT_DIR", without_dir)):
        if not found:
            raise InputError(
                f"{role} {path}: no images found (looked recursively for "
                f"{', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}).")
    paths = positives + negatives
    # The folder below WITH_DIR or WITHOUT_DIR, so that ep1/ of both is one episode.
    folders = [Path(os.path.relpath(p.parent, root)).as_posix()
               for found, root in ((positives, with_dir), (negatives, without_dir)) for p in found]
    table = pd.DataFrame({
        "path": [str(p) for p in paths],
        "filename": [str(p) for p in paths],
        symbol: np.r_[np.ones(len(positives)), np.zeros(len(negatives))].astype(np.float32),
        "folder": ["" if f == "." else f for f in folders],
    })
    details = {}
    if groups_csv is not None:
        import split_groups  # here: it uses this module
        base = os.path.dirname(os.path.abspath(groups_csv))
        details["groups_csv"] = {"path": str(groups_csv), "column": split_groups.add_groups(
            table, groups_csv, group_by, keys=[os.path.realpath(p) for p in paths],
            key_of=lambda raw: os.path.realpath(os.path.join(base, raw.strip().replace("\\", "/"))),
            labels_from=f"WITH_DIR {with_dir} and WITHOUT_DIR {without_dir}",
            names_are=f"relative to the folder of the groups CSV ({base}), or absolute")}
    return LabelledImages(table, [symbol], f"directories {with_dir} (with) and {without_dir} (without)",
                          details, labels_from_folders=True)


# --------------------------------------------------------------------------------------------
# Labels from a CSV

VISIBLE_SUFFIX = "_visible"
# Spellings of a label. TRUE/FALSE are accepted because Excel writes boolean cells that way and
# pandas writes True/False; 1.0/0.0 because spreadsheets export numbers in that form. Words
# such as yes/no are refused: they come in too many languages and forms to guess safely.
LABEL_SPELLINGS = {"1": 1.0, "1.0": 1.0, "true": 1.0, "0": 0.0, "0.0": 0.0, "false": 0.0}
# A frame not annotated for a symbol: it trains the other symbols, and this one's loss and
# metrics leave it out.
NOT_ANNOTATED_SPELLINGS = frozenset({"", "-1", "-1.0"})
ALLOWED_LABELS_TEXT = "0 or 1 (also written 0.0/1.0, or false/true in any case)"
CSV_DELIMITERS = {",": "','", ";": "';'", "\t": "tab"}
_VISIBLE_COLUMN = re.compile(r"^(?P<symbol>.*)_visible$", re.IGNORECASE)
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class CsvFormat:
    """How a labels CSV was read: its text encoding and its separator."""

    encoding: str  # a Python codec name
    delimiter: str
    bom: bool = False

    def describe(self) -> str:
        encoding = {"utf-8": "UTF-8", "utf-8-sig": "UTF-8", "utf-16": "UTF-16"}[self.encoding]
        bom = " with a byte-order mark" if self.bom else ""
        return f"{encoding}{bom}, separator {CSV_DELIMITERS[self.delimiter]}"


def spreadsheet_rows(rows: Sequence[int], shown: int = 5, values: Sequence[str] | None = None) -> str:
    """'rows 3, 7 ('yes'), ...' as a user finds them in a spreadsheet: the first few and a count."""
    items = [f"{r} ({v!r})" if values is not None else str(r)
             for r, v in zip(rows, values if values is not None else rows)]
    word = "row" if len(rows) == 1 else "rows"
    text = f"{word} {', '.join(items[:shown])}"
    if len(rows) > shown:
        text += f" and {len(rows) - shown:,} more ({len(rows):,} rows)"
    return text


def _csv_text(csv_path: Path, role: str = "LABELS_CSV") -> tuple[str, str, bool]:
    """The CSV's text, its encoding and whether it had a byte-order mark; InputError if it is
    not readable text in UTF-8 (with or without BOM) or UTF-16 with a BOM. `role` names the
    file in messages (LABELS_CSV, --groups-csv)."""
    try:
        data = csv_path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{role} {csv_path}: no such file.") from None
    except IsADirectoryError:
        raise InputError(f"{role} {csv_path} is a directory; give the path of the CSV file.") from None
    except OSError as error:
        raise InputError(f"{role} {csv_path}: cannot be read ({error.strerror}).") from None
    if data.startswith(b"PK\x03\x04") or data.startswith(b"\xd0\xcf\x11\xe0"):
        raise InputError(
            f"{csv_path} is a spreadsheet workbook (Excel .xlsx/.xls), not CSV text. Save it as "
            "CSV: in Excel, File > Save As > 'CSV UTF-8 (Comma delimited)'.")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        # Excel's "Unicode Text" export: UTF-16 with a BOM (and tabs between cells).
        try:
            return data.decode("utf-16"), "utf-16", True
        except UnicodeDecodeError as error:
            raise InputError(f"{csv_path}: starts with a UTF-16 byte-order mark but is not valid "
                             f"UTF-16 ({error.reason}). Save it again as 'CSV UTF-8'.") from None
    bom = data.startswith(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        byte = data[error.start:error.start + 1]
        raise InputError(
            f"{csv_path}: not UTF-8 text: byte 0x{byte.hex()} on line {line} is not valid "
            "UTF-8. The file is probably in a legacy encoding such as Windows-1252 (older Excel "
            "versions save CSV that way). Save it as 'CSV UTF-8 (Comma delimited)', or convert "
            f"it: iconv -f WINDOWS-1252 -t UTF-8 {csv_path.name} > labels-utf8.csv") from None
    if "\x00" in text:
        raise InputError(f"{csv_path}: contains NUL characters, so it is not a CSV text file. "
                         f"Check that {role} names the right file.")
    return text, "utf-8-sig" if bom else "utf-8", bom


def _csv_delimiter(text: str) -> str:
    """The separator: the candidate that makes `filename` a header cell, else the one that
    splits the header into the most cells (comma on a tie)."""
    header_line = re.split(r"\r\n|\r|\n", text.lstrip("\r\n"), maxsplit=1)[0]
    best, best_cells = ",", 0
    for delimiter in CSV_DELIMITERS:
        try:
            cells = [c.strip() for c in next(csv.reader([header_line], delimiter=delimiter), [])]
        except csv.Error:  # a malformed header is reported by the full read, with its line
            continue
        if "filename" in cells:
            return delimiter
        if len(cells) > best_cells:
            best, best_cells = delimiter, len(cells)
    return best


def read_csv_rows(csv_path: str | os.PathLike, role: str = "LABELS_CSV",
                  example_header: str = "filename,pentagram_visible,star_visible",
                  ) -> tuple[list[str], list[tuple[int, list[str]]], CsvFormat]:
    """The header cells (the first non-blank row) and the non-blank rows after it, each with
    its spreadsheet row number (the first line is row 1), detecting a BOM, UTF-16 and the
    separator (',', ';' or tab). `role` and `example_header` are for the messages."""
    csv_path = Path(csv_path)
    text, encoding, bom = _csv_text(csv_path, role)
    delimiter = _csv_delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[tuple[int, list[str]]] = []
    try:
        for number, cells in enumerate(reader, start=1):
            if any(c.strip() for c in cells):
                rows.append((number, cells))
    except csv.Error as error:
        raise InputError(
            f"{csv_path}: malformed CSV near line {reader.line_num}: {error}. Usually an unclosed "
            "quote (\"); open the file in a text editor at that line.") from None
    fmt = CsvFormat(encoding, delimiter, bom)
    if not rows:
        raise InputError(f"{csv_path}: empty; expected a header row such as "
                         f"'{example_header}' and one row per image.")
    (_, header), body = rows[0], rows[1:]
    return [c.strip() for c in header], body, fmt


def _csv_filename(raw: str) -> tuple[str | None, str | None]:
    """The normalised relative path of a `filename` cell, or None and what is wrong with it."""
    name = raw.strip().replace("\\", "/")
    if not name:
        return None, "empty"
    if "\x00" in name:
        return None, "contains a NUL character"
    if name.startswith("/") or _WINDOWS_DRIVE.match(name):
        return None, "absolute path"
    normal = posixpath.normpath(name)
    if normal == ".." or normal.startswith("../"):
        return None, "outside IMAGE_DIR"
    if normal == ".":
        return None, "empty"
    return normal, None


# A name like a symbol column's written another way: the symbol, then a word like 'visible'
# that is not the suffix '_visible' (puma_visable, puma visible, pumaVisible, puma_vis).
_LAST_WORD = re.compile(r"^(?P<symbol>.*?[^\W_])[\W_]*(?P<word>[A-Z]?[a-z]+|[A-Z]+)$")


def _looks_like_visible(word: str) -> bool:
    """'visible' misspelt (visable, visble), shortened (vis) or extended (visibility)."""
    word = word.lower()
    return ((len(word) >= 3 and "visible".startswith(word)) or word.startswith("visib")
            or (word.startswith("v") and difflib.SequenceMatcher(None, word, "visible").ratio() >= 0.8))


def near_symbol_columns(header: Sequence[str]) -> dict[str, str]:
    """The columns that look like a `<symbol>_visible` column with a typo or written another
    way, each with the name it probably means. They would otherwise be kept as ordinary
    columns, and their symbol silently not trained."""
    found = {}
    for column in header:
        if not column or column == "filename" or _VISIBLE_COLUMN.match(column):
            continue
        match = _LAST_WORD.match(column)
        if match and _looks_like_visible(match.group("word")):
            found[column] = re.sub(r"[\W_]+", "_", match.group("symbol")).strip("_") + VISIBLE_SUFFIX
    return found


def _near_columns_text(near: dict[str, str]) -> str:
    return ", ".join(f"{column!r} (did you mean {meant!r}?)" for column, meant in near.items())


def _symbol_columns(header: list[str], csv_path: Path, wanted: Sequence[str] | None,
                    wanted_from: str = "--symbols") -> dict[str, str]:
    """Map each `<symbol>_visible` column to its output name, in the CSV's column order;
    `wanted` (symbol or column names, which came from `wanted_from`) keeps a subset. Without
    `wanted`, a column that looks like a misspelt symbol column is an error; with it, only the
    wanted columns must be usable."""
    columns: dict[str, str] = {}
    unusable: dict[str, str] = {}  # column: what its symbol part cleans to
    for column in header:
        match = _VISIBLE_COLUMN.match(column)
        if match is None:
            continue
        symbol = clean_symbol_name(match.group("symbol"))
        if not symbol or not SYMBOL_NAME_PATTERN.match(symbol):
            unusable[column] = symbol
            continue
        if symbol != match.group("symbol"):
            log.info("Column %r gives the output name %r (characters other than letters, digits "
                     "and '_' become '_').", column, symbol)
        clash = [c for c, s in columns.items() if s == symbol]
        if clash:
            raise InputError(f"{csv_path}: columns {clash[0]!r} and {column!r} both give the symbol "
                             f"name {symbol!r}; rename one of them.")
        columns[column] = symbol

    def unusable_error(column: str) -> InputError:
        return InputError(
            f"{csv_path}: column {column!r} gives no usable symbol name (after replacing "
            f"characters other than A-Z, a-z, 0-9 and '_' by '_' it is {unusable[column]!r}). "
            "Name the column <symbol>_visible, for example pentagram_visible"
            + ("." if wanted is not None else ", or leave it out with --symbols."))

    near = near_symbol_columns(header)
    if wanted is None and unusable:
        raise unusable_error(next(iter(unusable)))
    if wanted is None and near:
        one = len(near) == 1
        raise InputError(
            f"{csv_path}: {'column' if one else 'columns'} {_near_columns_text(near)} "
            f"{'looks like a symbol column' if one else 'look like symbol columns'} written "
            f"another way, so {'its symbol' if one else 'their symbols'} would not be trained: a "
            f"symbol column's name is the symbol followed by '{VISIBLE_SUFFIX}'. Rename "
            f"{'it' if one else 'them'}"
            + (f"; or, if {'it holds' if one else 'they hold'} no labels, pass --symbols "
               f"{','.join(columns.values())} to train only on the other columns' symbols."
               if columns else "."))
    if not columns and not (wanted is not None and any(w in unusable for w in wanted)):
        raise InputError(
            f"{csv_path}: no column whose name ends in '{VISIBLE_SUFFIX}' (the header has: "
            f"{', '.join(header)}). Each symbol needs a column <symbol>_visible holding 0 or 1, "
            "for example pentagram_visible."
            + (f" Look at {_near_columns_text(near)}." if near else ""))
    if wanted is not None:
        named_unusable = [w for w in wanted if w in unusable]
        if named_unusable:
            raise unusable_error(named_unusable[0])
        by_name = {**{s: c for c, s in columns.items()}, **{c: c for c in columns}}
        unknown = [w for w in wanted if w not in by_name]
        if unknown:
            raise InputError(
                f"{wanted_from}: {', '.join(map(repr, unknown))} not found in {csv_path}; its "
                f"symbols are {', '.join(columns.values()) or 'none'}."
                + (f" Columns that look like misspelt symbol columns: {_near_columns_text(near)}."
                   if near else ""))
        chosen = {by_name[w] for w in wanted}
        columns = {c: s for c, s in columns.items() if c in chosen}
    check_symbol_names(list(columns.values()), f"{csv_path}")
    return columns


def _check_csv_header(header: list[str], rows: list[tuple[int, list[str]]], csv_path: Path,
                      fmt: CsvFormat) -> None:
    """Raise InputError for a header that cannot be read as labels: a named column missing,
    repeated, or values under an empty header cell."""
    for index, name in enumerate(header):
        if not name and any(index < len(cells) and cells[index].strip() for _, cells in rows):
            raise InputError(f"{csv_path}: column {index + 1} has values but no name in the header "
                             "row; name it or delete it.")
    repeated = sorted({c for c in header if c and header.count(c) > 1})
    if repeated:
        raise InputError(f"{csv_path}: the header names {', '.join(map(repr, repeated))} more than "
                         "once; every column needs its own name.")
    if "filename" not in header:
        similar = [c for c in header if c.lower().replace(" ", "").replace("_", "") in
                   ("filename", "file", "path", "image", "filepath", "imagepath")]
        hint = f" Rename {similar[0]!r} to filename." if similar else ""
        raise InputError(
            f"{csv_path}: no 'filename' column (read as {fmt.describe()}; the header has: "
            f"{', '.join(header) or 'nothing'}). Add a column named filename holding each image's "
            f"path relative to IMAGE_DIR.{hint}")


def _filenames_and_problems(values: list[tuple[int, str]], image_dir: Path) -> tuple[list[str | None], list[str]]:
    """Each (row, filename cell) normalised, None where unusable, and what is wrong."""
    names: list[str | None] = []
    bad: dict[str, list[tuple[int, str]]] = {}
    for number, raw in values:
        name, trouble = _csv_filename(raw)
        names.append(name)
        if trouble:
            bad.setdefault(trouble, []).append((number, raw))
    problems = []
    for trouble, found in bad.items():
        numbers = [n for n, _ in found]
        if trouble == "empty":
            problems.append(f"column filename: empty in {spreadsheet_rows(numbers)}; every row needs "
                            "the image's path relative to IMAGE_DIR.")
        else:
            problems.append(
                f"column filename: {trouble} in {spreadsheet_rows(numbers, values=[v for _, v in found])}; "
                f"file names must be relative paths inside IMAGE_DIR {image_dir} (e.g. "
                "episode1/frame0001.jpg).")
    return names, problems


def _labels_and_problems(column: str, values: list[tuple[int, str]]) -> tuple[np.ndarray, list[str]]:
    """One `_visible` column's labels as 1, 0 or NaN (not annotated: an empty cell or -1),
    and what is wrong with it."""
    labels = np.zeros(len(values), np.float32)
    invalid, invalid_values = [], []
    for i, (number, raw) in enumerate(values):
        raw = raw.strip()
        value = LABEL_SPELLINGS.get(raw.lower())
        if value is not None:
            labels[i] = value
        elif raw in NOT_ANNOTATED_SPELLINGS:
            labels[i] = np.nan
        else:
            invalid.append(number)
            invalid_values.append(raw)
    problems = []
    if invalid:
        problems.append(
            f"column {column}: {spreadsheet_rows(invalid, values=invalid_values)} "
            f"{'is not' if len(invalid) == 1 else 'are not'} a label; write {ALLOWED_LABELS_TEXT}, "
            "or leave the cell empty (or write -1) where the symbol was not annotated.")
    return labels, problems


def _first_listings(names: list[str | None], labels: np.ndarray,
                    row_numbers: list[int]) -> tuple[np.ndarray, list[str], list[int]]:
    """Which rows to keep (the first row of each file), the files listed again with other
    labels, and the rows that repeat a file with the same labels."""
    first_row_of: dict[str, int] = {}
    conflicts, repeats, keep = [], [], np.ones(len(names), bool)
    for i, name in enumerate(names):
        if name is None:
            continue
        if name not in first_row_of:
            first_row_of[name] = i
            continue
        first = first_row_of[name]
        keep[i] = False
        if np.array_equal(labels[first], labels[i], equal_nan=True):
            repeats.append(row_numbers[i])
        else:
            conflicts.append(f"{name!r} in rows {row_numbers[first]} and {row_numbers[i]}")
    return keep, conflicts, repeats


def images_from_csv(image_dir: str | os.PathLike, csv_path: str | os.PathLike,
                    symbols: Sequence[str] | None = None, *,
                    symbols_from: str = "--symbols", group_by: str | None = None,
                    groups_csv: str | os.PathLike | None = None) -> LabelledImages:
    """The labelled table of a multi-label task from a labels CSV.

    The CSV has a `filename` column (a path relative to `image_dir`, '/' or '\\\\' between
    folders) and one `<symbol>_visible` column per symbol holding 0 or 1. Symbols keep the
    CSV's column order; `symbols` (names, or column names) keeps a subset. Other columns are
    kept in the table. Every problem in the cells is collected and raised as one InputError
    that names the rows as a spreadsheet numbers them. `symbols_from` says where `symbols`
    came from, for the error when one is missing from the CSV.

    `groups_csv` (--groups-csv) adds the column of another CSV that groups the split, with
    the same file names (see split_groups.add_groups); `frame_groups` then groups by it
    unless --group-by says otherwise. `group_by` (--group-by) says which column groups the
    split, so that it is not reported as an ignored column.
    """
    image_dir, csv_path = Path(image_dir), Path(csv_path)
    if not image_dir.is_dir():
        raise InputError(f"IMAGE_DIR {image_dir}: no such directory.")
    if symbols is not None and not [s for s in symbols if s.strip()]:
        raise InputError("--symbols: empty; give symbol names separated by commas, e.g. pentagram,star.")
    header, rows, fmt = read_csv_rows(csv_path)
    if not rows:
        raise InputError(f"{csv_path}: has a header row but no rows of labels; add one row per image.")
    log.info("Read %s: %s, %s rows", csv_path, fmt.describe(), f"{len(rows):,}")
    _check_csv_header(header, rows, csv_path, fmt)
    wanted = None if symbols is None else list(dict.fromkeys(s.strip() for s in symbols if s.strip()))
    columns = _symbol_columns(header, csv_path, wanted, symbols_from)
    all_visible = [c for c in header if c and _VISIBLE_COLUMN.match(c)]
    extra = [c for c in header if c and c != "filename" and c not in all_visible]
    if groups_csv is not None:
        grouping = None
    else:
        grouping = automatic_group_column(extra) if group_by is None else group_by
    ignored = [c for c in extra if c != grouping]
    if ignored:
        log.info("Ignoring columns: %s (kept with the data for later use)", ", ".join(ignored))
    unused = [c for c in all_visible if c not in columns]
    if unused:
        log.info("Not training on: %s (left out by --symbols)", ", ".join(unused))

    index_of = {c: i for i, c in enumerate(header) if c}

    def column_values(column: str) -> list[tuple[int, str]]:
        i = index_of[column]
        return [(number, cells[i] if i < len(cells) else "") for number, cells in rows]

    problems: list[str] = []
    too_long = [n for n, cells in rows
                if len(cells) > len(header) and any(c.strip() for c in cells[len(header):])]
    if too_long:
        problems.append(
            f"{spreadsheet_rows(too_long)}: more cells than the header's {len(header)} columns. "
            f"A file name containing the separator {CSV_DELIMITERS[fmt.delimiter]} must be quoted.")
    names, found = _filenames_and_problems(column_values("filename"), image_dir)
    problems += found
    labels = np.zeros((len(rows), len(columns)), np.float32)
    for j, column in enumerate(columns):
        labels[:, j], found = _labels_and_problems(column, column_values(column))
        problems += found
    row_numbers = [number for number, _ in rows]
    keep, conflicts, repeats = _first_listings(names, labels, row_numbers)
    if conflicts:
        problems.append(f"{len(conflicts):,} file(s) listed twice with different labels: "
                        f"{listing(conflicts, separator='; ')}. "
                        "Keep one row per file, with the right labels.")
    if repeats:
        log.warning("%s: %s: same file and labels as an earlier row; each file is used once.",
                    csv_path, spreadsheet_rows(repeats))
    missing = [(row_numbers[i], name) for i, name in enumerate(names)
               if name is not None and keep[i] and not os.path.isfile(os.path.join(image_dir, name))]
    if missing:
        missing_names = [name for _, name in missing]
        problems.append(
            f"column filename: {len(missing):,} listed file(s) do not exist in IMAGE_DIR {image_dir}: "
            f"{spreadsheet_rows([n for n, _ in missing], values=missing_names)}."
            f"{_missing_file_hint(image_dir, missing_names)}")
    if problems:
        raise InputError(
            f"{csv_path} ({fmt.describe()}): {len(problems)} problem(s); fix them and run again "
            "(add --dry-run to check without training):\n  - " + "\n  - ".join(problems))

    labels = labels[keep]
    hopeless = []
    for j, symbol in enumerate(columns.values()):
        if np.isnan(labels[:, j]).all():
            hopeless.append(f"{symbol} (not annotated in any row)")
        elif not (labels[:, j] == 1).any():
            hopeless.append(f"{symbol} (no row with 1)")
        elif not (labels[:, j] == 0).any():
            hopeless.append(f"{symbol} (no row with 0)")
    if hopeless:
        raise InputError(
            f"{csv_path}: cannot learn {', '.join(hopeless)}: a symbol needs frames where it is "
            "visible (1) and frames where it is not (0). Label some, or leave it out with --symbols.")

    not_annotated = {symbol: int(np.isnan(labels[:, j]).sum())
                     for j, symbol in enumerate(columns.values())}
    if any(not_annotated.values()):
        log.info("Not annotated (empty cell or -1), so left out of that symbol's loss and "
                 "metrics but used for the others: %s of %s frames.",
                 ", ".join(f"{s} {n:,}" for s, n in not_annotated.items()), f"{len(labels):,}")
    kept_names = [names[i] for i in np.flatnonzero(keep)]
    table = pd.DataFrame({
        "path": [os.path.join(image_dir, n) for n in kept_names],
        "filename": kept_names,
        "folder": [posixpath.dirname(n) for n in kept_names],
    })
    for j, symbol in enumerate(columns.values()):
        table[symbol] = labels[:, j]
    for column in extra:
        values = [value for (_, value), kept in zip(column_values(column), keep) if kept]
        table[column if column not in table.columns else f"csv_{column}"] = values
    details = {}
    if groups_csv is not None:
        import split_groups  # here: it uses this module
        details["groups_csv"] = {"path": str(groups_csv), "column": split_groups.add_groups(
            table, groups_csv, group_by, keys=kept_names, key_of=lambda raw: _csv_filename(raw)[0],
            labels_from=str(csv_path), names_are=f"relative to IMAGE_DIR {image_dir}, as in {csv_path}",
            rows=[row_numbers[i] for i in np.flatnonzero(keep)])}

    listed = {os.path.normpath(p) for p in table["path"]}
    unlisted = [p for p in find_images(image_dir, quiet=True) if os.path.normpath(p) not in listed]
    if unlisted:
        log.info("%s images in IMAGE_DIR %s are not listed in %s; they are not used (for example %s).",
                 f"{len(unlisted):,}", image_dir, csv_path.name,
                 Path(os.path.relpath(unlisted[0], image_dir)).as_posix())
    details = {"labels_csv": str(csv_path), "image_dir": str(image_dir), "csv_format": fmt.describe(),
               "rows": len(rows), "duplicate_rows_dropped": len(repeats),
               "not_annotated": not_annotated,
               "ignored_columns": ignored, "unlisted_images": len(unlisted), **details}
    return LabelledImages(table, list(columns.values()),
                          f"labels CSV {csv_path} with images in {image_dir}", details)


def _missing_file_hint(image_dir: Path, missing: Sequence[str]) -> str:
    """A hint when the missing names exist with other letter case, or under another folder."""
    by_lower, by_base = {}, {}
    for path in find_images(image_dir, quiet=True):
        relative = Path(os.path.relpath(path, image_dir)).as_posix()
        by_lower.setdefault(relative.lower(), relative)
        by_base.setdefault(posixpath.basename(relative), relative)
    for name in missing:
        if name.lower() in by_lower:
            return (f" Names are case-sensitive: {name!r} exists as {by_lower[name.lower()]!r}.")
        if posixpath.basename(name) in by_base:
            return (f" {name!r} exists as {by_base[posixpath.basename(name)]!r}: is IMAGE_DIR the "
                    "folder the file names are relative to?")
    return " Check IMAGE_DIR, and that the names are relative to it."


def with_validation_set(train: LabelledImages, validation: LabelledImages,
                        validation_origin: str) -> tuple[LabelledImages, np.ndarray]:
    """Training and given validation images in one table, and the mask of the validation
    rows, for a split chosen by the user rather than drawn. The validation images must have
    the training symbols (in any order) and no file in common with the training images."""
    missing = [s for s in train.symbols if s not in validation.symbols]
    if missing:
        raise InputError(f"{validation_origin}: has no labels for {', '.join(missing)}, which "
                         "the training labels have; validation needs every trained symbol.")
    extra = [s for s in validation.symbols if s not in train.symbols]
    if extra:
        log.info("%s: not validating %s (not in the training labels).", validation_origin,
                 ", ".join(extra))
    def identities(path: str) -> set:
        """The file's real path and, where the file exists, its (device, inode): a hard link
        is the same file under another real path."""
        found = {os.path.realpath(path)}
        with contextlib.suppress(OSError):
            stat = os.stat(path)
            found |= {(stat.st_dev, stat.st_ino)} if stat.st_ino else set()
        return found

    resolved = set().union(*map(identities, train.table["path"]))
    shared = [name for name, path in zip(validation.table["filename"], validation.table["path"])
              if identities(path) & resolved]
    if shared:
        raise InputError(
            f"{validation_origin}: {len(shared):,} image(s) are also training images (for "
            f"example {shared[0]!r}); a validation image must not be trained on. Remove them "
            "from one of the two.")
    table = pd.concat([train.table, validation.table.drop(columns=extra)], ignore_index=True)
    is_validation = np.r_[np.zeros(len(train.table), bool), np.ones(len(validation.table), bool)]
    details = {**train.details, "validation": {"source": validation.source, **validation.details}}
    combined = LabelledImages(table, list(train.symbols), train.source, details,
                              labels_from_folders=train.labels_from_folders)
    log.info("Validating on the %s images of %s instead of a split.",
             f"{len(validation.table):,}", validation_origin)
    return combined, is_validation


def drop_unreadable(images: LabelledImages, scan: ScanResult, max_unreadable: float) -> LabelledImages:
    """Remove the files the scan could not read, or raise if there are too many."""
    if scan.errors:
        for path, reason in scan.errors[:20]:
            log.warning("Skipping %s: %s", path, reason)
        if len(scan.errors) > 20:
            log.warning("... and %d more unreadable files", len(scan.errors) - 20)
    share = len(scan.errors) / max(1, len(images.table))
    if share > max_unreadable:
        first = "; ".join(f"{p}: {r}" for p, r in scan.errors[:3])
        raise InputError(
            f"{len(scan.errors):,} of {len(images.table):,} images ({share:.1%}) cannot be read, "
            f"more than --max-unreadable {max_unreadable}. First: {first}. Fix or remove them, "
            "or raise --max-unreadable.")
    keep = scan.readable
    table = images.table.loc[keep].copy()
    table["image_sha1"] = [h for h in scan.sha1 if h is not None]
    table["image_width"] = [s[0] for s in scan.size if s is not None]
    table["image_height"] = [s[1] for s in scan.size if s is not None]
    return dataclasses.replace(images, table=table.reset_index(drop=True))


def check_identical_content(images: LabelledImages) -> tuple[duplicates.IdenticalContent, dict]:
    """Frames whose files have the same content (by the scan's `image_sha1`; see
    duplicates.py): labels that disagree are an InputError where they come from folders and
    a warning naming the frames where they come from CSV rows; copies with the same labels
    are a warning. Returns what was found and its counts for metadata.json."""
    names = images.table["filename"].astype(str).to_numpy()
    labels = images.labels()
    found = duplicates.identical_content(images.table["image_sha1"].tolist(), labels,
                                         images.symbols)
    outcome = duplicates.report_identical(found, names, labels, images.symbols,
                                          images.labels_from_folders)
    if outcome.error:
        raise InputError(outcome.error)
    for warning in outcome.warnings:
        log.warning("%s", warning)
    return found, outcome.counts


def check_learnable(images: LabelledImages) -> None:
    """Every symbol needs two positives and two negatives: one of each for both splits."""
    labels = images.labels()
    problems = []
    for column, symbol in enumerate(images.symbols):
        positives = int(np.nansum(labels[:, column] == 1))
        negatives = int(np.nansum(labels[:, column] == 0))
        if positives < 2 or negatives < 2:
            problems.append(f"{symbol} ({positives} positive, {negatives} negative)")
    if problems:
        raise InputError(
            "cannot learn " + ", ".join(problems) + ": each symbol needs at least 2 readable "
            "images where it is visible and 2 where it is not, so both the training and the "
            "validation split have one of each. Add images or drop the symbol.")


# --------------------------------------------------------------------------------------------
# Train/validation split


# Columns that name a frame's episode or shot; the first present groups the split by default.
AUTOMATIC_GROUP_COLUMNS = ("episode", "group", "video", "shot")


def automatic_group_column(columns: Sequence[str]) -> str | None:
    """The column that groups the split when --group-by is not given, if any."""
    return next((c for name in AUTOMATIC_GROUP_COLUMNS for c in columns if c.lower() == name), None)


@dataclass(frozen=True)
class FrameGroups:
    """The group of every frame (None: each frame alone) and how it was chosen."""

    groups: np.ndarray | None
    description: str


def frame_groups(images: LabelledImages, group_by: str | None) -> FrameGroups:
    """The groups that the split keeps together, from --group-by (see TrainingConfig), or
    without it from the column that --groups-csv added."""
    table = images.table
    columns = [c for c in table.columns if c not in TABLE_COLUMNS and c not in images.symbols]
    from_file = images.details.get("groups_csv")
    if group_by is None and from_file:
        group_by = from_file["column"]
    if group_by is None:
        automatic = automatic_group_column(columns)
        if automatic is None:
            return FrameGroups(None, "none (each frame alone)")
        group_by = automatic
        how = f"the column {group_by!r} (found automatically; --group-by none splits frames one by one)"
    elif group_by == "none":
        return FrameGroups(None, "none (--group-by none)")
    else:
        how = None
    if group_by == "folder":
        groups = table["folder"].astype(str).to_numpy()
        description = "folder"
    elif group_by in columns:
        values = table[group_by].astype(str).str.strip()
        empty = values == ""
        if empty.any():
            log.warning("--group-by %s: %s frames have no value (for example %s); each of them is "
                        "its own group.", group_by, f"{int(empty.sum()):,}",
                        table.loc[empty, "filename"].iloc[0])
            values = values.where(~empty, "(no group) " + table["filename"])
        groups = values.to_numpy()
        description = how or f"the column {group_by!r}" + (
            f" of --groups-csv {from_file['path']}" if from_file and from_file["column"] == group_by else "")
    else:
        try:
            pattern = re.compile(group_by)
        except re.error as error:
            pattern = None
            reason = f"not a valid regular expression ({error})"
        if pattern is not None and pattern.groups >= 1:
            found = [pattern.search(name) for name in table["filename"]]
            unmatched = [name for name, match in zip(table["filename"], found)
                         if match is None or match.group(1) is None]
            if unmatched:
                raise InputError(
                    f"--group-by {group_by!r}: the pattern does not match {len(unmatched):,} of "
                    f"{len(table):,} file names (for example {unmatched[0]!r}); every file "
                    "name needs a group. Adjust the pattern.")
            groups = np.array([match.group(1) for match in found], dtype=object)
            description = f"the pattern {group_by!r} on file names"
        else:
            if pattern is not None:
                reason = "a regular expression needs a group in parentheses, e.g. 'ep(\\d+)_'"
            available = ", ".join(columns) if columns else "none"
            raise InputError(
                f"--group-by {group_by!r}: not a column of the labels (other columns: "
                f"{available}), not 'folder' or 'none', and {reason}.")
    if len(set(groups)) < 2 and how is not None:
        log.warning("The column %r has the same value for every frame; splitting frames one by "
                    "one.", group_by)
        return FrameGroups(None, f"none (the column {group_by!r} has one value)")
    if len(set(groups)) < 2:
        raise InputError(
            f"--group-by {group_by!r}: every frame is in the same group ({groups[0]!r}), so "
            "no split can keep groups apart. Choose another grouping, or --group-by none.")
    return FrameGroups(np.asarray(groups, dtype=str), description)


# Hamming distance between two frames' perceptual hashes up to which they count as
# near-duplicates. On 3,000 make_symbol_frames.py frames, 98 % of frames have a frame of their
# own shot within 4 bits; 31 % have one in another episode that close (the generator reuses
# a few background photographs, so some of those are near-duplicates too).
NEAR_DUPLICATE_BITS = 4
# Warn about a frame-by-frame split when more of the validation frames than this have one.
NEAR_DUPLICATE_WARNING_SHARE = 0.05


def near_duplicates(hashes: Sequence[int], is_validation: np.ndarray,
                    max_bits: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """Which validation frames have a training frame within `max_bits` of their perceptual
    hash: a bool per validation frame."""
    as_array = np.array([int(h) for h in hashes], dtype=np.uint64)
    validation, train = as_array[is_validation], as_array[~is_validation]
    found = np.zeros(len(validation), bool)
    if not len(train):
        return found
    for start in range(0, len(validation), 512):  # 512 x 20,000 comparisons at a time
        chunk = validation[start:start + 512, None] ^ train[None, :]
        found[start:start + 512] = (np.bitwise_count(chunk) <= max_bits).any(axis=1)
    return found


def split_train_validation(labels: np.ndarray, validation_fraction: float, seed: int,
                           groups: Sequence | None = None) -> np.ndarray:
    """A seeded, stratified split; returns a boolean array, True for validation rows.

    `labels` is (frames, symbols) with 1, 0 or NaN. Frames of one group always land in the same
    split (with no groups every frame is its own group). Groups are assigned by iterative
    stratification (Sechidis et al., 2011): the symbol with the fewest positives left is
    placed first, each group going to the split that most lacks that symbol's positives, so
    every symbol gets positives in validation in proportion. Negatives of each symbol are then
    balanced the same way, and the remaining groups fill the validation size.

    When groups are as large as a symbol's validation target (a sign seen in two episodes of
    30 frames), the paper's rule sends every group to training, which always lacks more
    frames, and the symbol is never validated. So the last group holding a symbol's
    positives (or negatives) goes to the split that has none of them yet, if one has none.
    """
    labels = np.asarray(labels, dtype=np.float32)
    n = len(labels)
    if groups is None:
        group_ids = np.arange(n)
    else:
        _, group_ids = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_groups = int(group_ids.max()) + 1 if n else 0
    # Per group: frames, positives and negatives per symbol.
    frames = np.bincount(group_ids, minlength=n_groups).astype(float)
    pos = np.zeros((n_groups, labels.shape[1]))
    neg = np.zeros((n_groups, labels.shape[1]))
    np.add.at(pos, group_ids, np.nan_to_num(labels == 1).astype(float))
    np.add.at(neg, group_ids, np.nan_to_num(labels == 0).astype(float))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)  # random tie-breaking, repeatable by seed
    fractions = np.array([1 - validation_fraction, validation_fraction])
    # Desired counts per split: rows (train, validation), columns the count kinds.
    counts = np.concatenate([frames[:, None], pos, neg], axis=1)
    totals = counts.sum(axis=0)
    desired = fractions[:, None] * totals[None, :]
    # A class with two or more frames puts at least one in validation, so small symbols are
    # still validated on both classes (plain proportions would give a 2-positive symbol 0.4).
    at_least_one = (totals >= 2) & (np.arange(len(totals)) > 0)
    desired[1, at_least_one] = np.maximum(desired[1, at_least_one], 1.0)
    desired[0] = totals - desired[1]
    initial = desired.copy()
    holders = (counts > 0).sum(axis=0)  # groups with frames of each count kind
    assigned = np.full(n_groups, -1)
    unassigned = set(order.tolist())

    def place(group: int, split: int) -> None:
        assigned[group] = split
        desired[split] -= counts[group]
        unassigned.discard(group)

    n_symbols = labels.shape[1]
    # Positives first (rarest symbol first), then negatives; columns 1.. of counts.
    for kind_offset in (1, 1 + n_symbols):
        while True:
            remaining = [g for g in order if g in unassigned]
            if not remaining:
                break
            rem = np.array(remaining)
            totals = counts[rem, kind_offset:kind_offset + n_symbols].sum(axis=0)
            candidates = np.flatnonzero(totals > 0)
            if len(candidates) == 0:
                break
            column = kind_offset + candidates[np.argmin(totals[candidates])]
            remaining_holders = rem[counts[rem, column] > 0]
            for i, group in enumerate(remaining_holders):
                need = desired[:, column]
                untouched = need == initial[:, column]  # splits with none of this kind yet
                if (i == len(remaining_holders) - 1 and holders[column] >= 2
                        and untouched.sum() == 1):
                    split = int(np.flatnonzero(untouched)[0])
                elif need[0] != need[1]:
                    split = int(np.argmax(need))
                else:
                    split = int(np.argmax(desired[:, 0]))
                place(int(group), split)
    for group in [g for g in order if g in unassigned]:
        place(int(group), int(np.argmax(desired[:, 0])))
    return assigned[group_ids] == 1


# --------------------------------------------------------------------------------------------
# Backbones and the model



# ImageNet channel means in BGR order, as keras.applications.imagenet_utils uses them.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def _preprocessing_layer(spec: BackboneSpec):
    """The backbone's input preprocessing as a standard, serialisable Keras layer (no Lambda),
    so the saved model takes raw 0-255 RGB and loads in safe mode."""
    if spec.preprocessing == "tf":
        return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocessing")
    if spec.preprocessing == "caffe":
        # RGB -> BGR and mean subtraction as one fixed 1x1 convolution.
        swap = np.zeros((1, 1, 3, 3), dtype=np.float32)
        for rgb in range(3):
            swap[0, 0, rgb, 2 - rgb] = 1.0
        layer = keras.layers.Conv2D(3, 1, name="preprocessing", trainable=False)
        layer.build((None, None, None, 3))
        layer.set_weights([swap, -np.array(_CAFFE_MEAN_BGR, dtype=np.float32)])
        return layer
    return None


def keras_models_cache() -> Path:
    """Where Keras caches downloaded weights ($KERAS_HOME/models, default ~/.keras/models)."""
    from keras.src.backend import config as keras_config  # Keras fixes its home at import
    return Path(keras_config.keras_home()) / "models"


def build_backbone(config: TrainingConfig, input_shape: tuple[int, int, int]) -> keras.Model:
    """The pretrained backbone without its top; raises WeightsUnavailableError with the fix."""
    spec = BACKBONES[config.backbone]
    kwargs = dict(spec.extra)
    if spec.alphas:
        kwargs["alpha"] = config.alpha
    source = config.weights_source
    weights = None if source == "none" else source
    constructor = getattr(keras.applications, spec.constructor)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # a node behind a silent firewall must fail, not hang all night
    try:
        backbone = constructor(include_top=False, weights=weights, input_shape=input_shape, **kwargs)
    except Exception as error:
        if source == "imagenet":
            raise WeightsUnavailableError(
                f"could not get the ImageNet weights of {config.backbone} "
                f"(alpha {config.alpha}, input {input_shape[0]}x{input_shape[1]}): {error}. "
                f"On a machine without internet, either pass --weights PATH with a weights "
                f"file (.h5), or run the same command once on a machine with internet and "
                f"copy its Keras cache folder ({keras_models_cache()}) to the same place "
                f"(or to $KERAS_HOME/models) on this one. Never trained on random weights."
            ) from None
        if source != "none":
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise WeightsUnavailableError(
                f"--weights {config.weights}: the file does not fit {config.backbone} with "
                f"alpha {config.alpha} ({first_line[:300]}). Use the weights file made for "
                f"this backbone and width, without the top (no_top).") from None
        raise
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return keras.Model(backbone.input, backbone.output, name="backbone")


@dataclass
class ModelParts:
    """The full model and the two views of it that training uses (layers are shared)."""

    model: keras.Model             # raw RGB image -> {symbol: probability}
    features: keras.Model          # raw RGB image -> pooled features (avg) or feature map
    head: keras.Model              # features -> {symbol: probability}
    backbone: keras.Model
    preprocessing: keras.layers.Layer | None
    pooling: str = "avg"           # TrainingConfig.pooling; heads.is_spatial tells the kind

    @property
    def spatial(self) -> bool:
        """Whether the head pools per-location scores (heads.py), trained on feature maps."""
        return heads.is_spatial(self.pooling)


def build_model(symbols: Sequence[str], config: TrainingConfig,
                geometry: ImageGeometry) -> ModelParts:
    """Raw 0-255 RGB pixels -> preprocessing -> frozen backbone -> pooling -> dropout ->
    one Dense(1, sigmoid) output per symbol, named after it. With a spatial
    `config.pooling` the head after the backbone is heads.SpatialHead instead: dropout ->
    1x1 Conv2D "score_map" -> pooling over locations -> a sigmoid output per symbol."""
    check_symbol_names(list(symbols), "symbols")
    input_shape = (geometry.height, geometry.width, 3)
    backbone = build_backbone(config, input_shape)
    backbone.trainable = False
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    preprocessing = _preprocessing_layer(BACKBONES[config.backbone])
    if preprocessing is not None:
        x = preprocessing(x)
    # training=False keeps BatchNorm in inference mode in both phases, as the keras.io
    # transfer-learning guide advises: its statistics are not relearned from small batches.
    x = backbone(x, training=False)
    if heads.is_spatial(config.pooling):
        head_layers = heads.SpatialHead(symbols, config.pooling, config.dropout)
        model = keras.Model(inputs, head_layers(x), name="symbol_classifier")
        features = keras.Model(inputs, x, name="feature_extractor")
        feature_input = keras.Input(shape=tuple(x.shape[1:]), name="features")
        head = keras.Model(feature_input, head_layers(feature_input), name="head")
        return ModelParts(model, features, head, backbone, preprocessing, config.pooling)
    pooled = keras.layers.GlobalAveragePooling2D(name="pooling")(x)
    dropout = keras.layers.Dropout(config.dropout, name="head_dropout")
    # float32 outputs keep the sigmoid and the loss exact under mixed precision.
    outputs = [keras.layers.Dense(1, activation="sigmoid", name=s, dtype="float32")
               for s in symbols]
    hidden = dropout(pooled)
    model = keras.Model(inputs, {s: h(hidden) for s, h in zip(symbols, outputs)},
                        name="symbol_classifier")
    features = keras.Model(inputs, pooled, name="feature_extractor")
    feature_input = keras.Input(shape=(pooled.shape[-1],), name="features")
    hidden = dropout(feature_input)
    head = keras.Model(feature_input, {s: h(hidden) for s, h in zip(symbols, outputs)},
                       name="head")
    return ModelParts(model, features, head, backbone, preprocessing)


def calibrate_batchnorm(parts: ModelParts, images: np.ndarray) -> None:
    """Set every BatchNorm layer's statistics from one batch of training images.

    Only for `--weights none`: a randomly initialised backbone whose BatchNorm layers keep
    their initial statistics (mean 0, variance 1) shrinks activations layer after layer, and
    its pooled features come out near 1e-11 and constant. One forward pass in training mode
    with momentum 0 stores each layer's batch statistics, so in inference mode the random
    network passes a signal and its features are usable (data-dependent initialisation).
    """
    layers = [l for l in parts.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    x = tf.convert_to_tensor(images, dtype=tf.float32)
    if parts.preprocessing is not None:
        x = parts.preprocessing(x)
    trainable = parts.backbone.trainable
    try:
        # A frozen BatchNorm layer ignores training=True, so unfreeze for this one pass.
        parts.backbone.trainable = True
        for layer in layers:
            layer.momentum = 0.0
        parts.backbone(x, training=True)
    finally:
        parts.backbone.trainable = trainable
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


def unfreeze_top(backbone: keras.Model, fraction: float) -> int:
    """Make the top `fraction` of the backbone's layers trainable, BatchNorm excepted;
    returns how many layers now train."""
    backbone.trainable = True
    layers = backbone.layers
    first = int(round(len(layers) * (1 - fraction)))
    count = 0
    for index, layer in enumerate(layers):
        trainable = index >= first and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = trainable
        count += bool(trainable and layer.weights)
    return count


# --------------------------------------------------------------------------------------------
# Input pipeline and inference


def image_dataset(paths: Sequence[str], geometry: ImageGeometry, batch_size: int, *,
                  targets: np.ndarray | None = None, order: tf.data.Dataset | None = None,
                  store: PixelStore | None = None) -> tf.data.Dataset:
    """Stream images from disk in batches of uint8 tensors; with `targets` (one row per path,
    see `fused_targets`), yield (images, targets). `order` is a dataset of index batches to
    load (see `epoch_batches`); without it, every path once, in order, `batch_size` at a time.
    With `store`, images come from it when it has them and are added to it when it does not.

    Each map call loads a whole batch, and several batches load in parallel (Pillow releases
    the GIL while it decodes): one Python call per batch rather than per image keeps the
    pipeline's own overhead small next to the model's step when images come from `store`."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("image_dataset needs at least one path")

    def load_batch(indices):
        if store is not None:
            return np.stack([store.load(paths[i]) for i in indices])
        return np.stack([load_image_array(paths[i], geometry) for i in indices])

    def decode(indices):
        images = tf.numpy_function(load_batch, [indices], tf.uint8, stateful=False)
        images.set_shape((None, geometry.height, geometry.width, 3))
        return images

    dataset = order if order is not None else tf.data.Dataset.range(len(paths)).batch(batch_size)
    if targets is None:
        dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        y = tf.constant(np.asarray(targets, dtype=np.float32))

        def decode_labelled(indices):
            return decode(indices), tf.gather(y, indices)

        dataset = dataset.map(decode_labelled, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)
    return _distributable(dataset.prefetch(tf.data.AUTOTUNE))


def _distributable(dataset: tf.data.Dataset) -> tf.data.Dataset:
    # Across workers, tf.data would first try to split the input by file, which an index
    # pipeline has none of; saying so up front splits it by batch without the warning.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def epoch_batches(items: int, batch_size: int, seed: int, first_epoch: int,
                  epochs: int) -> tf.data.Dataset:
    """Index batches of epochs `first_epoch` to `epochs - 1`, one epoch after the other, each
    in its own shuffled order (`checkpoints.epoch_order`): an epoch's batches depend only on
    the seed and its number, so a resumed run repeats them exactly."""
    orders = np.stack([checkpoints.epoch_order(items, seed, e) for e in range(first_epoch, epochs)])
    return tf.data.Dataset.from_tensor_slices(orders).flat_map(
        lambda order: tf.data.Dataset.from_tensor_slices(order).batch(batch_size))


def feature_dataset(features: np.ndarray, targets: np.ndarray, batch_size: int,
                    order: tf.data.Dataset | None = None) -> tf.data.Dataset:
    """(features, targets) batches gathered in `order` (index batches), or in row order.
    Feature maps (more than two dimensions) are gathered by NumPy, so that they are neither
    copied into a tensor whole nor read whole from a memory-mapped file."""
    y = tf.constant(np.asarray(targets, np.float32))
    if order is None:
        order = tf.data.Dataset.range(len(features)).batch(batch_size)
    if features.ndim > 2:
        dtype = tf.as_dtype(features.dtype)

        def gather_maps(indices):
            maps = tf.numpy_function(lambda i: np.asarray(features[i]), [indices], dtype)
            return tf.ensure_shape(maps, (None, *features.shape[1:]))
        dataset = order.map(lambda indices: (gather_maps(indices), tf.gather(y, indices)))
        return _distributable(dataset.prefetch(tf.data.AUTOTUNE))
    x = tf.constant(features)
    dataset = order.map(lambda indices: (tf.gather(x, indices), tf.gather(y, indices)))
    return _distributable(dataset.prefetch(tf.data.AUTOTUNE))


def compiled_inference(model: keras.Model):
    """`model` in inference mode as one compiled function of an image batch of any length.

    It is traced once per image shape and dtype, for any number of images: left to itself,
    tf.function traces again for the first batch of another length (the last, shorter batch
    of nearly every pass), which costs as long as a hundred images of MobileNetV2-0.35 at
    224 px on 2 CPU cores."""
    @tf.function(autograph=False)
    def infer(images):
        with warnings.catch_warnings():
            # A loaded model's one input is the list ['image'] to Keras, and a bare batch
            # means the same; the warning about it would only alarm users of predict.py.
            warnings.filterwarnings("ignore", message="The structure of `inputs`")
            return model(images, training=False)

    traced = {}

    def any_length(images):
        images = tf.convert_to_tensor(images)
        key = (images.dtype, tuple(images.shape[1:]))
        if key not in traced:
            traced[key] = infer.get_concrete_function(tf.TensorSpec((None, *key[1]), key[0]))
        return traced[key](images)
    any_length.tracing_count = infer.experimental_get_tracing_count
    return any_length


def run_inference(model: keras.Model | Callable, dataset: Iterable,
                  progress_label: str | None = None, total: int | None = None,
                  into: np.ndarray | None = None):
    """Apply `model` in inference mode to every batch of `dataset` (a tf.data.Dataset or
    any iterable of batches, either of which may be (images, targets) pairs); returns a
    numpy array, or a dict of them for a dict-output model, in dataset order. `model` may
    also be a function from `compiled_inference`, for passes that should not trace anew.
    With `into` (single-output models), each batch's result is written into its rows, in
    its dtype, and `into` is returned: no second copy of the results is made."""
    infer = model if not isinstance(model, keras.Model) else compiled_inference(model)
    chunks = []
    done, last_report, start = 0, time.monotonic(), time.monotonic()
    for batch in dataset:
        images = batch[0] if isinstance(batch, tuple) else batch
        result = tf.nest.map_structure(lambda t: t.numpy(), infer(images))
        if into is None:
            chunks.append(result)
        else:
            into[done:done + len(result)] = result
        done += int(images.shape[0])
        if progress_label and time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            rate = done / (last_report - start)
            log.info("%s: %s of %s images (%.1f images/s)", progress_label, f"{done:,}",
                     f"{total:,}" if total else "?", rate)
    if into is not None:
        if done != len(into):
            raise ValueError(f"{done} results for {len(into)} rows")
        return into
    if not chunks:
        raise ValueError("no batches to run")
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts, axis=0), *chunks)


def feature_description(config: TrainingConfig, geometry: ImageGeometry,
                        compute_dtype: str = "float32") -> dict:
    """Everything that turns an image file into a pooled feature vector (or, for a spatial
    `config.pooling`, a float16 feature map), for the cache key. A weights file is identified
    by its content, so a replaced file is never mistaken."""
    weights = config.weights_source
    if weights not in ("imagenet", "none"):
        weights = f"sha256:{feature_cache.file_sha256(weights)}"
    description = {"backbone": config.backbone, "alpha": config.alpha, "weights": weights,
                   "input": geometry.to_json(),
                   "preprocessing": BACKBONES[config.backbone].preprocessing,
                   "pooling": "global_average", "alpha_background": ALPHA_BACKGROUND}
    if compute_dtype != "float32":  # float32 keys stay as they were before this field existed
        description["compute_dtype"] = compute_dtype
    if heads.is_spatial(config.pooling):  # maps, never mixed with vectors; every spatial
        description["pooling"] = "none: feature map"  # pooling trains on the same maps
        description["stored_dtype"] = np.dtype(heads.MAP_DTYPE).name
    return description


def decoded_image_store(paths: Sequence[str], geometry: ImageGeometry,
                        config: TrainingConfig) -> PixelStore | None:
    """A PixelStore for `paths` in $TMPDIR when fine-tuning will read the images again and
    they fit both `config.decoded_cache_gb` and the free disk space; else None (decode
    every epoch), with the reason logged."""
    if config.fine_tune_epochs == 0 or config.decoded_cache_gb == 0:
        return None
    shape = (geometry.height, geometry.width, 3)
    needed = PixelStore.bytes_needed(len(paths), shape)
    directory = tempfile.gettempdir()
    free = shutil.disk_usage(directory).free
    gb = 1e9
    if needed > config.decoded_cache_gb * gb:
        log.info("Decoding images every fine-tuning epoch: keeping them decoded would take "
                 "%.1f GB, more than --decoded-cache-gb %g.", needed / gb, config.decoded_cache_gb)
        return None
    if needed + 2 * gb > free:
        log.info("Decoding images every fine-tuning epoch: keeping them decoded would take "
                 "%.1f GB and %s has %.1f GB free (2 GB are left spare).", needed / gb,
                 directory, free / gb)
        return None
    store = PixelStore(paths, shape, lambda path: load_image_array(path, geometry), directory)
    log.info("Keeping decoded images for fine-tuning in %s (%.2f GB; a nameless file, freed "
             "when the run ends however it ends).", store.directory, needed / gb)
    return store


def backbone_features(parts: ModelParts, table: pd.DataFrame, geometry: ImageGeometry,
                      config: TrainingConfig, store: PixelStore | None = None) -> np.ndarray:
    """Pooled backbone features of every image in `table` (which has `path` and
    `image_sha1`), from `config.cache_dir` where present there, computed and added otherwise.
    Images decoded to compute features are also put in `store`."""
    paths = table["path"].tolist()
    if config.cache_dir is None:
        return extract_features(parts, paths, geometry, config.batch_size, store)
    if config.weights_source == "none":
        log.info("Not using --cache-dir: random backbone weights (--weights none) differ per run.")
        return extract_features(parts, paths, geometry, config.batch_size, store)
    try:
        cache = feature_cache.FeatureCache(
            config.cache_dir, feature_description(config, geometry, parts.features.compute_dtype),
            tuple(parts.features.output_shape[1:]),
            heads.MAP_DTYPE if parts.spatial else np.float32)
    except OSError as error:
        raise InputError(f"--cache-dir {config.cache_dir}: cannot be used ({error.strerror or error}); "
                         "choose a folder you can write, or leave the flag out.") from None
    sha1s = table["image_sha1"].tolist()
    features, found = cache.load(sha1s, feature_array(parts, len(sha1s)))
    missing = np.flatnonzero(~found)
    log.info("Feature cache %s: %s of %s images found, %s to compute", cache.directory,
             f"{int(found.sum()):,}", f"{len(sha1s):,}", f"{len(missing):,}")
    if len(missing):
        computed = extract_features(parts, [paths[i] for i in missing], geometry,
                                    config.batch_size, store)
        features[missing] = computed
        try:
            cache.store([sha1s[i] for i in missing], computed)
        except OSError as error:
            log.warning("Could not write to the feature cache %s (%s); training goes on without "
                        "storing these features.", cache.directory, error)
    return features


# Batches per chunk of decoded images in feature extraction: big enough that the backbone
# runs several steps between hand-overs, small enough to keep memory flat (two chunks of 128
# images at 224x384 are 66 MB).
FEATURE_CHUNK_BATCHES = 4


def decoded_chunks(paths: Sequence[str], geometry: ImageGeometry, chunk_size: int,
                   store: PixelStore | None = None):
    """The model inputs of `paths` in order, as uint8 arrays of `chunk_size` images (the last
    may be shorter). While the caller works on one chunk, threads (one fewer than the
    cores, leaving one to the caller) decode the next, so at most two chunks are in memory.
    With `store`, images come from it when it has them and are added to it when it does
    not. A file that cannot be read raises ImageReadError."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    load = store.load if store is not None else (lambda path: load_image_array(path, geometry))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) - 1),
                                                 thread_name_prefix="decode")
    try:
        def submit(first: int) -> list:
            return [pool.submit(load, str(path)) for path in paths[first:first + chunk_size]]

        pending = submit(0)
        for first in range(0, len(paths), chunk_size):
            images = np.stack([future.result() for future in pending])
            pending = submit(first + chunk_size)
            yield images
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def feature_array(parts: ModelParts, count: int) -> np.ndarray:
    """Room for the features of `count` images: float32 vectors, or for a spatial head
    float16 feature maps (heads.feature_map_array: in memory, or a mapped file if large)."""
    shape = tuple(parts.features.output_shape[1:])
    if parts.spatial:
        return heads.feature_map_array(count, shape)
    return np.zeros((count, *shape), np.float32)


def extract_features(parts: ModelParts, paths: Sequence[str], geometry: ImageGeometry,
                     batch_size: int, store: PixelStore | None = None) -> np.ndarray:
    """Backbone features of every image, computed once: (images, feature size), or float16
    feature maps (images, height, width, channels) for a spatial head.

    The backbone runs on in-memory chunks of a few batches while threads decode the next
    chunk (`decoded_chunks`). A `tf.data` pipeline decoding a batch per Python call beside
    the backbone reached only 40-75 % of the in-memory inference rate on 2 CPU cores
    (29 against 69 images/s at 224x384 in one run of bench/train_speed.py); decoding a
    chunk ahead reached 75-79 % in the next run (55-59 against 74 images/s)."""
    start = time.monotonic()
    # Closed on the way out, so that an error or SIGTERM here also stops the decoding threads
    # at once instead of when the generator is garbage-collected.
    with contextlib.closing(decoded_chunks(paths, geometry, FEATURE_CHUNK_BATCHES * batch_size,
                                           store)) as decoded:
        batches = (images[first:first + batch_size] for images in decoded
                   for first in range(0, len(images), batch_size))
        features = run_inference(parts.features, batches, "Computing backbone features",
                                 len(paths), into=feature_array(parts, len(paths)))
    seconds = time.monotonic() - start
    log.info("Computed backbone features of %s images in %.1f s (%.1f images/s)",
             f"{len(paths):,}", seconds, len(paths) / max(seconds, 1e-9))
    return features


# --------------------------------------------------------------------------------------------
# Training


def positive_weights(labels: np.ndarray, scheme: str) -> np.ndarray:
    """Per-symbol weight of a positive frame. 'balanced': negatives / positives of the symbol
    in the training split, clipped to [1, 100]: a symbol visible in 2 % of frames gets 49, so
    its positives weigh as much in the loss as its negatives. 'none': 1."""
    if scheme == "none":
        return np.ones(labels.shape[1], dtype=np.float32)
    positives = np.nansum(labels == 1, axis=0).astype(np.float64)
    negatives = np.nansum(labels == 0, axis=0).astype(np.float64)
    return np.clip(negatives / np.maximum(positives, 1), 1.0, 100.0).astype(np.float32)


def sample_weights(labels: np.ndarray, weight_of_positive: np.ndarray) -> np.ndarray:
    """Per frame and symbol: the positive weight, 1 for a negative, 0 where not annotated."""
    weights = np.where(labels == 1, weight_of_positive[None, :], 1.0)
    return np.where(np.isnan(labels), 0.0, weights).astype(np.float32)


# Seconds between the progress lines of a long epoch when no progress bar is shown (batch jobs).
PROGRESS_LINE_SECONDS = 60.0


def rankable_symbols(labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per symbol, whether its annotated frames (weight above 0) include both positives and
    negatives: the symbols whose average precision says something about a model."""
    rankable = np.zeros(labels.shape[1], bool)
    for j in range(labels.shape[1]):
        positive = labels[weights[:, j] > 0, j] == 1
        rankable[j] = positive.any() and not positive.all()
    return rankable


def validation_macro_ap(labels: np.ndarray, weights: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean average precision over the `rankable_symbols`, on their annotated frames; NaN
    when there are none."""
    values = [evaluation.average_precision(labels[weights[:, j] > 0, j] == 1,
                                           probabilities[weights[:, j] > 0, j])
              for j in np.flatnonzero(rankable_symbols(labels, weights))]
    return float(np.mean(values)) if values else float("nan")


def mean_weighted_crossentropy(targets: np.ndarray, logits: np.ndarray) -> float:
    """`weighted_binary_crossentropy` averaged over frames, in numpy: the training loss."""
    labels, weights = np.split(np.asarray(targets, np.float64), 2, axis=1)
    x = np.asarray(logits, np.float64)
    losses = np.maximum(x, 0) - x * labels + np.log1p(np.exp(-np.abs(x)))
    return float(np.mean(np.sum(losses * weights, axis=1)))


class ValidationScores(keras.callbacks.Callback):
    """Scores the model on the validation frames after every epoch and adds `val_loss` (the
    training loss) and `val_ap` (`validation_macro_ap`) to the epoch's logs, for early
    stopping, the log line, the history and TensorBoard, which come after it.

    Early stopping watches `val_ap` because the weighted loss is the wrong judge on the
    small, imbalanced validation sets our users have: rare symbols' positives weigh up to
    100 each, so the loss rises as soon as the head grows confident, while the ranking that
    average precision measures still improves for many epochs. On 300 photos of
    logodet3k_clothes (45 symbols), the loss was lowest after 2 head epochs (held-out macro
    AP 0.45-0.47) and the validation AP rose with the held-out AP to epoch 25 (0.56-0.59).

    The one pass of inference runs outside any distribution strategy, on every worker over
    all validation frames, so that every worker takes the same early-stopping decision."""

    def __init__(self, batches: Callable[[], Iterable], targets: np.ndarray):
        super().__init__()
        self.batches, self.targets = batches, np.asarray(targets, np.float32)
        self.labels, self.weights = np.split(self.targets, 2, axis=1)
        self.seconds = 0.0
        self._infer = None

    def on_train_begin(self, logs=None):
        self._infer = compiled_inference(self.model)

    def scores(self) -> dict:
        start = time.monotonic()
        logits = run_inference(self._infer, self.batches())
        probabilities = 1 / (1 + np.exp(-logits.astype(np.float64)))
        scores = {"val_loss": mean_weighted_crossentropy(self.targets, logits),
                  "val_ap": validation_macro_ap(self.labels, self.weights, probabilities)}
        self.seconds = time.monotonic() - start
        return scores

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.scores())

    def monitor(self) -> str:
        """What early stopping should watch: val_ap, or val_loss when no symbol has both
        positive and negative validation frames (then average precision says nothing)."""
        return "val_ap" if rankable_symbols(self.labels, self.weights).any() else "val_loss"


class EpochLog(keras.callbacks.Callback):
    """Logs one line per epoch, and a progress line every PROGRESS_LINE_SECONDS within long
    epochs, and collects the history rows of a phase."""

    def __init__(self, phase: str, total_epochs: int, rows: list[dict], steps: int | None = None,
                 validation: ValidationScores | None = None):
        super().__init__()
        self.phase, self.total_epochs, self.rows, self.steps = phase, total_epochs, rows, steps
        self.validation = validation
        self._start = self._last_line = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._last_line = time.monotonic()
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        if now - self._last_line < PROGRESS_LINE_SECONDS or not self.steps:
            return
        self._last_line = now
        done = batch + 1
        left = (now - self._start) / done * (self.steps - done)
        log.info("%s epoch %d/%d: step %s of %s, loss %.4f, about %.0f s left in the epoch",
                 self.phase, self._epoch + 1, self.total_epochs, f"{done:,}", f"{self.steps:,}",
                 float((logs or {}).get("loss", float("nan"))), left)

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        seconds = time.monotonic() - self._start
        # The training steps' time alone is what compares with a raw train_on_batch rate.
        train_seconds = seconds - (self.validation.seconds if self.validation else 0.0)
        # Microseconds: a head epoch's validation pass can take less than a millisecond.
        row = {"phase": self.phase, "epoch": epoch + 1, "seconds": round(seconds, 6),
               "train_seconds": round(train_seconds, 6)}
        row.update({k: float(v) for k, v in sorted(logs.items())})
        self.rows.append(row)
        log.info("%s epoch %d/%d: loss %.4f, val_loss %.4f, val_ap %.4f (%.1f s)", self.phase,
                 epoch + 1, self.total_epochs, logs.get("loss", float("nan")),
                 logs.get("val_loss", float("nan")), logs.get("val_ap", float("nan")), seconds)


def _jit_compile(setting: str):
    return {"auto": "auto", "on": True, "off": False}[setting]


def weighted_binary_crossentropy(labels_and_weights, logits):
    """Sum over symbols of weight x binary cross-entropy, for one frame. `labels_and_weights`
    is the labels and the per-symbol weights side by side, (batch, 2 x symbols)."""
    labels, weights = keras.ops.split(labels_and_weights, 2, axis=-1)
    losses = keras.ops.binary_crossentropy(labels, logits, from_logits=True)
    return keras.ops.sum(losses * weights, axis=-1)


def fused_targets(labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """What `weighted_binary_crossentropy` takes: labels and weights side by side."""
    # An unannotated label (NaN) has weight 0, but NaN x 0 is still NaN: any finite value does.
    return np.concatenate([np.nan_to_num(labels), weights], axis=1).astype(np.float32)


def compile_fused(model: keras.Model, learning_rate: float, xla: str = "auto",
                  steps_per_execution: int = 1) -> None:
    """Compile a model with fused logits (`fused_head`) for training with `fused_targets`.
    `steps_per_execution` steps run in one call of the compiled step; it must divide the
    steps of an epoch, or an execution would run into the next epoch's batches."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=weighted_binary_crossentropy, jit_compile=_jit_compile(xla),
                  steps_per_execution=steps_per_execution)


def fused_head(parts: ModelParts, symbols: Sequence[str], dropout: float) -> keras.Model:
    """A training twin of `parts.head`: the same dropout, then one Dense(symbols) giving
    logits, starting from the per-symbol layers' weights. Both phases train it, and
    `_copy_fused_head` puts its weights back into the named outputs the saved model has.

    With one small Dense per symbol, Keras's per-output bookkeeping (a loss, a weight and a
    metric per output at every step, and a label slice per output in the input pipeline)
    costs far more than the arithmetic: 7 s per head epoch at 45 symbols, and half the
    fine-tuning step rate. One matrix does the same sums in a single op. A spatial head's
    twin is heads.fused_spatial_head: its score map already is one convolution."""
    if parts.spatial:
        return heads.fused_spatial_head(parts.head, parts.pooling, dropout,
                                        tuple(parts.features.output_shape[1:]))
    layers = [parts.head.get_layer(s) for s in symbols]
    inputs = keras.Input(shape=(parts.features.output_shape[-1],), name="features")
    x = keras.layers.Dropout(dropout, dtype="float32")(inputs)
    dense = keras.layers.Dense(len(symbols), name="logits", dtype="float32")
    model = keras.Model(inputs, dense(x), name="fused_head")
    dense.set_weights([np.concatenate([l.get_weights()[0] for l in layers], axis=1),
                       np.concatenate([l.get_weights()[1] for l in layers], axis=0)])
    return model


def _copy_fused_head(fused: keras.Model, parts: ModelParts, symbols: Sequence[str]) -> None:
    if parts.spatial:
        heads.copy_fused_spatial_head(fused, parts.head, parts.pooling)
        return
    kernel, bias = fused.get_layer("logits").get_weights()
    for i, symbol in enumerate(symbols):
        parts.head.get_layer(symbol).set_weights([kernel[:, i:i + 1], bias[i:i + 1]])


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's early stopping, whose counters and best weights a checkpoint saves and restores.
    It keeps the weights of the epoch with the highest `monitor` when that is val_ap, the
    lowest when val_loss (see ValidationScores)."""

    def __init__(self, patience: int, restored: checkpoints.PhaseState | None = None,
                 monitor: str = "val_loss", starting_score: float | None = None):
        """`starting_score`: the monitored value of the weights the phase starts from, which
        then compete with its epochs (best_epoch -1 when none of them beats it)."""
        super().__init__(monitor=monitor, mode="max" if monitor == "val_ap" else "min",
                         patience=patience, restore_best_weights=True)
        self._restored, self._starting_score = restored, starting_score

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._restored is not None:
            for name, value in self._restored.early_stopping.items():
                setattr(self, name, value)
            self.best_weights = self._restored.best_weights
        elif self._starting_score is not None and np.isfinite(self._starting_score):
            self.best, self.best_epoch = float(self._starting_score), -1
            self.best_weights = self.model.get_weights()

    def counters(self) -> dict:
        return {"wait": self.wait, "best": None if self.best is None else float(self.best),
                "best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch}


class TrainingDiverged(InputError):
    """A training or validation loss became NaN or infinite: the weights are worthless, so the
    run stops without writing a model directory. Exit code 2: the user lowers the learning
    rate or fixes the data."""


STEP_LOSS_CHECK_SECONDS = 2.0


class FiniteLossGuard(keras.callbacks.Callback):
    """Raises TrainingDiverged as soon as the training loss of a step, or at an epoch's end
    the epoch's loss, `val_loss` or a trainable weight, is not finite. Listed after
    ValidationScores (whose `val_loss` it checks) and before early stopping and the
    checkpoint, so no diverged epoch is kept or saved."""

    def __init__(self, phase: str, learning_rates: dict[str, float]):
        """`learning_rates`: the flags to advise lowering, most likely culprit first, and
        their values."""
        super().__init__()
        self.phase, self.learning_rates = phase, learning_rates
        self._epoch, self._checked = 0, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._checked = 0.0

    def on_train_batch_end(self, batch, logs=None):
        # Reading a step's loss waits for the device, so it is read at most every few seconds
        # (and the epoch's end checks everything): a long epoch still stops within seconds.
        now = time.monotonic()
        if now - self._checked >= STEP_LOSS_CHECK_SECONDS:
            self._checked = now
            self._check(logs, ("loss",), f"step {batch + 1} of")

    def on_epoch_end(self, epoch, logs=None):
        self._check(logs, ("loss", "val_loss"), "the end of")
        if not all(np.isfinite(keras.ops.convert_to_numpy(v)).all()
                   for v in self.model.trainable_variables):
            self._fail("a trainable weight", "not finite", "the end of")

    def _check(self, logs, keys: Sequence[str], where: str) -> None:
        for key in keys:
            value = (logs or {}).get(key)
            if value is not None and not np.isfinite(float(np.asarray(value))):
                self._fail("the training loss" if key == "loss" else "the validation loss",
                           str(float(np.asarray(value))), where)

    def _fail(self, what: str, value: str, where: str) -> None:
        flags = " or ".join(f"{flag} (now {rate:g})" for flag, rate in self.learning_rates.items())
        raise TrainingDiverged(
            f"Training diverged: {what} became {value} at {where} "
            f"{checkpoints.PHASE_NAMES[self.phase]} epoch {self._epoch + 1}, so no model "
            f"directory was written. The learning rate is probably too high: lower {flags}, "
            "for example to a tenth, and run again. If the loss still diverges, check the "
            "images and the labels (a frame that decodes to noise, a label column that means "
            "something else).")


class EpochCheckpoint(keras.callbacks.Callback):
    """Writes the phase's state to the run's checkpoint at the end of every epoch. Listed after
    early stopping and EpochLog, so the state includes their view of the epoch."""

    def __init__(self, checkpoint: checkpoints.Checkpoint, phase: str, epochs: int,
                 rows: list[dict], early_stopping: ResumableEarlyStopping):
        super().__init__()
        self.checkpoint, self.phase, self.epochs = checkpoint, phase, epochs
        self.rows, self.early_stopping = rows, early_stopping

    def on_epoch_end(self, epoch, logs=None):
        model = self.model
        self.checkpoint.save(checkpoints.PhaseState(
            phase=self.phase, epochs_done=epoch + 1,
            finished=bool(model.stop_training) or epoch + 1 >= self.epochs,
            rows=list(self.rows), early_stopping=self.early_stopping.counters(),
            variables=[np.asarray(v.numpy()) for v in model.variables],
            optimizer=[np.asarray(v.numpy()) for v in model.optimizer.variables],
            best_weights=self.early_stopping.best_weights))


@dataclass
class TrainingRun:
    """Where a run trains and what it resumes: the devices and cluster (`placement`), the
    checkpoint it writes every epoch (None: none), and the state it continues from."""

    placement: distribution.Placement
    checkpoint: checkpoints.Checkpoint | None = None
    resumed: checkpoints.PhaseState | None = None

    def resumed_in(self, phase: str) -> checkpoints.PhaseState | None:
        return self.resumed if self.resumed is not None and self.resumed.phase == phase else None

    def global_batch(self, batch_size: int) -> int:
        return batch_size * self.placement.replicas


def single_device_run() -> TrainingRun:
    """Training on TensorFlow's default device, without a checkpoint: what library callers that
    train one phase by hand (benchmarks, tests) get."""
    return TrainingRun(distribution.Placement(tf.distribute.get_strategy(), 1, 1, 0,
                                              "the default device"))


def _restore_variables(model: keras.Model, state: checkpoints.PhaseState) -> None:
    # Compared by shape, in order: Keras numbers unnamed layers by how many were built before
    # in the process, so a run resumed in fine-tuning names its variables differently.
    shapes = [tuple(v.shape) for v in model.variables]
    if shapes != [tuple(np.shape(value)) for value in state.variables]:
        raise InputError(
            "the checkpoint's model does not match the model this run builds (was the code "
            "or Keras updated since?); pass --no-resume to start over.")
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    for variable, value in zip(model.variables, state.variables):
        variable.assign(value)
    for variable, value in zip(model.optimizer.variables, state.optimizer):
        variable.assign(value)


def _build_for_workers(model: keras.Model, strategy: tf.distribute.Strategy,
                       dataset: tf.data.Dataset) -> None:
    """Build `model`'s state from the shapes of `dataset` before fitting it across workers.

    Keras 3.15 builds a model under a tf.distribute strategy inside fit() by averaging its
    first batch over the replicas with `strategy.reduce`, which MultiWorkerMirroredStrategy
    cannot do for an (images, targets) pair ('unsupported type PerReplica'). Built here from
    shapes alone, fit() and evaluate() are told to skip that step."""
    example = tf.nest.map_structure(
        lambda spec: np.zeros([1, *spec.shape[1:]], spec.dtype.as_numpy_dtype),
        dataset.element_spec)
    with strategy.scope():
        model._symbolic_build(data_batch=example)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None


def fit_phase(model: keras.Model, phase: str, config: TrainingConfig, run: TrainingRun,
              train_data: Callable[[int], tf.data.Dataset], steps: int,
              validation: ValidationScores, rows: list[dict], verbose: int = 0,
              keep_start_unless_beaten: bool = False) -> int:
    """Fit a compiled `model` for one phase, with `validation` scoring every epoch, early
    stopping on its `monitor()`, one log line and one history row per epoch, and a
    checkpoint per epoch. `train_data(first_epoch)` gives the training batches of epochs
    first_epoch onwards, `steps` per epoch. Resumes from `run.resumed` when it is a state of
    this phase, and returns at once when that phase had finished.

    With `keep_start_unless_beaten`, the weights the phase starts from, scored by the best
    row of `rows` so far (the phase before), count as a candidate: when no epoch beats them
    the phase ends with them. Returns the epoch whose weights the model ends with (1 for
    the first), or 0 for the starting weights."""
    epochs = config.epochs if phase == "head" else config.fine_tune_epochs
    resumed = run.resumed_in(phase)
    monitor = validation.monitor()
    if monitor == "val_loss":
        log.warning("No symbol has both visible and not-visible validation frames: early "
                    "stopping in the %s phase watches the validation loss instead of the "
                    "validation average precision.", phase)
    earlier = [row[monitor] for row in rows if np.isfinite(row.get(monitor, np.nan))]
    starting_score = None
    if keep_start_unless_beaten and earlier:
        starting_score = max(earlier) if monitor == "val_ap" else min(earlier)
    patience = config.patience if phase == "head" else config.fine_tune_patience
    early_stopping = ResumableEarlyStopping(patience, resumed, monitor, starting_score)
    first_epoch = 0
    if resumed is not None:
        rows[:] = resumed.rows
        with run.placement.strategy.scope():
            _restore_variables(model, resumed)
        if resumed.finished:
            if resumed.best_weights is not None:
                model.set_weights(resumed.best_weights)
            return int(resumed.early_stopping.get("best_epoch", -1)) + 1
        first_epoch = resumed.epochs_done
    batches = train_data(first_epoch)
    if isinstance(run.placement.strategy, tf.distribute.MultiWorkerMirroredStrategy):
        _build_for_workers(model, run.placement.strategy, batches)
    # Validation first: the callbacks after it read its scores from the epoch's logs.
    # A head phase that trained at too high a rate can leave weights that only overflow in
    # fine-tuning, so both rates are named there.
    rates = {"--fine-tune-learning-rate": config.fine_tune_learning_rate} if phase != "head" else {}
    rates["--learning-rate"] = config.learning_rate
    callbacks = [validation, FiniteLossGuard(phase, rates), early_stopping,
                 EpochLog(phase, epochs, rows, steps, validation)]
    if run.checkpoint is not None and run.checkpoint.writer:
        callbacks.append(EpochCheckpoint(run.checkpoint, phase, epochs, rows, early_stopping))
    if config.tensorboard and run.placement.is_chief:
        # One folder per phase: their epochs both count from 1 and would overwrite each other.
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(config.tensorboard, phase),
                                                     write_graph=False))
    # shuffle=False: the batches come shuffled by epoch_batches.
    model.fit(batches, steps_per_epoch=steps, initial_epoch=first_epoch, epochs=epochs,
              verbose=verbose, callbacks=callbacks, shuffle=False)
    return early_stopping.best_epoch + 1


def train_head(parts: ModelParts, symbols: Sequence[str], config: TrainingConfig,
               train: tuple[np.ndarray, np.ndarray, np.ndarray],
               validation: tuple[np.ndarray, np.ndarray, np.ndarray],
               rows: list[dict], run: TrainingRun | None = None) -> None:
    """Head phase on precomputed features; each tuple is (features, labels, weights).
    Trains `fused_head` and copies its weights into the per-symbol output layers."""
    run = run or single_device_run()
    batch = run.global_batch(config.batch_size)
    steps = math.ceil(len(train[1]) / batch)
    with run.placement.strategy.scope():
        fused = fused_head(parts, symbols, config.dropout)
        # A head step on cached features is a few microseconds of arithmetic and a
        # millisecond of Keras's per-call overhead; running a whole epoch in one compiled call
        # halves the head epochs' time (0.3 s to 0.13 s at 5,000 frames and 45 symbols).
        # Keras 3.15 cannot run several steps per call under MirroredStrategy (an
        # InvalidArgumentError in multi_step_on_iterator), so several replicas keep one.
        compile_fused(fused, config.learning_rate, config.xla,
                      steps_per_execution=steps if run.placement.replicas == 1 else 1)
    targets = fused_targets(train[1], train[2])
    fit_phase(fused, "head", config, run,
              lambda first: feature_dataset(train[0], targets, batch, epoch_batches(
                  len(targets), batch, config.seed, first, config.epochs)),
              steps,
              ValidationScores(lambda: (validation[0][i:i + batch]
                                        for i in range(0, len(validation[0]), batch)),
                               fused_targets(validation[1], validation[2])),
              rows)
    _copy_fused_head(fused, parts, symbols)


def training_model(parts: ModelParts, head: keras.Model, config: TrainingConfig) -> keras.Model:
    """The model that fine-tuning fits: image -> the augmentation layers of `config` ->
    `parts.features` -> `head` (a `fused_head`), sharing the backbone's weights. The
    augmentation acts in training steps only, so validation sees the images as they are,
    and the saved model (`parts.model`) has none."""
    augmenter = augmentation.augmentation_layers(config.augment, config.flip, config.seed)
    inputs = keras.Input(shape=parts.model.input_shape[1:], name="image")
    x = inputs if augmenter is None else augmenter(inputs)
    return keras.Model(inputs, head(parts.features(x)), name="fine_tuning")


def fine_tune(parts: ModelParts, symbols: Sequence[str], config: TrainingConfig,
              geometry: ImageGeometry, train: tuple[list[str], np.ndarray, np.ndarray],
              validation: tuple[list[str], np.ndarray, np.ndarray], rows: list[dict],
              store: PixelStore | None = None, run: TrainingRun | None = None,
              symbol_images: Sequence = ()) -> None:
    """Fine-tuning phase on streamed images; each tuple is (paths, labels, weights).
    `symbol_images` (symbol_paste.SymbolImage) are pasted into training images only."""
    run = run or single_device_run()
    batch = run.global_batch(config.batch_size)
    layers = unfreeze_top(parts.backbone, config.fine_tune_fraction)
    log.info("Fine-tuning the top %d weighted layers of %s at learning rate %g", layers,
             config.backbone, config.fine_tune_learning_rate)
    # XLA is not known to compile the augmentation's image resampling op, so 'auto' leaves
    # an augmented fine-tuning step to TensorFlow's own kernels; --xla on forces it.
    augmented = augmentation.augments(config.augment, config.flip)
    xla = "off" if augmented and config.xla == "auto" else config.xla
    with run.placement.strategy.scope():
        fused = fused_head(parts, symbols, config.dropout)
        model = training_model(parts, fused, config)
        compile_fused(model, config.fine_tune_learning_rate, xla)
    targets = fused_targets(train[1], train[2])
    paster = symbol_paste.paster_for(symbol_images, symbols, config)
    steps = math.ceil(len(targets) / batch)
    # Keras's progress bar writes to standard output: shown only when that is a terminal.
    verbose = 1 if sys.stdout.isatty() and log.isEnabledFor(logging.INFO) else 0
    # The head phase's weights stay unless a fine-tuning epoch scores better on validation:
    # fine-tuning can lower the validation AP (on logodet3k_clothes every one of 5 epochs
    # did, and the held-out AP fell from 0.961 to 0.951 when the best of them was kept).
    kept = fit_phase(model, "fine_tune", config, run,
                     lambda first: symbol_paste.pasting(image_dataset(
                         train[0], geometry, batch, targets=targets, store=store,
                         order=epoch_batches(len(targets), batch, config.seed, first,
                                             config.fine_tune_epochs)), paster, first * steps),
                     steps,
                     ValidationScores(lambda: image_dataset(validation[0], geometry, batch,
                                                            store=store),
                                      fused_targets(validation[1], validation[2])),
                     rows, verbose, keep_start_unless_beaten=True)
    if kept == 0:
        log.info("Fine-tuning did not raise the validation AP above the head phase's; "
                 "keeping the head phase's weights (the backbone as it was pretrained).")
    _copy_fused_head(fused, parts, symbols)
    parts.backbone.trainable = False


# --------------------------------------------------------------------------------------------
# The model directory


CHECKPOINT_FOLDER = "checkpoint"


class ModelDirectory:
    """The model directory being written. Everything goes into a sibling `<name>.partial`,
    renamed into place only when complete, so a failed or interrupted run never leaves a
    directory that looks complete; the run's checkpoint lives in `<name>.partial/checkpoint/`,
    where the next run of the same command finds it. `prepare` takes the run's lock in the
    partial directory (`run_lock`), so two runs never write into it at once; `commit`,
    `discard` and `release` let go of it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.final = Path(output_dir).resolve()
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.checkpoint = self.partial / CHECKPOINT_FOLDER
        self.lock = run_lock.RunLock(self.partial)

    def prepare(self, keep_checkpoint: bool) -> Path:
        """Create the partial directory and take its lock (InputError when another live run
        holds it), then empty it of all but (with `keep_checkpoint`) the checkpoint of an
        earlier run."""
        self.partial.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except run_lock.LockHeld as error:
            raise InputError(str(error)) from None
        ours = output_dir_checks.MODEL_DIRECTORY_ENTRIES | {CHECKPOINT_FOLDER, run_lock.LOCK_FILE}
        foreign = sorted(e.name for e in self.partial.iterdir() if e.name not in ours)
        if foreign:  # a folder of the user's that happens to have this name
            self.release()
            raise InputError(
                f"{self.partial} holds files this tool did not write ({listing(foreign)}). A run writes its "
                "model there before moving it to OUTPUT_MODEL_DIR, and would delete them. Move "
                "them away, or choose another OUTPUT_MODEL_DIR.")
        self._empty(keep_checkpoint)
        return self.partial

    def _empty(self, keep_checkpoint: bool) -> None:
        for entry in self.partial.iterdir():
            if (keep_checkpoint and entry == self.checkpoint) or entry == self.lock.path:
                continue
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def commit(self) -> None:
        """Drop the checkpoint and move the finished directory into place, without the lock."""
        shutil.rmtree(self.checkpoint, ignore_errors=True)
        if os.name == "nt":  # a folder with an open file in it cannot be renamed there
            self.release()
        old = None
        if self.final.exists():
            old = self.final.with_name(f"{self.final.name}.old-{os.getpid()}")
            self.final.rename(old)
        self.partial.rename(self.final)
        # Held through the rename, so no other run can start in the folder meanwhile.
        self.lock.release(moved_to=self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Delete the partial directory and let go of its lock."""
        if not self.lock.held:
            shutil.rmtree(self.partial, ignore_errors=True)
            return
        with contextlib.suppress(OSError):  # the lock goes last: no run starts in a half-empty one
            self._empty(keep_checkpoint=False)
        self.release()
        with contextlib.suppress(OSError):  # not when another run has started in it meanwhile
            self.partial.rmdir()

    def release(self) -> None:
        """Let go of the lock, if this run holds it; safe to call twice."""
        self.lock.release()


def package_versions() -> dict:
    import PIL
    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__, "pandas": pd.__version__,
            "pillow": PIL.__version__}


def data_fingerprint(table: pd.DataFrame, symbols: Sequence[str]) -> str:
    """SHA-256 over every training image's content hash and labels, independent of row order."""
    lines = []
    for sha1, *values in table[["image_sha1", *symbols]].itertuples(index=False, name=None):
        labels = ",".join("nan" if math.isnan(v) else str(int(v)) for v in values)
        lines.append(f"{sha1} {labels}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def finite_json(value):
    """`value` with every NaN or infinity replaced by None: strict JSON readers (browsers, jq)
    reject NaN."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(finite_json(data), indent=2, default=json_default) + "\n",
                    encoding="utf-8")


def write_history(path: Path, rows: list[dict]) -> None:
    columns = ["phase", "epoch", "seconds", "train_seconds"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def save_model(parts: ModelParts, symbols: Sequence[str], directory: Path) -> None:
    """Save an uncompiled inference model, so loading needs no custom loss or optimizer."""
    inference = keras.Model(parts.model.inputs,
                            {s: parts.model.get_layer(s).output for s in symbols},
                            name="symbol_classifier")
    inference.save(directory / MODEL_FILE)


# --------------------------------------------------------------------------------------------
# Loading and prediction


class LoadedModel(NamedTuple):
    model: keras.Model
    metadata: dict


def load_model_dir(path: str | os.PathLike) -> LoadedModel:
    """Load a model directory (safe mode: no code from the file is run) and its metadata,
    checking that they agree. Raises InputError naming the file and the field for a missing,
    empty, truncated or damaged file and for metadata that is invalid or disagrees with the
    model (model_checks)."""
    import model_checks

    directory = Path(path)
    metadata_path, model_path = directory / METADATA_FILE, directory / MODEL_FILE
    if not directory.is_dir():
        raise InputError(f"MODEL_DIR {directory}: no such folder; give a model directory "
                         "written by build_binary_classifier.py or build_multi_hot_model.py.")
    for required in (metadata_path, model_path):
        if not required.is_file():
            raise InputError(f"{directory} is not a model directory: {required.name} is missing.")
    metadata = model_checks.read_metadata(metadata_path)
    model_checks.check_model_file(model_path)
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except MemoryError:
        raise
    except Exception as error:  # Keras raises many types for a file it cannot rebuild
        raise InputError(
            f"{model_path}: cannot be loaded as a Keras model ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). It is damaged, or was not "
            f"written by this tool. {model_checks.RESTORE}.") from None
    outputs = list(model.output.keys()) if isinstance(model.output, dict) else model.output_names
    model_checks.check_against_model(metadata, metadata_path, outputs,
                                     [tuple(tensor.shape) for tensor in model.inputs])
    return LoadedModel(model, metadata)


def decision_thresholds(metadata: dict,
                        override: float | dict[str, float] | None = None) -> dict[str, float]:
    """Each symbol's decision threshold: the one stored at training, unless `override` gives
    one value for all symbols or a value per symbol (the others keep theirs)."""
    symbols = metadata["symbols"]
    stored = metadata.get("thresholds")
    if stored is None:
        log.warning("This model directory stores no decision thresholds (trained by an older "
                    "version); 0.5 is used for every symbol.")
        stored = {}
    thresholds = {s: float(stored.get(s, 0.5)) for s in symbols}
    if override is None:
        return thresholds
    given = {s: override for s in symbols} if isinstance(override, (int, float)) else override
    unknown = sorted(set(given) - set(symbols))
    if unknown:
        raise InputError(f"threshold for {', '.join(unknown)}: the model has no such symbol "
                         f"(its symbols: {', '.join(symbols)}).")
    for symbol, value in given.items():
        try:
            number = float(value) if not isinstance(value, (bool, str)) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not 0 <= number <= 1:
            raise InputError(f"threshold {symbol}={value!r}: a threshold is a probability between "
                             "0 and 1.")
        thresholds[symbol] = number
    return thresholds


def predict_images(model_dir_or_loaded: str | os.PathLike | LoadedModel,
                   paths: Sequence[str | os.PathLike], batch_size: int = 32,
                   thresholds: float | dict[str, float] | None = None) -> pd.DataFrame:
    """Probabilities and decisions per symbol for each image, in the order of `paths`: a table
    with `filename` and, per symbol, `<symbol>_probability` and `<symbol>_visible` (1 where
    the probability is at or above the symbol's threshold: the one stored at training, or
    `thresholds`, one value for all or a value per symbol). Raises ImageReadError naming the
    first unreadable image."""
    loaded = (model_dir_or_loaded if isinstance(model_dir_or_loaded, LoadedModel)
              else load_model_dir(model_dir_or_loaded))
    symbols = loaded.metadata["symbols"]
    cut = decision_thresholds(loaded.metadata, thresholds)
    geometry = ImageGeometry.from_json(loaded.metadata["input"])
    paths = [str(p) for p in paths]
    if not paths:
        return pd.DataFrame({"filename": [], **{f"{s}{suffix}": [] for s in symbols
                                                 for suffix in ("_probability", VISIBLE_SUFFIX)}})
    for path in paths:
        if not os.path.isfile(path):
            raise ImageReadError(path, "file not found")
    try:
        outputs = run_inference(loaded.model, image_dataset(paths, geometry, batch_size))
    except tf.errors.OpError as error:
        # A file that became unreadable surfaces from the tf.data worker as an OpError
        # whose text carries our ImageReadError message; give the user that line only.
        match = re.search(r"ImageReadError: (.*?)(?:\n|$)", str(error))
        if match is None:
            raise
        raise InputError(match.group(1)) from None
    table = pd.DataFrame({"filename": paths})
    for symbol in symbols:
        probability = outputs[symbol][:, 0].astype(np.float64)
        table[f"{symbol}_probability"] = probability
        table[f"{symbol}{VISIBLE_SUFFIX}"] = (probability >= cut[symbol]).astype(int)
    return table


# --------------------------------------------------------------------------------------------
# The whole run


@dataclass
class TrainingResult:
    output_dir: Path
    metrics: dict      # empty on a worker that is not the chief
    seconds: float
    counts: dict
    model: keras.Model  # the trained model in memory, the same weights as the saved one
    written: bool = True  # False on a worker that is not the chief: it writes nothing
    phase_seconds: dict = field(default_factory=dict)
    resumed_from: str | None = None  # where the run continued from a checkpoint, if it did
    exports: dict = field(default_factory=dict)  # format -> path, checked against the model


def split_counts(labels: np.ndarray, is_validation: np.ndarray, symbols: Sequence[str],
                 groups: np.ndarray | None = None) -> dict:
    """Images (and groups), positives and negatives per symbol and split."""
    counts = {}
    for name, mask in (("train", ~is_validation), ("validation", is_validation)):
        part = labels[mask]
        counts[name] = {
            "images": int(mask.sum()),
            "groups": int(len(set(groups[mask]))) if groups is not None else int(mask.sum()),
            "positives": {s: int(np.nansum(part[:, i] == 1)) for i, s in enumerate(symbols)},
            "negatives": {s: int(np.nansum(part[:, i] == 0)) for i, s in enumerate(symbols)},
        }
    return counts


# Fewer validation positives than this make a symbol's validation metrics too noisy to trust.
MIN_VALIDATION_POSITIVES = 10


@dataclass
class PreparedData:
    """Everything decided before training: the readable images and their split."""

    images: LabelledImages         # readable images only, with image_sha1/width/height columns
    is_validation: np.ndarray      # bool per row of images.table
    counts: dict                   # split_counts plus "listed", "unreadable", "grouping"
    unreadable: list[tuple[str, str]]  # (path, reason) of skipped files
    config: TrainingConfig
    groups: np.ndarray | None = None  # the split's group per row; None: frame by frame
    symbol_images: tuple = ()  # symbol_paste.SymbolImage of each --symbol-image, decoded

    def split_table(self) -> pd.DataFrame:
        """split.csv: filename, group and split of every readable frame, in table order."""
        filenames = self.images.table["filename"].astype(str).to_numpy()
        return pd.DataFrame({
            "filename": filenames,
            "group": self.groups if self.groups is not None else filenames,
            "split": np.where(self.is_validation, "validation", "train")})


def prepare_training_data(images: LabelledImages, config: TrainingConfig,
                          is_validation: np.ndarray | None = None) -> PreparedData:
    """Scan the images, drop unreadable ones, check every symbol can be learned, and split
    (unless `is_validation`, one bool per row of `images.table`, gives the split).

    This is everything before training, and all that `--dry-run` does."""
    start = time.monotonic()
    scan = scan_images(images.table["path"].tolist())
    log.info("Checked %s images in %.1f s: %s unreadable", f"{len(images.table):,}",
             time.monotonic() - start, f"{len(scan.errors):,}")
    readable = drop_unreadable(images, scan, config.max_unreadable)
    identical, identical_counts = check_identical_content(readable)
    check_learnable(readable)
    symbol_images = symbol_paste.load_symbol_images(config.symbol_images, readable.symbols)
    labels = readable.labels()
    grouping = frame_groups(readable, config.group_by)
    groups = grouping.groups
    given_split = is_validation is not None
    if is_validation is None:
        # Copies of one picture are one group, so that validation never scores a copy of a
        # training frame; with no copies this is `groups` itself.
        split_by = duplicates.split_groups(groups, readable.table["image_sha1"])
        is_validation = split_train_validation(labels, config.validation_split, config.seed,
                                               split_by)
        n_groups = len(set(split_by)) if split_by is not None else len(labels)
        for name, mask in (("training", ~is_validation), ("validation", is_validation)):
            if not mask.any():
                raise InputError(
                    f"the split by {grouping.description} leaves no {name} images: there are "
                    f"too few groups ({n_groups:,}). Choose a finer --group-by, or "
                    "--group-by none.")
        share = is_validation.mean()
        if groups is not None and not (0.5 <= share / config.validation_split <= 2):
            # Few, large groups cannot be cut to the asked share; keeping every symbol
            # validated wins, and the user should know what it cost.
            log.warning("The split by %s puts %.0f %% of the frames in validation, not the "
                        "%.0f %% asked for by --validation-split: the groups are large next to "
                        "the data (%s groups). A finer --group-by or more labelled episodes "
                        "gives a closer split.", grouping.description, 100 * share,
                        100 * config.validation_split, f"{len(set(groups)):,}")
    else:
        if len(is_validation) != len(images.table):
            raise ValueError(f"is_validation has {len(is_validation)} values for "
                             f"{len(images.table)} images")
        is_validation = np.asarray(is_validation, bool)[scan.readable]
        for name, mask in (("training", ~is_validation), ("validation", is_validation)):
            if not mask.any():
                raise InputError(f"the given split has no readable {name} images.")
        names = readable.table["filename"].astype(str).to_numpy()
        copies, warning = duplicates.copies_across_split(identical, is_validation, names)
        identical_counts["validation_copies_of_training"] = copies
        if warning:
            log.warning("%s", warning)
        if groups is not None:
            both = set(groups[is_validation]) & set(groups[~is_validation])
            if both:
                log.warning("%s groups (by %s) have frames in both training and the given "
                            "validation set, for example %r: their validation scores will "
                            "flatter the model.", f"{len(both):,}", grouping.description,
                            sorted(both)[0])
    counts = split_counts(labels, is_validation, readable.symbols, groups)
    counts["listed"] = len(images.table)
    counts["unreadable"] = len(scan.errors)
    counts["grouping"] = grouping.description
    counts["validation_set"] = "given" if given_split else "split"
    counts["identical_content"] = identical_counts
    if groups is None:
        log.info("Split frame by frame: grouping %s.", grouping.description)
    else:
        log.info("Split grouped by %s.", grouping.description)
    for split in ("train", "validation"):
        log.info("%s: %s images%s; positives %s", split.capitalize(),
                 f"{counts[split]['images']:,}",
                 f" in {counts[split]['groups']:,} groups" if groups is not None else "",
                 ", ".join(f"{s} {counts[split]['positives'][s]}" for s in readable.symbols))
    if groups is None:
        looks = [look for look, ok in zip(scan.look, scan.readable) if ok]
        duplicated = int(near_duplicates(looks, is_validation).sum())
        counts["validation"]["near_duplicates_in_train"] = duplicated
        share = duplicated / max(1, int(is_validation.sum()))
        (log.warning if share > NEAR_DUPLICATE_WARNING_SHARE else log.info)(
            "%s of %s validation frames (%.0f %%) look nearly identical to a training frame "
            "(perceptual hash within %d bits)%s", f"{duplicated:,}",
            f"{int(is_validation.sum()):,}", 100 * share, NEAR_DUPLICATE_BITS,
            ": validation scores will flatter the model on new episodes. Keep shots and "
            "episodes together with --group-by (a CSV column, 'folder', or a file-name pattern "
            "such as 'ep(\\d+)_')." if share > NEAR_DUPLICATE_WARNING_SHARE else ".")
    few = {s: n for s, n in counts["validation"]["positives"].items() if n < MIN_VALIDATION_POSITIVES}
    if few:
        log.warning(
            "Fewer than %d positives in validation for %s: their validation metrics are noisy "
            "(one frame moves recall by 10 %% or more). Label more frames that show them.",
            MIN_VALIDATION_POSITIVES, ", ".join(f"{s} ({n})" for s, n in few.items()))
    return PreparedData(readable, is_validation, counts, list(scan.errors), config, groups,
                        symbol_images)


def format_data_summary(prepared: PreparedData, shown_unreadable: int = 20) -> str:
    """A plain-text table of images, positives and negatives per symbol and split."""
    counts, symbols = prepared.counts, prepared.images.symbols
    total = counts["train"]["images"] + counts["validation"]["images"]
    lines = [
        f"Images: {counts['listed']:,} listed, {total:,} readable, {counts['unreadable']:,} skipped "
        f"as unreadable.",
        f"Split: {counts['train']['images']:,} train, {counts['validation']['images']:,} validation "
        + ("(the given validation set)." if counts.get("validation_set") == "given" else
           f"(--validation-split {prepared.config.validation_split}, --seed {prepared.config.seed})."),
    ]
    if prepared.groups is not None:
        lines.append(f"Grouped by {counts['grouping']}: {counts['train']['groups']:,} groups in "
                     f"train, {counts['validation']['groups']:,} in validation; no group is in both.")
    else:
        lines.append(f"Frames split one by one ({counts['grouping']}); "
                     f"{counts['validation'].get('near_duplicates_in_train', 0):,} validation frames "
                     "look nearly identical to a training frame.")
    lines.append("")
    width = max(len("symbol"), *(len(s) for s in symbols))
    head = (f"{'symbol':<{width}}  {'positives':>9}  {'share':>6}  {'train':>6}  {'valid':>6}  "
            f"{'negatives':>9}  {'train':>6}  {'valid':>6}")
    lines += [head, "-" * len(head)]
    for s in symbols:
        tp, vp = counts["train"]["positives"][s], counts["validation"]["positives"][s]
        tn, vn = counts["train"]["negatives"][s], counts["validation"]["negatives"][s]
        share = (tp + vp) / max(1, tp + vp + tn + vn)
        flag = "  <- few validation positives" if vp < MIN_VALIDATION_POSITIVES else ""
        lines.append(f"{s:<{width}}  {tp + vp:>9,}  {share:>6.1%}  {tp:>6,}  {vp:>6,}  "
                     f"{tn + vn:>9,}  {tn:>6,}  {vn:>6,}{flag}")
    if prepared.unreadable:
        lines += ["", "Skipped (unreadable):"]
        lines += [f"  {printable(path)}: {reason}"
                  for path, reason in prepared.unreadable[:shown_unreadable]]
        if len(prepared.unreadable) > shown_unreadable:
            lines.append(f"  ... and {len(prepared.unreadable) - shown_unreadable:,} more")
    return "\n".join(lines)


def mixed_precision_enabled(setting: str) -> bool:
    """Whether --mixed-precision `setting` means float16 compute on this machine."""
    if setting != "auto":
        return setting == "on"
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return False
    for gpu in gpus:
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if not capability or tuple(capability) < (7, 0):
            return False
    return True


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


def _train_phases(images: LabelledImages, config: TrainingConfig, geometry: ImageGeometry,
                  is_validation: np.ndarray, weight_of_positive: np.ndarray,
                  store: PixelStore | None, run: TrainingRun):
    """Build the model, extract features, train the head and fine-tune, continuing from
    `run.resumed` where a phase was under way; returns the model parts, the history rows and
    the seconds per phase of this run."""
    symbols, labels = images.symbols, images.labels()
    with run.placement.strategy.scope():
        parts = build_model(symbols, config, geometry)
    paths = images.table["path"].tolist()
    if config.weights_source == "none":
        sample = [paths[i] for i in np.flatnonzero(~is_validation)[:64]]
        calibrate_batchnorm(parts, np.stack([load_image_array(p, geometry) for p in sample]))
        log.warning("Random backbone weights (--weights none): fine for tests and demos, far "
                    "less accurate than --weights imagenet on real frames.")
    phase_seconds = {}
    weights = sample_weights(labels, weight_of_positive)
    train_idx, val_idx = np.flatnonzero(~is_validation), np.flatnonzero(is_validation)
    rows: list[dict] = []
    if run.resumed_in("fine_tune") is None:  # the head phase, or its end state, is still needed
        t = time.monotonic()
        features = run.checkpoint.features() if run.checkpoint is not None else None
        expected = (len(paths), *parts.features.output_shape[1:])
        if features is None or features.shape != expected:
            features = backbone_features(parts, images.table, geometry, config, store)
            if run.checkpoint is not None:
                run.checkpoint.save_features(features)
        phase_seconds["features"] = time.monotonic() - t
        t = time.monotonic()
        take = heads.take_rows if parts.spatial else (lambda array, rows: array[rows])
        train_head(parts, symbols, config,
                   (take(features, train_idx), labels[train_idx], weights[train_idx]),
                   (take(features, val_idx), labels[val_idx], weights[val_idx]), rows, run)
        phase_seconds["head"] = time.monotonic() - t
    if config.fine_tune_epochs > 0:
        t = time.monotonic()
        fine_tune(parts, symbols, config, geometry,
                  ([paths[i] for i in train_idx], labels[train_idx], weights[train_idx]),
                  ([paths[i] for i in val_idx], labels[val_idx], weights[val_idx]), rows, store,
                  run, symbol_images=symbol_paste.load_symbol_images(config.symbol_images,
                                                                     symbols))
        phase_seconds["fine_tune"] = time.monotonic() - t
    return parts, rows, phase_seconds


# Settings that change where or how fast a run goes, or only what happens after training
# (--threshold-for), not what it trains: a checkpoint made with other values of these is
# resumed all the same. The device count is compared instead of --devices, and mixed precision
# as it was resolved.
SETTINGS_NOT_IN_RUN_KEY = frozenset({"tensorboard", "cache_dir", "decoded_cache_gb", "devices",
                                     "mixed_precision", "threshold_for"})


def run_key(prepared: PreparedData, geometry: ImageGeometry, mixed: bool,
            placement: distribution.Placement) -> dict:
    """What makes two runs the same run, for resuming: a checkpoint is only continued by a
    run whose key is equal."""
    config = prepared.config
    split = prepared.split_table().to_csv(index=False).encode(**CSV_FILE_NAMES)
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if k not in SETTINGS_NOT_IN_RUN_KEY}
    if settings["pooling"] == "avg":  # as before --pooling existed: older checkpoints resume
        del settings["pooling"]
    if settings["symbol_images"]:  # the images' content, not only their paths
        settings["symbol_images"] = [[i.symbol, i.path, i.sha1] for i in prepared.symbol_images]
    else:  # as before --symbol-image existed
        del settings["symbol_images"], settings["symbol_image_rate"], settings["symbol_image_size"]
    return {
        "settings": settings,
        "mixed_precision": mixed, "replicas": placement.replicas,
        "symbols": list(prepared.images.symbols), "input": geometry.to_json(),
        "data_sha256": data_fingerprint(prepared.images.table, prepared.images.symbols),
        "split_sha256": hashlib.sha256(split).hexdigest(),
        # Checkpoints of versions whose early stopping watched the validation loss hold
        # counters that mean something else.
        "early_stopping": "val_ap",
    }


def _open_checkpoint(directory: ModelDirectory, key: dict, placement: distribution.Placement,
                     resume: bool) -> TrainingRun:
    if placement.is_chief:
        directory.prepare(keep_checkpoint=resume)
    checkpoint = checkpoints.Checkpoint(directory.checkpoint, key, writer=placement.is_chief)
    try:
        resumed = checkpoint.open(resume)
    except checkpoints.RunMismatch as error:
        shown = "; ".join(error.differences[:3]) + ("; ..." if len(error.differences) > 3 else "")
        raise InputError(
            f"{directory.partial} holds the checkpoint of an unfinished run with other settings "
            f"or data ({shown}). Run the command that started it to continue it, or pass "
            "--no-resume to start this one over (its checkpoint is then deleted).") from None
    if resumed is not None:
        log.info("Resuming from the checkpoint in %s: %s. (--no-resume starts over.)",
                 directory.checkpoint, checkpoint.progress(resumed))
    return TrainingRun(placement, checkpoint, resumed)


def _resume_hint(directory: ModelDirectory, run: TrainingRun) -> str:
    """What a rerun would continue from, for the user; empty when there is nothing to keep."""
    try:
        state = run.checkpoint.latest()
    except checkpoints.RunMismatch:
        return ""
    if state is None and run.checkpoint.features() is None:
        return ""
    done = run.checkpoint.progress(state)
    return (f"The checkpoint in {directory.checkpoint} keeps the backbone features and the "
            f"completed epochs ({done}); run the same command again to continue from there, or "
            "add --no-resume to start over.")


def check_output_outside_images(output_dir: str | os.PathLike, images: LabelledImages,
                                config: TrainingConfig) -> None:
    """Refuse an output folder that is, contains or lies inside a folder of the images, the
    feature cache or the TensorBoard logs (the scripts check the paths the user typed first;
    this also covers callers of the library)."""
    folders = sorted({os.path.dirname(path) for path in images.table["path"]})
    output_dir_checks.check_outside_inputs(output_dir, [
        ("--cache-dir", config.cache_dir), ("--tensorboard", config.tensorboard),
        *(("the image folder", folder) for folder in folders)])


@run_warnings.collected  # the report and metrics.json show every warning of the run
def train_and_save(images: LabelledImages, config: TrainingConfig,
                   output_dir: str | os.PathLike, *, overwrite: bool = False,
                   is_validation: np.ndarray | None = None, resume: bool = True,
                   exports: Sequence[str] = ()) -> TrainingResult:
    """Train on `images` with `config` and write the model directory; the whole pipeline.
    `is_validation` (one bool per row of `images.table`) replaces the seeded split. With
    `resume`, a checkpoint left by an interrupted run of the same settings and data is
    continued; otherwise it is deleted. `exports` ('saved_model', 'tflite') are written into
    the model directory and checked against the Keras model."""
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    check_output_outside_images(output_dir, images, config)
    check_output_dir(output_dir, overwrite)
    for name in exports:
        if name not in EXPORT_FORMATS:
            raise InputError(f"--export {name!r}: choose from {', '.join(EXPORT_FORMATS)}.")
    try:
        placement = distribution.placement(distribution.DeviceChoice.parse(config.devices))
    except ValueError as error:
        raise InputError(f"--devices {config.devices!r}: {error}.") from None
    log.info("Training on %s; global batch %d (--batch-size %d per device).",
             placement.description, config.batch_size * placement.replicas, config.batch_size)
    prepared = prepare_training_data(images, config, is_validation)
    images, is_validation, counts = prepared.images, prepared.is_validation, prepared.counts
    symbols = images.symbols
    labels = images.labels()
    geometry = input_geometry(config.image_size, config.resize,
                              list(zip(images.table["image_width"], images.table["image_height"])))
    log.info("Model input: %dx%d pixels (width x height), %s.", geometry.width, geometry.height,
             config.resize)

    mixed = mixed_precision_enabled(config.mixed_precision)
    log.info("Mixed precision (float16 compute): %s; XLA: %s.", "on" if mixed else "off",
             config.xla)
    keras.utils.set_random_seed(config.seed)
    paths = images.table["path"].tolist()
    val_idx = np.flatnonzero(is_validation)
    weight_of_positive = positive_weights(labels[~is_validation], config.positive_weighting)
    directory = ModelDirectory(output_dir)
    run = None
    try:
        key = run_key(prepared, geometry, mixed, placement)
        run = _open_checkpoint(directory, key, placement, resume)
        store = decoded_image_store(paths, geometry, config)
        try:
            with dtype_policy("mixed_float16" if mixed else "float32"):
                parts, rows, phase_seconds = _train_phases(images, config, geometry,
                                                           is_validation, weight_of_positive,
                                                           store, run)
            if mixed:
                parts = float32_twin(parts, symbols, config, geometry)
            if not placement.is_chief:
                log.info("Worker %d is done; worker 0 writes the model directory.",
                         placement.worker_index)
                return TrainingResult(Path(output_dir), {}, time.monotonic() - started, counts,
                                      parts.model, written=False, phase_seconds=phase_seconds)
            # Scored with the model as saved, so metrics.json describes the file users get.
            outputs = run_inference(parts.model, image_dataset(
                [paths[i] for i in val_idx], geometry, config.batch_size, store=store))
        finally:
            if store is not None:
                store.close()
        probabilities = np.concatenate([outputs[s] for s in symbols], axis=1)
        split_table = prepared.split_table()
        validation_labels = labels[val_idx]
        grouped = prepared.groups is not None
        thresholds = evaluation.choose_thresholds(
            validation_labels, probabilities, symbols,
            evaluation.parse_threshold_rule(config.threshold_for),
            prepared.groups[val_idx] if grouped else None)
        metrics = evaluation.evaluation_metrics(
            validation_labels, probabilities, symbols, thresholds,
            prepared.groups[val_idx] if grouped else None, seed=config.seed,
            group_name=f"groups, by {counts['grouping']}" if grouped else
            "frames one by one (the split was not grouped, so the intervals are too narrow "
            "where neighbouring frames are near-identical)")
        evaluation_table = evaluation.evaluation_table(
            images.table["filename"].to_numpy()[val_idx], split_table["group"].to_numpy()[val_idx],
            validation_labels, probabilities, symbols, thresholds)
        resumed_from = run.checkpoint.progress(run.resumed) if run.resumed is not None else None
        metadata = {
            "format_version": MODEL_FORMAT_VERSION,
            "symbols": list(symbols),
            "outputs": {s: {"activation": "sigmoid", "meaning": f"probability that {s} is visible"}
                        for s in symbols},
            "input": {**geometry.to_json(), "channels": 3, "color": "RGB", "dtype": "uint8",
                      "value_range": [0, 255], "alpha_background": ALPHA_BACKGROUND,
                      "exif_orientation": "applied"},
            "backbone": {"name": config.backbone, "alpha": config.alpha,
                         "weights": config.weights_source,
                         "preprocessing": BACKBONES[config.backbone].preprocessing},
            "training": {"config": dataclasses.asdict(config),
                         "positive_weights": dict(zip(symbols, map(float, weight_of_positive))),
                         "phase_seconds": phase_seconds, "started_at": started_at,
                         "mixed_precision": mixed, "devices": placement.description,
                         "replicas": placement.replicas,
                         "global_batch_size": config.batch_size * placement.replicas,
                         "resumed_from": resumed_from},
            # Decision thresholds, `probability >= threshold` meaning visible, from the
            # validation set by `threshold_rule`; predict_images applies them.
            "thresholds": {s: thresholds[s].threshold for s in symbols},
            # --symbol-image: what fine-tuning pasted into training frames (never validation).
            "symbol_images": symbol_paste.description(prepared.symbol_images, config),
            "threshold_rule": config.threshold_for,
            "data": {"source": images.source, "details": images.details, "counts": counts,
                     "fingerprint_sha256": key["data_sha256"]},
            "packages": package_versions(),
        }
        partial = directory.partial
        save_model(parts, symbols, partial)
        exported = {}
        if exports:
            import export  # TensorFlow's exporters load only for runs that ask for them
            exported = export.export_and_check(
                partial, parts.model, symbols, geometry, list(exports),
                [paths[i] for i in val_idx[:8]])
            metadata["exports"] = {name: str(path.relative_to(partial))
                                   for name, path in exported.items()}
        write_history(partial / HISTORY_FILE, rows)
        write_json(partial / METADATA_FILE, metadata)
        # A file name that is not UTF-8 (Linux allows any bytes) is written byte for byte.
        split_table.to_csv(partial / SPLIT_FILE, index=False, **CSV_FILE_NAMES)
        evaluation_table.to_csv(partial / EVALUATION_FILE, index=False, **CSV_FILE_NAMES)
        report.write_report(partial, model_name=Path(output_dir).name, metadata=metadata,
                            metrics=metrics, history=pd.DataFrame(rows), table=evaluation_table,
                            paths=[paths[i] for i in val_idx], warnings=run_warnings.current(),
                            model=parts.model)
        metrics["warnings"] = list(run_warnings.current())  # the report's own included
        write_json(partial / METRICS_FILE, metrics)
        directory.commit()
    except BaseException as error:  # an error, Ctrl-C, SIGTERM: keep what a rerun continues from
        if placement.is_chief and run is not None:
            # A rerun of a diverged run would diverge again, and one with a lower learning
            # rate cannot continue its checkpoint: nothing of it is kept.
            hint = "" if isinstance(error, TrainingDiverged) else _resume_hint(directory, run)
            if hint:
                directory.prepare(keep_checkpoint=True)  # only the checkpoint stays
                log.warning("%s", hint)
            else:
                directory.discard()
        raise
    finally:
        directory.release()
    seconds = time.monotonic() - started
    return TrainingResult(Path(output_dir), metrics, seconds, counts, parts.model,
                          phase_seconds=phase_seconds, resumed_from=resumed_from,
                          exports={k: Path(output_dir) / v.relative_to(directory.partial)
                                   for k, v in exported.items()})


@dataclass
class CommandOutcome:
    """What a training command reports: a summary for people, and the record that --json
    prints as one line."""

    summary: str
    record: dict


def _metrics_record(metrics: dict) -> dict:
    """The numbers of metrics.json that fit on one line: macro figures and, per symbol, its
    scalar metrics and threshold."""
    def scalars(values: dict) -> dict:
        return {k: v for k, v in values.items() if isinstance(v, (int, float, str)) or v is None}
    return {"macro": scalars(metrics.get("macro", {})),
            "symbols": {s: scalars(v) for s, v in metrics.get("symbols", {}).items()}}


def check_or_train(images: LabelledImages, config: TrainingConfig, output_dir: str | os.PathLike,
                   *, overwrite: bool = False, dry_run: bool = False,
                   is_validation: np.ndarray | None = None, resume: bool = True,
                   exports: Sequence[str] = ()) -> CommandOutcome:
    """What both scripts do once they have their labelled images: with `dry_run`, every check
    before training and the data summary; otherwise train, save, and summarise the metrics."""
    if dry_run:
        # An existing model directory is only a note here: dry runs are repeated after every
        # labelling session next to the model trained last time.
        if Path(output_dir).exists() and not Path(output_dir).is_dir():
            raise InputError(f"OUTPUT_MODEL_DIR {output_dir} is a file; give a directory path.")
        check_output_outside_images(output_dir, images, config)
        output_note = ""
        try:
            check_output_dir(output_dir, overwrite, create_parent=False)
        except InputError as error:
            output_note = f"\nNote: {error}"
        prepared = prepare_training_data(images, config, is_validation)
        counts = prepared.counts
        return CommandOutcome(
            "Dry run: all checks of the data passed; no model was trained." + output_note
            + "\n" + format_data_summary(prepared),
            {"status": "ok", "exit_code": 0, "dry_run": True,
             "images": {k: counts[k]["images"] for k in ("train", "validation")},
             "unreadable": counts["unreadable"]})
    result = train_and_save(images, config, output_dir, overwrite=overwrite,
                            is_validation=is_validation, resume=resume, exports=exports)
    record = {"status": "ok", "exit_code": 0,
              "model_dir": str(Path(result.output_dir).resolve()), "written": result.written,
              "resumed_from": result.resumed_from,
              "images": {k: result.counts[k]["images"] for k in ("train", "validation")},
              "seconds": {"total": round(result.seconds, 3),
                          **{k: round(v, 3) for k, v in result.phase_seconds.items()}},
              "metrics": _metrics_record(result.metrics),
              "exports": {k: str(Path(v).resolve()) for k, v in result.exports.items()}}
    if not result.written:
        return CommandOutcome(f"Training finished on this worker in {result.seconds:.0f} s; "
                              f"the chief (worker 0) writes {result.output_dir}.", record)
    bootstrap = result.metrics["bootstrap"]
    return CommandOutcome(
        f"Validation metrics (thresholds chosen by --threshold-for {config.threshold_for}; "
        f"95 % intervals from {bootstrap['replicates']:,} bootstrap resamples of "
        f"{bootstrap['resampled'].split(' (')[0]}):\n"
        f"{evaluation.format_metrics_summary(result.metrics)}\n"
        f"Wrote {result.output_dir} in {result.seconds:.0f} s; open "
        f"{Path(result.output_dir) / report.REPORT_FILE} for curves and the frames it gets wrong.",
        record)


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
