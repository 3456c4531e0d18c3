"""One training run at a time per OUTPUT_MODEL_DIR: a lock file in `<model dir>.partial/`.

Two runs writing into one `.partial` folder (a scheduler's requeue while the first job still
runs, a double submit) delete and overwrite each other's files. The run that writes the model
directory therefore first creates `.partial/run.lock` atomically (O_CREAT | O_EXCL) holding its
host, pid and start time, and keeps it open, under `flock` where the system has it, until it
ends. A second run finds the file and stops, naming the holder.

A lock whose holder is gone is stale and is taken over with a warning: on the same host when
its `flock` is free (the kernel drops it when the process dies, however it dies) or its pid is
no longer running. A lock of another host is never taken over: this host cannot see whether
that process lives, so the message says how to remove the file if the job is really gone.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be deleted, which serves as the lock there
    fcntl = None

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written in its file."""

    host: str
    pid: int
    started_at: str

    def describe(self) -> str:
        return f"process {self.pid} on host {self.host}, started {self.started_at}"


class LockHeld(Exception):
    """Another live run holds the lock; the message says who and what to do."""

    def __init__(self, path: Path, holder: Holder | None, other_host: bool):
        self.path, self.holder, self.other_host = path, holder, other_host
        who = holder.describe() if holder else "a process that has not written its name yet"
        if other_host:
            advice = (f"A lock of another host is never taken over automatically. Wait for that "
                      f"run to finish; if it is really gone (the machine was restarted, the job "
                      f"cancelled), delete {path} and run again.")
        else:
            advice = (f"Wait for it to finish, or stop it (kill {holder.pid if holder else 'it'}) "
                      "and run again to continue from its checkpoint; to train both at once, "
                      "give this run another OUTPUT_MODEL_DIR.")
        super().__init__(f"{path.parent} is in use by another training run ({who}): two runs "
                         f"into one OUTPUT_MODEL_DIR would overwrite each other's files. {advice}")


def this_host() -> str:
    return socket.gethostname()


def _process_running(pid: int) -> bool:
    """Whether `pid` is a running process of this host (True when that cannot be told)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Holder(str(data["host"]), int(data["pid"]), str(data["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _try_flock(fd: int) -> bool | None:
    """Take the flock of `fd` without waiting: True taken, False held elsewhere, None when this
    system or filesystem has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None


class RunLock:
    """The lock file `LOCK_FILE` in `directory`. `acquire()` takes it or raises LockHeld;
    `release()` removes it (safe to call twice, and after the folder was renamed)."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LOCK_FILE
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        if self.held:
            return
        for _ in range(50):  # only a race with another run starting or ending loops again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                if self._take_over_if_stale():
                    return
                continue
            if _try_flock(fd) is False:  # another run took over this very file: retry
                os.close(fd)
                continue
            self._own(fd)
            return
        raise LockHeld(self.path, _read_holder(self.path), other_host=False)

    def _own(self, fd: int) -> None:
        record = {"host": this_host(), "pid": os.getpid(),
                  "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    def _take_over_if_stale(self) -> bool:
        """With the lock file there: take it when its holder is gone (True), raise LockHeld
        when it lives or may live, False when the file vanished meanwhile (try again)."""
        holder = _read_holder(self.path)
        if holder is None:  # being written by a run that is starting: give it a moment
            time.sleep(0.2)
            holder = _read_holder(self.path)
        if holder is not None and holder.host != this_host():
            raise LockHeld(self.path, holder, other_host=True)
        if fcntl is None:
            return self._take_over_without_flock(holder)
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        taken = _try_flock(fd)
        if taken is False and (holder is None or _process_running(holder.pid)):
            os.close(fd)
            raise LockHeld(self.path, holder, other_host=False)
        try:
            same_file = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            same_file = False
        if not same_file:  # released and recreated meanwhile
            os.close(fd)
            return False
        if taken is None and holder is not None and _process_running(holder.pid):
            os.close(fd)  # no flock on this filesystem: the pid alone decides
            raise LockHeld(self.path, holder, other_host=False)
        self._warn_takeover(holder)
        self._own(fd)
        return True

    def _take_over_without_flock(self, holder: Holder | None) -> bool:
        # Windows: the holder keeps the file open, so deleting it fails while the holder lives.
        if holder is not None and _process_running(holder.pid):
            raise LockHeld(self.path, holder, other_host=False)
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        except PermissionError:
            raise LockHeld(self.path, holder, other_host=False) from None
        self._warn_takeover(holder)
        return False  # the caller creates the file afresh

    def _warn_takeover(self, holder: Holder | None) -> None:
        who = holder.describe() if holder else "a process that left it empty"
        log.warning("Taking over the stale lock %s of %s, which is no longer running; its "
                    "unfinished files in %s are this run's now.", self.path, who, self.path.parent)

    def release(self, moved_to: str | os.PathLike | None = None) -> None:
        """Remove the lock file, from `moved_to` when its folder was renamed there, and let go
        of it."""
        if not self.held:
            return
        path = Path(moved_to) / LOCK_FILE if moved_to is not None else self.path
        fd, self._fd = self._fd, -1
        if os.name == "nt":  # an open file cannot be deleted there
            os.close(fd)
            path.unlink(missing_ok=True)
            return
        try:  # removed while the flock is still ours, so no other run can slip in between
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
