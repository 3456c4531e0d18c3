"""The warnings a run gave, kept for the report and metrics.json: people read the report, not
the log.

`collecting()` attaches a logging handler to the root logger for the duration of a block and
keeps every record at WARNING or above that the tool's own modules log (the loggers named after
a module in this folder; TensorFlow's, Keras's and other libraries' records are left to the
log). Blocks nest:
an inner block (train_and_save) shares the collector of an outer one (the script, which
started collecting before it read the labels), so the report also shows the warnings given
while reading the inputs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

_active: list["WarningCollector"] = []


_PACKAGE = __name__.split(".")[0]
# The folder above the package: in a checkout, its top-level scripts (common.py,
# build_multi_hot_model.py, ...) log as the tool too; an installed copy has none there.
_TOOL_FOLDER = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
_IN_CHECKOUT = os.path.isfile(os.path.join(_TOOL_FOLDER, "build_multi_hot_model.py"))


@functools.lru_cache(maxsize=None)
def is_tool_logger(name: str) -> bool:
    """Whether a logger belongs to the tool: its modules log through
    logging.getLogger(__name__), so the first part of the name is the package, or a script
    of the checkout."""
    first = name.split(".")[0]
    if first == _PACKAGE:
        return True
    return _IN_CHECKOUT and os.path.isfile(os.path.join(_TOOL_FOLDER, first + ".py"))


def source_name(name: str) -> str:
    """A logger's name as the run's warnings show it: the module, without the package
    (symbol_trainer.report -> report), as when the modules lay flat beside the scripts."""
    return name[len(_PACKAGE) + 1:] if name.startswith(_PACKAGE + ".") else name


class WarningCollector(logging.Handler):
    """Keeps the tool's WARNING and ERROR records as dicts (level, source, message), each
    distinct message once, in the order they were first logged."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[dict] = []
        self._seen: set[tuple[str, str]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if not is_tool_logger(record.name):
            return
        try:
            message = record.getMessage()
        except Exception:  # a malformed call must not end the run; logging reports it
            self.handleError(record)
            return
        key = (record.levelname, message)
        if key not in self._seen:
            self._seen.add(key)
            self.records.append({"level": record.levelname, "source": source_name(record.name),
                                 "message": message})


@contextlib.contextmanager
def collecting() -> Iterator[WarningCollector]:
    """Collect the tool's warnings within the block; within an outer block, its collector."""
    if _active:
        yield _active[-1]
        return
    collector = WarningCollector()
    root = logging.getLogger()
    root.addHandler(collector)
    _active.append(collector)
    try:
        yield collector
    finally:
        _active.remove(collector)
        root.removeHandler(collector)


def current() -> list[dict]:
    """The records collected so far by the active collector (a live list), or [] outside
    any `collecting()` block."""
    return _active[-1].records if _active else []


def collected(function: Callable[..., T]) -> Callable[..., T]:
    """`function` run within `collecting()`: a script's whole run, or train_and_save."""
    @functools.wraps(function)
    def run(*args, **kwargs) -> T:
        with collecting():
            return function(*args, **kwargs)
    return run
