"""tf.distribute on CPU: two logical devices under MirroredStrategy, and two worker processes on
127.0.0.1 under MultiWorkerMirroredStrategy. Each runs in fresh processes, since devices and
collective operations can only be set up before TensorFlow starts its runtime."""

from __future__ import annotations

import json
import socket
import subprocess

import pandas as pd
import pytest

from conftest import listdir, process_environment, training_command

TINY = ["--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32", "--weights",
        "none", "--epochs", "2", "--fine-tune-epochs", "1", "--batch-size", "8", "--json"]


@pytest.fixture
def frames(small_two_symbol_csv):
    return small_two_symbol_csv


def _command(frames, out, *extra):
    return training_command(frames, out, *TINY, *extra)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _last_json_line(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout  # --json: nothing else on standard output
    return json.loads(lines[0])


def test_two_logical_cpu_devices_train_under_mirrored_strategy(frames, tmp_path,
                                                               isolated_keras_home):
    out = tmp_path / "model"
    done = subprocess.run(_command(frames, out, "--devices", "cpu:2"),
                          env=process_environment(isolated_keras_home), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "MirroredStrategy over 2 devices" in done.stderr
    assert "global batch 16 (--batch-size 8 per device)" in done.stderr
    record = _last_json_line(done.stdout)
    assert record["status"] == "ok" and record["written"] is True
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["training"]["replicas"] == 2
    assert metadata["training"]["global_batch_size"] == 16
    assert listdir(tmp_path) == ["frames", "model"]
    assert len(pd.read_csv(out / "history.csv")) == 3


def test_two_workers_on_localhost_train_one_model_directory(frames, tmp_path, isolated_keras_home):
    """Both workers train to the end in step; only worker 0 writes, and exactly one complete
    model directory results."""
    out = tmp_path / "model"
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    processes = [
        subprocess.Popen(_command(frames, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=process_environment(isolated_keras_home, TF_CONFIG=json.dumps(
                             {"cluster": cluster, "task": {"type": "worker", "index": index}})))
        for index in range(2)]
    results = [p.communicate(timeout=600) for p in processes]
    for process, (stdout, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr
    chief, other = (_last_json_line(stdout) for stdout, _ in results)
    assert "MultiWorkerMirroredStrategy over 2 workers from TF_CONFIG" in results[0][1]
    assert chief["written"] is True and other["written"] is False
    assert chief["metrics"]["macro"]["average_precision"] is not None and not other["metrics"]["macro"]
    assert listdir(tmp_path) == ["frames", "model"]
    assert {"model.keras", "metadata.json", "history.csv", "report.html"} <= set(listdir(out))
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["training"]["replicas"] == 2
    # Both workers saw the same losses: they trained one model together.
    worker_lines = [[line for line in stderr.splitlines() if " epoch " in line]
                    for _, stderr in results]
    strip = [[line.rsplit(" (", 1)[0] for line in lines] for lines in worker_lines]
    assert strip[0] == strip[1] and len(strip[0]) == 3
