"""Helpers for end-to-end tests: configs pointing at a FakePyPI, a static server."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mirror.config import Config, parse_config


def config_data(url: str, directory: Path, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A test config as a TOML-shaped dict: fast retries, loopback upstream."""
    data: dict[str, dict[str, Any]] = {
        "upstream": {
            "url": url,
            "allow_http": True,
            "user_agent": "mirror-tests (tests@example.org)",
            "xmlrpc_interval": 0,
            "backoff": 0.01,
            "max_backoff": 0.05,
            "timeout": 10,
        },
        "mirror": {"directory": str(directory), "workers": 8},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def make_config(url: str, directory: Path, **sections: dict[str, Any]) -> Config:
    return parse_config(config_data(url, directory, **sections), source="test.toml", base=directory.parent)


def write_config(path: Path, url: str, directory: Path, **sections: dict[str, Any]) -> Path:
    """The same as make_config, as a TOML file for subprocess tests."""
    make_config(url, directory, **sections)  # validate early
    data = config_data(url, directory, **sections)
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            lines.append(f"{k} = {_toml(v)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def static_server(root: Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1:<free port> the way a plain static server would."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        t.join()


def clean_pip_env() -> dict[str, str]:
    """An environment where pip sees only what the test gives it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_CACHE_DIR"] = "1"
    return env


def free_port() -> int:
    """A port free on 127.0.0.1 right now (for servers that cannot bind port 0 and say which)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """Until ``deadline``: True once 127.0.0.1:``port`` accepts, False if ``proc`` died."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def start_on_free_port(start: Callable[[int], subprocess.Popen[bytes]], what: str, *,
                       attempts: int = 5) -> tuple[subprocess.Popen[bytes], int]:
    """``start(port)`` on a free port until it listens (the port can be taken
    between our check and the server's bind): (process, port)."""
    for _ in range(attempts):
        port = free_port()
        proc = start(port)
        if wait_listening(port, proc, time.monotonic() + 10):
            return proc, port
        proc.kill()
        proc.wait(timeout=5)
    raise RuntimeError(f"{what} did not start")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
