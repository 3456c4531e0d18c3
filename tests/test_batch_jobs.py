"""Batch jobs: resuming after a real SIGINT and SIGTERM, exit codes, the --json line."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import build_multi_hot_model
from symbol_trainer import checkpoints
from symbol_trainer import model_format, pipeline
from conftest import (ROOT, listdir, process_environment, run_script, training_command)

# Long enough to be interrupted mid-phase: 6 head and 3 fine-tuning epochs, with patience so
# that early stopping never ends a phase before its last epoch. A head epoch here takes a
# fraction of a second, so the signal sent after its second epoch needs several more to land
# before the phase is over.
# 30 head epochs (each a few milliseconds on cached 32 px features), so that the Ctrl-C sent
# once the checkpoint holds epoch 2 still lands in the head phase on a loaded machine: with 6,
# the whole phase once ended between two polls.
RESUMABLE = ["--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32",
             "--weights", "none", "--epochs", "30", "--fine-tune-epochs", "3", "--patience", "30",
             "--fine-tune-patience", "9",
             "--batch-size", "8", "--group-by", "none"]


@pytest.fixture
def frames(small_two_symbol_csv):
    return small_two_symbol_csv


def _command(frames, out, *extra) -> list[str]:
    return training_command(frames, out, *RESUMABLE, *extra)


def _interrupt(command, env, checkpoint_dir: Path, phase: str, epochs_done: int, signum: int):
    """Start `command`, send `signum` as soon as its checkpoint has `epochs_done` epochs of
    `phase`, and return the finished process's exit code and standard error."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    reader = checkpoints.Checkpoint(checkpoint_dir, {}, writer=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        state = reader.latest() if (checkpoint_dir / checkpoints.STATE_FILE).exists() else None
        if state is not None and state.phase == phase and state.epochs_done >= epochs_done:
            process.send_signal(signum)
            break
        time.sleep(0.02)
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def _history_without_timings(model_dir: Path) -> pd.DataFrame:
    return pd.read_csv(model_dir / "history.csv").drop(columns=["seconds", "train_seconds"])


