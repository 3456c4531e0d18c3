"""Running a trained model over new frames: every kind of input (images, folders, lists,
globs, videos) expanded into one stream of frames, decoded in parallel ahead of the model,
classified in batches by a compiled inference function, and written row by row, so memory
stays flat however many frames there are.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import glob
import json
import logging
import os
import queue
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TextIO

import numpy as np

from symbol_trainer.csv_rows import read_csv_rows
from symbol_trainer.datasets import compiled_inference
from symbol_trainer.errors import ImageReadError, InputError
from symbol_trainer.images import (
    IMAGE_EXTENSIONS, ImageGeometry, find_images, resize_to_geometry)
from symbol_trainer.labels_csv import VISIBLE_SUFFIX
from symbol_trainer.model_dir import LoadedModel, decision_thresholds
from symbol_trainer.output_dir import file_identity, within
from symbol_trainer.errors import printable  # noqa: F401  (prediction.printable: what outputs write)
from symbol_trainer import decoding
from symbol_trainer import heatmaps
from symbol_trainer import video

log = logging.getLogger(__name__)

LIST_EXTENSIONS = frozenset({".txt", ".csv", ".lst"})
GLOB_CHARACTERS = frozenset("*?[")
# Batches decoded ahead of the model: enough to hide a slow image, few enough that memory
# stays a few batches of pixels.
BATCHES_AHEAD = 3
SAVED_FRAME_QUALITY = 95


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class ImageInput:
    path: str      # where to read it
    filename: str  # what the output calls it


@dataclass(frozen=True)
class VideoInput:
    path: str
    name: str      # the `video` column, and the folder of its saved frames


@dataclass
class Inputs:
    """The checked inputs, in order: runs of images, and videos."""

    sources: list[list[ImageInput] | VideoInput] = field(default_factory=list)
    images: int = 0
    videos: list[VideoInput] = field(default_factory=list)

    def add_images(self, items: list[ImageInput]) -> None:
        # Consecutive images form one stream, so that they decode in parallel.
        if self.sources and isinstance(self.sources[-1], list):
            self.sources[-1].extend(items)
        else:
            self.sources.append(list(items))
        self.images += len(items)

    def add_video(self, item: VideoInput) -> None:
        self.sources.append(item)
        self.videos.append(item)


def _posix(path: str | os.PathLike) -> str:
    return Path(path).as_posix()


def _name_for(path: Path, base: Path | None, given: str) -> str:
    """The output's filename: relative to `base` when the image is below it, else as given."""
    if base is not None:
        try:
            return _posix(path.resolve().relative_to(base.resolve()))
        except ValueError:
            pass
    return _posix(given)


def _listed_paths(list_path: Path) -> list[str]:
    """The image paths a .txt (one per line, # comments) or .csv (a `filename` column) lists."""
    if list_path.suffix.lower() == ".csv":
        header, rows, _ = read_csv_rows(list_path)
        columns = [h.strip().lower() for h in header]
        if "filename" not in columns:
            raise _input_error(
                f"{list_path}: a CSV of inputs needs a 'filename' column (its columns: "
                f"{', '.join(header)}).")
        column = columns.index("filename")
        return [values[column].strip() for _, values in rows
                if column < len(values) and values[column].strip()]
    try:
        text = list_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _input_error(f"{list_path}: not a UTF-8 text file of paths.") from None
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


_ESCAPED_BYTE = re.compile(r"\\x([89a-fA-F][0-9a-fA-F])")


def unescaped(name: str) -> str:
    """The file name that `printable` wrote as `name`: each \\xNN (NN from 80 to ff, the
    bytes that are never valid UTF-8 alone) back to that byte."""
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), name)


def _input_error(message: str) -> InputError:
    """An InputError whose message names files as the output does (see `printable`)."""
    return InputError(printable(message))


def _listed_file(root: Path, name: str) -> str:
    """Where a list's `name` is: as written, or, for a name with \\xNN escapes that is not
    there, the file whose name has those bytes (a predictions CSV read back as a list)."""
    path = root / name
    if _ESCAPED_BYTE.search(name) and not os.path.lexists(path):
        original = root / unescaped(name)
        if os.path.lexists(original):
            return str(original)
    return str(path)


def _warn_about_undecodable_names(inputs: Inputs) -> None:
    names = [item.filename for source in inputs.sources if isinstance(source, list)
             for item in source] + [item.name for item in inputs.videos]
    odd = [name for name in names if printable(name) != name]
    if odd:
        log.warning("%s input name(s) are not valid UTF-8, e.g. %s: they are predicted, and "
                    "the output writes each byte that is not UTF-8 as \\xNN (a list INPUT "
                    "with such names is read back the same way). Rename them to UTF-8 (for "
                    "example with convmv) to use them in other programs.",
                    f"{len(odd):,}", printable(odd[0]))


