"""Both training phases: the class weights and the weighted loss, the fused head, one phase's
fit (resumable, distributable), the head phase on cached features and the fine-tuning phase
on streamed images.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from symbol_trainer.backend import BACKEND, keras
from symbol_trainer import augmentation
from symbol_trainer import checkpoints
from symbol_trainer import distribution
from symbol_trainer import heads
from symbol_trainer import schedules
from symbol_trainer import symbol_paste
from symbol_trainer.callbacks import (
    EpochCheckpoint, EpochLog, FiniteLossGuard, ResumableEarlyStopping, ValidationScores)
from symbol_trainer.datasets import Batches, epoch_batches, feature_dataset, image_dataset
from symbol_trainer.errors import InputError
from symbol_trainer.images import ImageGeometry
from symbol_trainer.model import ModelParts, unfreeze_top
from symbol_trainer.pixel_store import PixelStore
from symbol_trainer.settings import TrainingConfig

log = logging.getLogger(__name__)


def positive_weights(labels: np.ndarray, scheme: str) -> np.ndarray:
    """Per-symbol weight of a positive frame. 'balanced': negatives / positives of the symbol
    in the training split, clipped to [1, 100]: a symbol visible in 2 % of frames gets 49, so
    its positives weigh as much in the loss as its negatives. 'none': 1."""
    if scheme == "none":
        return np.ones(labels.shape[1], dtype=np.float32)
    positives = np.nansum(labels == 1, axis=0).astype(np.float64)
    negatives = np.nansum(labels == 0, axis=0).astype(np.float64)
    return np.clip(negatives / np.maximum(positives, 1), 1.0, 100.0).astype(np.float32)


def sample_weights(labels: np.ndarray, weight_of_positive: np.ndarray) -> np.ndarray:
    """Per frame and symbol: the positive weight, 1 for a negative, 0 where not annotated."""
    weights = np.where(labels == 1, weight_of_positive[None, :], 1.0)
    return np.where(np.isnan(labels), 0.0, weights).astype(np.float32)


def _jit_compile(setting: str):
    return {"auto": "auto", "on": True, "off": False}[setting]


def weighted_binary_crossentropy(labels_and_weights, logits, focal_gamma: float = 0.0):
    """Sum over symbols of weight x binary cross-entropy, for one frame. `labels_and_weights`
    is the labels and the per-symbol weights side by side, (batch, 2 x symbols). With
    `focal_gamma` G above 0, each term is multiplied by (1 - p)^G, p being the probability
    given to the true label (focal loss): confidently right frames count less."""
    labels, weights = keras.ops.split(labels_and_weights, 2, axis=-1)
    losses = keras.ops.binary_crossentropy(labels, logits, from_logits=True)
    if focal_gamma:
        # 1 - p of the true label is sigmoid(-logit) for a positive, sigmoid(logit) for a
        # negative: sigmoid((1 - 2 x label) x logit), without 1 - p rounding to 0.
        wrong = keras.ops.sigmoid((1.0 - 2.0 * labels) * logits)
        losses = losses * keras.ops.power(wrong, focal_gamma)
    return keras.ops.sum(losses * weights, axis=-1)


def training_loss(focal_gamma: float = 0.0) -> Callable:
    """The loss both phases compile: `weighted_binary_crossentropy`, focal when
    `focal_gamma` (--focal-gamma) is above 0."""
    if not focal_gamma:
        return weighted_binary_crossentropy

    def focal_weighted_binary_crossentropy(labels_and_weights, logits):
        return weighted_binary_crossentropy(labels_and_weights, logits, focal_gamma)
    return focal_weighted_binary_crossentropy


def fused_targets(labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """What `weighted_binary_crossentropy` takes: labels and weights side by side."""
    # An unannotated label (NaN) has weight 0, but NaN x 0 is still NaN: any finite value does.
    return np.concatenate([np.nan_to_num(labels), weights], axis=1).astype(np.float32)


def compile_fused(model: keras.Model,
                  learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
                  xla: str = "auto", steps_per_execution: int = 1,
                  focal_gamma: float = 0.0) -> None:
    """Compile a model with fused logits (`fused_head`) for training with `fused_targets`.
    `steps_per_execution` steps run in one call of the compiled step; it must divide the
    steps of an epoch, or an execution would run into the next epoch's batches."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=training_loss(focal_gamma), jit_compile=_jit_compile(xla),
                  steps_per_execution=steps_per_execution)


