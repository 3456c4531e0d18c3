"""The fine-tuning learning rate over its steps (--fine-tune-schedule), and its record.

`fine_tuning_rate` turns the settings into what the optimizer takes: a number for 'constant',
a `keras.optimizers.schedules.CosineDecay` with a linear warm-up for 'cosine'. Keras evaluates
a schedule at the optimizer's step counter (`optimizer.iterations`), which is one of the
optimizer's variables: a checkpoint saves it with the others and a resumed run restores it, so
the schedule continues at the step where the interrupted run stopped. Nothing here reads flags
or depends on the backend; the mixed-precision LossScaleOptimizer passes the schedule through
to the Adam it wraps.

`LearningRateLog` puts each epoch's rate into the epoch's logs as `learning_rate`, the column
of history.csv that shows the schedule.
"""

from __future__ import annotations

import logging

from symbol_trainer.backend import keras

log = logging.getLogger(__name__)


def warmup_steps(planned_steps: int, steps_per_epoch: int, warmup_epochs: float) -> int:
    """The warm-up's steps: `warmup_epochs` epochs, rounded to whole steps, and at most half
    of `planned_steps`, so that a short fine-tuning still has a decay."""
    wanted = int(round(warmup_epochs * steps_per_epoch))
    return max(0, min(wanted, planned_steps // 2))


def fine_tuning_rate(
        peak: float, schedule: str, epochs: int, steps_per_epoch: int, warmup_epochs: float,
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate of the fine-tuning optimizer.

    'constant': `peak` at every step. 'cosine': over the first `warmup_steps` steps a linear
    rise from peak / warm-up steps to `peak`, then a half cosine from `peak` down to 0 at step
    epochs x steps_per_epoch, so the last planned step runs at a small fraction of `peak`
    (never exactly 0: every planned step moves the weights). Steps past the plan (there are
    none unless the caller trains longer) stay at 0."""
    if schedule == "constant":
        return float(peak)
    if schedule != "cosine":
        raise ValueError(f"unknown learning rate schedule {schedule!r}")
    planned = max(1, int(epochs) * int(steps_per_epoch))
    warmup = warmup_steps(planned, steps_per_epoch, warmup_epochs)
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(float(peak), planned, alpha=0.0,
                                                      name="fine_tune_cosine")
    # Keras's warm-up starts at initial_learning_rate at step 0; starting at peak / warmup
    # rather than 0 keeps the first step from being wasted at a rate of exactly 0.
    return keras.optimizers.schedules.CosineDecay(
        float(peak) / warmup, planned - warmup, alpha=0.0, name="fine_tune_cosine",
        warmup_target=float(peak), warmup_steps=warmup)


def describe(rate) -> str:
    """'constant 0.0001' or 'cosine to 0.0001 after 12 warm-up steps, to 0 at step 60', for
    the log."""
    if not isinstance(rate, keras.optimizers.schedules.CosineDecay):
        return f"constant {float(rate):g}"
    if rate.warmup_target is None:
        return (f"cosine from {rate.initial_learning_rate:g} without warm-up, to 0 at step "
                f"{rate.decay_steps}")
    return (f"cosine: warm-up to {rate.warmup_target:g} over {rate.warmup_steps} steps, then "
            f"decay to 0 at step {rate.warmup_steps + rate.decay_steps}")


def current_rate(optimizer) -> float:
    """The rate `optimizer` (or the Adam inside a LossScaleOptimizer) applies at its next step."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class LearningRateLog(keras.callbacks.Callback):
    """Adds `learning_rate` to every epoch's logs: the rate of the epoch's first step, read
    from the optimizer when the epoch begins (after a resumed run has restored its step
    counter). Listed before the callbacks that write the epoch's history row."""

    def __init__(self):
        super().__init__()
        self._rate = float("nan")

    def on_epoch_begin(self, epoch, logs=None):
        self._rate = current_rate(self.model.optimizer)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = self._rate
