"""--fine-tune-schedule and --fine-tune-warmup: the schedule's values, the learning_rate column
of history.csv, flag checks, resuming mid-schedule, and the schedule under MirroredStrategy
with mixed precision."""

from __future__ import annotations

import json
import math
import subprocess

import keras
import numpy as np
import pandas as pd
import pytest

import build_multi_hot_model
from symbol_trainer import checkpoints
from symbol_trainer import callbacks
from symbol_trainer import schedules
from symbol_trainer import settings
from conftest import process_environment, run_script, training_command
from symbol_trainer.errors import InputError

PEAK = 1e-4


def _rate(schedule, step: int) -> float:
    return float(keras.ops.convert_to_numpy(schedule(step)))


def test_cosine_warms_up_linearly_then_decays_to_near_zero_at_the_last_planned_step():
    # 5 epochs of 10 steps, 1 epoch of warm-up: 10 warm-up steps, 40 of decay.
    schedule = schedules.fine_tuning_rate(PEAK, "cosine", 5, 10, 1.0)
    assert _rate(schedule, 0) == pytest.approx(PEAK / 10, rel=1e-5)  # near 0, not 0
    assert _rate(schedule, 5) == pytest.approx(PEAK / 10 + (PEAK - PEAK / 10) * 5 / 10, rel=1e-5)
    assert _rate(schedule, 10) == pytest.approx(PEAK, rel=1e-5)  # end of warm-up: the peak
    assert _rate(schedule, 30) == pytest.approx(PEAK / 2, rel=1e-4)  # middle of the decay
    last = _rate(schedule, 49)  # the last planned step still moves the weights, a little
    assert 0 < last < PEAK * 0.002
    assert _rate(schedule, 50) == pytest.approx(0, abs=1e-12)
    rates = [_rate(schedule, s) for s in range(50)]
    assert all(a < b for a, b in zip(rates[:10], rates[1:11]))  # rises through the warm-up
    assert all(a > b for a, b in zip(rates[10:49], rates[11:50]))  # then only falls
    assert "warm-up to 0.0001 over 10 steps" in schedules.describe(schedule)


def test_warmup_is_in_epochs_and_cut_to_half_the_planned_steps():
    assert schedules.warmup_steps(50, 10, 1.0) == 10
    assert schedules.warmup_steps(50, 10, 0.25) == 2  # fractions of an epoch, rounded
    assert schedules.warmup_steps(20, 10, 5.0) == 10  # at most half: the rate still decays
    assert schedules.warmup_steps(1, 1, 1.0) == 0
    no_warmup = schedules.fine_tuning_rate(PEAK, "cosine", 2, 10, 0.0)
    assert _rate(no_warmup, 0) == pytest.approx(PEAK, rel=1e-6)
    assert _rate(no_warmup, 10) == pytest.approx(PEAK / 2, rel=1e-4)
    single = schedules.fine_tuning_rate(PEAK, "cosine", 1, 1, 1.0)  # one step: the peak
    assert _rate(single, 0) == pytest.approx(PEAK, rel=1e-6)
    constant = schedules.fine_tuning_rate(PEAK, "constant", 5, 10, 1.0)
    assert constant == PEAK and schedules.describe(constant) == "constant 0.0001"


def test_the_rate_is_read_through_the_mixed_precision_wrapper():
    schedule = schedules.fine_tuning_rate(PEAK, "cosine", 5, 10, 1.0)
    wrapped = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(schedule))
    assert schedules.current_rate(wrapped) == pytest.approx(PEAK / 10, rel=1e-5)
    wrapped.inner_optimizer.iterations.assign(30)
    assert schedules.current_rate(wrapped) == pytest.approx(PEAK / 2, rel=1e-4)


def test_settings_check_the_schedule_and_the_warmup_naming_the_flag():
    assert settings.TrainingConfig().fine_tune_schedule == "cosine"  # the default since issue 25 measured it
    with pytest.raises(InputError, match="--fine-tune-schedule choose one of constant, cosine"):
        settings.TrainingConfig(fine_tune_schedule="linear")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="--fine-tune-warmup must be a number of epochs"):
            settings.TrainingConfig(fine_tune_warmup=bad)


@pytest.mark.parametrize("flags, named", [
    (["--fine-tune-schedule", "linear"], "--fine-tune-schedule"),
    (["--fine-tune-warmup", "-0.5"], "--fine-tune-warmup"),
    (["--fine-tune-warmup", "soon"], "--fine-tune-warmup"),
])
def test_bad_schedule_flags_exit_2_naming_the_flag(small_two_symbol_csv, tmp_path, capsys,
                                                   flags, named):
    root, csv_path = small_two_symbol_csv
    out = tmp_path / "model"
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors exit 2 themselves
        code = run_script(build_multi_hot_model, [root, csv_path, out, *flags])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "model.partial").exists()


# 3 head and 4 fine-tuning epochs of 2 steps (26 training frames, batch 16), with patience
# that lets every planned epoch run: a warm-up of 1 epoch, then 3 epochs of decay.
COSINE = ["--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32",
          "--weights", "none", "--epochs", "3", "--fine-tune-epochs", "4", "--patience", "9",
          "--fine-tune-patience", "9", "--batch-size", "16", "--group-by", "none", "--quiet",
          "--fine-tune-learning-rate", str(PEAK),
          "--fine-tune-schedule", "cosine", "--fine-tune-warmup", "1"]


def _fine_tune_rates(model_dir) -> list[float]:
    history = pd.read_csv(model_dir / "history.csv")
    return history.loc[history["phase"] == "fine_tune", "learning_rate"].tolist()


