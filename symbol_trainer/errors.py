"""The errors this tool raises on purpose, and what exit code each means.

Kept apart from the library so that the scripts can check flags and paths, and report a
mistake, without importing TensorFlow.
"""

from __future__ import annotations

import os


def printable(text: str) -> str:
    """`text` as written to the output: each byte of a file name that is not UTF-8 (which
    Python holds as a lone surrogate) becomes the four characters \\xNN, as Python's
    'backslashreplace' writes it, so the CSV and JSON stay UTF-8 text. Other text is
    unchanged. `prediction.unescaped` reverses it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def listing(items, shown: int = 5, separator: str = ", ") -> str:
    """The first `shown` of `items` joined by `separator`, and how many more there are:
    'a, b and 3 more', or with separator '; ' 'a; b; and 3 more'. For messages that name a
    few of many files, rows or pairs."""
    text = separator.join(items[:shown])
    if len(items) > shown:
        text += f"{separator.rstrip(', ')} and {len(items) - shown:,} more"
    return text


class SymbolTrainerError(Exception):
    """Base class of the errors this library raises on purpose."""


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler ending the job, `kill`): raised in the main thread, like
    KeyboardInterrupt for Ctrl-C, so that work unwinds and the command exits with 143."""


class InputError(SymbolTrainerError):
    """Something the user gave (a flag, a path, a file, a CSV) must be fixed. Exit code 2.
    File names that are not UTF-8 are shown with their bytes as \\xNN (see `printable`)."""

    def __init__(self, message: str = "", *args):
        super().__init__(printable(message) if isinstance(message, str) else message, *args)


class WeightsUnavailableError(InputError):
    """Pretrained weights could not be downloaded or loaded."""


class ImageReadError(InputError):
    """One image could not be read; `path` names it, `reason` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{printable(str(path))}: {reason}")

    def __reduce__(self):  # pickled whole, so that a decoding process can raise it
        return type(self), (self.path, self.reason)


class BackendError(InputError):
    """A feature that the active Keras backend lacks was asked for. Exit code 2."""