def collect_inputs(arguments: Sequence[str], image_dir: str | None = None) -> Inputs:
    """Check every INPUT before any work and return them in order. An INPUT is an image, a
    video, a folder (searched recursively for images), a .txt/.csv list of image paths
    (relative ones resolved against `image_dir`, else the list's folder), or a glob pattern.
    Raises InputError naming the first INPUT that is none of these."""
    base = Path(image_dir) if image_dir else None
    if base is not None and not base.is_dir():
        raise _input_error(f"--image-dir {image_dir}: no such folder.")
    inputs = Inputs()


    for argument in arguments:
        path = Path(argument)
        suffix = path.suffix.lower()
        if path.is_dir():
            found = find_images(path)
            if not found:
                raise _input_error(f"INPUT {argument}: no images found in this folder "
                                        f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}).")
            inputs.add_images([ImageInput(str(p), _name_for(p, base or path, str(p))) for p in found])
        elif path.is_file() and suffix in IMAGE_EXTENSIONS:
            inputs.add_images([ImageInput(str(path), _name_for(path, base, argument))])
        elif path.is_file() and suffix in video.VIDEO_EXTENSIONS:
            inputs.add_video(VideoInput(str(path), path.stem))
        elif path.is_file() and suffix in LIST_EXTENSIONS:
            listed = _listed_paths(path)
            if not listed:
                raise _input_error(f"INPUT {argument}: the list names no images.")
            root = base or path.parent
            inputs.add_images([ImageInput(_listed_file(root, p), _name_for(root / p, base, p)
                                          if base else _posix(p)) for p in listed])
        elif path.is_file():
            raise _input_error(
                f"INPUT {argument}: not an image ({', '.join(sorted(IMAGE_EXTENSIONS))}), "
                f"a video ({', '.join(sorted(video.VIDEO_EXTENSIONS))}) or a list of paths "
                "(.txt, .csv).")
        elif GLOB_CHARACTERS & set(argument):
            matches = [m for m in sorted(Path(m) for m in glob.glob(argument, recursive=True))
                       if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS | video.VIDEO_EXTENSIONS]
            if not matches:
                raise _input_error(f"INPUT {argument}: the pattern matches no image or video.")
            for match in matches:
                if match.suffix.lower() in video.VIDEO_EXTENSIONS:
                    inputs.add_video(VideoInput(str(match), match.stem))
                else:
                    inputs.add_images([ImageInput(str(match), _name_for(match, base, str(match)))])
        else:
            raise _input_error(f"INPUT {argument}: no such file or folder.")
    _warn_about_undecodable_names(inputs)
    names = [v.name for v in inputs.videos]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise _input_error(
            f"two videos share the name {duplicated[0]!r}; their frames would get the same "
            "file names. Rename one, or predict them in separate runs.")
    return inputs


def shard_of(inputs: Inputs, part: int, parts: int) -> Inputs:
    """The `part`-th (counted from 1) of `parts` interleaved parts of `inputs`: the items
    number part-1, part-1+parts, part-1+2*parts, ... in input order, an image or a whole
    video being one item (a video is never split). The parts are disjoint and together hold
    every item exactly once; a part beyond the number of items is empty."""
    if not 1 <= part <= parts:
        raise ValueError(f"part {part} of {parts}: a part is from 1 to {parts}")
    items = [item for source in inputs.sources
             for item in (source if isinstance(source, list) else [source])]
    selected = Inputs()
    for item in items[part - 1::parts]:
        if isinstance(item, VideoInput):
            selected.add_video(item)
        else:
            selected.add_images([item])
    return selected


# --------------------------------------------------------------------------------------------
# Outputs that would destroy an input


