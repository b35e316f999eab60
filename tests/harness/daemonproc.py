"""Helpers for `mirror run` tests: a daemon subprocess, a NOTIFY_SOCKET, /metrics."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from prometheus_client.parser import text_string_to_metric_families


def wait_until(pred: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``pred`` until it is true; return the seconds it took."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


class NotifySocket:
    """What systemd does for Type=notify: an abstract datagram socket, read
    all the time as systemd reads it.  (A Unix datagram queue holds only
    ``net.unix.max_dgram_qlen`` messages, 10 by default: a reader that
    only looks now and then would make the daemon drop the rest.)"""

    def __init__(self) -> None:
        self.name = f"@mirror-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.05)
        self.messages: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return  # closed
            self.messages.append(dict(line.split("=", 1) for line in data.splitlines()))

    def poll(self) -> None:
        """Kept for callers: the reader thread has already taken everything."""

    def has(self, key: str, value: str | None = None) -> bool:
        return any(key in m and (value is None or m[key] == value) for m in list(self.messages))

    def close(self) -> None:
        self._stop.set()
        self._reader.join(timeout=5)
        self.sock.close()


class DaemonProcess:
    """``python -m mirror run`` with stderr collected line by line."""

    def __init__(self, conf: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        full_env = {**os.environ, **(env or {})}
        full_env.pop("JOURNAL_STREAM", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mirror", *args, "run", "--config", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def seen() -> bool:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    found.append(m)
                    return True
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before logging {pattern!r}:\n{self.log}")
            return False

        wait_until(seen, timeout, f"log line {pattern!r}")
        return found[0]

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return rc

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        return str(r.read().decode())


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None
