"""symbol_trainer/dependencies.py: a Python without the packages gets one message that says
what to install, right for a checkout (requirements.txt) and for an installed copy (which has
no requirements.txt, only its distribution's pinned requirements)."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

from conftest import ROOT
from symbol_trainer import dependencies
from symbol_trainer.errors import InputError

ABSENT = {"no_such_module_for_this_test": "no-such-package"}


def test_present_packages_are_not_missing_and_absent_ones_are():
    assert dependencies.missing_packages({"json": "json", **ABSENT}) == ["no-such-package"]


def test_a_checkout_is_told_to_install_its_requirements_file():
    assert dependencies.REQUIREMENTS_FILE == ROOT / "requirements.txt"
    advice = dependencies.install_advice(["numpy"])
    assert f"{sys.executable} -m pip install -r {ROOT / 'requirements.txt'}'" in advice


def test_an_installed_copy_is_told_the_pinned_packages_not_a_missing_file(tmp_path, monkeypatch):
    pins = ["tensorflow==2.21.0", "Pillow==13.0.0", "numpy>=2,<3",
            "pytest==9.0; extra == 'dev'", "av==18.1.0; python_version >= '3.9'"]
    monkeypatch.setattr(importlib.metadata, "requires",
                        lambda name: pins if name == "symbol-trainer" else None)
    advice = dependencies.install_advice(["tensorflow", "pillow", "numpy", "av", "other"],
                                         requirements_file=tmp_path / "requirements.txt")
    assert (f"'{sys.executable} -m pip install tensorflow==2.21.0 Pillow==13.0.0 numpy>=2,<3 "
            "av==18.1.0 other'") in advice
    assert "requirements.txt" not in advice and "-r " not in advice
    assert "install symbol-trainer again" in advice


def test_an_installed_copy_without_metadata_is_told_the_package_names(tmp_path):
    advice = dependencies.install_advice(["numpy", "pillow"],
                                         requirements_file=tmp_path / "requirements.txt",
                                         distribution="no-such-distribution-for-this-test")
    assert f"'{sys.executable} -m pip install numpy pillow'" in advice
    assert "requirements.txt" not in advice


def test_require_raises_one_input_error_naming_what_is_missing():
    with pytest.raises(InputError) as raised:
        dependencies.require({"json": "json", **ABSENT})
    message = str(raised.value)
    assert "lacks no-such-package, which this tool needs" in message
    assert "requirements.txt" in message and "\n" not in message
    dependencies.require({"json": "json"})  # nothing missing: no error


def test_configured_backend_follows_keras_rules(tmp_path, monkeypatch):
    # The same order as Keras: KERAS_BACKEND, then keras.json in KERAS_HOME, then TensorFlow.
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert dependencies.configured_backend() == "tensorflow"
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    assert dependencies.configured_backend() == "jax"
    assert dependencies.required_packages()["jax"] == "jax"
    assert "tensorflow" not in dependencies.required_packages()
    monkeypatch.setenv("KERAS_BACKEND", "torch")
    assert dependencies.configured_backend() == "torch"
    monkeypatch.setenv("KERAS_BACKEND", "theano")
    with pytest.raises(InputError, match="KERAS_BACKEND names the Keras backend 'theano'"):
        dependencies.configured_backend()


def test_each_backend_is_told_its_own_requirements_file(monkeypatch):
    assert dependencies.requirements_file_for("tensorflow") == ROOT / "requirements.txt"
    for backend in ("jax", "torch"):
        path = dependencies.requirements_file_for(backend)
        assert path == ROOT / f"requirements-{backend}.txt" and path.is_file()
        pins = path.read_text()
        assert "tensorflow" not in pins and f"\n{backend}" in pins
        monkeypatch.setenv("KERAS_BACKEND", backend)
        assert f"-r {path}'" in dependencies.install_advice([backend])
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    assert f"-r {ROOT / 'requirements.txt'}'" in dependencies.install_advice(["numpy"])
    # The backend files pin the same versions as requirements.txt, less TensorFlow's two.
    common = {l for l in (ROOT / "requirements.txt").read_text().splitlines()
              if "==" in l and not l.startswith(("tensorflow", "tensorboard"))}
    for backend in ("jax", "torch"):
        assert common <= set(dependencies.requirements_file_for(backend).read_text().splitlines())


def test_tensorflow_only_run_features_are_named_under_other_backends(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert dependencies.tensorflow_only_features("cpu:2", "logs", "tensorflow") == []
    assert dependencies.tensorflow_only_features("cpu:2", None, "jax") == []
    assert dependencies.tensorflow_only_features("auto", "logs", "jax") == ["--tensorboard"]
    assert dependencies.tensorflow_only_features("0,1", None, "torch") == [
        "--devices 0,1 (several devices; KERAS_BACKEND=jax has them too)"]
    assert dependencies.tensorflow_only_features("0", None, "torch") == []
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    assert dependencies.tensorflow_only_features("auto", None, "jax") == [
        "TF_CONFIG (tf.distribute multi-worker training)"]
    from symbol_trainer.errors import BackendError
    with pytest.raises(BackendError, match=r"^TF_CONFIG \(tf.distribute multi-worker training\) "
                                           r"needs the TensorFlow backend, and this run uses "
                                           r"KERAS_BACKEND=jax\. Run it with"):
        dependencies.require_backend_features("auto", None, "jax")
    dependencies.require_backend_features("auto", "logs", "tensorflow")


def _pins(path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            pins[name.split("[", 1)[0].lower()] = version
    return pins


@pytest.mark.parametrize("backend_file, backend_package", [
    ("requirements-jax.txt", "jax"), ("requirements-torch.txt", "torch")])
def test_backend_requirement_files_pin_what_requirements_txt_pins(backend_file, backend_package):
    # requirements.txt stays flat (pyproject.toml reads it), so the other backends' files
    # repeat its pins: they must not drift apart.
    default = _pins(ROOT / "requirements.txt")
    other = _pins(ROOT / backend_file)
    shared = {name: version for name, version in default.items()
              if name not in ("tensorflow", "tensorboard")}
    assert {name: version for name, version in other.items() if name != backend_package} == shared
    assert backend_package in other


def test_several_processes_are_refused_under_torch_only(monkeypatch):
    """srun with several tasks: JAX joins the cluster (jax_cluster.py), torch trains in one
    process and says so at once (KERAS_DISTRIBUTION_*: tests/test_distribution.py)."""
    for name in ("TF_CONFIG", "KERAS_DISTRIBUTION_NUM_PROCESSES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert dependencies.tensorflow_only_features("auto", None, "jax") == []
    assert dependencies.tensorflow_only_features("auto", None, "tensorflow") == []
    assert dependencies.tensorflow_only_features("auto", None, "torch") == [
        "training across several processes (srun with several tasks; KERAS_BACKEND=jax has it "
        "too)"]
