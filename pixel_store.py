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
        handle, name = tempfile.mkstemp(prefix="decoded-images-", suffix=".u8", dir=directory)
        self.path = Path(name)
        self._fd = handle
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
        slot = self._slots.get(path)
        if slot is not None and self._filled[slot]:
            data = os.pread(self._fd, self.slot_bytes, slot * self.slot_bytes)
            if len(data) == self.slot_bytes:
                return np.frombuffer(data, np.uint8).reshape(self.shape)
        image = self._decode(path)
        if slot is not None and self._writable and image.shape == self.shape:
            self._store(slot, image)
        return image

    def _store(self, slot: int, image: np.ndarray) -> None:
        try:
            written = os.pwrite(self._fd, np.ascontiguousarray(image, np.uint8).tobytes(),
                                slot * self.slot_bytes)
        except OSError as error:
            with self._lock:
                if self._writable:
                    self._writable = False
                    log.warning("Cannot keep more decoded images in %s (%s); the rest are decoded "
                                "from their files every epoch.", self.path, error.strerror or error)
            return
        if written == self.slot_bytes:
            self._filled[slot] = True

    def close(self) -> None:
        """Delete the file. Safe to call twice."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "PixelStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