def check_outputs(outputs: Sequence[tuple[str, str | None]], arguments: Sequence[str],
                  inputs: Inputs, model_dir: str | os.PathLike,
                  save_frames: str | os.PathLike | None = None) -> None:
    """Refuse, before any work, outputs that would overwrite what this run reads.

    `outputs` are (flag, FILE) pairs of the files written as FILE.partial and renamed to
    FILE. None of FILE and FILE.partial may be an INPUT file, an image found in a folder,
    list or pattern INPUT, or a video (compared by device and inode, so symbolic and hard
    links count), nor lie inside `model_dir`; two flags may not name one file. Frames saved
    below `save_frames` may not land in `model_dir` or on an input image. Raises InputError
    naming the output, the input and what to do."""
    read: dict[tuple[int, int], str] = {}
    for name in [*(a for a in arguments if os.path.isfile(a)),
                 *(item.path for source in inputs.sources if isinstance(source, list)
                   for item in source),
                 *(item.path for item in inputs.videos)]:
        identity = file_identity(name)
        if identity is not None:
            read.setdefault(identity, name)
    given = [(flag, path) for flag, path in outputs if path]
    for index, (flag, path) in enumerate(given):
        for other_flag, other in given[:index]:
            if os.path.realpath(other) == os.path.realpath(path) or (
                    file_identity(path) is not None and file_identity(path) == file_identity(other)):
                raise _input_error(f"{other_flag} {other} and {flag} {path} name the same "
                                        "file; give each output its own file.")
        if os.path.isdir(path):
            raise _input_error(f"{flag} {path} is a folder; give the path of a file.")
        if within(path, model_dir):
            raise _input_error(
                f"{flag} {path} lies inside the model directory {model_dir}, which this run "
                "reads; write the output somewhere else.")
        for written in (path, f"{path}.partial"):
            source = read.get(file_identity(written))
            if source is not None:
                what = "" if written == path else f" (through its temporary file {written})"
                raise _input_error(
                    f"{flag} {path} would overwrite{what} {source}, which this run reads as "
                    "input; nothing was written. Give the output another file name.")
    if save_frames is None:
        return
    for item in inputs.videos:
        folder = Path(save_frames) / item.name
        if within(folder, model_dir):
            raise _input_error(
                f"--save-frames {save_frames} would save frames into the model directory "
                f"{model_dir}, which this run reads; save them somewhere else.")
        if not folder.is_dir():
            continue
        pattern = re.compile(re.escape(item.name) + r"_frame\d{7,}\.jpg")
        for existing in sorted(folder.iterdir()):
            source = read.get(file_identity(existing)) if pattern.fullmatch(existing.name) else None
            if source is not None:
                raise _input_error(
                    f"--save-frames {save_frames} would overwrite {existing} with a frame of "
                    f"{item.path}, but that file is the input image {source} of this run; "
                    "nothing was written. Save the frames into another folder.")


# --------------------------------------------------------------------------------------------
# Frames, decoded ahead of the model


@dataclass
class Frame:
    filename: str
    pixels: np.ndarray | None      # the model input, or None when it could not be read
    error: str = ""
    video: str = ""
    frame_index: int | None = None
    timestamp: float | None = None
    shown: object = None           # for heatmaps: (the frame reduced, its size as decoded)


def _shown(image, keep: tuple[int, int] | None):
    """What --heatmaps draws on: a copy of the frame reduced to fit in `keep`, and its size."""
    return None if keep is None else (heatmaps.reduced(image, keep), image.size)


def _decoded_frame(item: ImageInput, future: concurrent.futures.Future) -> Frame:
    """The Frame of `item` from its decoding.decode_frame in the pool."""
    try:
        pixels, shown = future.result()
        return Frame(item.filename, pixels, shown=shown)
    except ImageReadError as error:
        return Frame(item.filename, None, printable(str(error)))


def _image_frames(items: Iterable[ImageInput], geometry: ImageGeometry,
                  pool: concurrent.futures.Executor, ahead: int,
                  keep: tuple[int, int] | None = None) -> Iterator[Frame]:
    """Decode in the pool, at most `ahead` images in flight, yielding in input order. The
    workers, threads or processes, run decoding.decode_frame (a module that imports no Keras
    backend) and the Frames are made here."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append((item, pool.submit(decoding.decode_frame, item.path, geometry, keep)))
        if len(pending) >= ahead:
            yield _decoded_frame(*pending.popleft())
    while pending:
        yield _decoded_frame(*pending.popleft())


def _video_frames(item: VideoInput, geometry: ImageGeometry, fps: float | None,
                  save_dir: Path | None, prefix: str,
                  keep: tuple[int, int] | None = None) -> Iterator[Frame]:
    try:
        for frame in video.sampled_frames(item.path, fps):
            name = frame_filename(item.name, frame.index)
            if save_dir is not None:
                # Saved here, in the decoding thread, so full-size frames never queue up.
                target = save_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                frame.image.save(target, quality=SAVED_FRAME_QUALITY)
            yield Frame(prefix + name, resize_to_geometry(frame.image, geometry),
                        video=item.name, frame_index=frame.index, timestamp=frame.timestamp,
                        shown=_shown(frame.image, keep))
    except video.VideoReadError as error:
        yield Frame(_posix(item.path), None, printable(str(error)), video=item.name)


def frame_filename(video_name: str, index: int) -> str:
    """Where --save-frames puts a sampled frame, relative to its folder: also the `filename`
    of the frame's row, so the predictions are a labels CSV for that folder."""
    return f"{video_name}/{video_name}_frame{index:07d}.jpg"


