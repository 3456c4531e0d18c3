"""pyproject.toml: `pip install .` gives the package and three working console commands,
without the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT

COMMANDS = {"build-binary-classifier": "WITH_DIR", "build-multi-hot-model": "LABELS_CSV",
            "predict-symbols": "INPUT"}
# What pip needs from the checkout; the tests, benchmarks and documentation stay behind.
PACKAGE_FILES = ["pyproject.toml", "requirements.txt", "symbol_trainer"]


def _build_tools_missing() -> str | None:
    for module in ("venv", "setuptools", "pip"):
        try:
            __import__(module)
        except ImportError:
            return f"this Python ({sys.executable}) has no {module}"
    import setuptools
    if int(setuptools.__version__.split(".")[0]) < 64:  # pyproject.toml's build requirement
        return f"setuptools {setuptools.__version__} is older than 64, which pyproject.toml needs"
    return None


def test_pip_install_gives_three_commands_that_work_without_the_checkout(tmp_path):
    missing = _build_tools_missing()
    if missing:
        print(f"skipped: {missing}")
        pytest.skip(missing)
    # A copy, so that pip's build/ and *.egg-info never land in the checkout.
    source = tmp_path / "checkout"
    source.mkdir()
    for name in PACKAGE_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    # The new environment sees this interpreter's packages (pip, setuptools, and the
    # dependencies, which --no-deps leaves alone) after its own.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "parent_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
         "--disable-pip-version-check", str(source)],
        capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    shutil.rmtree(source)  # the installed copy stands on its own
    assert not (ROOT / "build").exists() and not list(ROOT.glob("*.egg-info"))

    for command, positional in COMMANDS.items():
        result = subprocess.run([str(env_dir / "bin" / command), "--help"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: {command} ") and positional in result.stdout
    # The installed package is the copy, not the checkout on some path.
    where = subprocess.run([str(python), "-c", "import symbol_trainer; print(symbol_trainer.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(env_dir) in where
    # A Python that lacks a dependency is told to install it by name, at the version
    # requirements.txt pins (read from the installed metadata): the copy has no requirements.txt.
    advice = subprocess.run(
        [str(python), "-c", "from symbol_trainer import dependencies as d; "
         "print(d.REQUIREMENTS_FILE.exists()); print(d.install_advice(['numpy', 'av']))"],
        cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert advice.startswith("False\n"), advice
    assert f"-m pip install numpy=={pins['numpy']} av=={pins['av']}'" in advice
    assert "requirements.txt" not in advice
    # A flag mistake is still answered before TensorFlow, with exit code 2.
    flag = subprocess.run([str(env_dir / "bin" / "build-multi-hot-model"), "a", "b.csv", "out",
                           "--seed", "-1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert flag.returncode == 2 and "--seed must be" in flag.stderr
