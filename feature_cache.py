"""An on-disk cache of pooled backbone features, shared by runs on the same images.

The head phase trains on features of the frozen backbone. Computing them is most of that
phase's time, and they depend only on the image's bytes and on how it becomes a feature
vector: the backbone, its weights, the input geometry and the preprocessing. A second run on
the same frames (another learning rate, another symbol subset, new labels) finds them here.

Layout: `CACHE_DIR/<model key>/key.json` says what the key stands for, and
`CACHE_DIR/<model key>/<sha1[:2]>/<sha1>.npy` holds one image's feature vector, named by the
SHA-1 of the image file's bytes. Every entry is written to a temporary file in its folder and
renamed into place, so readers never see half an entry and two runs writing the same entry at
once leave one complete copy. An entry that cannot be read, or has the wrong shape, or holds a
non-finite value, is recomputed and rewritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

# Bump when the way features are computed changes without the key noticing.
FEATURE_FORMAT_VERSION = 1


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_key(description: dict) -> str:
    """A short stable key for everything that turns image bytes into a feature vector."""
    text = json.dumps({"feature_format": FEATURE_FORMAT_VERSION, **description}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class FeatureCache:
    """Feature vectors of one model key, by image content hash."""

    def __init__(self, root: str | os.PathLike, description: dict, feature_size: int):
        self.description = description
        self.feature_size = feature_size
        self.directory = Path(root) / model_key(description)
        self.directory.mkdir(parents=True, exist_ok=True)
        key_file = self.directory / "key.json"
        if not key_file.is_file():
            self._write_atomically(key_file, (json.dumps(
                {"feature_format": FEATURE_FORMAT_VERSION, "feature_size": feature_size,
                 **description}, indent=2, sort_keys=True) + "\n").encode())

    def _entry(self, sha1: str) -> Path:
        return self.directory / sha1[:2] / f"{sha1}.npy"

    def load(self, sha1s: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Features of the given images, (n, feature size), and a mask of which were found."""
        features = np.zeros((len(sha1s), self.feature_size), np.float32)
        found = np.zeros(len(sha1s), bool)
        for i, sha1 in enumerate(sha1s):
            path = self._entry(sha1)
            if not path.is_file():
                continue
            try:
                vector = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as error:
                log.warning("Feature cache entry %s is unreadable (%s); recomputing it.", path, error)
                continue
            if vector.shape != (self.feature_size,) or not np.all(np.isfinite(vector)):
                log.warning("Feature cache entry %s has shape %s or non-finite values; "
                            "recomputing it.", path, vector.shape)
                continue
            features[i], found[i] = vector, True
        return features, found

    def store(self, sha1s: Sequence[str], features: np.ndarray) -> None:
        for sha1, vector in zip(sha1s, features):
            path = self._entry(sha1)
            path.parent.mkdir(exist_ok=True)
            buffer = _npy_bytes(np.asarray(vector, np.float32))
            self._write_atomically(path, buffer)

    @staticmethod
    def _write_atomically(path: Path, data: bytes) -> None:
        handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
        try:
            with handle:
                handle.write(data)
            os.replace(handle.name, path)
        except BaseException:
            Path(handle.name).unlink(missing_ok=True)
            raise


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