def frame_stream(inputs: Inputs, geometry: ImageGeometry, batch_size: int,
                 fps: float | None, save_dir: Path | None = None, frame_prefix: str = "",
                 workers: int | None = None, keep: tuple[int, int] | None = None) -> Iterator[Frame]:
    """Every frame of every input, in input order, image files decoded ahead of the caller
    by the decoding pool (decoding.decode_pool: `workers`, default one per usable core,
    threads or processes as decoding.POOL_KIND says; Pillow releases the GIL while it
    decodes), video frames by FFmpeg in the caller's thread. Video frames are named
    `frame_prefix` + `frame_filename(...)`, and saved below `save_dir` as
    `frame_filename(...)` when it is given. With `keep` (width, height), each frame also
    carries a copy reduced to fit in it (`Frame.shown`), for heatmaps."""
    pool = decoding.decode_pool(workers)
    try:
        for source in inputs.sources:
            if isinstance(source, VideoInput):
                yield from _video_frames(source, geometry, fps, save_dir, frame_prefix, keep)
            else:
                yield from _image_frames(source, geometry, pool, batch_size * BATCHES_AHEAD, keep)
    finally:  # closed early (an error, SIGTERM, a reader gone): queued decodes are dropped
        pool.shutdown(wait=True, cancel_futures=True)


