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
