"""Whether this Python has the packages the tool needs, asked before any of them is imported.

A script started with a Python that lacks them (the system's, not the virtual environment's)
would otherwise end in a ModuleNotFoundError traceback. Standard library only.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from symbol_trainer.errors import InputError

# Import name -> the package that requirements.txt installs for it.
REQUIRED = {"numpy": "numpy", "pandas": "pandas", "PIL": "pillow", "tensorflow": "tensorflow",
            "keras": "keras", "matplotlib": "matplotlib"}
# The checkout's requirements.txt (the package lies one folder below it).
REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "requirements.txt"


def missing_packages(modules: dict[str, str] = REQUIRED) -> list[str]:
    """The packages (as pip names them) of `modules` that this Python cannot import."""
    missing = []
    for module, package in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def require(modules: dict[str, str] = REQUIRED) -> None:
    """Raise InputError, saying what to install or which Python to use, when this Python
    lacks any of `modules`."""
    missing = missing_packages(modules)
    if missing:
        raise InputError(
            f"This Python ({sys.executable}) lacks {', '.join(missing)}, which this tool needs. "
            f"Install them with '{sys.executable} -m pip install -r {REQUIREMENTS_FILE}', or run "
            "the script with the Python of the virtual environment that has them (for example "
            ".venv/bin/python, as in the README's Quick start).")
