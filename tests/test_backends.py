"""The tool under other Keras backends than TensorFlow: the scripts started in subprocesses
with KERAS_BACKEND=jax (or torch, when this Python has it): training, predict.py, a model
trained under one backend predicting the same under another, TensorFlow-only features
refused in one line, and several devices under keras.distribution."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import build_multi_hot_model
from symbol_trainer.backend import keras
from conftest import FAST, ROOT, process_environment, run_script, training_command

BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(
    importlib.util.find_spec(name) is None, reason=f"{name} is not installed in this Python "
    f"(requirements-dev.txt installs jax[cpu]; torch is optional)")) for name in ("jax", "torch")]
# Small and quick: the fine-tuning step is compiled once per batch shape, which costs most
# of a JAX run on CPU; one head epoch and one fine-tuning epoch of one batch length.
QUICK = [*FAST, "--weights", "none", "--epochs", "2", "--batch-size", "12"]


def _environment(tmp_path, backend: str, **extra) -> dict:
    """A subprocess under `backend`. Under JAX and torch, TensorFlow is hidden: a package
    named tensorflow that fails to import comes first on PYTHONPATH, so the run is what a
    virtual environment without TensorFlow would give (CI's has it, for the other tests)."""
    home = tmp_path / f"keras_home_{backend}"
    home.mkdir(exist_ok=True)
    if backend != "tensorflow":
        hidden = tmp_path / "without_tensorflow"
        (hidden / "tensorflow").mkdir(parents=True, exist_ok=True)
        (hidden / "tensorflow" / "__init__.py").write_text(
            "raise ImportError('tensorflow is hidden from this test run')\n")
        extra.setdefault("PYTHONPATH", os.pathsep.join(
            p for p in (str(hidden), os.environ.get("PYTHONPATH", "")) if p))
    return process_environment(home, KERAS_BACKEND=backend, **extra)


def _run(command: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _predict(model_dir, images, out, env) -> pd.DataFrame:
    done = _run([sys.executable, str(ROOT / "predict.py"), str(model_dir), str(images),
                 "--output", str(out)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    return pd.read_csv(out).sort_values("filename").reset_index(drop=True)


def _probabilities(table: pd.DataFrame) -> np.ndarray:
    return table[[c for c in table.columns if c.endswith("_probability")]].to_numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_trained_under_the_backend_predicts_the_same_under_tensorflow(
        backend, small_two_symbol_csv, tmp_path):
    out = tmp_path / "model"
    env = _environment(tmp_path, backend)
    done = _run(training_command(small_two_symbol_csv, out, *QUICK, "--json"), env)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["status"] == "ok" and record["written"]
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["packages"]["backend"] == backend and backend in metadata["packages"]
    assert "tensorflow" not in metadata["packages"]
    frames = small_two_symbol_csv[0]
    there = _predict(out, frames, tmp_path / f"{backend}.csv", env)
    assert len(there) == 32 and there["error"].isna().all()
    here = _predict(out, frames, tmp_path / "tensorflow.csv",
                    _environment(tmp_path, "tensorflow"))
    assert list(here["filename"]) == list(there["filename"])
    np.testing.assert_allclose(_probabilities(there), _probabilities(here), atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_trained_under_tensorflow_predicts_the_same_under_the_backend(
        backend, small_two_symbol_csv, tmp_path):
    out = tmp_path / "model"
    frames, labels = small_two_symbol_csv
    assert run_script(build_multi_hot_model, [frames, labels, out, *FAST, "--weights", "none",
                                              "--fine-tune-epochs", "0"]) == 0
    assert json.loads((out / "metadata.json").read_text())["packages"]["backend"] == "tensorflow"
    here = _predict(out, frames, tmp_path / "tensorflow.csv", _environment(tmp_path, "tensorflow"))
    there = _predict(out, frames, tmp_path / f"{backend}.csv", _environment(tmp_path, backend))
    assert list(here["filename"]) == list(there["filename"])
    np.testing.assert_allclose(_probabilities(there), _probabilities(here), atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensorflow_only_features_stop_at_once_in_one_line(backend, small_two_symbol_csv,
                                                            tmp_path):
    env = _environment(tmp_path, backend)
    done = _run(training_command(small_two_symbol_csv, tmp_path / "model", *QUICK,
                                 "--tensorboard", tmp_path / "logs"), env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == (f"ERROR: --tensorboard needs the TensorFlow backend, and this run uses "
                         f"KERAS_BACKEND={backend}. Run it with KERAS_BACKEND=tensorflow "
                         f"(TensorFlow installed), or leave --tensorboard out.")
    assert not (tmp_path / "model").exists() and not (tmp_path / "logs").exists()
    cluster = json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                          "task": {"type": "worker", "index": 0}})
    done = _run(training_command(small_two_symbol_csv, tmp_path / "model", *QUICK),
                {**env, "TF_CONFIG": cluster})
    assert done.returncode == 2
    assert "TF_CONFIG (tf.distribute multi-worker training) needs the TensorFlow backend" in \
        done.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_two_cpu_devices_train_data_parallel_under_jax(small_two_symbol_csv, tmp_path):
    """--devices cpu:2 asks XLA for two host devices; keras.distribution splits each global
    batch of 2 x --batch-size over them (the last, shorter batch filled up to an even
    length). The fine-tuning phase is left out: its compilation would double the time."""
    env = _environment(tmp_path, "jax")
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "model"
    done = _run(training_command(small_two_symbol_csv, out, *QUICK, "--fine-tune-epochs", "0",
                                 "--batch-size", "5", "--devices", "cpu:2", "--json"), env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["written"]
    training = json.loads((out / "metadata.json").read_text())["training"]
    assert training["devices"].startswith("keras.distribution.DataParallel over 2 devices")
    assert training["replicas"] == 2 and training["global_batch_size"] == 10


# Under several processes JAX checks that each replicated variable starts the same everywhere
# (one all-gather per variable, compiled per shape) and compiles every eager operation for
# both: MobileNet at alpha 0.25 has half the variables of MobileNetV2 and takes 30 s less.
CLUSTER_QUICK = ["--backbone", "mobilenet", "--alpha", "0.25", "--fine-tune-epochs", "0",
                 "--batch-size", "5", "--json"]


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_two_processes_on_localhost_train_one_model_under_jax(small_two_symbol_csv, tmp_path):
    """Two processes joined by Keras's KERAS_DISTRIBUTION_* variables train one model under
    keras.distribution.DataParallel over both processes' CPU devices, each feeding half of
    every global batch; both log the same epochs, only process 0 writes, and the model it
    writes loads and predicts. The fine-tuning phase is left out: its compilation would
    double the time."""
    out = tmp_path / "model"
    port = _free_port()
    processes = []
    for index in range(2):
        env = _environment(tmp_path, "jax", KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}",
                           KERAS_DISTRIBUTION_NUM_PROCESSES="2",
                           KERAS_DISTRIBUTION_PROCESS_ID=str(index),
                           SYMBOL_TRAINER_CLUSTER_TIMEOUT="120")
        env.pop("XLA_FLAGS", None)
        processes.append(subprocess.Popen(
            training_command(small_two_symbol_csv, out, *[o for o in QUICK if o != "--quiet"],
                             *CLUSTER_QUICK),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in processes]
    for process, (_, stderr) in zip(processes, results):
        assert process.returncode == 0, stderr[-3000:]
    chief, other = (json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in results)
    assert chief["written"] is True and other["written"] is False
    helpers = ("keras_home", "without_tensorflow")  # _environment's folders
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(helpers)) \
        == ["frames", "model"]
    training = json.loads((out / "metadata.json").read_text())["training"]
    assert training["devices"].startswith(
        "keras.distribution.DataParallel over 2 devices in 2 processes from KERAS_DISTRIBUTION_")
    assert training["replicas"] == 2 and training["global_batch_size"] == 10
    epochs = [[line.rsplit(" (", 1)[0] for line in stderr.splitlines() if " epoch " in line]
              for _, stderr in results]
    assert epochs[0] == epochs[1] and len(epochs[0]) == 2  # one model, trained in step
    # The model process 0 wrote loads (here under TensorFlow, in safe mode) and predicts.
    model = keras.saving.load_model(out / "model.keras")
    outputs = model.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0)
    assert sorted(outputs) == ["blue_circle", "red_square"]
    assert all(np.isfinite(v).all() and v.shape == (2, 1) for v in outputs.values())


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
