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


# Several processes under JAX: the cluster read from SLURM or Keras's variables (jax_cluster.py).
# The training itself runs in tests/test_backends.py.

@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node01,gpu5", ["node01", "gpu5"]),
    ("node[01-04,07],gpu5", ["node01", "node02", "node03", "node04", "node07", "gpu5"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("a[007],b", ["a007", "b"]),
])
def test_slurm_nodelists_expand_to_their_hosts_in_order(nodelist, hosts):
    from symbol_trainer.jax_cluster import expand_nodelist
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-04", "node01]", "node[a-b]", "node[4-2]", "n1,,n2",
                                      "n[1-[2]]"])
def test_malformed_slurm_nodelists_are_refused(nodelist):
    from symbol_trainer.jax_cluster import expand_nodelist
    with pytest.raises(ValueError):
        expand_nodelist(nodelist)


SLURM = {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4",
         "SLURM_STEP_NODELIST": "gpu[07-08,11],gpu20", "SLURM_JOB_ID": "123456"}


def test_the_cluster_comes_from_srun_with_the_first_host_as_coordinator():
    from symbol_trainer.jax_cluster import JaxCluster, cluster_from_environment
    assert cluster_from_environment(SLURM) == JaxCluster(
        f"gpu07:{61440 + 123456 % 4096}", 4, 2, "SLURM")
    assert cluster_from_environment({**SLURM, "JAX_COORDINATOR_PORT": "7001"}).coordinator == \
        "gpu07:7001"
    # One task, or no srun at all: one process, no cluster.
    assert cluster_from_environment({**SLURM, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert cluster_from_environment({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) is None
    assert cluster_from_environment({}) is None


def test_keras_distribution_variables_describe_the_cluster_and_win_over_slurm():
    from symbol_trainer.jax_cluster import JaxCluster, cluster_from_environment
    keras_vars = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234,10.0.0.2:2345",
                  "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "1"}
    expected = JaxCluster("10.0.0.1:1234", 2, 1, "KERAS_DISTRIBUTION_* variables")
    assert cluster_from_environment({**SLURM, **keras_vars}) == expected
    # Process 0's address alone is enough; with every address the count may be left out.
    assert cluster_from_environment({**keras_vars,
                                     "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234"}) == expected
    no_count = {k: v for k, v in keras_vars.items() if k != "KERAS_DISTRIBUTION_NUM_PROCESSES"}
    assert cluster_from_environment(no_count) == expected
    assert cluster_from_environment({**keras_vars, "KERAS_DISTRIBUTION_NUM_PROCESSES": "1",
                                     "KERAS_DISTRIBUTION_PROCESS_ID": "0",
                                     "KERAS_DISTRIBUTION_JOB_ADDRESSES": "h:1"}) is None


@pytest.mark.parametrize("change, message", [
    ({"KERAS_DISTRIBUTION_PROCESS_ID": "2"},
     r"^KERAS_DISTRIBUTION_PROCESS_ID='2' is not a whole number from 0 to 1\. Processes are"),
    ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "two"},
     r"^KERAS_DISTRIBUTION_NUM_PROCESSES='two' is not a whole number of at least 1\."),
    ({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "node01"},
     r"^KERAS_DISTRIBUTION_JOB_ADDRESSES: 'node01' is not host:port"),
    ({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "a:1,b:2,c:3"},
     r"^KERAS_DISTRIBUTION_JOB_ADDRESSES lists 3 addresses and KERAS_DISTRIBUTION_NUM_PROCESSES "
     r"is 2"),
    ({"KERAS_DISTRIBUTION_JOB_ADDRESSES": ""},
     r"^KERAS_DISTRIBUTION_JOB_ADDRESSES not set, where KERAS_DISTRIBUTION_NUM_PROCESSES, "
     r"KERAS_DISTRIBUTION_PROCESS_ID is: set all three"),
])
def test_bad_keras_distribution_variables_stop_in_one_line_naming_the_variable(change, message):
    from symbol_trainer.errors import InputError
    from symbol_trainer.jax_cluster import cluster_from_environment
    environ = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "localhost:1234",
               "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "0",
               **change}
    with pytest.raises(InputError, match=message) as raised:
        cluster_from_environment(environ)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("change, message", [
    ({"SLURM_STEP_NODELIST": "gpu[07"}, r"^SLURM_STEP_NODELIST='gpu\[07' is not a SLURM host list"),
    ({"JAX_COORDINATOR_PORT": "70000"}, r"^JAX_COORDINATOR_PORT='70000' is not a whole number "
                                        r"from 1 to 65535\. Give a free TCP port"),
    ({"SLURM_JOB_ID": ""}, r"^Neither JAX_COORDINATOR_PORT nor SLURM_JOB_ID is set"),
    ({"SLURM_PROCID": "x"}, r"^SLURM_PROCID='x' is not a whole number from 0 to 3"),
])
def test_bad_slurm_values_stop_in_one_line_naming_the_variable(change, message):
    from symbol_trainer.errors import InputError
    from symbol_trainer.jax_cluster import cluster_from_environment
    with pytest.raises(InputError, match=message):
        cluster_from_environment({**SLURM, **change})


