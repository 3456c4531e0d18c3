"""The pool that decodes images ahead of the model, for feature extraction
(features.decoded_chunks) and predict.py (prediction.frame_stream): its kind, threads or
processes, and its size, every core this process may use. One setting, here.

Threads are the default: Pillow releases the GIL while it decodes and resizes, and on 2 CPU
cores 2 threads decoded 1280x720 and 1920x1080 frames at 98-102 % of the rate of 2
processes (docs/measurements/decode_speed.md, `bench/decode_speed.py`; cores shared with
other work, so neither kind gained much over one worker there). Whether threads keep up on
16 cores is for `bench/gpu.py` to show on a GPU machine: it measures both. Where threads fall
short, POOL_KIND = "processes" runs the same decoding in worker processes (started with
'spawn', so that no process forks a running TensorFlow, JAX or PyTorch): callers then submit
picklable module-level functions and keep the decoded-image store in their own process.

No TensorFlow here.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
from pathlib import Path

import numpy as np
from PIL import Image

from symbol_trainer.images import ImageGeometry, read_image, resize_to_geometry

POOL_KINDS = ("threads", "processes")
# The kind of every decoding pool; see the module's docstring for why.
POOL_KIND = "threads"

# Where Linux keeps a control group's CPU limit: cgroup v2, then v1.
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_limit(v2: Path = CGROUP_V2_CPU_MAX, v1_quota: Path = CGROUP_V1_QUOTA,
                     v1_period: Path = CGROUP_V1_PERIOD) -> int | None:
    """The CPU limit of this process's control group in whole cores (rounded up, at least 1),
    or None where there is none or it cannot be read (no Linux, no cgroup file, 'max')."""
    try:
        quota, period = v2.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = v1_quota.read_text().strip(), v1_period.read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # 'max': no limit
        return None
    if quota_us <= 0 or period_us <= 0:  # v1 writes -1 for no limit
        return None
    return max(1, math.ceil(quota_us / period_us))


def usable_cores() -> int:
    """The cores this process may use: those it may be scheduled on (sched_getaffinity,
    which a batch scheduler such as SLURM narrows to the job's cores), capped by its control
    group's CPU limit (a container's or a job's --cpus), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit else cores)


def decode_workers() -> int:
    """How many images decode at once: one per usable core. The caller's own thread (the
    model) is not left a core of its own: on a GPU it mostly waits, and on a CPU the model's
    threads and the decoders share the cores as the system schedules them."""
    return usable_cores()


def decode_pool(workers: int | None = None, kind: str | None = None,
                name: str = "decode") -> concurrent.futures.Executor:
    """A pool of `workers` (default decode_workers()) of `kind` (default POOL_KIND). With
    'processes', submit only picklable module-level functions and arguments."""
    kind = kind or POOL_KIND
    workers = workers or decode_workers()
    if kind == "threads":
        return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=name)
    if kind == "processes":
        return concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"))
    raise ValueError(f"unknown decoding pool kind {kind!r}; choose from {', '.join(POOL_KINDS)}")


def in_processes(pool: concurrent.futures.Executor) -> bool:
    """Whether `pool` runs its work in other processes (which cannot share this one's
    memory, such as a decoded-image store's bookkeeping)."""
    return isinstance(pool, concurrent.futures.ProcessPoolExecutor)


def reduced_copy(image: Image.Image, max_size: tuple[int, int]) -> Image.Image:
    """A copy of `image` reduced to fit in `max_size` (width, height), aspect ratio kept: what
    --heatmaps draws on (heatmaps.reduced)."""
    shown = image.copy()
    shown.thumbnail(max_size, Image.Resampling.BILINEAR)
    return shown


def decode_frame(path: str, geometry: ImageGeometry, keep: tuple[int, int] | None = None
                 ) -> tuple[np.ndarray, tuple[Image.Image, tuple[int, int]] | None]:
    """predict.py's work for one image file, in a decoding thread or process: the model input
    of `path`, and with `keep` (width, height) a copy of the frame reduced to fit in it with
    the frame's size as decoded (for heatmaps), else None. Raises ImageReadError. It lives
    here, not in prediction, so that a decoding process imports no Keras backend."""
    image = read_image(path, (geometry.width, geometry.height))
    shown = None if keep is None else (reduced_copy(image, keep), image.size)
    return resize_to_geometry(image, geometry), shown