def _batched(frames: Iterator[Frame], batch_size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def prefetched(iterator: Iterator, depth: int) -> Iterator:
    """Run `iterator` in a background thread, at most `depth` items ahead of the consumer:
    decoding overlaps the model, and memory is bounded by `depth`."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as error:  # handed to the consumer, which raises it
            items.put(error)

    thread = threading.Thread(target=produce, name="frames", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# --------------------------------------------------------------------------------------------
# Output


class RowWriter:
    """Writes rows as CSV or JSON lines, with a fixed column order."""

    def __init__(self, handle: TextIO, columns: list[str], fmt: str):
        self.handle, self.columns, self.format = handle, columns, fmt
        if fmt == "csv":
            self._csv = csv.writer(handle, lineterminator="\n")
            self._csv.writerow(columns)

    def write(self, row: dict) -> None:
        row = {k: printable(v) if isinstance(v, str) else v for k, v in row.items()}
        if self.format == "csv":
            self._csv.writerow(["" if row.get(c) is None else row.get(c) for c in self.columns])
        else:
            self.handle.write(json.dumps({c: row.get(c) for c in self.columns}) + "\n")


def output_columns(symbols: Sequence[str], with_video: bool) -> list[str]:
    columns = ["filename"]
    if with_video:
        columns += ["video", "frame_index", "timestamp", "timecode"]
    for symbol in symbols:
        columns += [f"{symbol}_probability", f"{symbol}{VISIBLE_SUFFIX}"]
    return columns + ["error"]


SEGMENT_COLUMNS = ["video", "symbol", "start", "end", "duration", "start_timecode",
                   "end_timecode", "frames", "mean_probability", "peak_probability"]


class Progress:
    """A progress line on stderr: redrawn in place on a terminal, a log line every
    `every` seconds otherwise."""

    def __init__(self, total: int | None, every: float, stream: TextIO = sys.stderr):
        self.total, self.every, self.stream = total, every, stream
        self.done = 0
        self.start = self.last = time.monotonic()
        self.terminal = stream.isatty()

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last < (0.5 if self.terminal else self.every):
            return
        self.last = now
        rate = self.done / max(1e-9, now - self.start)
        text = f"{self.done:,}" + (f"/{self.total:,}" if self.total else "") + \
            f" frames, {rate:.1f} frames/s"
        if self.total and rate > 0 and self.done <= self.total:
            text += f", ETA {video.timecode((self.total - self.done) / rate)[:8]}"
        if self.terminal:
            self.stream.write(f"\r{text}   ")
            self.stream.flush()
        else:
            log.info("Predicted %s", text)

    def finish(self) -> None:
        if self.terminal and self.done:
            self.stream.write("\n")


@dataclass
class PredictionSummary:
    frames: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    segments: int = 0


def predict_inputs(loaded: LoadedModel, inputs: Inputs, writer: RowWriter, *,
                   batch_size: int = 32, thresholds: float | dict | None = None,
                   fps: float | None = 1.0, skip_errors: bool = False,
                   save_frames: Path | None = None, frame_prefix: str = "",
                   segments: RowWriter | None = None,
                   segment_settings: video.SegmentSettings = video.SegmentSettings(),
                   progress: Progress | None = None,
                   heatmap_writer: heatmaps.HeatmapWriter | None = None) -> PredictionSummary:
    """Predict every frame of `inputs` and write one row per frame (or per unreadable input,
    with its `error`, unless `skip_errors`). With `save_frames`, sampled video frames are
    saved below it as `frame_filename(...)`, and their rows' filename is that name after
    `frame_prefix`. With `heatmap_writer`, the model's heatmaps of each frame are written
    too (in the same pass). Returns what happened; never raises for an unreadable image or
    video."""
    symbols = loaded.metadata["symbols"]
    geometry = ImageGeometry.from_json(loaded.metadata["input"])
    cut = decision_thresholds(loaded.metadata, thresholds)
    infer = compiled_inference(loaded.model if heatmap_writer is None else
                                      heatmaps.with_probabilities(loaded.model, symbols))
    summary = PredictionSummary()
    started = time.monotonic()
    # A video's frames come one after another: its timestamps and probabilities so far,
    # turned into segments when the next input starts.
    current_video, timestamps, video_rows = "", [], []

    def finish_video() -> None:
        if segments is None or not video_rows:
            return
        probabilities = np.stack(video_rows)
        for j, symbol in enumerate(symbols):
            for s in video.visible_segments(timestamps, probabilities[:, j], cut[symbol],
                                            segment_settings):
                segments.write({"video": current_video, "symbol": symbol,
                                "start": round(s.start, 3), "end": round(s.end, 3),
                                "duration": round(s.duration, 3),
                                "start_timecode": video.timecode(s.start),
                                "end_timecode": video.timecode(s.end), "frames": s.frames,
                                "mean_probability": round(s.mean_probability, 6),
                                "peak_probability": round(s.peak_probability, 6)})
                summary.segments += 1

    stream = frame_stream(inputs, geometry, batch_size, fps, save_dir=save_frames,
                          frame_prefix=frame_prefix,
                          keep=heatmap_writer.max_size if heatmap_writer else None)
    for batch in prefetched(_batched(stream, batch_size), BATCHES_AHEAD):
        readable = [f for f in batch if f.pixels is not None]
        if readable:
            outputs = infer(np.stack([f.pixels for f in readable]))
            if heatmap_writer:
                maps = iter(heatmaps.sigmoid(outputs["score_map"]))
                outputs = outputs["probabilities"]
            values = iter(np.concatenate([outputs[s] for s in symbols], axis=1)
                          .astype(np.float64))
        for frame in batch:
            if frame.video != current_video:
                finish_video()
                current_video, timestamps, video_rows = frame.video, [], []
            row = {"filename": frame.filename, "error": frame.error or None}
            if frame.video:
                row.update(video=frame.video, frame_index=frame.frame_index,
                           timestamp=None if frame.timestamp is None else round(frame.timestamp, 3),
                           timecode=None if frame.timestamp is None else video.timecode(frame.timestamp))
            if frame.pixels is None:
                summary.failed.append((frame.filename, frame.error))
                log.error("%s", frame.error)
                if not skip_errors:
                    writer.write(row)
                continue
            probabilities = next(values)  # readable frames' rows, in batch order
            for j, symbol in enumerate(symbols):
                row[f"{symbol}_probability"] = round(float(probabilities[j]), 6)
                row[f"{symbol}{VISIBLE_SUFFIX}"] = int(probabilities[j] >= cut[symbol])
            if frame.video:
                timestamps.append(frame.timestamp)
                video_rows.append(probabilities)
            if heatmap_writer:
                heatmap_writer.write(frame.filename, heatmaps.on_frame(
                    *frame.shown, probabilities, next(maps), symbols, geometry))
            writer.write(row)
            summary.frames += 1
        if progress:
            progress.update(len(batch))
        if summary.frames and summary.frames == len(readable):  # bench/gpu.py: after tracing
            log.debug("First batch of %d frames predicted %.3f s after the start (model "
                      "tracing included)", summary.frames, time.monotonic() - started)
    finish_video()
    if progress:
        progress.finish()
    summary.seconds = time.monotonic() - started
    return summary
