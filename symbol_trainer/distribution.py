"""Which devices and machines train: a `tf.distribute` strategy from --devices, TF_CONFIG or
SLURM under TensorFlow; a `keras.distribution.DataParallel` over local devices under JAX.

Training never distributes work itself; it builds and fits its Keras models inside the scope
of the strategy chosen here, and Keras splits every global batch over the replicas. Under
TensorFlow:

- one device (one GPU, or the CPU): TensorFlow's default strategy, no overhead;
- several GPUs of one machine (all visible ones by default, or `--devices 0,2`):
  `MirroredStrategy`;
- `--devices cpu:N`: N logical CPU devices under `MirroredStrategy`, which exercises the
  multi-device path on a laptop or in CI (it is slower than one CPU device);
- several processes, described by TF_CONFIG or started by `srun` with more than one task:
  `MultiWorkerMirroredStrategy`, each worker using the GPUs it sees (or its CPU).

Under JAX, several local devices (every visible GPU by default, `--devices 0,2`, or
`--devices cpu:N`, for which this process asks XLA for N host devices before JAX starts)
train under `keras.distribution.DataParallel`; the strategy object is then a stand-in whose
scope does nothing. Several processes (one per machine) train one model under JAX too, when
`srun` starts them with several tasks or Keras's KERAS_DISTRIBUTION_* variables describe them
(jax_cluster.py reads both, and joins the cluster before JAX touches a device): DataParallel
then spans every device of every process, each process feeds its own share of each global
batch (`local_share`), and every process scores the validation frames and computes the
backbone features, as under TensorFlow, so that all take the same steps. After the last
step they leave the cluster together (`leave_cluster`), and process 0 alone scores, saves
and writes the report on its own devices. TF_CONFIG is TensorFlow's format and stops a JAX
run with a BackendError; under torch, one process uses one device.

The global batch is `--batch-size` times the number of replicas. Only the chief (worker 0)
writes the model directory and its checkpoints; every worker reads the same checkpoint to
resume, so the model directory must be on a filesystem all workers share.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from dataclasses import dataclass

from symbol_trainer.backend import BACKEND, keras, tf  # TensorFlow first, quietly
from symbol_trainer import jax_cluster

from symbol_trainer.settings import DEVICES_HELP, DeviceChoice  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

@dataclass
class Placement:
    """The strategy training runs under, and this process's part in it."""

    strategy: object         # tf.distribute.Strategy, or LocalScope under JAX and torch
    replicas: int            # devices that each take a share of every global batch
    workers: int             # processes taking part
    worker_index: int
    description: str

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the model directory and checkpoints."""
        return self.worker_index == 0


def _cluster_workers() -> tuple[str, int] | None:
    """('tf_config' or 'slurm', number of workers) when this process is one of several."""
    raw = os.environ.get("TF_CONFIG")
    if raw:
        try:
            cluster = json.loads(raw).get("cluster", {})
        except (json.JSONDecodeError, AttributeError) as error:
            raise ValueError(f"TF_CONFIG is not valid JSON with a 'cluster' entry: {error}") from None
        tasks = sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))
        if tasks > 1:
            return "tf_config", tasks
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "SLURM_PROCID" in os.environ and tasks > 1:
        return "slurm", tasks
    return None


def _worker_index(resolver) -> int:
    """This process's place among the workers; 0 is the one that writes: the 'chief' task when
    the cluster has one, else worker 0."""
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    if "chief" in resolver.cluster_spec().as_dict():
        return 0 if task_type == "chief" else task_id + 1
    return task_id


def _restrict_devices(choice: DeviceChoice) -> None:
    """Make only the chosen devices visible; only possible before TensorFlow starts its runtime."""
    try:
        if choice.kind == "cpu":
            tf.config.set_visible_devices([], "GPU")
            if choice.cpu_devices > 1:
                cpu = tf.config.list_physical_devices("CPU")[0]
                tf.config.set_logical_device_configuration(
                    cpu, [tf.config.LogicalDeviceConfiguration()] * choice.cpu_devices)
        elif choice.kind == "gpus":
            gpus = tf.config.list_physical_devices("GPU")
            missing = [i for i in choice.gpu_indices if i >= len(gpus)]
            if missing:
                raise ValueError(f"GPU {missing[0]} does not exist: this machine has "
                                 f"{len(gpus)} visible GPU(s), numbered from 0")
            tf.config.set_visible_devices([gpus[i] for i in choice.gpu_indices], "GPU")
    except RuntimeError as error:
        # TensorFlow refuses once it has run an operation: a caller that trains twice in one
        # process (tests, notebooks) keeps the devices of its first run.
        current = [d.name for d in tf.config.list_logical_devices()]
        log.warning("Cannot change the devices after TensorFlow has started (%s); training on "
                    "%s.", error, ", ".join(current))


def _mend_keras_multi_worker_logs() -> None:
    """Let Keras 3's fit() run under MultiWorkerMirroredStrategy.

    Keras (3.15 at the time of writing) averages each step's logs across workers with
    `strategy.reduce("MEAN", value, axis=0)`, and every log is a scalar, so every step fails
    with 'Invalid reduction dimension 0 for input with 0 dimensions' (tensorflow/tensorflow
    issue 72388; the reported workaround is going back to Keras 2). A scalar is averaged over
    the replicas with axis=None instead, which is what one-worker training does too; every
    other case is left to Keras."""
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    keras_reduce = trainer.reduce_per_replica
    if getattr(keras_reduce, "mends_scalars", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or \
                not trainer._collective_all_reduce_multi_worker(strategy):
            return keras_reduce(values, strategy, reduction)

        def mean(value):
            rank = strategy.experimental_local_results(value)[0].shape.rank
            return strategy.reduce("MEAN", value, axis=0 if rank else None)
        return tree.map_structure(mean, values)

    reduce_per_replica.mends_scalars = True
    trainer.reduce_per_replica = reduce_per_replica


def _rearm_python_sigterm() -> None:
    """Give SIGTERM back to Python's handler (the command's, which stops training with a
    checkpoint and exit code 143). TensorFlow's coordination service, which a multi-worker
    strategy starts, installs a C++ SIGTERM handler of its own for its preemption notices,
    and with it the signal no longer reaches Python: workers kept training through it.
    jax.distributed.initialize starts the same notifier (its log says 'SIGTERM caught')."""
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):
        try:
            signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: the caller handles no signals there
            pass


def is_multi_worker(placement: Placement) -> bool:
    """Whether `placement` is TensorFlow's MultiWorkerMirroredStrategy."""
    return tf is not None and isinstance(placement.strategy,
                                         tf.distribute.MultiWorkerMirroredStrategy)


