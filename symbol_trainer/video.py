"""Video: sampling frames from a file with PyAV (FFmpeg's decoders, bundled in the wheel), and
turning per-frame probabilities into the intervals in which a symbol is visible.

PyAV rather than OpenCV: it decodes every container and codec FFmpeg does (mp4, mkv, avi,
mov, webm, MPEG-TS), gives each frame its presentation time, and adds no GUI stack; the
frames come out as Pillow images, so they are resized exactly as training resizes images.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm", ".ts", ".m4v", ".mpg",
                              ".mpeg"})


class VideoReadError(Exception):
    """A video that cannot be opened or decoded; the message names the file."""


@dataclass(frozen=True)
class VideoFrame:
    index: int          # position of the frame among all decoded frames of the stream, from 0
    timestamp: float    # seconds from the start of the stream
    image: Image.Image  # RGB


def timecode(seconds: float) -> str:
    """HH:MM:SS.mmm."""
    milliseconds = int(round(max(0.0, seconds) * 1000))
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}.{rest % 1000:03d}"


def sampled_frames(path: str | Path, fps: float | None) -> Iterator[VideoFrame]:
    """Decode the first video stream and yield every frame (`fps` None) or, for `fps` N, the
    first frame at or after each multiple of 1/N seconds: N frames per second of video,
    whatever its own frame rate. Raises VideoReadError naming the file."""
    import av

    try:
        container = av.open(str(path))
    except Exception as error:
        raise VideoReadError(f"{path}: cannot be read as a video ({error}).") from None
    try:
        if not container.streams.video:
            raise VideoReadError(f"{path}: has no video stream.")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # FFmpeg's own frame and slice threads
        start = None
        next_time = 0.0
        index = -1
        try:
            for frame in container.decode(stream):
                index += 1
                if frame.time is None:
                    continue
                if start is None:
                    start = frame.time
                timestamp = frame.time - start
                if fps is not None:
                    # A hair of tolerance: a 25 fps frame at 0.9999999 s is the 1 s sample.
                    if timestamp + 1e-6 < next_time:
                        continue
                    next_time = (math.floor(timestamp * fps + 1e-6) + 1) / fps
                yield VideoFrame(index, round(timestamp, 6), frame.to_image())
        except VideoReadError:
            raise
        except Exception as error:
            raise VideoReadError(f"{path}: decoding failed after frame {index} "
                                 f"({error}).") from None
        if index < 0:
            raise VideoReadError(f"{path}: no frame could be decoded.")
    finally:
        container.close()


# --------------------------------------------------------------------------------------------
# Segments


@dataclass(frozen=True)
class SegmentSettings:
    """How per-frame decisions become intervals. A segment starts at a frame whose
    probability reaches the symbol's threshold and goes on while it stays at or above
    threshold - `hysteresis`; segments separated by less than `merge_gap` seconds are joined,
    and those shorter than `min_duration` seconds are dropped."""

    hysteresis: float = 0.1
    merge_gap: float = 1.5
    min_duration: float = 0.0


@dataclass(frozen=True)
class Segment:
    start: float       # seconds: the first frame in the segment
    end: float         # seconds: the last frame in it plus one sampling interval
    frames: int
    mean_probability: float
    peak_probability: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def visible_segments(timestamps: Sequence[float], probabilities: Sequence[float],
                     threshold: float, settings: SegmentSettings = SegmentSettings()) -> list[Segment]:
    """The intervals in which one symbol is visible, from its probability at each sampled
    frame (timestamps ascending)."""
    t = np.asarray(timestamps, np.float64)
    p = np.asarray(probabilities, np.float64)
    if len(t) == 0:
        return []
    # A frame stands for the time until the next one; the last for the typical spacing.
    spacing = float(np.median(np.diff(t))) if len(t) > 1 else 0.0
    low = threshold - settings.hysteresis
    runs: list[list[int]] = []
    inside = False
    for i, value in enumerate(p):
        if not inside and value >= threshold:
            inside = True
            runs.append([i, i])
        elif inside and value >= low:
            runs[-1][1] = i
        else:
            inside = False
    merged: list[list[int]] = []
    for first, last in runs:
        if merged and t[first] - (t[merged[-1][1]] + spacing) < settings.merge_gap:
            merged[-1][1] = last
        else:
            merged.append([first, last])
    segments = []
    for first, last in merged:
        values = p[first:last + 1]
        end = t[last] + spacing
        if end - t[first] + 1e-9 < settings.min_duration:
            continue
        segments.append(Segment(float(t[first]), float(end), last - first + 1,
                                float(values.mean()), float(values.max())))
    return segments