def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(frames, tmp_path,
                                                               isolated_keras_home, capsys):
    """Ctrl-C in the head phase exits 130, SIGTERM in fine-tuning exits 143; each time the
    same command continues from the last completed epoch and says so, and the model
    directory it ends with has the history, split and metrics of a run never stopped. A
    rerun with another setting is refused in between."""
    env = process_environment(isolated_keras_home)
    whole = tmp_path / "whole"
    done = subprocess.run(_command(frames, whole), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "model"
    checkpoint_dir = tmp_path / "model.partial" / "checkpoint"
    code, err = _interrupt(_command(frames, out), env, checkpoint_dir, "head", 2, signal.SIGINT)
    assert code == 130, err
    assert "Stopped by Ctrl-C (SIGINT)" in err
    assert "run the same command again to continue" in err
    assert not out.exists() and checkpoint_dir.is_dir()
    assert checkpoints.Checkpoint(checkpoint_dir, {}, writer=False).latest().phase == "head"

    # Another setting must not continue this run's checkpoint: exit 2, naming the change.
    root, csv_path = frames
    changed = [root, csv_path, out, *RESUMABLE, "--learning-rate", "0.01"]
    assert run_script(build_multi_hot_model, changed) == 2
    error = capsys.readouterr().err
    assert "holds the checkpoint of an unfinished run with other settings" in error
    assert "settings.learning_rate: 0.003 then, 0.01 now" in error and "--no-resume" in error

    code, err = _interrupt(_command(frames, out), env, checkpoint_dir, "fine_tune", 1,
                           signal.SIGTERM)
    assert code == 143, err
    assert "Resuming from the checkpoint" in err and "head phase epoch" in err
    assert "Stopped by SIGTERM" in err
    state = checkpoints.Checkpoint(checkpoint_dir, {}, writer=False).latest()
    assert state.phase == "fine_tune" and 1 <= state.epochs_done < 3

    resumed = subprocess.run(_command(frames, out), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from the checkpoint" in resumed.stderr
    assert "head phase done, fine-tuning epoch" in resumed.stderr
    assert listdir(tmp_path) == ["frames", "model", "whole"]
    assert not (out / model_format.CHECKPOINT_FOLDER).exists()

    pd.testing.assert_frame_equal(_history_without_timings(out), _history_without_timings(whole))
    assert (out / "split.csv").read_text() == (whole / "split.csv").read_text()
    assert json.loads((out / "metrics.json").read_text()) == \
        json.loads((whole / "metrics.json").read_text())
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["training"]["resumed_from"].startswith("head phase done, fine-tuning epoch")


def _json_line(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines  # --json: one line on standard output, nothing else
    return json.loads(lines[0])


def test_json_line_and_exit_codes_0_1_2(frames, tmp_path, monkeypatch, capsys):
    """--json ends every run with one JSON line: the model directory, metrics and timings on
    success (0); the error and its exit code for bad input (2) and for a crash (1)."""
    root, csv_path = frames
    out = tmp_path / "model"
    fast = ["--alpha", "0.35", "--image-size", "32", "--weights", "none", "--epochs", "2",
            "--fine-tune-epochs", "0", "--json"]
    assert run_script(build_multi_hot_model, [root, csv_path, out, *fast]) == 0
    record = _json_line(capsys)
    assert record["status"] == "ok" and record["exit_code"] == 0
    assert record["model_dir"] == str(out.resolve()) and record["written"] is True
    assert 0 <= record["metrics"]["macro"]["average_precision"] <= 1
    assert set(record["metrics"]["symbols"]) == {"red_square", "blue_circle"}
    assert record["seconds"]["total"] > record["seconds"]["head"] > 0
    assert record["images"]["train"] + record["images"]["validation"] == 32

    missing = tmp_path / "nope.csv"
    assert run_script(build_multi_hot_model, [root, missing, tmp_path / "m2", *fast]) == 2
    record = _json_line(capsys)
    assert record["status"] == "error" and record["exit_code"] == 2
    assert str(missing) in record["error"]

    def crash(*args, **kwargs):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(pipeline, "train_and_save", crash)  # where check_or_train finds it
    assert run_script(build_multi_hot_model, [root, csv_path, tmp_path / "m3", *fast]) == 1
    record = _json_line(capsys)
    assert record == {"status": "error", "exit_code": 1, "error": "RuntimeError: out of memory "
                      "(run again with --debug for the traceback)"}


# Every network connection refused, as on an offline compute node; then the scripts' main()s
# in this one process, whose Keras reads $KERAS_HOME when imported.
OFFLINE = """
import json, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = refuse
socket.create_connection = refuse
import build_multi_hot_model, predict
runs = json.loads(sys.argv[1])
sys.exit(max(build_multi_hot_model.main(runs[0]), build_multi_hot_model.main(runs[1]),
             predict.main(runs[2])))
"""


def test_offline_node_trains_and_predicts_from_the_fetched_weights(frames, tmp_path,
                                                                   isolated_keras_home):
    """Once the weights file is in $KERAS_HOME/models (as copied from a machine with
    internet), --download-weights-only reports it there and fetches nothing, and training
    and prediction run with every network connection refused. (Without the file the same
    command fails with exit code 2: see test_cli_errors.)"""
    from conftest import SHARED_WEIGHTS_LEGACY
    if not SHARED_WEIGHTS_LEGACY.is_file():
        pytest.skip(f"needs {SHARED_WEIGHTS_LEGACY}, which a clone without ../shared lacks")
    cache = isolated_keras_home / "models"
    cache.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHARED_WEIGHTS_LEGACY, cache / SHARED_WEIGHTS_LEGACY.name)
    root, csv_path = frames
    out = tmp_path / "model"
    runs = [["--download-weights-only", "--alpha", "0.35", "--json"],
            [str(root), str(csv_path), str(out), "--alpha", "0.35", "--image-size", "32",
             "--epochs", "1", "--fine-tune-epochs", "0", "--quiet"],
            [str(out), str(root / "ep0"), "--quiet"]]
    done = subprocess.run([sys.executable, "-c", OFFLINE, json.dumps(runs)], cwd=ROOT,
                          env=process_environment(isolated_keras_home), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    record = json.loads(lines[0])
    assert record["downloaded"] == [] and record["weights_dir"] == str(cache)
    assert "weights were already in" in done.stderr
    assert json.loads((out / "metadata.json").read_text())["backbone"]["weights"] == "imagenet"
    header = next(i for i, line in enumerate(lines) if line.startswith("filename,"))
    assert len(lines) - header == 1 + 8  # predict.py's header and its 8 frames, at the end


def test_checkpoint_state_round_trip_and_an_unreadable_one(tmp_path):
    """The state file gives back what was saved; a damaged one is reported (the command then
    exits 2 and suggests --no-resume), never half-loaded."""
    import numpy as np

    run = {"settings": {"epochs": 3, "fine_tune_epochs": 2}}
    writer = checkpoints.Checkpoint(tmp_path / "checkpoint", run)
    assert writer.open(resume=True) is None
    state = checkpoints.PhaseState(
        phase="fine_tune", epochs_done=1, finished=False,
        rows=[{"phase": "head", "epoch": 1, "loss": 0.5}],
        early_stopping={"wait": 0, "best": 0.25, "best_epoch": 0, "stopped_epoch": 0},
        variables=[np.arange(6, dtype=np.float32).reshape(2, 3)], optimizer=[np.int64(7)],
        best_weights=[np.ones(2, np.float32)])
    writer.save(state)
    reader = checkpoints.Checkpoint(tmp_path / "checkpoint", run, writer=False)
    back = reader.open(resume=True)
    assert back.rows == state.rows and back.early_stopping == state.early_stopping
    np.testing.assert_array_equal(back.variables[0], state.variables[0])
    assert int(back.optimizer[0]) == 7 and back.best_weights[0].tolist() == [1.0, 1.0]
    assert checkpoints.describe(back, {"head": 3, "fine_tune": 2}) == \
        "head phase done, fine-tuning epoch 1 of 2 done"

    with pytest.raises(checkpoints.RunMismatch, match="settings.epochs: 3 then, 4 now"):
        checkpoints.Checkpoint(tmp_path / "checkpoint",
                               {"settings": {"epochs": 4, "fine_tune_epochs": 2}}).open(True)
    (tmp_path / "checkpoint" / checkpoints.STATE_FILE).write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(checkpoints.RunMismatch, match="state.npz unreadable"):
        reader.open(resume=True)