def fused_head(parts: ModelParts, symbols: Sequence[str], dropout: float) -> keras.Model:
    """A training twin of `parts.head`: the same dropout, then one Dense(symbols) giving
    logits, starting from the per-symbol layers' weights. Both phases train it, and
    `_copy_fused_head` puts its weights back into the named outputs the saved model has.

    With one small Dense per symbol, Keras's per-output bookkeeping (a loss, a weight and a
    metric per output at every step, and a label slice per output in the input pipeline)
    costs far more than the arithmetic: 7 s per head epoch at 45 symbols, and half the
    fine-tuning step rate. One matrix does the same sums in a single op. A spatial head's
    twin is heads.fused_spatial_head: its score map already is one convolution."""
    if parts.spatial:
        return heads.fused_spatial_head(parts.head, parts.pooling, dropout,
                                        tuple(parts.features.output_shape[1:]))
    layers = [parts.head.get_layer(s) for s in symbols]
    inputs = keras.Input(shape=(parts.features.output_shape[-1],), name="features")
    x = keras.layers.Dropout(dropout, dtype="float32")(inputs)
    dense = keras.layers.Dense(len(symbols), name="logits", dtype="float32")
    model = keras.Model(inputs, dense(x), name="fused_head")
    dense.set_weights([np.concatenate([l.get_weights()[0] for l in layers], axis=1),
                       np.concatenate([l.get_weights()[1] for l in layers], axis=0)])
    return model


def _copy_fused_head(fused: keras.Model, parts: ModelParts, symbols: Sequence[str]) -> None:
    if parts.spatial:
        heads.copy_fused_spatial_head(fused, parts.head, parts.pooling)
        return
    kernel, bias = fused.get_layer("logits").get_weights()
    for i, symbol in enumerate(symbols):
        parts.head.get_layer(symbol).set_weights([kernel[:, i:i + 1], bias[i:i + 1]])


@dataclass
class TrainingRun:
    """Where a run trains and what it resumes: the devices and cluster (`placement`), the
    checkpoint it writes every epoch (None: none), and the state it continues from."""

    placement: distribution.Placement
    checkpoint: checkpoints.Checkpoint | None = None
    resumed: checkpoints.PhaseState | None = None

    def resumed_in(self, phase: str) -> checkpoints.PhaseState | None:
        return self.resumed if self.resumed is not None and self.resumed.phase == phase else None

    def global_batch(self, batch_size: int) -> int:
        return batch_size * self.placement.replicas


def single_device_run() -> TrainingRun:
    """Training on the backend's default device, without a checkpoint: what library callers
    that train one phase by hand (benchmarks, tests) get."""
    return TrainingRun(distribution.default_placement())


def _restore_variables(model: keras.Model, state: checkpoints.PhaseState) -> None:
    # Compared by shape, in order: Keras numbers unnamed layers by how many were built before
    # in the process, so a run resumed in fine-tuning names its variables differently.
    shapes = [tuple(v.shape) for v in model.variables]
    if shapes != [tuple(np.shape(value)) for value in state.variables]:
        raise InputError(
            "the checkpoint's model does not match the model this run builds (was the code "
            "or Keras updated since?); pass --no-resume to start over.")
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    for variable, value in zip(model.variables, state.variables):
        variable.assign(value)
    for variable, value in zip(model.optimizer.variables, state.optimizer):
        variable.assign(value)


