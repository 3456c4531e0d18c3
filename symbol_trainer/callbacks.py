"""Keras callbacks of both training phases: validation scores each epoch, the epoch log
lines, early stopping that survives a resume, the guard against a diverging loss, and the
checkpoint at the end of each epoch.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from symbol_trainer.backend import keras
from symbol_trainer import checkpoints
from symbol_trainer import evaluation
from symbol_trainer.datasets import compiled_inference, run_inference
from symbol_trainer.errors import InputError

log = logging.getLogger(__name__)


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
    """`weighted_binary_crossentropy` averaged over frames, in numpy: the training loss
    without --focal-gamma's factor, so a proper score of the probabilities either way."""
    labels, weights = np.split(np.asarray(targets, np.float64), 2, axis=1)
    x = np.asarray(logits, np.float64)
    losses = np.maximum(x, 0) - x * labels + np.log1p(np.exp(-np.abs(x)))
    return float(np.mean(np.sum(losses * weights, axis=1)))


class ValidationScores(keras.callbacks.Callback):
    """Scores the model on the validation frames after every epoch and adds `val_loss` (the
    weighted cross-entropy) and `val_ap` (`validation_macro_ap`) to the epoch's logs, for early
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
