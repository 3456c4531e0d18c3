"""The errors this tool raises on purpose, and what exit code each means.

Kept apart from the library so that the scripts can check flags and paths, and report a
mistake, without importing TensorFlow.
"""

from __future__ import annotations

import os


class SymbolTrainerError(Exception):
    """Base class of the errors this library raises on purpose."""


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler ending the job, `kill`): raised in the main thread, like
    KeyboardInterrupt for Ctrl-C, so that work unwinds and the command exits with 143."""


class InputError(SymbolTrainerError):
    """Something the user gave (a flag, a path, a file, a CSV) must be fixed. Exit code 2."""


class WeightsUnavailableError(InputError):
    """Pretrained weights could not be downloaded or loaded."""


class ImageReadError(InputError):
    """One image could not be read; `path` names it, `reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

