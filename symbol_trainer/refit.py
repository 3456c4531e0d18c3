"""--refit: once validation has chosen the epochs and the thresholds, train the model to save
again on the training and validation frames together (see docs/refit.md).

A normal run trains on the training frames, stops each phase early on the validation average
precision and chooses every symbol's decision threshold on the validation frames. With
`TrainingConfig.refit`, `refit_if_asked` then builds a fresh model (the same seed, so the same
initialisation as far as Keras allows), trains its head for exactly the head epochs the
validation run kept and fine-tunes it for exactly the fine-tuning epochs it kept (0 when it
kept the head phase's weights), on every frame, with no validation and no early stopping. The
model directory then holds that model with the validation run's thresholds; the metrics,
evaluation.csv and report.html stay those of the validation run, because the refitted model
has no held-out frame left to be scored on.

The refit writes no checkpoint of its own: a run stopped during it (Ctrl-C, SIGTERM, an
error) writes no model directory, keeps the validation run's checkpoint (which ends with its
finished last phase), and a rerun of the same command continues from there at once and
starts the refit again from its beginning. A half-trained refit is never saved.

This module builds on the training pieces (training.py, callbacks.py, precision.py); the
pipeline (pipeline.train_and_save) calls it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from symbol_trainer import symbol_paste
from symbol_trainer import distribution
from symbol_trainer.backend import keras
from symbol_trainer.callbacks import FiniteLossGuard
from symbol_trainer.datasets import epoch_batches, feature_dataset
from symbol_trainer.features import backbone_features
from symbol_trainer.images import ImageGeometry, load_image_array
from symbol_trainer.labelled_images import LabelledImages
from symbol_trainer.model import build_model, calibrate_batchnorm, ModelParts
from symbol_trainer.precision import dtype_policy, float32_twin
from symbol_trainer.settings import TrainingConfig
from symbol_trainer.training import (
    _build_for_workers, _copy_fused_head, compiled_fine_tuning, compiled_head,
    fine_tuning_batches, fused_targets, positive_weights, sample_weights, TrainingRun)

log = logging.getLogger(__name__)

# What metadata.json, --json and the report say about where the figures come from.
METRICS_FROM_VALIDATION_RUN = "validation run before refitting"
METRICS_FROM_SAVED_MODEL = "saved model"


# --------------------------------------------------------------------------------------------
# The epochs the validation run kept


def _improves(value: float, best: float | None, mode: str) -> bool:
    """Keras's EarlyStopping test with min_delta 0: the first value counts as an improvement,
    NaN never does afterwards."""
    if best is None:
        return True
    return bool(value > best) if mode == "max" else bool(value < best)


def kept_epochs(rows: Sequence[dict]) -> dict[str, int]:
    """The epochs whose weights the validation run kept, from its history rows: {'head': the
    best head epoch (1 for the first), 'fine_tune': the best fine-tuning epoch, 0 when no
    fine-tuning epoch beat the head phase's weights or there was none}.

    It repeats the choice of ResumableEarlyStopping: the validation average precision
    when any epoch has one (the highest wins), else the validation loss (the lowest wins);
    an epoch counts only when strictly better than every one before it, and fine-tuning
    epochs compete with the head phase's best."""
    head = [row for row in rows if row.get("phase") == "head"]
    tuned = [row for row in rows if row.get("phase") == "fine_tune"]
    if not head:
        raise ValueError("the history has no head-phase epoch to refit")
    has_ap = any(np.isfinite(row.get("val_ap", np.nan)) for row in head + tuned)
    monitor, mode = ("val_ap", "max") if has_ap else ("val_loss", "min")
    best, kept = None, {"head": 0, "fine_tune": 0}
    for row in head:
        value = float(row.get(monitor, np.nan))
        if _improves(value, best, mode):
            best, kept["head"] = value, int(row["epoch"])
    # Fine-tuning's weights to beat are the head phase's, scored by the best finite value of
    # the rows before it (fit_phase's keep_start_unless_beaten).
    finite = [float(row[monitor]) for row in head if np.isfinite(row.get(monitor, np.nan))]
    best = (max(finite) if mode == "max" else min(finite)) if finite else None
    for row in tuned:
        value = float(row.get(monitor, np.nan))
        if _improves(value, best, mode):
            best, kept["fine_tune"] = value, int(row["epoch"])
    return kept


# --------------------------------------------------------------------------------------------
# Training without validation


class RefitLog(keras.callbacks.Callback):
    """One log line and one history row per refit epoch (there is no validation score)."""

    def __init__(self, phase: str, epochs: int, rows: list[dict]):
        super().__init__()
        self.phase, self.epochs, self.rows = phase, epochs, rows
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.monotonic() - self._start
        loss = float((logs or {}).get("loss", float("nan")))
        self.rows.append({"phase": self.phase, "epoch": epoch + 1, "loss": loss,
                          "seconds": round(seconds, 6)})
        log.info("refit %s epoch %d/%d: loss %.4f (%.1f s)", self.phase, epoch + 1,
                 self.epochs, loss, seconds)


def _fit_exactly(model, phase: str, epochs: int, batches, steps: int,
                 config: TrainingConfig, run: TrainingRun,
                 rows: list[dict], verbose: int = 0) -> None:
    """Fit a compiled `model` for exactly `epochs` epochs of `steps` steps: no validation, no
    early stopping, no checkpoint; a diverging loss still stops the run (FiniteLossGuard)."""
    rates = {"--fine-tune-learning-rate": config.fine_tune_learning_rate} \
        if phase == "fine_tune" else {}
    rates["--learning-rate"] = config.learning_rate
    batches = distribution.local_share(batches, run.placement)
    if distribution.is_multi_worker(run.placement):
        _build_for_workers(model, run.placement.strategy, batches)
    try:
        model.fit(batches, steps_per_epoch=steps, epochs=epochs, verbose=verbose, shuffle=False,
                  callbacks=[FiniteLossGuard(phase, rates), RefitLog(phase, epochs, rows)])
    finally:
        batches.close()


def _features(parts: ModelParts, images: LabelledImages,
              config: TrainingConfig, geometry: ImageGeometry,
              store, run: TrainingRun) -> np.ndarray:
    """The backbone features of every frame: the validation run's, kept in its checkpoint,
    when the backbone is the same pretrained one; computed again otherwise (with --weights
    none the refit calibrates its random backbone's BatchNorm on other frames)."""
    expected = (len(images.table), *parts.features.output_shape[1:])
    if config.weights_source != "none" and run.checkpoint is not None:
        features = run.checkpoint.features()
        if features is not None and features.shape == expected:
            return features
    return backbone_features(parts, images.table, geometry, config, store)


def train_on_all_frames(images: LabelledImages, config: TrainingConfig,
                        geometry: ImageGeometry, epochs: dict[str, int], store,
                        run: TrainingRun, rows: list[dict],
                        symbol_images: Sequence = ()) -> tuple[ModelParts, np.ndarray]:
    """A fresh model trained on every frame of `images` for exactly `epochs['head']` head
    epochs and `epochs['fine_tune']` fine-tuning epochs, as _train_phases trains one
    (same seed, BatchNorm calibration, positive weighting, batches and learning rates), but
    without validation, pasting the decoded `symbol_images` (symbol_paste.SymbolImage) as its
    fine-tuning did. Returns the model parts and the positive weights it used."""
    symbols, labels = images.symbols, images.labels()
    paths = images.table["path"].tolist()
    keras.utils.set_random_seed(config.seed)  # the validation run's initialisation
    with run.placement.strategy.scope():
        parts = build_model(symbols, config, geometry)
    if config.weights_source == "none":
        sample = paths[:64]  # every frame is a training frame now
        calibrate_batchnorm(parts, np.stack([load_image_array(p, geometry)
                                                    for p in sample]))
    weight_of_positive = positive_weights(labels, config.positive_weighting)
    targets = fused_targets(labels, sample_weights(labels, weight_of_positive))
    batch = run.global_batch(config.batch_size)
    steps = math.ceil(len(targets) / batch)

    features = _features(parts, images, config, geometry, store, run)
    fused = compiled_head(parts, symbols, config, run, steps)
    _fit_exactly(fused, "head", epochs["head"], feature_dataset(
        features, targets, batch, epoch_batches(len(targets), batch, config.seed, 0,
                                                epochs["head"],
                                                distribution.batch_multiple(run.placement))),
        steps, config, run, rows)
    _copy_fused_head(fused, parts, symbols)
    del features

    if epochs["fine_tune"] > 0:
        log.info("Refit: fine-tuning for %d epochs.", epochs["fine_tune"])
        # The validation run's schedule, planned over --fine-tune-epochs: the refit's last
        # epoch ends at the rate the kept epoch ended at.
        fused, model = compiled_fine_tuning(parts, symbols, config, run, steps)
        # --symbol-image pastes as in the validation run's fine-tuning (symbol_paste.py).
        paster = symbol_paste.paster_for(symbol_images, symbols, config)
        _fit_exactly(model, "fine_tune", epochs["fine_tune"], fine_tuning_batches(
            paths, targets, geometry, batch, config, store, paster, 0, epochs["fine_tune"],
            distribution.batch_multiple(run.placement)),
            steps, config, run, rows)
        _copy_fused_head(fused, parts, symbols)
        parts.backbone.trainable = False
    return parts, weight_of_positive


# --------------------------------------------------------------------------------------------
# The hook of train_and_save


@dataclass
class Refit:
    """What train_and_save needs from the refit: the model to save instead of the validation
    run's (None: no refit), and metadata.json's "refit" record."""

    parts: ModelParts | None
    record: dict = field(default_factory=dict)


def note(record: dict) -> str:
    """The one sentence that the report, the summary and --json give about the refit."""
    if not record.get("refit"):
        return ("The saved model is the one trained on the training frames and scored on the "
                "validation frames; the metrics are its own.")
    images, epochs = record["images"], record["epochs"]
    fine = (f" and {epochs['fine_tune']} fine-tuning epoch{'s' if epochs['fine_tune'] != 1 else ''}"
            if epochs["fine_tune"] else " (no fine-tuning epoch: validation kept the head "
            "phase's weights)")
    return (f"The saved model was refitted on all {images['refit']:,} frames (training and "
            f"validation together) for {epochs['head']} head epoch"
            f"{'s' if epochs['head'] != 1 else ''}{fine}, the epochs validation chose; every "
            f"metric, threshold, curve and frame shown here comes from the validation run "
            f"before refitting (trained on {images['validation_run']:,} frames, scored on "
            f"{images['validation']:,} it did not see), the only held-out figures there are, "
            "since the saved model has trained on every frame.")


def refit_if_asked(images: LabelledImages, config: TrainingConfig,
                   geometry: ImageGeometry, is_validation: np.ndarray,
                   rows: list[dict], store, run: TrainingRun, mixed: bool,
                   phase_seconds: dict | None = None, symbol_images: Sequence = ()) -> Refit:
    """With `config.refit`, the model trained again on every frame for the epochs that the
    validation run's `rows` kept (float32 after mixed precision, as saved models are), and
    its record, adding its seconds to `phase_seconds` as 'refit'; without it, no model and
    the record of a normal run."""
    trained = int((~is_validation).sum())
    if not config.refit:
        record = {"refit": False, "metrics_from": METRICS_FROM_SAVED_MODEL,
                  "images": {"trained_on": trained}}
        return Refit(None, {**record, "note": note(record)})
    epochs = kept_epochs(rows)
    total = len(images.table)
    log.info("Refit (--refit): training a fresh model on all %s frames (the %s training and "
             "%s validation frames) for the epochs validation kept: %d head, %d fine-tuning. "
             "It is not checkpointed: if stopped, a rerun continues the finished validation "
             "run from its checkpoint and starts the refit again.", f"{total:,}",
             f"{trained:,}", f"{total - trained:,}", epochs["head"], epochs["fine_tune"])
    started = time.monotonic()
    history: list[dict] = []
    with dtype_policy("mixed_float16" if mixed else "float32"):
        parts, weight_of_positive = train_on_all_frames(images, config, geometry, epochs,
                                                        store, run, history, symbol_images)
    if mixed:
        parts = float32_twin(parts, images.symbols, config, geometry)
    seconds = time.monotonic() - started
    if phase_seconds is not None:
        phase_seconds["refit"] = seconds
    log.info("Refit done in %.1f s (a second training pass on %s frames).", seconds,
             f"{total:,}")
    record = {"refit": True, "metrics_from": METRICS_FROM_VALIDATION_RUN,
              "epochs": epochs,
              "images": {"refit": total, "validation_run": trained, "validation": total - trained},
              "positive_weights": dict(zip(images.symbols, map(float, weight_of_positive))),
              "seconds": round(seconds, 3), "history": history}
    record["note"] = note(record)
    return Refit(parts, record)
