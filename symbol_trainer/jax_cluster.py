"""Several processes training one model under JAX: which cluster this process belongs to, and
joining it before JAX touches any device.

A cluster is described by the environment, in one of two ways:

- SLURM: a step started by `srun` with more than one task (SLURM_STEP_NUM_TASKS above 1).
  Process SLURM_PROCID of SLURM_STEP_NUM_TASKS; the coordinator (process 0) listens on the
  first host of SLURM_STEP_NODELIST, at port JAX_COORDINATOR_PORT when set (the variable
  JAX's own SLURM detection reads), else 61440 + SLURM_JOB_ID % 4096 (JAX's own choice), so
  that two jobs sharing a node rarely pick the same port.
- Keras's variables, which `keras.distribution.initialize` reads: KERAS_DISTRIBUTION_JOB_ADDRESSES
  (`host:port` of process 0, or every process's `host:port`, comma-separated, process 0
  first), KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID. They win over
  SLURM's when both are set.

TF_CONFIG (TensorFlow's format) is not read under JAX: dependencies.tensorflow_only_features
stops such a run with a BackendError.

`join` does what `keras.distribution.initialize` does (`jax.distributed.initialize`), with
three differences: it first checks that the coordinator's port can be reached (or, on process
0, bound), so that a wrong host or port ends in one line naming the variable instead of JAX
aborting the process from C++; it passes a time limit (SYMBOL_TRAINER_CLUSTER_TIMEOUT seconds,
default 300); and it turns off JAX's own cluster detection, which under SLURM would give each
task only the GPU numbered SLURM_LOCALID where this tool runs one task per node on all of its
GPUs. Keras's seed synchronisation is not needed: every process seeds Keras with --seed.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from symbol_trainer.errors import InputError

log = logging.getLogger(__name__)

KERAS_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                   "KERAS_DISTRIBUTION_PROCESS_ID")
PORT_VARIABLE = "JAX_COORDINATOR_PORT"
TIMEOUT_VARIABLE = "SYMBOL_TRAINER_CLUSTER_TIMEOUT"
DEFAULT_TIMEOUT = 300  # seconds, as jax.distributed.initialize's own default


class ClusterError(InputError):
    """The environment describes a cluster that cannot be joined (exit code 2): the message
    names the variable and what to change."""


@dataclass(frozen=True)
class JaxCluster:
    """The processes of one training run and this process's place among them."""

    coordinator: str  # host:port of process 0
    processes: int
    process_id: int
    source: str       # where it was read: "SLURM" or "KERAS_DISTRIBUTION_* variables"

    @property
    def host(self) -> str:
        return self.coordinator.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.coordinator.rsplit(":", 1)[1])


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas that lie outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError("nested brackets")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("a ']' without its '['")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("a '[' without its ']'")
    parts.append(text[start:])
    return parts


def _expand_range_list(ranges: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07']: zero padding as the first number of each range
    writes it."""
    values = []
    for item in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not match:
            raise ValueError(f"{item!r} is not a number or a range of numbers like 01-04")
        first, last = match.group(1), match.group(2) or match.group(1)
        if int(last) < int(first):
            raise ValueError(f"the range {item} runs backwards")
        values += [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    return values


def _expand_host(pattern: str) -> list[str]:
    """One host pattern, possibly with several bracket groups ('rack[1-2]-n[01-02]')."""
    start = pattern.find("[")
    if start < 0:
        return [pattern]
    end = pattern.index("]", start)
    rest = _expand_host(pattern[end + 1:])
    return [pattern[:start] + value + tail
            for value in _expand_range_list(pattern[start + 1:end]) for tail in rest]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ('node[01-04,07],gpu5') as host names, in order
    (['node01', 'node02', 'node03', 'node04', 'node07', 'gpu5']). Raises ValueError for text
    that is not one."""
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        part = part.strip()
        if not part:
            raise ValueError("an empty host name")
        hosts += _expand_host(part)
    return hosts


def _integer(environ: Mapping[str, str], name: str, lowest: int, highest: int | None = None,
             fix: str = "") -> int:
    raw = environ.get(name, "")
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < lowest or (highest is not None and value > highest):
        span = f"from {lowest} to {highest}" if highest is not None else f"of at least {lowest}"
        raise ClusterError(f"{name}={raw!r} is not a whole number {span}. {fix}".strip())
    return value


def _coordinator_address(text: str, name: str) -> str:
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\],]+):(\d+)", text.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ClusterError(f"{name}: {text.strip()!r} is not host:port (a host name or IP "
                           f"address, a colon and a port from 1 to 65535), e.g. node01:61234.")
    return f"{match.group(1)}:{int(match.group(2))}"


