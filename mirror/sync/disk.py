"""A full or failing disk ends the whole cycle as one clear ``DiskError``.

Every task that hit the disk reports it (through nested nurseries, as an
exception group, or as SQLite's "database or disk is full"); nothing partial
is visible, because every write is a rename of a complete, fsynced file.
``disk_error_aborts_cycle`` turns all of that into one ``DiskError`` and
counts the failed operations in ``mirror_download_errors_total{reason="disk"}``.
"""

from __future__ import annotations

import errno
import functools
import sqlite3
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

from mirror.errors import DiskError

if TYPE_CHECKING:
    from mirror.sync.cycle import Syncer

_P = ParamSpec("_P")
_R = TypeVar("_R")

# SQLite primary result codes that mean the disk, not the data, is at fault.
_SQLITE_DISK_CODES = {
    13,  # SQLITE_FULL
    10,  # SQLITE_IOERR
    8,  # SQLITE_READONLY
    14,  # SQLITE_CANTOPEN
}
# Narrower than "any OSError": a stray EACCES that no tree method wrapped is
# more likely a bug than the disk.
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT}


def disk_error_of(exc: BaseException) -> tuple[DiskError, int] | None:
    """(the first DiskError, how many operations failed) when ``exc`` is
    nothing but disk trouble, else None.

    ``exc`` may be an exception group from nested nurseries, where each task
    that hit the full disk reports it once."""
    if isinstance(exc, BaseExceptionGroup):
        found = [f for e in exc.exceptions if (f := disk_error_of(e)) is not None]
        if not found or len(found) != len(exc.exceptions):
            return None
        return found[0][0], sum(n for _, n in found)
    if isinstance(exc, DiskError):
        return exc, 1
    if isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_DISK_CODES:
        return DiskError(f"state database: {exc}"), 1
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return DiskError.of(exc, "disk"), 1
    return None


def disk_error_aborts_cycle(
    cycle: Callable[Concatenate[Syncer, _P], Awaitable[_R]],
) -> Callable[Concatenate[Syncer, _P], Awaitable[_R]]:
    async def run(self: Syncer, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await cycle(self, *args, **kwargs)
        except BaseException as e:
            found = disk_error_of(e)
            if found is None:
                raise
            self.metrics.download_errors.labels("disk").inc(found[1])
            raise found[0] from None

    functools.update_wrapper(run, cycle)
    return run