def _build_for_workers(model: keras.Model, strategy, dataset) -> None:
    """Build `model`'s state from the shapes of `dataset` before fitting it across workers.

    Keras 3.15 builds a model under a tf.distribute strategy inside fit() by averaging its
    first batch over the replicas with `strategy.reduce`, which MultiWorkerMirroredStrategy
    cannot do for an (images, targets) pair ('unsupported type PerReplica'). Built here from
    shapes alone, fit() and evaluate() are told to skip that step."""
    example = keras.tree.map_structure(lambda a: np.zeros([1, *a.shape[1:]], a.dtype),
                                       dataset[0])
    with strategy.scope():
        model._symbolic_build(data_batch=example)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None


def fit_phase(model: keras.Model, phase: str, config: TrainingConfig, run: TrainingRun,
              train_data: Callable[[int], Batches], steps: int,
              validation: ValidationScores, rows: list[dict], verbose: int = 0,
              keep_start_unless_beaten: bool = False) -> int:
    """Fit a compiled `model` for one phase, with `validation` scoring every epoch, early
    stopping on its `monitor()`, one log line and one history row per epoch, and a
    checkpoint per epoch. `train_data(first_epoch)` gives the training batches of epochs
    first_epoch onwards, `steps` per epoch. Resumes from `run.resumed` when it is a state of
    this phase, and returns at once when that phase had finished.

    With `keep_start_unless_beaten`, the weights the phase starts from, scored by the best
    row of `rows` so far (the phase before), count as a candidate: when no epoch beats them
    the phase ends with them. Returns the epoch whose weights the model ends with (1 for
    the first), or 0 for the starting weights."""
    epochs = config.epochs if phase == "head" else config.fine_tune_epochs
    resumed = run.resumed_in(phase)
    monitor = validation.monitor()
    if monitor == "val_loss":
        log.warning("No symbol has both visible and not-visible validation frames: early "
                    "stopping in the %s phase watches the validation loss instead of the "
                    "validation average precision.", phase)
    earlier = [row[monitor] for row in rows if np.isfinite(row.get(monitor, np.nan))]
    starting_score = None
    if keep_start_unless_beaten and earlier:
        starting_score = max(earlier) if monitor == "val_ap" else min(earlier)
    patience = config.patience if phase == "head" else config.fine_tune_patience
    early_stopping = ResumableEarlyStopping(patience, resumed, monitor, starting_score)
    first_epoch = 0
    if resumed is not None:
        rows[:] = resumed.rows
        with run.placement.strategy.scope():
            _restore_variables(model, resumed)
        if resumed.finished:
            if resumed.best_weights is not None:
                model.set_weights(resumed.best_weights)
            return int(resumed.early_stopping.get("best_epoch", -1)) + 1
        first_epoch = resumed.epochs_done
    batches = distribution.local_share(train_data(first_epoch), run.placement)
    if distribution.is_multi_worker(run.placement):
        _build_for_workers(model, run.placement.strategy, batches)
    # Validation first: the callbacks after it read its scores from the epoch's logs.
    # A head phase that trained at too high a rate can leave weights that only overflow in
    # fine-tuning, so both rates are named there.
    rates = {"--fine-tune-learning-rate": config.fine_tune_learning_rate} if phase != "head" else {}
    rates["--learning-rate"] = config.learning_rate
    callbacks = [validation, schedules.LearningRateLog(), FiniteLossGuard(phase, rates),
                 early_stopping, EpochLog(phase, epochs, rows, steps, validation)]
    if run.checkpoint is not None and run.checkpoint.writer:
        callbacks.append(EpochCheckpoint(run.checkpoint, phase, epochs, rows, early_stopping))
    if config.tensorboard and run.placement.is_chief:
        # One folder per phase: their epochs both count from 1 and would overwrite each other.
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(config.tensorboard, phase),
                                                     write_graph=False))
    # shuffle=False: the batches come shuffled by epoch_batches.
    try:
        model.fit(batches, steps_per_epoch=steps, initial_epoch=first_epoch, epochs=epochs,
                  verbose=verbose, callbacks=callbacks, shuffle=False)
    finally:
        batches.close()  # early stopping leaves batches loading ahead
    return early_stopping.best_epoch + 1


