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

import checkpoints
import common
from conftest import ROOT, process_environment, training_command
from pixel_store import PixelStore

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
        from pixel_store import PixelStore
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
