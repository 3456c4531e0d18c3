"""The model directory: writing it safely (a .partial sibling renamed into place, a lock),
the record of package versions and data, saving the model, and loading it back with its
metadata checked (model_checks) and the decision thresholds chosen at training.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import platform
import shutil
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from symbol_trainer.backend import BACKEND, keras
from symbol_trainer import output_dir as output_dir_checks
from symbol_trainer import run_lock
from symbol_trainer.errors import InputError, listing
from symbol_trainer.model import ModelParts
from symbol_trainer.model_format import CHECKPOINT_FOLDER
from symbol_trainer.output_dir import METADATA_FILE, MODEL_FILE

log = logging.getLogger(__name__)


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
    import importlib
    backend = importlib.import_module(BACKEND)  # already imported by Keras
    # "backend" names the Keras backend that trained the model; its package has its version.
    return {"python": platform.python_version(), "backend": BACKEND,
            BACKEND: backend.__version__, "keras": keras.__version__, "numpy": np.__version__, "pandas": pd.__version__,
            "pillow": PIL.__version__}


def data_fingerprint(table: pd.DataFrame, symbols: Sequence[str]) -> str:
    """SHA-256 over every training image's content hash and labels, independent of row order."""
    lines = []
    for sha1, *values in table[["image_sha1", *symbols]].itertuples(index=False, name=None):
        labels = ",".join("nan" if math.isnan(v) else str(int(v)) for v in values)
        lines.append(f"{sha1} {labels}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def save_model(parts: ModelParts, symbols: Sequence[str], directory: Path) -> None:
    """Save an uncompiled inference model, so loading needs no custom loss or optimizer."""
    inference = keras.Model(parts.model.inputs,
                            {s: parts.model.get_layer(s).output for s in symbols},
                            name="symbol_classifier")
    inference.save(directory / MODEL_FILE)


class LoadedModel(NamedTuple):
    model: keras.Model
    metadata: dict


def load_model_dir(path: str | os.PathLike) -> LoadedModel:
    """Load a model directory (safe mode: no code from the file is run) and its metadata,
    checking that they agree. Raises InputError naming the file and the field for a missing,
    empty, truncated or damaged file and for metadata that is invalid or disagrees with the
    model (model_checks)."""
    from symbol_trainer import model_checks

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
