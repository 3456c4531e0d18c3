"""Resumable training: the state of an unfinished run, kept in `<model dir>.partial/checkpoint/`.

After every epoch of either phase the chief writes one file, `state.npz`, replaced atomically:
the history rows so far, the phase and its epochs done, early stopping's counters and best
weights, and every variable of the model being trained (including the random generators of
dropout and augmentation) and of its optimizer. The backbone features of the head phase are
kept beside it once computed (`features.npy`). Each epoch's data order is drawn from the seed
and the epoch number alone (`epoch_order`), so a resumed run sees the same batches, the same
augmentations and the same dropout masks as one that never stopped, and ends the same.

`run.json` says which run the checkpoint belongs to (settings that change the result, the
data's fingerprint, the split, the number of replicas); a checkpoint of another run is never
resumed silently.

Every file is written to a temporary `.<name>.*` beside it and renamed over it: a kill during
the write leaves the previous file whole, a write that fails (a full disk) removes its
temporary, and the next run's `open` removes any temporary a killed writer left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
STATE_FILE = "state.npz"
FEATURES_FILE = "features.npy"
PHASE_NAMES = {"head": "head phase", "fine_tune": "fine-tuning"}


class RunMismatch(Exception):
    """The checkpoint on disk belongs to a run with other settings or data."""

    def __init__(self, directory: Path, differences: list[str]):
        self.directory, self.differences = directory, differences
        super().__init__(f"{directory} holds a checkpoint of another run "
                         f"({'; '.join(differences)})")


@dataclass
class PhaseState:
    """Where a phase stood at the end of its last completed epoch."""

    phase: str
    epochs_done: int
    finished: bool                    # early stopping ended it, or its last epoch is done
    rows: list[dict]                  # history rows of every phase so far
    early_stopping: dict              # wait, best, best_epoch, stopped_epoch
    variables: list[np.ndarray]       # model.variables, in order
    optimizer: list[np.ndarray]       # model.optimizer.variables, in order
    best_weights: list[np.ndarray] | None = None  # model.get_weights() of the best epoch


def epoch_order(items: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of `items` examples in `epoch`: a function of the seed and epoch only,
    so a resumed run draws exactly the orders the interrupted one would have."""
    return np.random.default_rng([seed, epoch]).permutation(items).astype(np.int64)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return found


class Checkpoint:
    """The checkpoint folder of one run. Only the writer (the chief) changes it; every process
    reads it."""

    def __init__(self, directory: str | os.PathLike, run: dict, writer: bool = True):
        self.directory = Path(directory)
        self.run = json.loads(json.dumps(run))  # as it reads back from run.json
        self.writer = writer

    def open(self, resume: bool) -> PhaseState | None:
        """Start the run's checkpoint: with `resume`, keep a matching one and return where it
        stands (None if there is none); raise RunMismatch for one of another run. Without
        `resume`, any earlier checkpoint is removed."""
        run_file = self.directory / RUN_FILE
        if self.writer:
            self._remove_temporaries()
        if run_file.is_file() and resume:
            try:
                old = json.loads(run_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise RunMismatch(self.directory, [f"{RUN_FILE} unreadable ({error})"]) from None
            differences = _differences(old, self.run)
            if differences:
                raise RunMismatch(self.directory, differences)
            return self.latest()
        if self.writer:
            if self.directory.exists():
                shutil.rmtree(self.directory)
            self.directory.mkdir(parents=True)
            self._write(run_file, json.dumps(self.run, indent=2, sort_keys=True).encode())
        return None

    def _write(self, path: Path, data: bytes) -> None:
        _replace(path, lambda handle: handle.write(data))

    def _remove_temporaries(self) -> None:
        """Delete the temporaries of writes that a kill or a crash interrupted."""
        if not self.directory.is_dir():
            return
        for name in (RUN_FILE, STATE_FILE, FEATURES_FILE):
            for stale in self.directory.glob(f".{name}.*"):
                log.info("Removing %s, left by an interrupted checkpoint write.", stale)
                with contextlib.suppress(OSError):
                    stale.unlink()

    def features(self) -> np.ndarray | None:
        path = self.directory / FEATURES_FILE
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            log.warning("Checkpoint features %s unreadable (%s); computing them again.", path, error)
            return None

    def save_features(self, features: np.ndarray) -> None:
        if not self.writer:
            return
        _replace(self.directory / FEATURES_FILE,
                 lambda handle: np.save(handle, np.ascontiguousarray(features), allow_pickle=False),
                 suffix=".npy")

    def latest(self) -> PhaseState | None:
        """The state of the last completed epoch, or None before the first."""
        path = self.directory / STATE_FILE
        if not path.is_file():
            return None
        try:
            return self._read_state(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise RunMismatch(self.directory, [f"{STATE_FILE} unreadable ({error})"]) from None

    @staticmethod
    def _read_state(path: Path) -> PhaseState:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["state_json"]))

            def arrays(prefix: str, count: int) -> list[np.ndarray]:
                return [data[f"{prefix}{i}"] for i in range(count)]

            return PhaseState(
                phase=meta["phase"], epochs_done=meta["epochs_done"], finished=meta["finished"],
                rows=meta["rows"], early_stopping=meta["early_stopping"],
                variables=arrays("variable_", meta["variables"]),
                optimizer=arrays("optimizer_", meta["optimizer"]),
                best_weights=(arrays("best_", meta["best_weights"])
                              if meta["best_weights"] is not None else None))

    def save(self, state: PhaseState) -> None:
        """Replace the state with `state` (the writer only)."""
        if not self.writer:
            return
        meta = {"phase": state.phase, "epochs_done": state.epochs_done,
                "finished": state.finished, "rows": state.rows,
                "early_stopping": state.early_stopping,
                "variables": len(state.variables), "optimizer": len(state.optimizer),
                "best_weights": None if state.best_weights is None else len(state.best_weights)}
        arrays = {"state_json": np.array(json.dumps(meta))}
        arrays.update({f"variable_{i}": v for i, v in enumerate(state.variables)})
        arrays.update({f"optimizer_{i}": v for i, v in enumerate(state.optimizer)})
        arrays.update({f"best_{i}": v for i, v in enumerate(state.best_weights or [])})
        _replace(self.directory / STATE_FILE, lambda handle: np.savez(handle, **arrays),
                 suffix=".npz")

    def progress(self, state: PhaseState | None) -> str:
        """`describe` of `state`, with this run's epochs per phase."""
        settings = self.run["settings"]
        return describe(state, {"head": settings["epochs"],
                                "fine_tune": settings["fine_tune_epochs"]})

    def remove(self) -> None:
        if self.writer:
            shutil.rmtree(self.directory, ignore_errors=True)


def _replace(path: Path, write: Callable[[BinaryIO], object], suffix: str = "") -> None:
    """Write `path` with `write(handle)` into a temporary beside it, then rename that over
    `path`: a kill during the write leaves the previous file whole (readers see one or the
    other), and a write that fails, a full disk (ENOSPC) included, leaves no temporary."""
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=suffix,
                                         delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


def describe(state: PhaseState | None, epochs: dict[str, int]) -> str:
    """'fine-tuning epoch 2 of 5 done' and the like, for the log."""
    if state is None:
        return "no epoch done yet"
    if state.phase == "head" and state.finished:
        return "head phase done"
    text = f"{PHASE_NAMES[state.phase]} epoch {state.epochs_done} of {epochs[state.phase]} done"
    if state.phase == "fine_tune":
        text = "head phase done, " + text
    return text + (" (phase finished)" if state.finished and state.phase == "fine_tune" else "")