def _from_keras_variables(environ: Mapping[str, str]) -> JaxCluster | None:
    missing = [name for name in KERAS_VARIABLES if not environ.get(name, "").strip()]
    if missing == list(KERAS_VARIABLES):
        return None
    addresses = [a for a in environ.get(KERAS_VARIABLES[0], "").split(",") if a.strip()]
    if KERAS_VARIABLES[0] in missing or (
            KERAS_VARIABLES[1] in missing and len(addresses) < 2) or KERAS_VARIABLES[2] in missing:
        raise ClusterError(
            f"{' and '.join(missing)} not set, where {', '.join(sorted(set(KERAS_VARIABLES) - set(missing)))} "
            "is: set all three (the coordinator's host:port, the number of processes and this "
            "process's number from 0), or none of them for one process.")
    if KERAS_VARIABLES[1] in missing:
        processes = len(addresses)
    else:
        processes = _integer(environ, KERAS_VARIABLES[1], 1,
                             fix="Give the number of processes of the run.")
    if len(addresses) > 1 and len(addresses) != processes:
        raise ClusterError(f"{KERAS_VARIABLES[0]} lists {len(addresses)} addresses and "
                           f"{KERAS_VARIABLES[1]} is {processes}: give one address per "
                           f"process, or only process 0's.")
    process_id = _integer(environ, KERAS_VARIABLES[2], 0, processes - 1,
                          fix=f"Processes are numbered from 0 to {KERAS_VARIABLES[1]} - 1.")
    if processes == 1:
        return None
    return JaxCluster(_coordinator_address(addresses[0], KERAS_VARIABLES[0]), processes,
                      process_id, "KERAS_DISTRIBUTION_* variables")


def _from_slurm(environ: Mapping[str, str]) -> JaxCluster | None:
    if "SLURM_PROCID" not in environ:
        return None
    tasks = _integer(environ, "SLURM_STEP_NUM_TASKS", 1,
                     fix="Start the step with srun, which sets it.") \
        if environ.get("SLURM_STEP_NUM_TASKS", "").strip() else 1
    if tasks == 1:
        return None
    process_id = _integer(environ, "SLURM_PROCID", 0, tasks - 1,
                          fix="Start the step with srun, which sets it.")
    nodelist = environ.get("SLURM_STEP_NODELIST", "")
    try:
        hosts = expand_nodelist(nodelist)
    except ValueError as error:
        raise ClusterError(f"SLURM_STEP_NODELIST={nodelist!r} is not a SLURM host list "
                           f"({error}); start the step with srun, which sets it.") from None
    if environ.get(PORT_VARIABLE, "").strip():
        port = _integer(environ, PORT_VARIABLE, 1, 65535,
                        fix="Give a free TCP port for process 0 to listen on.")
    elif environ.get("SLURM_JOB_ID", "").strip().isdigit():
        port = 61440 + int(environ["SLURM_JOB_ID"]) % 4096
    else:
        raise ClusterError(f"Neither {PORT_VARIABLE} nor SLURM_JOB_ID is set: set "
                           f"{PORT_VARIABLE} to a free TCP port for process 0 to listen on.")
    host = f"[{hosts[0]}]" if ":" in hosts[0] else hosts[0]
    return JaxCluster(f"{host}:{port}", tasks, process_id, "SLURM")


def cluster_from_environment(environ: Mapping[str, str] | None = None) -> JaxCluster | None:
    """The cluster `environ` (default: this process's environment) describes, or None when
    this process trains alone. KERAS_DISTRIBUTION_* variables win over SLURM's. Raises
    ClusterError for values that are missing, malformed or out of range."""
    environ = os.environ if environ is None else environ
    if any(environ.get(name, "").strip() for name in KERAS_VARIABLES):
        return _from_keras_variables(environ)
    return _from_slurm(environ)


def timeout_seconds(environ: Mapping[str, str] | None = None) -> int:
    """How long joining may take: SYMBOL_TRAINER_CLUSTER_TIMEOUT seconds, default 300."""
    environ = os.environ if environ is None else environ
    if not environ.get(TIMEOUT_VARIABLE, "").strip():
        return DEFAULT_TIMEOUT
    return _integer(environ, TIMEOUT_VARIABLE, 1,
                    fix="Give the seconds processes may take to find each other.")