def local_share(batches, placement: Placement):
    """`batches` (a datasets.Batches stream that fit() takes) cut to this process's share of
    each global batch when several JAX processes train together: Keras makes one global array
    of every process's share (jax.make_array_from_process_local_data). Each process loads only
    its own rows. Unchanged otherwise (tf.distribute shards a dataset itself)."""
    if BACKEND == "jax" and placement.workers > 1:
        return batches.keep_share(placement.worker_index, placement.workers)
    return batches


def leave_cluster(placement: Placement, models) -> None:
    """After the last step all processes take together, under JAX with several processes:
    copy the variables of `models` to this process's own device and leave the cluster
    (jax_cluster.leave), so that process 0 scores, saves and reports alone and the others may
    exit. Every process calls it at the same point; nothing happens otherwise."""
    if BACKEND == "jax" and placement.workers > 1:
        jax_cluster.leave([m for m in models if m is not None])


def batch_multiple(placement: Placement) -> int:
    """What every batch's length must be a multiple of: the replicas under keras.distribution
    (JAX), which splits batches evenly; 1 under tf.distribute, which splits any batch."""
    return 1 if BACKEND == "tensorflow" else placement.replicas


class LocalScope:
    """The stand-in for a tf.distribute strategy under JAX and torch: Keras's distribution
    (if any) is set globally, so a scope has nothing to do."""

    num_replicas_in_sync = 1

    def scope(self):
        return contextlib.nullcontext()


def default_placement() -> Placement:
    """The backend's default device, no distribution: one process, one replica."""
    strategy = tf.distribute.get_strategy() if BACKEND == "tensorflow" else LocalScope()
    return Placement(strategy, 1, 1, 0, "the default device")


def _request_cpu_devices(count: int) -> None:
    """Ask XLA for `count` host devices (under JAX); read when JAX starts its CPU client,
    which nothing has asked for yet in a run."""
    if count > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                   f"platform_device_count={count}").strip()


def _jax_devices(choice: DeviceChoice) -> list:
    import jax

    if choice.kind == "cpu":
        _request_cpu_devices(choice.cpu_devices)
        devices = jax.devices("cpu")
        if len(devices) < choice.cpu_devices:
            raise ValueError(
                f"JAX has {len(devices)} CPU device(s) in this process; start it with XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{choice.cpu_devices}")
        return devices[:choice.cpu_devices]
    if choice.kind == "gpus":
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        missing = [i for i in choice.gpu_indices if i >= len(gpus)]
        if missing:
            raise ValueError(f"GPU {missing[0]} does not exist: this machine has {len(gpus)} "
                             f"visible GPU(s), numbered from 0")
        return [gpus[i] for i in choice.gpu_indices]
    return jax.local_devices()