def test_an_unreachable_coordinator_stops_in_one_line_within_the_time_limit():
    """Process 1 looks for process 0 before JAX does (JAX would abort the process from C++);
    process 0 checks that it can listen on the port."""
    import time
    from symbol_trainer.jax_cluster import ClusterError, JaxCluster, check_coordinator
    port = _free_ports(1)[0]
    started = time.monotonic()
    with pytest.raises(ClusterError, match=rf"^Process 1 of 2 found nothing listening at the "
                                           rf"coordinator 127\.0\.0\.1:{port} \(from "
                                           rf"KERAS_DISTRIBUTION_JOB_ADDRESSES\) within 1 s"):
        check_coordinator(JaxCluster(f"127.0.0.1:{port}", 2, 1, "KERAS_DISTRIBUTION_* variables"), 1)
    assert time.monotonic() - started < 5
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(ClusterError, match=rf"^Process 0 cannot listen on port {taken} of "):
            check_coordinator(JaxCluster(f"127.0.0.1:{taken}", 2, 0, "SLURM"), 1)
    with pytest.raises(ClusterError, match=r"The coordinator's host of no-such-host\.invalid:1 "):
        check_coordinator(JaxCluster("no-such-host.invalid:1", 2, 1, "SLURM"), 1)


def test_each_process_loads_its_share_of_every_global_batch():
    from symbol_trainer.datasets import epoch_batches
    whole = epoch_batches(10, 4, seed=3, first_epoch=0, epochs=1, multiple=2)
    shares = []
    for index in range(2):
        order = epoch_batches(10, 4, seed=3, first_epoch=0, epochs=1, multiple=2)
        order.share = (index, 2)
        shares.append([order.rows(n) for n in range(len(order))])
    for n in range(len(whole)):  # the last batch of 2 rows too
        assert list(shares[0][n]) + list(shares[1][n]) == list(whole.rows(n))


def test_the_shares_of_one_batch_are_transformed_with_numbers_of_their_own(monkeypatch):
    """--symbol-image pastes are drawn from the batch's number: each process's share of a
    batch draws from its own, so two processes do not paste alike."""
    from symbol_trainer import distribution
    from symbol_trainer.datasets import feature_dataset
    import numpy as np
    monkeypatch.setattr(distribution, "BACKEND", "jax")
    seen = []
    for index in range(2):
        batches = feature_dataset(np.zeros((8, 1)), np.zeros((8, 2)), 4).map_batches(
            lambda batch, number: seen.append((index, number)) or batch, 10)
        distribution.local_share(batches, distribution.Placement(None, 2, 2, index, ""))
        assert [len(b[0]) for b in batches] == [2, 2]
    assert sorted(seen) == [(0, 20), (0, 22), (1, 21), (1, 23)]  # loaded by threads


def test_keras_distribution_variables_stop_a_tensorflow_run_in_one_line(frames, tmp_path,
                                                                        monkeypatch, capsys):
    """Keras's KERAS_DISTRIBUTION_* variables describe a JAX cluster: under TensorFlow every
    process would train alone into the same folder, so the run stops (exit 2) and names what
    TensorFlow reads instead."""
    import build_multi_hot_model
    from conftest import run_script
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    assert run_script(build_multi_hot_model, [*frames, tmp_path / "model", *TINY[:-1]]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("ERROR: KERAS_DISTRIBUTION_NUM_PROCESSES and its two companions "
                                "describe a cluster for keras.distribution")
    assert "(this run uses tensorflow): run with KERAS_BACKEND=jax, or under TensorFlow start " \
        "the processes with TF_CONFIG or srun" in error[-1]
    assert not (tmp_path / "model").exists()
