"""Whether this Python has the packages the tool needs, asked before any of them is imported.

A script started with a Python that lacks them (the system's, not the virtual environment's)
would otherwise end in a ModuleNotFoundError traceback. What to install depends on where the
package came from: a checkout has requirements.txt beside the package (`pip install -r` it);
a copy installed with `pip install .` has no requirements.txt, but its distribution's metadata
holds the same pinned versions, so the message names those. Standard library only.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

from symbol_trainer.errors import BackendError, InputError
from symbol_trainer.settings import DeviceChoice

# Import name -> the package that requirements.txt installs for it, whatever the backend.
COMMON = {"numpy": "numpy", "pandas": "pandas", "PIL": "pillow", "keras": "keras",
          "matplotlib": "matplotlib"}
# The Keras backends the tool runs under, and the package (import name -> pip name) each needs.
BACKEND_PACKAGES = {"tensorflow": {"tensorflow": "tensorflow"}, "jax": {"jax": "jax"},
                    "torch": {"torch": "torch"}}
# The checkout's requirements.txt (the package lies one folder below it); an installed copy has
# none there.
REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "requirements.txt"
# The distribution name of pyproject.toml, whose metadata an installed copy has.
DISTRIBUTION = "symbol-trainer"


def configured_backend() -> str:
    """The Keras backend this process will run under, resolved as Keras 3 resolves it, without
    importing Keras: the KERAS_BACKEND environment variable when set and not empty, else the
    "backend" of keras.json in KERAS_HOME (or ~/.keras, or /tmp/.keras when the home folder
    is not writable), else "tensorflow". Raises InputError for a backend the tool does not
    run under."""
    backend = os.environ.get("KERAS_BACKEND") or ""
    source = "the environment variable KERAS_BACKEND"
    if not backend:
        home = os.environ.get("KERAS_HOME") or os.path.join(
            os.path.expanduser("~") if os.access(os.path.expanduser("~"), os.W_OK) else "/tmp",
            ".keras")
        config = os.path.join(home, "keras.json")
        try:
            with open(config, encoding="utf-8") as file:
                backend = json.load(file).get("backend", "") or ""
            source = config
        except (OSError, ValueError, AttributeError):
            backend = ""
    backend = backend or "tensorflow"
    if backend not in BACKEND_PACKAGES:
        raise InputError(f"{source} names the Keras backend {backend!r}; this tool runs under "
                         f"{', '.join(BACKEND_PACKAGES)}. Set KERAS_BACKEND to one of them.")
    return backend


def require_tensorflow(feature: str, backend: str | None = None) -> None:
    """Raise BackendError when `backend` (default: the configured one) is not TensorFlow:
    `feature` (for example "--export saved_model") exists only there."""
    backend = backend or configured_backend()
    if backend != "tensorflow":
        raise BackendError(f"{feature} needs the TensorFlow backend, and this run uses "
                           f"KERAS_BACKEND={backend}. Run it with KERAS_BACKEND=tensorflow "
                           f"(TensorFlow installed), or leave {feature} out.")


def tensorflow_only_features(devices: str = "auto", tensorboard: str | None = None,
                             backend: str | None = None) -> list[str]:
    """What of a training run (its --devices and --tensorboard, and the cluster its
    environment describes) only the TensorFlow backend does here; empty under TensorFlow.
    TF_CONFIG is TensorFlow's own format; several processes under JAX come from srun or
    KERAS_DISTRIBUTION_* (jax_cluster.py, and distribution.placement refuses the latter under
    the other backends), and torch trains in one process."""
    backend = backend or configured_backend()
    if backend == "tensorflow":
        return []
    features = ["--tensorboard"] if tensorboard else []
    if os.environ.get("TF_CONFIG"):
        features.append("TF_CONFIG (tf.distribute multi-worker training)")
    if backend == "torch" and "SLURM_PROCID" in os.environ and \
            os.environ.get("SLURM_STEP_NUM_TASKS", "1").strip() not in ("", "0", "1"):
        features.append("training across several processes (srun with several tasks; "
                        "KERAS_BACKEND=jax has it too)")
    try:
        choice = DeviceChoice.parse(str(devices))
    except ValueError:  # a bad value is --devices' own check's to report
        choice = None
    if backend == "torch" and choice is not None and (
            len(choice.gpu_indices) > 1 or choice.cpu_devices > 1):
        features.append(f"--devices {devices} (several devices; KERAS_BACKEND=jax has them too)")
    return features


def require_backend_features(devices: str = "auto", tensorboard: str | None = None,
                             backend: str | None = None) -> None:
    """Raise BackendError naming the first of `tensorflow_only_features` when there is one."""
    for feature in tensorflow_only_features(devices, tensorboard, backend):
        require_tensorflow(feature, backend)


def required_packages(backend: str | None = None) -> dict[str, str]:
    """Import name -> pip name of what the tool needs under `backend` (default: the configured
    one): the common packages and the backend's own."""
    return {**COMMON, **BACKEND_PACKAGES[backend or configured_backend()]}


def missing_packages(modules: dict[str, str] | None = None) -> list[str]:
    """The packages (as pip names them) of `modules` (default: `required_packages()`) that
    this Python cannot import."""
    modules = required_packages() if modules is None else modules
    missing = []
    for module, package in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_requirements(distribution: str = DISTRIBUTION) -> dict[str, str]:
    """Package name (normalized) -> its requirement as the installed distribution states it
    (`numpy==2.4.6`); empty when `distribution` is not installed."""
    try:
        requirements = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    pinned = {}
    for requirement in requirements:
        specifier, _, marker = (part.strip() for part in requirement.partition(";"))
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", specifier)
        if name and "extra" not in marker:  # an optional extra's packages are not needed
            pinned[_normalized(name.group(0))] = specifier.replace(" ", "")
    return pinned


def requirements_file_for(backend: str | None = None) -> Path:
    """The checkout's requirements file for `backend` (default: the configured one):
    requirements.txt for TensorFlow, requirements-jax.txt or requirements-torch.txt for the
    others (the same packages without TensorFlow, with the backend's own)."""
    try:
        backend = backend or configured_backend()
    except InputError:
        backend = "tensorflow"
    if backend == "tensorflow":
        return REQUIREMENTS_FILE
    return REQUIREMENTS_FILE.with_name(f"requirements-{backend}.txt")


def install_advice(missing: list[str], requirements_file: Path | None = None,
                   distribution: str = DISTRIBUTION) -> str:
    """The sentence that says how to install the `missing` packages: from the checkout's
    requirements file for the configured backend (`requirements_file_for`) when there is
    one, else by name, at the versions the installed distribution pins."""
    requirements_file = requirements_file or requirements_file_for()
    pip = f"{sys.executable} -m pip install"
    if requirements_file.is_file():
        return (f"Install them with '{pip} -r {requirements_file}', or run the script with the "
                "Python of the virtual environment that has them (for example .venv/bin/python, "
                "as in the README's Quick start).")
    pinned = pinned_requirements(distribution)
    names = " ".join(pinned.get(_normalized(package), package) for package in missing)
    return (f"Install them with '{pip} {names}', or install {distribution} again with its "
            "dependencies ('pip install .' in its source folder, without --no-deps), or run "
            "the command with the Python of the environment that has them.")


def require(modules: dict[str, str] | None = None) -> None:
    """Raise InputError, saying what to install or which Python to use, when this Python
    lacks any of `modules` (default: what the configured backend needs)."""
    missing = missing_packages(modules)
    if missing:
        raise InputError(
            f"This Python ({sys.executable}) lacks {', '.join(missing)}, which this tool needs. "
            + install_advice(missing))