def compiled_head(parts: ModelParts, symbols: Sequence[str], config: TrainingConfig,
                  run: TrainingRun, steps: int) -> keras.Model:
    """The head phase's fused head, compiled for epochs of `steps` steps (train_head, and the
    refit's head epochs)."""
    with run.placement.strategy.scope():
        fused = fused_head(parts, symbols, config.dropout)
        # A head step on cached features is a few microseconds of arithmetic and a
        # millisecond of Keras's per-call overhead; running a whole epoch in one compiled call
        # halves the head epochs' time (0.3 s to 0.13 s at 5,000 frames and 45 symbols).
        # Keras 3.15 cannot run several steps per call under MirroredStrategy (an
        # InvalidArgumentError in multi_step_on_iterator), so several replicas keep one, and
        # Keras's torch backend runs one step per call only.
        several = run.placement.replicas == 1 and BACKEND != "torch"
        compile_fused(fused, config.learning_rate, config.xla,
                      steps_per_execution=steps if several else 1,
                      focal_gamma=config.focal_gamma)
    return fused


def train_head(parts: ModelParts, symbols: Sequence[str], config: TrainingConfig,
               train: tuple[np.ndarray, np.ndarray, np.ndarray],
               validation: tuple[np.ndarray, np.ndarray, np.ndarray],
               rows: list[dict], run: TrainingRun | None = None) -> None:
    """Head phase on precomputed features; each tuple is (features, labels, weights).
    Trains `fused_head` and copies its weights into the per-symbol output layers."""
    run = run or single_device_run()
    batch = run.global_batch(config.batch_size)
    steps = math.ceil(len(train[1]) / batch)
    fused = compiled_head(parts, symbols, config, run, steps)
    targets = fused_targets(train[1], train[2])
    fit_phase(fused, "head", config, run,
              lambda first: feature_dataset(train[0], targets, batch, epoch_batches(
                  len(targets), batch, config.seed, first, config.epochs,
                  distribution.batch_multiple(run.placement))),
              steps,
              ValidationScores(lambda: (validation[0][i:i + batch]
                                        for i in range(0, len(validation[0]), batch)),
                               fused_targets(validation[1], validation[2])),
              rows)
    _copy_fused_head(fused, parts, symbols)


def training_model(parts: ModelParts, head: keras.Model, config: TrainingConfig) -> keras.Model:
    """The model that fine-tuning fits: image -> the augmentation layers of `config` ->
    `parts.features` -> `head` (a `fused_head`), sharing the backbone's weights. The
    augmentation acts in training steps only, so validation sees the images as they are,
    and the saved model (`parts.model`) has none."""
    augmenter = augmentation.augmentation_layers(config.augment, config.flip, config.seed)
    inputs = keras.Input(shape=parts.model.input_shape[1:], name="image")
    x = inputs if augmenter is None else augmenter(inputs)
    return keras.Model(inputs, head(parts.features(x)), name="fine_tuning")