def _variable_of(cluster: JaxCluster) -> str:
    return (f"{KERAS_VARIABLES[0]}" if cluster.source != "SLURM" else
            f"SLURM_STEP_NODELIST's first host, port {PORT_VARIABLE} or from SLURM_JOB_ID")


def check_coordinator(cluster: JaxCluster, timeout: float) -> None:
    """Raise ClusterError unless the coordinator can be reached within `timeout` seconds
    (processes above 0), or its port is free on this machine (process 0)."""
    where = f"{cluster.coordinator} (from {_variable_of(cluster)})"
    try:
        socket.getaddrinfo(cluster.host, cluster.port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise ClusterError(f"The coordinator's host of {where} is unknown here ({error}): give "
                           f"process 0's host name or address.") from None
    if cluster.process_id == 0:
        try:
            with socket.socket(socket.AF_INET6 if ":" in cluster.host else socket.AF_INET) as s:
                # As JAX's server binds: connections of an earlier run that still linger in
                # TIME_WAIT (a requeued job on the same node) do not make the port taken.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("", cluster.port))
                s.listen()
        except OSError as error:
            raise ClusterError(f"Process 0 cannot listen on port {cluster.port} of {where}: "
                               f"{error.strerror or error}. Choose a free port "
                               f"({PORT_VARIABLE} under SLURM).") from None
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((cluster.host, cluster.port), timeout=5):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"Process {cluster.process_id} of {cluster.processes} found nothing "
                    f"listening at the coordinator {where} within {timeout:.0f} s "
                    f"({error.strerror or error}). Start process 0 there, check the host and "
                    f"port, or raise {TIMEOUT_VARIABLE}.") from None
        time.sleep(0.5)


def join(cluster: JaxCluster, local_device_ids: Sequence[int] | None = None,
         environ: Mapping[str, str] | None = None) -> None:
    """Join `cluster` (jax.distributed.initialize), giving JAX only `local_device_ids` of this
    machine's accelerators (None: all); a second call in the same process with the same
    cluster does nothing. Must come before anything asks JAX for its devices."""
    import jax

    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (cluster.processes, cluster.process_id):
            raise ClusterError(f"This process already joined a JAX cluster of "
                               f"{jax.process_count()} processes; start a new process for "
                               f"{cluster.processes}.")
        return
    timeout = timeout_seconds(environ)
    started = time.monotonic()
    check_coordinator(cluster, timeout)
    log.info("Joining %d processes as process %d, coordinator %s (from %s).",
             cluster.processes, cluster.process_id, cluster.coordinator, cluster.source)
    jax.distributed.initialize(
        coordinator_address=cluster.coordinator, num_processes=cluster.processes,
        process_id=cluster.process_id, local_device_ids=local_device_ids,
        cluster_detection_method="deactivate",
        initialization_timeout=max(1, int(timeout - (time.monotonic() - started))))
    global _joined
    _joined = True
    jax.devices()  # the backends start here, and with them JAX's own exit handlers
    atexit.register(_exit_at_once_after_sigterm)  # so it runs before those


_joined = False  # in a cluster that `leave` has not left


def _exit_at_once_after_sigterm() -> None:
    """At exit, after SIGTERM stopped a process still in the cluster: end it with 143 at once.
    Its peers stop at other steps, and JAX's exit handlers then wait for a collective
    operation that never completes (two processes stopped by SIGTERM both hung there)."""
    from symbol_trainer.command import sigterm_received
    if _joined and sigterm_received():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143)


def leave(models: Sequence) -> None:
    """After the last step every process takes together: give each variable of `models`
    (Keras models) a copy of its value on this process's first device, end the
    keras.distribution, and leave the cluster, so that what follows (scoring, saving and the
    report on process 0) runs on this machine alone, and the other processes may exit.
    Every process must call it, at the same point."""
    import jax
    import numpy as np
    from symbol_trainer.backend import keras

    device = jax.local_devices()[0]
    seen = set()
    for model in models:
        for variable in model.variables:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            value = np.asarray(variable.value)  # replicated: this process's copy, no transfer
            variable._layout = None  # Keras would otherwise lay an assigned value out again
            variable._value = jax.device_put(value, device)
    keras.distribution.set_distribution(None)
    jax.distributed.shutdown()
    global _joined
    _joined = False
