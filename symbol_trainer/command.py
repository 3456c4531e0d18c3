"""Running a command: logging to standard error, SIGTERM, and the exit code of each outcome.

Standard library only, so that a script reports a mistake in its flags or paths (exit code 2)
before TensorFlow is imported.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from typing import Callable

from symbol_trainer.errors import InputError, Terminated, printable

log = logging.getLogger(__name__)



def _printable_records() -> None:
    """Make every log record name files that are not UTF-8 as the outputs do (\\xNN), so
    that no handler (a UTF-8 log file, a test runner's) fails on their lone surrogates."""
    make = logging.getLogRecordFactory()
    if getattr(make, "printable", False):
        return

    def record(*args, **kwargs):
        made = make(*args, **kwargs)
        if isinstance(made.msg, str):
            made.msg = printable(made.msg)
        if isinstance(made.args, tuple):
            made.args = tuple(printable(a) if isinstance(a, str) else a for a in made.args)
        return made

    record.printable = True
    logging.setLogRecordFactory(record)


def configure_logging(quiet: bool = False, debug: bool = False) -> None:
    """Log to stderr, one line per message; quieten TensorFlow's own chatter."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    _printable_records()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.symbol_trainer = True  # replaced on the next call; other handlers are left alone
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "symbol_trainer", False)]
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("tensorflow", "absl", "h5py", "PIL", "jax"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not debug else logging.INFO)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # what tf.get_logger() returns


_sigterm_received = False


def sigterm_received() -> bool:
    """Whether SIGTERM arrived within the last `sigterm_raises` block of this process."""
    return _sigterm_received


def _raise_terminated(signum, frame):
    global _sigterm_received
    _sigterm_received = True
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises Terminated in the main thread (outside it, or where
    signals cannot be handled, the process keeps its handler)."""
    global _sigterm_received
    _sigterm_received = False
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(command: Callable[[], int], debug: bool = False,
                interrupted: str = "Interrupted; no model directory was written.",
                on_failure: Callable[[int, str], None] | None = None) -> int:
    """Run a script's work and turn exceptions into one clear line and an exit code: 2 for
    input the user must fix, 130 for Ctrl-C (SIGINT), 143 for SIGTERM, 1 for anything else.
    `on_failure(exit code, message)` is called after the message is logged."""
    try:
        with sigterm_raises():
            return command()
    except Terminated:
        code, message = 143, f"Stopped by SIGTERM. {interrupted}"
    except InputError as error:
        if debug:
            log.exception("input error")
        code, message = 2, str(error)
    except KeyboardInterrupt:
        code, message = 130, f"Stopped by Ctrl-C (SIGINT). {interrupted}"
    except Exception as error:  # the last line of defence of a command-line program
        if debug:
            log.exception("unexpected error")
        code, message = 1, f"{type(error).__name__}: {error}"
        if not debug:
            message += " (run again with --debug for the traceback)"
        if _sigterm_received:
            # SIGTERM can land inside TensorFlow's C++ code, or end a worker whose peers it
            # stopped first with a collective-operation error: either way the job was stopped.
            code, message = 143, f"Stopped by SIGTERM. {interrupted}"
    log.error("%s", message)
    if on_failure is not None:
        on_failure(code, message)
    return code