def compiled_fine_tuning(parts: ModelParts, symbols: Sequence[str], config: TrainingConfig,
                         run: TrainingRun, steps: int) -> tuple[keras.Model, keras.Model]:
    """Unfreeze the top --fine-tune-fraction of the backbone and compile the fine-tuning
    model for epochs of `steps` steps, with the --fine-tune-schedule planned over
    --fine-tune-epochs; returns the fused head and the model that trains it (fine_tune, and
    the refit's fine-tuning epochs)."""
    layers = unfreeze_top(parts.backbone, config.fine_tune_fraction)
    # --fine-tune-schedule (schedules.py): a number, or a schedule of the optimizer's steps.
    rate = schedules.fine_tuning_rate(config.fine_tune_learning_rate, config.fine_tune_schedule,
                                      config.fine_tune_epochs, steps, config.fine_tune_warmup)
    log.info("Fine-tuning the top %d weighted layers of %s, learning rate %s", layers,
             config.backbone, schedules.describe(rate))
    # XLA is not known to compile the augmentation's image resampling op, so 'auto' leaves
    # an augmented fine-tuning step to TensorFlow's own kernels; --xla on forces it. Under
    # JAX, XLA is the only compiler (off runs every op eagerly, many times slower), and
    # under torch 'auto' is Keras's choice.
    augmented = augmentation.augments(config.augment, config.flip)
    xla = "off" if augmented and config.xla == "auto" and BACKEND == "tensorflow" else config.xla
    with run.placement.strategy.scope():
        fused = fused_head(parts, symbols, config.dropout)
        model = training_model(parts, fused, config)
        compile_fused(model, rate, xla, focal_gamma=config.focal_gamma)
    return fused, model


def fine_tuning_batches(paths: Sequence[str], targets: np.ndarray, geometry: ImageGeometry,
                        batch: int, config: TrainingConfig, store: PixelStore | None,
                        paster, first: int, epochs: int, multiple: int = 1) -> Batches:
    """The fine-tuning batches from epoch `first` (counted from 0) of `epochs`: the images in
    each epoch's seeded order, --symbol-image pastes numbered from that epoch's first batch.
    `multiple`: see datasets.BatchOrder."""
    steps = math.ceil(len(targets) / batch)
    return symbol_paste.pasting(image_dataset(
        paths, geometry, batch, targets=targets, store=store,
        order=epoch_batches(len(targets), batch, config.seed, first, epochs, multiple)),
        paster, first * steps)


def fine_tune(parts: ModelParts, symbols: Sequence[str], config: TrainingConfig,
              geometry: ImageGeometry, train: tuple[list[str], np.ndarray, np.ndarray],
              validation: tuple[list[str], np.ndarray, np.ndarray], rows: list[dict],
              store: PixelStore | None = None, run: TrainingRun | None = None,
              symbol_images: Sequence = ()) -> None:
    """Fine-tuning phase on streamed images; each tuple is (paths, labels, weights).
    `symbol_images` (symbol_paste.SymbolImage) are pasted into training images only."""
    run = run or single_device_run()
    batch = run.global_batch(config.batch_size)
    targets = fused_targets(train[1], train[2])
    steps = math.ceil(len(targets) / batch)
    fused, model = compiled_fine_tuning(parts, symbols, config, run, steps)
    paster = symbol_paste.paster_for(symbol_images, symbols, config)
    # Keras's progress bar writes to standard output: shown only when that is a terminal.
    verbose = 1 if sys.stdout.isatty() and log.isEnabledFor(logging.INFO) else 0
    # The head phase's weights stay unless a fine-tuning epoch scores better on validation:
    # fine-tuning can lower the validation AP (on logodet3k_clothes every one of 5 epochs
    # did, and the held-out AP fell from 0.961 to 0.951 when the best of them was kept).
    kept = fit_phase(model, "fine_tune", config, run,
                     lambda first: fine_tuning_batches(train[0], targets, geometry, batch,
                                                       config, store, paster, first,
                                                       config.fine_tune_epochs,
                                                       distribution.batch_multiple(run.placement)),
                     steps,
                     ValidationScores(lambda: image_dataset(validation[0], geometry, batch,
                                                            store=store),
                                      fused_targets(validation[1], validation[2])),
                     rows, verbose, keep_start_unless_beaten=True)
    if kept == 0:
        log.info("Fine-tuning did not raise the validation AP above the head phase's; "
                 "keeping the head phase's weights (the backbone as it was pretrained).")
    _copy_fused_head(fused, parts, symbols)
    parts.backbone.trainable = False