def _local_placement(choice: DeviceChoice) -> Placement:
    """JAX and torch: the devices of `choice` on this machine, data parallel under JAX when
    there are several."""
    if BACKEND == "torch":
        from keras.src.backend.torch.core import get_device
        device = str(get_device())
        if choice.kind == "cpu" and device != "cpu":
            raise ValueError("--devices cpu under torch: start the run with "
                             "KERAS_TORCH_DEVICE=cpu (torch picks its device when it starts)")
        if choice.kind == "gpus" and (choice.gpu_indices != (0,) or device == "cpu"):
            raise ValueError(f"--devices {choice.gpu_indices[0]} under torch: make that GPU "
                             f"the only visible one (CUDA_VISIBLE_DEVICES) and leave --devices "
                             f"at auto")
        return Placement(LocalScope(), 1, 1, 0, f"one device ({device})")
    devices = _jax_devices(choice)
    names = ", ".join(str(d) for d in devices)
    keras.distribution.set_distribution(None)
    if len(devices) == 1:
        if choice.kind != "auto":  # --devices cpu on a GPU machine, or one GPU of several
            import jax
            jax.config.update("jax_default_device", devices[0])
        return Placement(LocalScope(), 1, 1, 0, f"one device ({names})")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return Placement(LocalScope(), len(devices), 1, 0,
                     f"keras.distribution.DataParallel over {len(devices)} devices ({names})")


def _jax_cluster_placement(choice: DeviceChoice, cluster: jax_cluster.JaxCluster) -> Placement:
    """JAX, several processes: join `cluster`, then DataParallel over every device of every
    process, the same number on each: `--devices` chooses this process's devices as on one
    machine."""
    if choice.kind == "cpu":
        _request_cpu_devices(choice.cpu_devices)
    jax_cluster.join(cluster, list(choice.gpu_indices) if choice.kind == "gpus" else None)
    _rearm_python_sigterm()  # JAX's preemption notifier takes SIGTERM as TensorFlow's does
    import jax
    by_process: dict[int, list] = {}
    for device in jax.devices("cpu" if choice.kind == "cpu" else None):
        by_process.setdefault(device.process_index, []).append(device)
    if choice.kind == "cpu":
        by_process = {p: found[:choice.cpu_devices] for p, found in by_process.items()}
    devices = [d for p in sorted(by_process) for d in by_process[p]]
    local = by_process.get(jax.process_index(), [])
    if len(devices) != len(local) * cluster.processes:
        raise jax_cluster.ClusterError(
            f"The {cluster.processes} processes have {len(devices)} devices in all and this "
            f"one has {len(local)}: give every process as many devices (--devices, or the "
            f"same GPUs per node), since each global batch is split evenly.")
    keras.distribution.set_distribution(keras.distribution.DataParallel(
        devices=devices, auto_shard_dataset=False))  # each process feeds its share itself
    return Placement(LocalScope(), len(devices), cluster.processes, cluster.process_id,
                     f"keras.distribution.DataParallel over {len(devices)} devices in "
                     f"{cluster.processes} processes from {cluster.source} "
                     f"({len(local)} here; this is process {cluster.process_id})")


def placement(choice: DeviceChoice) -> Placement:
    """The strategy for `choice` and the cluster this process belongs to (TF_CONFIG or SLURM
    under TensorFlow; SLURM or KERAS_DISTRIBUTION_* under JAX, which it joins here).
    Call it before any TensorFlow operation runs and before anything asks JAX for its
    devices: devices and collective operations can only be set up before the backend starts
    its runtime. Raises ValueError for impossible choices, BackendError for what only
    TensorFlow does here, jax_cluster.ClusterError for a cluster that cannot be joined."""
    if BACKEND == "jax":
        cluster = jax_cluster.cluster_from_environment()
        if cluster is not None:
            return _jax_cluster_placement(choice, cluster)
    elif os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1").strip() not in ("", "0", "1"):
        # Each process would train alone, all into the same model directory.
        raise jax_cluster.ClusterError(
            "KERAS_DISTRIBUTION_NUM_PROCESSES and its two companions describe a cluster for "
            f"keras.distribution, which this tool joins under KERAS_BACKEND=jax only (this run "
            f"uses {BACKEND}): run with KERAS_BACKEND=jax, or under TensorFlow start the "
            "processes with TF_CONFIG or srun instead (docs/batch-jobs.md).")
    if BACKEND != "tensorflow":
        return _local_placement(choice)
    cluster = _cluster_workers()
    _restrict_devices(choice)
    if cluster is not None:
        source, workers = cluster
        if source == "slurm":
            # One task per node using all of that node's GPUs is the layout the batch script
            # of docs/batch-jobs.md asks for; GPUs are never reassigned here, since TensorFlow
            # already enumerated them when it was imported.
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
                gpus_per_node=len(tf.config.list_physical_devices("GPU")), auto_set_gpu=False)
        else:
            resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        _mend_keras_multi_worker_logs()
        _rearm_python_sigterm()
        index = _worker_index(resolver)
        return Placement(strategy, strategy.num_replicas_in_sync, workers, index,
                         f"MultiWorkerMirroredStrategy over {workers} workers from "
                         f"{'SLURM' if source == 'slurm' else 'TF_CONFIG'} "
                         f"({strategy.num_replicas_in_sync} replicas; this is worker {index})")
    devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    if not devices:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) == 1:
        return Placement(tf.distribute.get_strategy(), 1, 1, 0, f"one device ({devices[0]})")
    strategy = tf.distribute.MirroredStrategy(devices=devices)
    return Placement(strategy, len(devices), 1, 0,
                     f"MirroredStrategy over {len(devices)} devices ({', '.join(devices)})")
