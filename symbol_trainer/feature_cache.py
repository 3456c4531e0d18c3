"""An on-disk cache of backbone features, shared by runs on the same images.

The head phase trains on features of the frozen backbone. Computing them is most of that
phase's time, and they depend only on the image's bytes and on how it becomes a feature
vector: the backbone, its weights, the input geometry and the preprocessing. A second run on
the same frames (another learning rate, another symbol subset, new labels) finds them here.

Layout: `CACHE_DIR/<model key>/key.json` says what the key stands for, and
`CACHE_DIR/<model key>/<sha1[:2]>/<sha1>.npy` holds one image's feature vector, named by the
SHA-1 of the image file's bytes. A spatial head (`--pooling max|lse|topk`) caches the
backbone's feature map instead, as float16 (height, width, channels); its model key says so,
so maps and vectors never share a folder. Every entry is written to a temporary file in its folder and
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

    def __init__(self, root: str | os.PathLike, description: dict,
                 feature_shape: int | Sequence[int], dtype=np.float32):
        """`feature_shape`: the length of a feature vector, or the shape of a feature map;
        entries are stored and returned in `dtype`."""
        self.description = description
        self.feature_shape = (feature_shape,) if isinstance(feature_shape, int) \
            else tuple(int(d) for d in feature_shape)
        self.dtype = np.dtype(dtype)
        self.directory = Path(root) / model_key(description)
        self.directory.mkdir(parents=True, exist_ok=True)
        key_file = self.directory / "key.json"
        if not key_file.is_file():
            shape = {"feature_size": self.feature_shape[0]} if len(self.feature_shape) == 1 \
                else {"feature_shape": list(self.feature_shape), "dtype": self.dtype.name}
            self._write_atomically(key_file, (json.dumps(
                {"feature_format": FEATURE_FORMAT_VERSION, **shape,
                 **description}, indent=2, sort_keys=True) + "\n").encode())

    @property
    def feature_size(self) -> int:
        return self.feature_shape[0]

    def _entry(self, sha1: str) -> Path:
        return self.directory / sha1[:2] / f"{sha1}.npy"

    def load(self, sha1s: Sequence[str], into: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """Features of the given images, (n, *feature shape), and a mask of which were found.
        With `into`, they are written into its rows (the others are left as they were)."""
        features = np.zeros((len(sha1s), *self.feature_shape), self.dtype) if into is None \
            else into
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
            if vector.shape != self.feature_shape or vector.dtype != self.dtype \
                    or not np.all(np.isfinite(vector)):
                log.warning("Feature cache entry %s has shape %s or non-finite values; "
                            "recomputing it.", path, vector.shape)
                continue
            features[i], found[i] = vector, True
        return features, found

    def store(self, sha1s: Sequence[str], features: np.ndarray) -> None:
        for sha1, vector in zip(sha1s, features):
            path = self._entry(sha1)
            path.parent.mkdir(exist_ok=True)
            buffer = _npy_bytes(np.asarray(vector, self.dtype))
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