def test_cosine_run_writes_warm_up_then_decay_and_resumes_mid_schedule(
        small_two_symbol_csv, tmp_path, monkeypatch, capsys):
    """history.csv shows the rate of each epoch's first step: near 0, the peak, then falling.
    A run stopped after fine-tuning epoch 2 refuses to continue under another schedule, and
    continues under its own at the step it had reached: the same rates as a run never
    stopped, not a second warm-up."""
    root, csv_path = small_two_symbol_csv
    whole = tmp_path / "whole"
    assert run_script(build_multi_hot_model, [root, csv_path, whole, *COSINE]) == 0
    history = pd.read_csv(whole / "history.csv")
    assert history.loc[history["phase"] == "head", "learning_rate"].tolist() == \
        pytest.approx([3e-3] * 3)
    split = pd.read_csv(whole / "split.csv")
    steps = math.ceil((split["split"] == "train").sum() / 16)
    assert steps == 2
    rates = _fine_tune_rates(whole)
    assert rates[0] == pytest.approx(PEAK / steps, rel=1e-4)  # warm-up starts near 0
    assert rates[1] == pytest.approx(PEAK, rel=1e-4)  # one epoch later: the peak
    decay = 3 * steps  # then a half cosine over the 3 remaining epochs
    assert rates[2] == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi * steps / decay)),
                                     rel=1e-4)
    assert rates[3] == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi * 2 * steps / decay)),
                                     rel=1e-4)
    metadata = json.loads((whole / "metadata.json").read_text())
    assert metadata["training"]["config"]["fine_tune_schedule"] == "cosine"
    assert metadata["training"]["config"]["fine_tune_warmup"] == 1.0

    # Stop after fine-tuning epoch 2, as a Ctrl-C would, once its checkpoint is written.
    out = tmp_path / "model"
    save = callbacks.EpochCheckpoint.on_epoch_end

    def stop_after_second_fine_tuning_epoch(self, epoch, logs=None):
        save(self, epoch, logs)
        if self.phase == "fine_tune" and epoch + 1 == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.EpochCheckpoint, "on_epoch_end", stop_after_second_fine_tuning_epoch)
    assert run_script(build_multi_hot_model, [root, csv_path, out, *COSINE]) == 130
    monkeypatch.setattr(callbacks.EpochCheckpoint, "on_epoch_end", save)
    checkpoint_dir = tmp_path / "model.partial" / "checkpoint"
    state = checkpoints.Checkpoint(checkpoint_dir, {}, writer=False).latest()
    assert state.phase == "fine_tune" and state.epochs_done == 2
    assert int(state.optimizer[0]) == 2 * steps  # the step counter the schedule reads
    capsys.readouterr()

    constant = [*COSINE[:-4], "--fine-tune-schedule", "constant"]
    assert run_script(build_multi_hot_model, [root, csv_path, out, *constant]) == 2
    error = capsys.readouterr().err
    assert "settings.fine_tune_schedule: 'cosine' then, None now" in error
    assert "--no-resume" in error
    longer = [*COSINE[:-1], "2"]
    assert run_script(build_multi_hot_model, [root, csv_path, out, *longer]) == 2
    assert "settings.fine_tune_warmup: 1.0 then, 2.0 now" in capsys.readouterr().err

    assert run_script(build_multi_hot_model, [root, csv_path, out, *COSINE]) == 0
    assert _fine_tune_rates(out) == pytest.approx(rates, rel=1e-6)
    assert json.loads((out / "metadata.json").read_text())["training"]["resumed_from"] \
        .startswith("head phase done, fine-tuning epoch 2")


def test_cosine_under_mirrored_strategy_with_mixed_precision(small_two_symbol_csv, tmp_path,
                                                            isolated_keras_home, shared_weights):
    """Two logical CPU devices (global batch 32: one step per epoch) and float16 compute: the
    LossScaleOptimizer carries the schedule, and history.csv shows it. A one-epoch warm-up is
    one step here: epoch 1 runs at peak / 1, then a half cosine over the 3 steps left. Real
    weights: random ones overflow float16 on CPU whatever the schedule (the validation loss
    becomes NaN with 'constant' too)."""
    out = tmp_path / "model"
    command = training_command(small_two_symbol_csv, out, *COSINE, "--devices", "cpu:2",
                               "--mixed-precision", "on", "--weights", shared_weights)
    done = subprocess.run(command, env=process_environment(isolated_keras_home),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["training"]["replicas"] == 2
    assert metadata["training"]["mixed_precision"] is True
    rates = _fine_tune_rates(out)
    expected = [PEAK * 0.5 * (1 + math.cos(math.pi * s / 3)) for s in range(3)]
    assert rates == pytest.approx([PEAK, *expected], rel=1e-3)
    assert np.all(np.isfinite(pd.read_csv(out / "history.csv")["loss"]))


def test_bench_accuracy_configurations_take_the_schedule_flags():
    """`bench/accuracy.py --config 'cos=--fine-tune-schedule cosine ...'` reads the flags
    through settings, so the integrator can compare schedules."""
    import sys

    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "bench"))
    import accuracy

    config = accuracy.training_config(
        "--fine-tune-schedule cosine --fine-tune-warmup 0.5 --fine-tune-epochs 10",
        weights="none", seed=0)
    assert (config.fine_tune_schedule, config.fine_tune_warmup, config.fine_tune_epochs) \
        == ("cosine", 0.5, 10)
    old = accuracy.training_config(accuracy.OLD_RELEASE_FLAGS, weights="none", seed=0)
    assert old.fine_tune_schedule == "constant"  # the last release's (OLD_RELEASE_LATER_FLAGS)
    assert accuracy.differing_settings(config, old)["--fine-tune-schedule"] == "cosine"
    with pytest.raises(accuracy.ConfigError, match="--fine-tune-schedule"):
        accuracy.training_config("--fine-tune-schedule linear", weights="none", seed=0)
