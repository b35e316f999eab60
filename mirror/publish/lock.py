"""One writer per mirror directory: ``flock`` on ``state/lock``.

The lock is held for the life of the process and released by the kernel even
on kill -9, so a stale lock file never blocks a restart.  The holder's pid is
written into the file so a second instance can say who holds it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from mirror.errors import DiskError, LockHeld

CONTENTION_GRACE = 0.5  # seconds


class DirectoryLock:
    def __init__(self, path: Path, *, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DiskError(f"cannot open lock file {self.path}: {e.strerror}") from None
        # `lock_holder` (mirror status, monitoring probes) holds a shared
        # lock for a few microseconds; retry briefly so a probe can never make
        # a starting instance fail.  A real holder keeps the lock far longer.
        deadline = time.monotonic() + CONTENTION_GRACE
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                try:
                    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                finally:
                    os.close(fd)
                raise LockHeld(str(self.path), pid) from None
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def lock_holder(path: Path) -> str | None:
    """The pid recorded in the lock file if a process holds it, else None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
