"""The whole run: the stages strung together, from labelled images to a model directory.

`train_and_save` and `check_or_train` (what the training programs call) live here. Like every
module of the package it never reads flags and never exits the process: it logs through
`logging` and raises `InputError` (the user must fix something; exit code 2) or other
exceptions (exit code 1).

The training loop:

1. `scan_images` (images) reads every image once, in parallel: content hash, size, and a full
   decode at reduced scale, so a corrupt file is found (and skipped) before training, never in
   epoch 3.
2. `split_train_validation` (splitting) makes a seeded, stratified split (iterative
   stratification over groups of frames; with no groups each frame is its own group).
3. `build_model` (model) builds raw pixels -> backbone preprocessing -> pretrained backbone ->
   pooling -> dropout -> one named sigmoid output per symbol.
4. Head phase: the backbone is frozen, so its pooled features are computed once per image
   (`features.extract_features`) and the head is trained on them for many cheap epochs.
5. Fine-tuning phase (`training.fine_tune`): the top of the backbone is unfrozen (BatchNorm
   stays frozen and in inference mode) and the whole model trains on streamed images at a
   lower learning rate.
6. The validation set is scored with the final model and everything is written to a temporary
   sibling of the model directory, which is renamed into place only at the end.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from symbol_trainer.backend import BACKEND, keras
from symbol_trainer.dependencies import require_backend_features
from symbol_trainer import checkpoints
from symbol_trainer import distribution
from symbol_trainer import evaluation
from symbol_trainer import heads
from symbol_trainer import refit
from symbol_trainer import output_dir as output_dir_checks
from symbol_trainer import report
from symbol_trainer import run_warnings
from symbol_trainer import symbol_paste
from symbol_trainer.callbacks import TrainingDiverged
from symbol_trainer.datasets import image_dataset, run_inference
from symbol_trainer.errors import InputError
from symbol_trainer.features import backbone_features, decoded_image_store
from symbol_trainer.images import ALPHA_BACKGROUND, ImageGeometry, input_geometry, load_image_array
from symbol_trainer.json_files import write_history, write_json
from symbol_trainer.labelled_images import LabelledImages
from symbol_trainer.model import build_model, calibrate_batchnorm
from symbol_trainer.model_dir import ModelDirectory, data_fingerprint, package_versions, save_model
from symbol_trainer.model_format import (
    CSV_FILE_NAMES, EVALUATION_FILE, HISTORY_FILE, METRICS_FILE, MODEL_FORMAT_VERSION, SPLIT_FILE)
from symbol_trainer.output_dir import METADATA_FILE, check_output_dir
from symbol_trainer.pixel_store import PixelStore
from symbol_trainer.precision import dtype_policy, float32_twin, mixed_precision_enabled
from symbol_trainer.preparation import PreparedData, format_data_summary, prepare_training_data
from symbol_trainer.settings import BACKBONES, TrainingConfig
from symbol_trainer.training import (
    TrainingRun, fine_tune, positive_weights, sample_weights, train_head)

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    output_dir: Path
    metrics: dict      # empty on a worker that is not the chief
    seconds: float
    counts: dict
    model: keras.Model  # the trained model in memory, the same weights as the saved one
    written: bool = True  # False on a worker that is not the chief: it writes nothing
    phase_seconds: dict = field(default_factory=dict)
    resumed_from: str | None = None  # where the run continued from a checkpoint, if it did
    exports: dict = field(default_factory=dict)  # format -> path, checked against the model
    refit: dict = field(default_factory=dict)  # metadata.json's "refit" record (refit.py)


def _train_phases(images: LabelledImages, config: TrainingConfig, geometry: ImageGeometry,
                  is_validation: np.ndarray, weight_of_positive: np.ndarray,
                  store: PixelStore | None, run: TrainingRun, symbol_images: Sequence = ()):
    """Build the model, extract features, train the head and fine-tune (pasting the decoded
    `symbol_images`, PreparedData.symbol_images), continuing from `run.resumed` where a phase
    was under way; returns the model parts, the history rows and the seconds per phase of
    this run."""
    symbols, labels = images.symbols, images.labels()
    with run.placement.strategy.scope():
        parts = build_model(symbols, config, geometry)
    paths = images.table["path"].tolist()
    if config.weights_source == "none":
        sample = [paths[i] for i in np.flatnonzero(~is_validation)[:64]]
        calibrate_batchnorm(parts, np.stack([load_image_array(p, geometry) for p in sample]))
        log.warning("Random backbone weights (--weights none): fine for tests and demos, far "
                    "less accurate than --weights imagenet on real frames.")
    phase_seconds = {}
    weights = sample_weights(labels, weight_of_positive)
    train_idx, val_idx = np.flatnonzero(~is_validation), np.flatnonzero(is_validation)
    rows: list[dict] = []
    if run.resumed_in("fine_tune") is None:  # the head phase, or its end state, is still needed
        t = time.monotonic()
        features = run.checkpoint.features() if run.checkpoint is not None else None
        expected = (len(paths), *parts.features.output_shape[1:])
        if features is None or features.shape != expected:
            features = backbone_features(parts, images.table, geometry, config, store)
            if run.checkpoint is not None:
                run.checkpoint.save_features(features)
        phase_seconds["features"] = time.monotonic() - t
        t = time.monotonic()
        take = heads.take_rows if parts.spatial else (lambda array, rows: array[rows])
        train_head(parts, symbols, config,
                   (take(features, train_idx), labels[train_idx], weights[train_idx]),
                   (take(features, val_idx), labels[val_idx], weights[val_idx]), rows, run)
        phase_seconds["head"] = time.monotonic() - t
    if config.fine_tune_epochs > 0:
        t = time.monotonic()
        fine_tune(parts, symbols, config, geometry,
                  ([paths[i] for i in train_idx], labels[train_idx], weights[train_idx]),
                  ([paths[i] for i in val_idx], labels[val_idx], weights[val_idx]), rows, store,
                  run, symbol_images=symbol_images)
        phase_seconds["fine_tune"] = time.monotonic() - t
    return parts, rows, phase_seconds


# Settings that change where or how fast a run goes, or only what happens after training
# (--threshold-for), not what it trains: a checkpoint made with other values of these is
# resumed all the same. The device count is compared instead of --devices, and mixed precision
# as it was resolved.
SETTINGS_NOT_IN_RUN_KEY = frozenset({"tensorboard", "cache_dir", "decoded_cache_gb", "devices",
                                     "mixed_precision", "threshold_for",
                                     # --refit trains after the checkpointed run (refit.py)
                                     "refit"})


def run_key(prepared: PreparedData, geometry: ImageGeometry, mixed: bool,
            placement: distribution.Placement) -> dict:
    """What makes two runs the same run, for resuming: a checkpoint is only continued by a
    run whose key is equal."""
    config = prepared.config
    split = prepared.split_table().to_csv(index=False).encode(**CSV_FILE_NAMES)
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if k not in SETTINGS_NOT_IN_RUN_KEY}
    if settings["pooling"] == "avg":  # as before --pooling existed: older checkpoints resume
        del settings["pooling"]
    if settings["symbol_images"]:  # the images' content, not only their paths
        settings["symbol_images"] = [[i.symbol, i.path, i.sha1] for i in prepared.symbol_images]
    else:  # as before --symbol-image existed
        del settings["symbol_images"], settings["symbol_image_rate"], settings["symbol_image_size"]
    if settings["fine_tune_schedule"] == "constant":  # as before the schedule: no warm-up either
        del settings["fine_tune_schedule"], settings["fine_tune_warmup"]
    return {
        "settings": settings,
        "mixed_precision": mixed, "replicas": placement.replicas,
        "symbols": list(prepared.images.symbols), "input": geometry.to_json(),
        "data_sha256": data_fingerprint(prepared.images.table, prepared.images.symbols),
        "split_sha256": hashlib.sha256(split).hexdigest(),
        # Checkpoints of versions whose early stopping watched the validation loss hold
        # counters that mean something else.
        "early_stopping": "val_ap",
    }


def _open_checkpoint(directory: ModelDirectory, key: dict, placement: distribution.Placement,
                     resume: bool) -> TrainingRun:
    if placement.is_chief:
        directory.prepare(keep_checkpoint=resume)
    checkpoint = checkpoints.Checkpoint(directory.checkpoint, key, writer=placement.is_chief)
    try:
        resumed = checkpoint.open(resume)
    except checkpoints.RunMismatch as error:
        shown = "; ".join(error.differences[:3]) + ("; ..." if len(error.differences) > 3 else "")
        raise InputError(
            f"{directory.partial} holds the checkpoint of an unfinished run with other settings "
            f"or data ({shown}). Run the command that started it to continue it, or pass "
            "--no-resume to start this one over (its checkpoint is then deleted).") from None
    if resumed is not None:
        log.info("Resuming from the checkpoint in %s: %s. (--no-resume starts over.)",
                 directory.checkpoint, checkpoint.progress(resumed))
    return TrainingRun(placement, checkpoint, resumed)


def _resume_hint(directory: ModelDirectory, run: TrainingRun) -> str:
    """What a rerun would continue from, for the user; empty when there is nothing to keep."""
    try:
        state = run.checkpoint.latest()
    except checkpoints.RunMismatch:
        return ""
    if state is None and run.checkpoint.features() is None:
        return ""
    done = run.checkpoint.progress(state)
    return (f"The checkpoint in {directory.checkpoint} keeps the backbone features and the "
            f"completed epochs ({done}); run the same command again to continue from there, or "
            "add --no-resume to start over.")


def check_output_outside_images(output_dir: str | os.PathLike, images: LabelledImages,
                                config: TrainingConfig) -> None:
    """Refuse an output folder that is, contains or lies inside a folder of the images, the
    feature cache or the TensorBoard logs (the scripts check the paths the user typed first;
    this also covers callers of the library)."""
    folders = sorted({os.path.dirname(path) for path in images.table["path"]})
    output_dir_checks.check_outside_inputs(output_dir, [
        ("--cache-dir", config.cache_dir), ("--tensorboard", config.tensorboard),
        *(("the image folder", folder) for folder in folders)])


@run_warnings.collected  # the report and metrics.json show every warning of the run
def train_and_save(images: LabelledImages, config: TrainingConfig,
                   output_dir: str | os.PathLike, *, overwrite: bool = False,
                   is_validation: np.ndarray | None = None, resume: bool = True,
                   exports: Sequence[str] = ()) -> TrainingResult:
    """Train on `images` with `config` and write the model directory; the whole pipeline.
    `is_validation` (one bool per row of `images.table`) replaces the seeded split. With
    `resume`, a checkpoint left by an interrupted run of the same settings and data is
    continued; otherwise it is deleted. `exports` ('saved_model', 'tflite', 'onnx') are
    written into the model directory and checked against the Keras model."""
    started = time.monotonic()
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if exports:  # the backend and the packages each export needs, before any training
        from symbol_trainer.export import check_formats
        check_formats(exports)
    check_output_outside_images(output_dir, images, config)
    check_output_dir(output_dir, overwrite)
    # What only TensorFlow does (--tensorboard, TF_CONFIG, ...) fails before any work.
    require_backend_features(config.devices, config.tensorboard, BACKEND)
    try:
        placement = distribution.placement(distribution.DeviceChoice.parse(config.devices))
    except ValueError as error:
        raise InputError(f"--devices {config.devices!r}: {error}.") from None
    log.info("Training on %s; global batch %d (--batch-size %d per device).",
             placement.description, config.batch_size * placement.replicas, config.batch_size)
    prepared = prepare_training_data(images, config, is_validation)
    images, is_validation, counts = prepared.images, prepared.is_validation, prepared.counts
    symbols = images.symbols
    labels = images.labels()
    geometry = input_geometry(config.image_size, config.resize,
                              list(zip(images.table["image_width"], images.table["image_height"])))
    log.info("Model input: %dx%d pixels (width x height), %s.", geometry.width, geometry.height,
             config.resize)

    mixed = mixed_precision_enabled(config.mixed_precision)
    log.info("Mixed precision (float16 compute): %s; XLA: %s.", "on" if mixed else "off",
             config.xla)
    keras.utils.set_random_seed(config.seed)
    paths = images.table["path"].tolist()
    val_idx = np.flatnonzero(is_validation)
    weight_of_positive = positive_weights(labels[~is_validation], config.positive_weighting)
    directory = ModelDirectory(output_dir)
    run = None
    try:
        key = run_key(prepared, geometry, mixed, placement)
        run = _open_checkpoint(directory, key, placement, resume)
        store = decoded_image_store(paths, geometry, config)
        try:
            with dtype_policy("mixed_float16" if mixed else "float32"):
                parts, rows, phase_seconds = _train_phases(
                    images, config, geometry, is_validation, weight_of_positive, store, run,
                    symbol_images=prepared.symbol_images)
            if mixed:
                parts = float32_twin(parts, symbols, config, geometry)
            # --refit hook (refit.py): the model to save, trained again on every frame for the
            # epochs validation kept; `parts` stays the validation run's, scored below.
            refitted = refit.refit_if_asked(images, config, geometry, is_validation, rows,
                                            store, run, mixed, phase_seconds,
                                            symbol_images=prepared.symbol_images)
            # Several JAX processes: the last step taken together is behind them; process 0
            # scores and saves on its own devices from here, the others stop.
            distribution.leave_cluster(placement, [parts.model, refitted.parts and
                                                   refitted.parts.model])
            if not placement.is_chief:
                log.info("Worker %d is done; worker 0 writes the model directory.",
                         placement.worker_index)
                return TrainingResult(Path(output_dir), {}, time.monotonic() - started, counts,
                                      parts.model, written=False, phase_seconds=phase_seconds)
            # Scored with the model as saved, so metrics.json describes the file users get.
            outputs = run_inference(parts.model, image_dataset(
                [paths[i] for i in val_idx], geometry, config.batch_size, store=store))
        finally:
            if store is not None:
                store.close()
        probabilities = np.concatenate([outputs[s] for s in symbols], axis=1)
        split_table = prepared.split_table()
        validation_labels = labels[val_idx]
        grouped = prepared.groups is not None
        thresholds = evaluation.choose_thresholds(
            validation_labels, probabilities, symbols,
            evaluation.parse_threshold_rule(config.threshold_for),
            prepared.groups[val_idx] if grouped else None)
        metrics = evaluation.evaluation_metrics(
            validation_labels, probabilities, symbols, thresholds,
            prepared.groups[val_idx] if grouped else None, seed=config.seed,
            group_name=f"groups, by {counts['grouping']}" if grouped else
            "frames one by one (the split was not grouped, so the intervals are too narrow "
            "where neighbouring frames are near-identical)")
        evaluation_table = evaluation.evaluation_table(
            images.table["filename"].to_numpy()[val_idx], split_table["group"].to_numpy()[val_idx],
            validation_labels, probabilities, symbols, thresholds)
        resumed_from = run.checkpoint.progress(run.resumed) if run.resumed is not None else None
        metadata = {
            "format_version": MODEL_FORMAT_VERSION,
            "symbols": list(symbols),
            "outputs": {s: {"activation": "sigmoid", "meaning": f"probability that {s} is visible"}
                        for s in symbols},
            "input": {**geometry.to_json(), "channels": 3, "color": "RGB", "dtype": "uint8",
                      "value_range": [0, 255], "alpha_background": ALPHA_BACKGROUND,
                      "exif_orientation": "applied"},
            "backbone": {"name": config.backbone, "alpha": config.alpha,
                         "weights": config.weights_source,
                         "preprocessing": BACKBONES[config.backbone].preprocessing},
            "training": {"config": dataclasses.asdict(config),
                         "positive_weights": dict(zip(symbols, map(float, weight_of_positive))),
                         "phase_seconds": phase_seconds, "started_at": started_at,
                         "mixed_precision": mixed, "devices": placement.description,
                         "replicas": placement.replicas,
                         "global_batch_size": config.batch_size * placement.replicas,
                         "resumed_from": resumed_from},
            # Decision thresholds, `probability >= threshold` meaning visible, from the
            # validation set by `threshold_rule`; predict_images applies them.
            "thresholds": {s: thresholds[s].threshold for s in symbols},
            # --symbol-image: what fine-tuning pasted into training frames (never validation).
            "symbol_images": symbol_paste.description(prepared.symbol_images, config),
            "threshold_rule": config.threshold_for,
            "data": {"source": images.source, "details": images.details, "counts": counts,
                     "fingerprint_sha256": key["data_sha256"]},
            "packages": package_versions(),
        }
        # --refit hook: save the refitted model; metrics and report stay the validation run's.
        metadata["refit"] = refitted.record
        validated, parts = parts, refitted.parts or parts
        partial = directory.partial
        save_model(parts, symbols, partial)
        exported = {}
        if exports:
            from symbol_trainer import export  # TensorFlow's exporters load only for runs that ask for them
            exported = export.export_and_check(
                partial, parts.model, symbols, geometry, list(exports),
                [paths[i] for i in val_idx[:8]])
            metadata["exports"] = {name: str(path.relative_to(partial))
                                   for name, path in exported.items()}
        write_history(partial / HISTORY_FILE, rows)
        write_json(partial / METADATA_FILE, metadata)
        # A file name that is not UTF-8 (Linux allows any bytes) is written byte for byte.
        split_table.to_csv(partial / SPLIT_FILE, index=False, **CSV_FILE_NAMES)
        evaluation_table.to_csv(partial / EVALUATION_FILE, index=False, **CSV_FILE_NAMES)
        report.write_report(partial, model_name=Path(output_dir).name, metadata=metadata,
                            metrics=metrics, history=pd.DataFrame(rows), table=evaluation_table,
                            paths=[paths[i] for i in val_idx], warnings=run_warnings.current(),
                            model=validated.model)  # heatmaps of the model scored there
        metrics["warnings"] = list(run_warnings.current())  # the report's own included
        write_json(partial / METRICS_FILE, metrics)
        directory.commit()
    except BaseException as error:  # an error, Ctrl-C, SIGTERM: keep what a rerun continues from
        if placement.is_chief and run is not None:
            # A rerun of a diverged run would diverge again, and one with a lower learning
            # rate cannot continue its checkpoint: nothing of it is kept.
            hint = "" if isinstance(error, TrainingDiverged) else _resume_hint(directory, run)
            if hint:
                directory.prepare(keep_checkpoint=True)  # only the checkpoint stays
                log.warning("%s", hint)
            else:
                directory.discard()
        raise
    finally:
        directory.release()
    seconds = time.monotonic() - started
    return TrainingResult(Path(output_dir), metrics, seconds, counts, parts.model,
                          phase_seconds=phase_seconds, resumed_from=resumed_from,
                          refit=refitted.record,
                          exports={k: Path(output_dir) / v.relative_to(directory.partial)
                                   for k, v in exported.items()})


@dataclass
class CommandOutcome:
    """What a training command reports: a summary for people, and the record that --json
    prints as one line."""

    summary: str
    record: dict


def _metrics_record(metrics: dict) -> dict:
    """The numbers of metrics.json that fit on one line: macro figures and, per symbol, its
    scalar metrics and threshold."""
    def scalars(values: dict) -> dict:
        return {k: v for k, v in values.items() if isinstance(v, (int, float, str)) or v is None}
    return {"macro": scalars(metrics.get("macro", {})),
            "symbols": {s: scalars(v) for s, v in metrics.get("symbols", {}).items()}}


def check_or_train(images: LabelledImages, config: TrainingConfig, output_dir: str | os.PathLike,
                   *, overwrite: bool = False, dry_run: bool = False,
                   is_validation: np.ndarray | None = None, resume: bool = True,
                   exports: Sequence[str] = ()) -> CommandOutcome:
    """What both scripts do once they have their labelled images: with `dry_run`, every check
    before training and the data summary; otherwise train, save, and summarise the metrics."""
    if dry_run:
        if exports:  # --export's backend and packages; train_and_save checks them otherwise
            from symbol_trainer.export import check_formats
            check_formats(exports)
        # An existing model directory is only a note here: dry runs are repeated after every
        # labelling session next to the model trained last time.
        if Path(output_dir).exists() and not Path(output_dir).is_dir():
            raise InputError(f"OUTPUT_MODEL_DIR {output_dir} is a file; give a directory path.")
        check_output_outside_images(output_dir, images, config)
        output_note = ""
        try:
            check_output_dir(output_dir, overwrite, create_parent=False)
        except InputError as error:
            output_note = f"\nNote: {error}"
        prepared = prepare_training_data(images, config, is_validation)
        counts = prepared.counts
        return CommandOutcome(
            "Dry run: all checks of the data passed; no model was trained." + output_note
            + "\n" + format_data_summary(prepared),
            {"status": "ok", "exit_code": 0, "dry_run": True,
             "images": {k: counts[k]["images"] for k in ("train", "validation")},
             "unreadable": counts["unreadable"]})
    result = train_and_save(images, config, output_dir, overwrite=overwrite,
                            is_validation=is_validation, resume=resume, exports=exports)
    record = {"status": "ok", "exit_code": 0,
              "model_dir": str(Path(result.output_dir).resolve()), "written": result.written,
              "resumed_from": result.resumed_from,
              "images": {k: result.counts[k]["images"] for k in ("train", "validation")},
              "seconds": {"total": round(result.seconds, 3),
                          **{k: round(v, 3) for k, v in result.phase_seconds.items()}},
              "metrics": _metrics_record(result.metrics),
              "exports": {k: str(Path(v).resolve()) for k, v in result.exports.items()}}
    # --refit hook: what was saved and where the metrics come from (refit.py)
    record["refit"] = {k: v for k, v in result.refit.items() if k != "history"}
    if not result.written:
        return CommandOutcome(f"Training finished on this worker in {result.seconds:.0f} s; "
                              f"the chief (worker 0) writes {result.output_dir}.", record)
    bootstrap = result.metrics["bootstrap"]
    return CommandOutcome(
        f"Validation metrics (thresholds chosen by --threshold-for {config.threshold_for}; "
        f"95 % intervals from {bootstrap['replicates']:,} bootstrap resamples of "
        f"{bootstrap['resampled'].split(' (')[0]}):\n"
        f"{evaluation.format_metrics_summary(result.metrics)}\n"
        + (f"{result.refit['note']}\n" if result.refit.get("refit") else "") +
        f"Wrote {result.output_dir} in {result.seconds:.0f} s; open "
        f"{Path(result.output_dir) / report.REPORT_FILE} for curves and the frames it gets wrong.",
        record)
