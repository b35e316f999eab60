"""The exception tree of `mirror`.

    MirrorError                      base
    ├── ConfigError                  bad or unreadable config
    ├── LockHeld                     another instance owns the directory
    ├── UpstreamError                the upstream misbehaved
    │   ├── UpstreamUnavailable      connection failures, 5xx after retries
    │   ├── MalformedResponse        unparsable JSON / HTML / XML-RPC, oversize page
    │   ├── UnsupportedAPIVersion    PEP 691 api-version with a higher major
    │   ├── StalePage                served serial below the one the feed promised
    │   └── ProjectNotFound          404 for a project page
    ├── PullError                    `mirror pull`: the rsync source failed or is not a mirror
    ├── UnsafeInput                  upstream data that must never touch the disk
    │   ├── UnsafeName               project name that is not a PEP 508 name
    │   ├── UnsafePath               file path / filename that could escape web/
    │   └── UnsafeURL                scheme other than http(s), or plain http refused
    ├── DownloadError(url, reason)   one file failed; ``reason`` is the metric label
    │   ├── HashMismatch(url, expected, actual)
    │   └── SizeMismatch(url, expected, actual)
    ├── DiskError                    ENOSPC / EROFS / EIO while writing
    │   └── StorageError(reason)     the bucket refused or failed (S3 tree)
    ├── MassDeleteBlocked(reason)    the safety valve held a cycle back
    └── SyncIncomplete(failed)       some projects were deferred

Errors say what went wrong, with structured fields; what a command's exit
code is for each of them is the CLI's business (``mirror.cli.EXIT_CODES``).
Every error pickles with its fields (``__reduce__``), so a helper process
can raise one in its parent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


class MirrorError(Exception):
    pass


class ConfigError(MirrorError):
    pass


class LockHeld(MirrorError):
    def __init__(self, path: str, pid: str) -> None:
        super().__init__(f"{path} is locked by another mirror process (pid {pid or 'unknown'})")
        self.path = path
        self.pid = pid

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.path, self.pid)


class UpstreamError(MirrorError):
    pass


class UpstreamUnavailable(UpstreamError):
    pass


class UpstreamUntrusted(UpstreamUnavailable):
    """The server's certificate was refused: a config problem, not a fault
    another feed or another attempt gets around."""


class MalformedResponse(UpstreamError):
    pass


class UnsupportedAPIVersion(UpstreamError):
    pass


class StalePage(UpstreamError):
    def __init__(self, name: str, expected: int, got: int | None) -> None:
        super().__init__(f"{name}: upstream served serial {got}, feed promised {expected}")
        self.name = name
        self.expected = expected
        self.got = got

    def __reduce__(self) -> tuple[type, tuple[str, int, int | None]]:
        return type(self), (self.name, self.expected, self.got)


class ProjectNotFound(UpstreamError):
    pass


class PullError(MirrorError):
    pass


class UnsafeInput(MirrorError):
    pass


class UnsafeName(UnsafeInput):
    pass


class UnsafePath(UnsafeInput):
    pass


class UnsafeURL(UnsafeInput):
    pass


DOWNLOAD_REASONS = (
    "http_status",
    "connection",
    "truncated",
    "hash_mismatch",
    "size_mismatch",
    "timeout",
    "tls",
    "disk",
)


class DownloadError(MirrorError):
    def __init__(self, url: str, reason: str, detail: str = "", *, wait: float | None = None) -> None:
        assert reason in DOWNLOAD_REASONS, reason
        super().__init__(f"{url}: {reason}{': ' + detail if detail else ''}")
        self.url = url
        self.reason = reason
        self.detail = detail
        # Seconds the upstream asked us to wait (Retry-After, RateLimit).
        self.wait = wait

    def __reduce__(self) -> tuple[Callable[..., DownloadError], tuple[object, ...]]:
        return DownloadError._rebuild, (type(self), self.__dict__)

    @staticmethod
    def _rebuild(cls: type[DownloadError], fields: dict[str, object]) -> DownloadError:
        e = cls.__new__(cls)
        Exception.__init__(e, f"{fields['url']}: {fields['reason']}{': ' + str(fields['detail']) if fields['detail'] else ''}")
        e.__dict__.update(fields)
        return e


class HashMismatch(DownloadError):
    def __init__(self, url: str, expected: str, actual: str) -> None:
        super().__init__(url, "hash_mismatch", f"expected sha256 {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class SizeMismatch(DownloadError):
    def __init__(self, url: str, expected: int, actual: int) -> None:
        super().__init__(url, "size_mismatch", f"expected {expected} bytes, got {actual}")
        self.expected = expected
        self.actual = actual


class DiskError(MirrorError):
    @classmethod
    def of(cls, e: OSError, what: str) -> DiskError:
        """``what`` failed with ``e``: one line naming both."""
        return cls(f"{what}: {e.strerror or e}")


class StorageError(DiskError):
    """The object store refused or failed an operation, after the client's
    own retries; ``reason`` is the ``mirror_upload_errors_total`` label."""

    def __init__(self, message: str, reason: str = "http_status") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (str(self), self.reason)


class MassDeleteBlocked(MirrorError):
    def __init__(self, reason: str) -> None:
        super().__init__(
            f"safety valve: {reason}; nothing destructive was published. "
            "If this is intended, run `mirror sync --allow-mass-delete` once"
        )
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return type(self), (self.reason,)


class SyncIncomplete(MirrorError):
    def __init__(self, failed: Mapping[str, str]) -> None:
        names = ", ".join(sorted(failed)[:20])
        more = f" (+{len(failed) - 20} more)" if len(failed) > 20 else ""
        super().__init__(f"{len(failed)} project(s) deferred to the next run: {names}{more}")
        self.failed = dict(failed)

    def __reduce__(self) -> tuple[type, tuple[dict[str, str]]]:
        return type(self), (self.failed,)


def leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside a (nested) exception group: trio's
    nurseries wrap every task error in one."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaves(e)]
    return [exc]
