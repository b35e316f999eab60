"""The systemd notify protocol, without a dependency.

A message is one datagram of ``KEY=value`` lines sent to the Unix socket named
by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).  When
the variable is unset (not under systemd, or ``Type=simple``) every call is a
no-op, so callers never check.

The watchdog is a trio task, not a thread, on purpose: ``WATCHDOG=1`` must
mean "the event loop is turning".  A loop wedged in a blocking call stops
pinging and systemd restarts the service after ``WatchdogSec``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import trio

log = logging.getLogger(__name__)

# Messages that change the unit's state, and the longest the loop may wait
# for room in systemd's queue to send one.
_STATE_KEYS = frozenset({"READY", "RELOADING", "STOPPING"})
STATE_WAIT = 1.0


def socket_address(value: str) -> str | None:
    """``NOTIFY_SOCKET`` -> an address for ``sendto``, or None if unusable."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``), or None when the
    watchdog is off or meant for another process (``WATCHDOG_PID``)."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


class Notifier:
    def __init__(self, address: str | None = None, *, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog if address is not None else None
        self._sock: socket.socket | None = None
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # A full receive queue must never block the event loop: drop the
            # message instead (systemd reads its socket promptly).
            self._sock.setblocking(False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        raw = environ.get("NOTIFY_SOCKET", "")
        if not raw:
            return cls()
        address = socket_address(raw)
        if address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or an abstract socket; not notifying systemd", raw)
            return cls()
        return cls(address, watchdog=watchdog_interval(environ))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True if it went out.

        STATUS and WATCHDOG are dropped when systemd's queue is full (a Unix
        datagram queue holds ``net.unix.max_dgram_qlen`` messages, often 10),
        so the event loop never waits on them.  READY, RELOADING and STOPPING
        change what systemd does next (a start or a reload waits for READY):
        for those the send may wait up to ``STATE_WAIT`` for room."""
        if self._sock is None or self.address is None:
            return False
        # One line per field: a newline inside a value would forge another key.
        data = "\n".join(f"{k}={' '.join(str(v).split())}" for k, v in fields.items()).encode()
        state = not _STATE_KEYS.isdisjoint(fields)
        try:
            if state:
                self._sock.settimeout(STATE_WAIT)
            self._sock.sendto(data, self.address)
        except OSError as e:
            log.log(logging.WARNING if state else logging.DEBUG, "sd_notify %s failed: %s", ",".join(fields), e)
            return False
        finally:
            if state:
                self._sock.setblocking(False)
        return True

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def reloading(self, status: str) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (what ``Type=notify-reload``,
        systemd >= 253, requires; older versions read RELOADING=1 alone).  A
        ``ready`` must follow once the reload is done or refused."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(RELOADING="1", MONOTONIC_USEC=str(usec), STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)

    async def run_watchdog(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping at half of ``WATCHDOG_USEC`` until cancelled (forever if off)."""
        task_status.started()
        if self.watchdog is None:
            await trio.sleep_forever()
        while True:
            self.send(WATCHDOG="1")
            await trio.sleep(self.watchdog)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
