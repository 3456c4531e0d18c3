"""What every results file in docs/measurements/ starts with: the command, the commit, the date
and the machine; and the writing of the file itself (markdown, with a JSON twin beside it).

Standard library only, so a benchmark can describe the machine before TensorFlow loads. The
backend (Keras backend, its framework's version, Keras's version, the GPUs the framework sees)
comes from the benchmark's training processes, which import Keras anyway: see
`backend_description`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """HEAD of the checkout this benchmark runs from, '+ changes' when the tree is dirty."""
    def git(*arguments: str) -> str:
        completed = subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True)
        return completed.stdout.strip() if completed.returncode == 0 else ""

    head = git("rev-parse", "--short=12", "HEAD")
    if not head:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{head} + uncommitted changes" if dirty else head


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[str]:
    """GPU names as nvidia-smi lists them; [] without one (or without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return []
    completed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True)
    return [line.strip() for line in completed.stdout.splitlines() if line.strip()] \
        if completed.returncode == 0 else []


def machine() -> dict:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
            "gpus": gpus(), "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def backend_description(import_keras: bool = True) -> dict:
    """The Keras backend of this process and what it runs on: Keras's version, the backend
    framework's version (TensorFlow, JAX or PyTorch) and the GPUs that framework sees. Call it
    in a process that imports Keras anyway (a training process): it imports Keras, and so the
    backend KERAS_BACKEND names. With `import_keras` False (a benchmark that needs no model),
    only the backend Keras would choose is named, nothing is imported."""
    if not import_keras:
        sys.path.insert(0, str(ROOT))
        from symbol_trainer.dependencies import configured_backend
        return {"keras_backend": configured_backend(), "keras": "not imported",
                "framework": "not imported", "visible_gpus": []}
    import keras
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf
        return {"keras_backend": name, "keras": keras.__version__,
                "tensorflow": tf.__version__, "framework": f"TensorFlow {tf.__version__}",
                "visible_gpus": [d.name for d in tf.config.list_physical_devices("GPU")]}
    if name == "jax":
        import jax
        return {"keras_backend": name, "keras": keras.__version__,
                "framework": f"JAX {jax.__version__}",
                "visible_gpus": [str(d) for d in jax.devices() if d.platform == "gpu"]}
    if name == "torch":
        import torch
        return {"keras_backend": name, "keras": keras.__version__,
                "framework": f"PyTorch {torch.__version__}",
                "visible_gpus": [torch.cuda.get_device_name(i)
                                 for i in range(torch.cuda.device_count())]}
    return {"keras_backend": name, "keras": keras.__version__, "framework": name,
            "visible_gpus": []}


def header(title: str, started: datetime.datetime, backend: dict | None) -> dict:
    """The facts every results file begins with; `backend` from backend_description."""
    return {"title": title,
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "commit": commit(),
            "date": started.astimezone(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "backend": backend or {}}


def header_markdown(facts: dict) -> str:
    m, b = facts["machine"], facts["backend"]
    gpu = ", ".join(m["gpus"]) or "none"
    framework = b.get("framework") or f"TensorFlow {b.get('tensorflow', '?')}" if b else ""
    if not b:
        backend = "not recorded"
    elif b["keras"] == "not imported":
        backend = f"KERAS_BACKEND {b['keras_backend']} (Keras not imported: no model here)"
    else:
        backend = (f"Keras {b['keras']} on {b['keras_backend']} ({framework}), "
                   f"visible GPUs: {', '.join(b['visible_gpus']) or 'none'}")
    return "\n".join([
        f"# {facts['title']}", "",
        "Written by the benchmark itself; do not edit by hand.", "",
        f"- Command: `{facts['command']}`",
        f"- Commit: {facts['commit']}",
        f"- Date: {facts['date']}",
        f"- Machine: {m['cpu']}, {m['cpu_cores']} CPU cores ({m['cpu_cores_usable']} usable), "
        f"GPU: {gpu}; {m['system']}, Python {m['python']}",
        f"- Backend: {backend}", ""])


def finite(value):
    """`value` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write(markdown_path: str | os.PathLike, markdown: str, data: dict) -> tuple[Path, Path]:
    """Write the markdown file and its JSON twin (same name, .json); return both paths."""
    path = Path(markdown_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown.rstrip() + "\n")
    twin = path.with_suffix(".json")
    twin.write_text(json.dumps(finite(data), indent=1, allow_nan=False, default=str) + "\n")
    return path, twin
