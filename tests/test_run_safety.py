"""Runs that die, fill the disk, collide or diverge leave nothing behind that they should not:
no nameless scratch file outlives its process, no checkpoint temporary survives a failed write,
two runs never share one OUTPUT_MODEL_DIR.partial, and a loss that is not finite stops the run
before any model directory is written."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from symbol_trainer import checkpoints
from symbol_trainer import callbacks, model_dir, pipeline, training
from symbol_trainer.errors import InputError
from symbol_trainer import run_lock
from conftest import ROOT, process_environment, training_command
from symbol_trainer.pixel_store import PixelStore

SHAPE = (8, 6, 3)


def decode(path):
    return np.full(SHAPE, int(path.rsplit("_", 1)[1]) % 256, np.uint8)


# --------------------------------------------------------------------------------------------
# The decoded-image store has no name to leak


def test_the_pixel_store_has_no_file_name_yet_reads_back_what_it_wrote(tmp_path):
    paths = [f"img_{i}" for i in range(5)]
    with PixelStore(paths, SHAPE, decode, tmp_path) as store:
        assert os.listdir(tmp_path) == []  # nothing a killed process could leave behind
        for p in paths:
            store.load(p)
        assert store.filled == 5 and os.listdir(tmp_path) == []
        # Read back from the file, not decoded again: a decoder that fails proves it.
        store._decode = lambda path: pytest.fail(f"{path} decoded again")
        assert [int(store.load(p)[0, 0, 0]) for p in paths] == [0, 1, 2, 3, 4]
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_a_sigkilled_process_leaves_no_pixel_store_file(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    program = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        from symbol_trainer.pixel_store import PixelStore
        store = PixelStore(["a_1", "a_2"], (64, 64, 3),
                           lambda p: np.full((64, 64, 3), 7, np.uint8))
        store.load("a_1"); store.load("a_2")
        print("ready", store.filled, flush=True)
        time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(scratch)})
    try:
        assert process.stdout.readline().split() == ["ready", "2"]
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert os.listdir(scratch) == []


# --------------------------------------------------------------------------------------------
# A checkpoint write that fails leaves no temporary


def _state(value: float) -> checkpoints.PhaseState:
    return checkpoints.PhaseState(phase="head", epochs_done=1, finished=False, rows=[],
                                  early_stopping={"wait": 0}, variables=[np.full(3, value)],
                                  optimizer=[np.zeros(2)])


def _temporaries(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def _disk_full_after_some_bytes(*args, **kwargs):
    handle = args[0]
    handle.write(b"PK\x03\x04 partial bytes")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_checkpoint_write_leaves_no_temporary(tmp_path, monkeypatch):
    checkpoint = checkpoints.Checkpoint(tmp_path / "checkpoint", {"settings": {}})
    checkpoint.open(resume=False)
    checkpoint.save(_state(1.0))
    monkeypatch.setattr(np, "savez", _disk_full_after_some_bytes)
    monkeypatch.setattr(np, "save", _disk_full_after_some_bytes)
    with pytest.raises(OSError) as caught:
        checkpoint.save(_state(2.0))
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        checkpoint.save_features(np.ones((4, 3), np.float32))
    assert _temporaries(checkpoint.directory) == []
    assert sorted(os.listdir(checkpoint.directory)) == ["run.json", "state.npz"]
    np.testing.assert_array_equal(checkpoint.latest().variables[0], np.full(3, 1.0))


def test_a_full_disk_while_closing_a_checkpoint_file_leaves_no_temporary(tmp_path, monkeypatch):
    """The bytes reach the disk at flush or fsync, where ENOSPC often shows first."""
    checkpoint = checkpoints.Checkpoint(tmp_path / "checkpoint", {"settings": {}})
    checkpoint.open(resume=False)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        checkpoint.save(_state(1.0))
    assert _temporaries(checkpoint.directory) == []
    assert os.listdir(checkpoint.directory) == ["run.json"]


def test_the_next_run_removes_temporaries_a_killed_writer_left(tmp_path):
    run = {"settings": {"epochs": 3, "fine_tune_epochs": 0}}
    checkpoint = checkpoints.Checkpoint(tmp_path / "checkpoint", run)
    checkpoint.open(resume=False)
    checkpoint.save(_state(1.0))
    for stale in (".state.npz.k2j3_x.npz", ".features.npy.a8b7.npy", ".run.json.q1w2"):
        (checkpoint.directory / stale).write_bytes(b"half a file")
    (checkpoint.directory / ".keep-me").write_text("not ours")
    resumed = checkpoints.Checkpoint(tmp_path / "checkpoint", run).open(resume=True)
    assert resumed is not None and resumed.epochs_done == 1  # the checkpoint itself stays
    assert _temporaries(checkpoint.directory) == [".keep-me"]


# --------------------------------------------------------------------------------------------
# One run at a time per OUTPUT_MODEL_DIR

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from symbol_trainer import run_lock
    run_lock.RunLock(sys.argv[2]).acquire()
    print("holding", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def lock_holder():
    """Start a process that takes the run lock of a folder and keeps it; kills it at the end."""
    started = []

    def start(folder):
        folder.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ROOT), str(folder)],
                                   stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "holding"
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _fake_lock(folder, host, pid):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / run_lock.LOCK_FILE).write_text(json.dumps(
        {"host": host, "pid": pid, "started_at": "2024-05-01T10:00:00+00:00"}))


def test_a_second_run_into_a_locked_output_stops_naming_the_holder_and_touches_nothing(
        small_two_symbol_csv, tmp_path, lock_holder, capsys):
    import build_multi_hot_model
    out = tmp_path / "model"
    partial = tmp_path / "model.partial"
    holder = lock_holder(partial)
    (partial / "model.keras").write_text("the first run's file")
    code = build_multi_hot_model.main(
        [str(a) for a in training_command(small_two_symbol_csv, out)[2:]]
        + ["--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32",
           "--weights", "none"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert code == 2 and len(errors) == 1
    assert f"process {holder.pid} on host {socket.gethostname()}, started 20" in errors[0]
    assert "in use by another training run" in errors[0] and f"kill {holder.pid}" in errors[0]
    assert (partial / "model.keras").read_text() == "the first run's file"
    assert sorted(os.listdir(partial)) == ["model.keras", run_lock.LOCK_FILE]
    assert not out.exists()
    # A dry run takes no lock: it checks the data and writes nothing.
    code = build_multi_hot_model.main(
        [str(a) for a in training_command(small_two_symbol_csv, out)[2:]] + ["--dry-run"])
    assert code == 0 and not out.exists()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, lock_holder, caplog):
    directory = model_dir.ModelDirectory(tmp_path / "model")
    holder = lock_holder(directory.partial)
    with pytest.raises(InputError, match=f"process {holder.pid} on host"):
        directory.prepare(keep_checkpoint=True)
    holder.kill()
    holder.wait()
    with caplog.at_level(logging.WARNING):
        directory.prepare(keep_checkpoint=True)
    assert f"Taking over the stale lock {directory.lock.path} of process {holder.pid}" in caplog.text
    record = json.loads(directory.lock.path.read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    directory.discard()
    assert not directory.partial.exists()


def test_a_lock_of_a_dead_pid_on_this_host_is_taken_over_one_of_another_host_never(
        tmp_path, caplog):
    directory = model_dir.ModelDirectory(tmp_path / "model")
    dead = _dead_pid()
    _fake_lock(directory.partial, socket.gethostname(), dead)
    with caplog.at_level(logging.WARNING):
        directory.prepare(keep_checkpoint=True)
    assert f"of process {dead} on host {socket.gethostname()}" in caplog.text
    directory.release()
    assert os.listdir(directory.partial) == []

    other = model_dir.ModelDirectory(tmp_path / "other")
    _fake_lock(other.partial, "gpu-node-17", dead)
    (other.partial / "checkpoint").mkdir()
    with pytest.raises(InputError) as caught:
        other.prepare(keep_checkpoint=False)
    message = str(caught.value)
    assert f"process {dead} on host gpu-node-17, started 2024-05-01T10:00:00+00:00" in message
    assert "never taken over automatically" in message
    assert f"delete {other.lock.path} and run again" in message
    assert sorted(os.listdir(other.partial)) == ["checkpoint", run_lock.LOCK_FILE]


def test_the_lock_is_released_on_commit_and_never_reaches_the_model_directory(tmp_path):
    directory = model_dir.ModelDirectory(tmp_path / "model")
    partial = directory.prepare(keep_checkpoint=False)
    (partial / "metadata.json").write_text("{}")
    with pytest.raises(InputError, match="in use by another training run"):
        model_dir.ModelDirectory(tmp_path / "model").prepare(keep_checkpoint=True)
    directory.commit()
    assert os.listdir(tmp_path / "model") == ["metadata.json"]
    assert not directory.partial.exists()
    again = model_dir.ModelDirectory(tmp_path / "model")  # free at once, without a warning
    again.prepare(keep_checkpoint=False)
    again.discard()
    assert os.listdir(tmp_path) == ["model"]


def test_an_interrupted_run_releases_its_lock_and_keeps_only_its_checkpoint(
        small_two_symbol_csv, tmp_path, monkeypatch):
    import build_multi_hot_model

    def interrupted(images, config, geometry, is_validation, weights, store, run,
                    symbol_images=()):
        run.checkpoint.save_features(np.zeros((len(images.table), 4), np.float32))
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_train_phases", interrupted)
    out = tmp_path / "model"
    argv = [str(a) for a in training_command(small_two_symbol_csv, out)[2:]] + [
        "--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32", "--weights", "none"]
    assert build_multi_hot_model.main(argv) == 130
    assert os.listdir(tmp_path / "model.partial") == ["checkpoint"]  # no lock left behind
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# A loss that is not finite stops the run; no model is written


def _diverging(monkeypatch, rate: float):
    """Train at 1e38 where the flags ask for `rate`: past every flag check, as any cause of a
    loss that is not finite would be."""
    compile_fused = training.compile_fused

    def compile_diverging(model, learning_rate, *args, **kwargs):
        compile_fused(model, 1e38 if learning_rate == rate else learning_rate, *args, **kwargs)

    monkeypatch.setattr(training, "compile_fused", compile_diverging)  # train_head and fine_tune


@pytest.mark.parametrize("phase, flags, advice", [
    ("head phase", ["--learning-rate", "0.0031"], "lower --learning-rate (now 0.0031)"),
    # A constant rate, so that the stub below recognises it (cosine passes a schedule).
    ("fine-tuning", ["--fine-tune-learning-rate", "0.00017", "--epochs", "1",
                     "--fine-tune-schedule", "constant"],
     "lower --fine-tune-learning-rate (now 0.00017) or --learning-rate"),
])
def test_a_loss_that_is_not_finite_stops_the_run_without_a_model(
        small_two_symbol_csv, tmp_path, monkeypatch, capsys, phase, flags, advice):
    import build_multi_hot_model
    _diverging(monkeypatch, float(flags[1]))
    out = tmp_path / "model"
    argv = [str(a) for a in training_command(small_two_symbol_csv, out)[2:]] + [
        "--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32", "--weights", "none",
        "--batch-size", "8", "--fine-tune-epochs", "1", "--quiet", "--json", *flags]
    code = build_multi_hot_model.main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("ERROR")]
    assert code == 2 and len(errors) == 1
    assert f"Training diverged: the training loss became " in errors[0]
    assert f"of {phase} epoch 1, so no model directory was written" in errors[0]
    assert advice in errors[0] and "check the images and the labels" in errors[0]
    record = json.loads(captured.out)
    assert record["status"] == "error" and record["exit_code"] == 2
    assert os.listdir(tmp_path) == ["frames"]  # no model directory, no .partial, no lock


def test_the_guard_checks_the_validation_loss_and_the_weights_at_the_end_of_an_epoch():
    guard = callbacks.FiniteLossGuard("head", {"--learning-rate": 0.5})
    guard.on_epoch_begin(2)
    guard.on_train_batch_end(0, {"loss": np.float32(0.7)})
    with pytest.raises(callbacks.TrainingDiverged, match="validation loss became inf at the end "
                       r"of head phase epoch 3.*--learning-rate \(now 0.5\)"):
        guard.on_epoch_end(2, {"loss": 0.7, "val_loss": float("inf")})
    import keras
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.layers[0].kernel.assign(np.array([[1.0], [np.nan]], np.float32))
    guard.set_model(model)
    with pytest.raises(callbacks.TrainingDiverged, match="a trainable weight became not finite"):
        guard.on_epoch_end(2, {"loss": 0.7, "val_loss": 0.6})
