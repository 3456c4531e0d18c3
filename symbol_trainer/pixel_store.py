"""A scratch file of decoded, resized images, so fine-tuning epochs do not decode JPEGs again.

Fine-tuning streams every training image through the backbone once per epoch. On a laptop CPU
decoding a 640x360 JPEG costs about as much as the model's own step for it, so a pipeline that
decodes every epoch leaves the model waiting. The first pass over the images (feature
extraction, or the first fine-tuning epoch when the features came from --cache-dir) writes each
decoded model input into one flat file at a fixed offset; later passes read it back with one
`pread`, which costs microseconds.

The file is on disk, not in memory: the kernel's page cache keeps it warm when there is room
and drops it when there is not, so the process's own memory stays flat whatever the number of
frames. Slots are written and read with positional I/O from any thread; a slot is marked
filled only after its bytes are written. If the disk fills up the store stops taking images
and every image not in it is decoded from its file again, so training never fails because of
it.

The file has no name from the moment it is created: on Linux it is made nameless (O_TMPFILE),
elsewhere on POSIX it is unlinked at once, and the store keeps only its open descriptor, so
the kernel frees its blocks when the process ends however it ends (SIGKILL, the out-of-memory
killer, a power cut's fsck). Nothing reopens it by path: every read and write, from any
thread or tf.data generator, goes through that descriptor. On Windows, where an open file
cannot be unlinked, it is opened delete-on-close (O_TEMPORARY), which the system honours even
when the process is killed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)


class PixelStore:
    """Decoded uint8 images of a fixed shape, one slot per path, in a temporary file."""

    def __init__(self, paths: Sequence[str], shape: tuple[int, int, int],
                 decode: Callable[[str], np.ndarray], directory: str | os.PathLike | None = None):
        self.shape = tuple(shape)
        self.slot_bytes = int(np.prod(self.shape))
        self._slots = {str(p): i for i, p in enumerate(paths)}
        self._filled = np.zeros(len(self._slots), bool)
        self._decode = decode
        self._lock = threading.Lock()
        self._writable = True
        self.directory = Path(directory if directory is not None else tempfile.gettempdir())
        # TemporaryFile: nameless or unlinked at once on POSIX, delete-on-close on Windows.
        self._file = tempfile.TemporaryFile(prefix="decoded-images-", suffix=".u8",
                                            dir=self.directory, buffering=0)
        self._fd = self._file.fileno()
        # The file is sparse until written, so its size costs no disk space up front.
        os.ftruncate(self._fd, self.slot_bytes * len(self._slots))

    @staticmethod
    def bytes_needed(count: int, shape: tuple[int, int, int]) -> int:
        return int(count) * int(np.prod(shape))

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def filled(self) -> int:
        return int(self._filled.sum())

    def load(self, path: str) -> np.ndarray:
        """The decoded image of `path`: from the store when it is there, else decoded from its
        file (and stored for next time)."""
        image = self.cached(path)
        if image is None:
            image = self._decode(path)
            self.put(path, image)
        return image

    def cached(self, path: str) -> np.ndarray | None:
        """The decoded image of `path` if the store has it, else None (nothing is decoded)."""
        slot = self._slots.get(path)
        if slot is not None and self._filled[slot]:
            data = self._pread(slot * self.slot_bytes)
            if len(data) == self.slot_bytes:
                return np.frombuffer(data, np.uint8).reshape(self.shape)
        return None

    def put(self, path: str, image: np.ndarray) -> None:
        """Keep `image`, decoded elsewhere (a decoding process), as the image of `path`; an
        image of a path the store does not hold, or of another shape, is not kept."""
        slot = self._slots.get(path)
        if slot is not None and self._writable and image.shape == self.shape:
            self._store(slot, image)

    def _store(self, slot: int, image: np.ndarray) -> None:
        try:
            written = self._pwrite(np.ascontiguousarray(image, np.uint8).tobytes(),
                                   slot * self.slot_bytes)
        except OSError as error:
            with self._lock:
                if self._writable:
                    self._writable = False
                    log.warning("Cannot keep more decoded images in %s (%s); the rest are decoded "
                                "from their files every epoch.", self.directory,
                                error.strerror or error)
            return
        if written == self.slot_bytes:
            self._filled[slot] = True

    def _pread(self, offset: int) -> bytes:
        if hasattr(os, "pread"):
            return os.pread(self._fd, self.slot_bytes, offset)
        with self._lock:  # Windows has no positional I/O in `os`: seek and read under the lock
            os.lseek(self._fd, offset, os.SEEK_SET)
            return os.read(self._fd, self.slot_bytes)

    def _pwrite(self, data: bytes, offset: int) -> int:
        if hasattr(os, "pwrite"):
            return os.pwrite(self._fd, data, offset)
        with self._lock:
            os.lseek(self._fd, offset, os.SEEK_SET)
            return os.write(self._fd, data)

    def close(self) -> None:
        """Close the file, which frees its space. Safe to call twice."""
        if self._fd >= 0:
            self._file.close()
            self._fd = -1

    def __enter__(self) -> "PixelStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
