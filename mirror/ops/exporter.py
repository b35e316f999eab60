"""The Prometheus endpoint of ``mirror run``: prometheus_client's own server thread.

Why a thread and not a trio task: a scrape must be answered while the event
loop is busy (a large root index is rendered synchronously, SQLite calls run
on the trio thread), and prometheus_client's server already handles content
negotiation (OpenMetrics), gzip and HEAD.  The metrics objects are
thread-safe; the daemon only ever *sets* values from the trio thread, so a
scrape never touches SQLite.  A wedged event loop is caught by the sd_notify
watchdog and by ``mirror_last_success_timestamp_seconds``, not by this
endpoint going silent.

``serve_metrics`` ties the thread to a nursery: it calls ``started(address)``
with the bound ``host:port`` (so ``listen = "127.0.0.1:0"`` works) and shuts
the server down when cancelled.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

import trio
from prometheus_client import CollectorRegistry, start_http_server

from mirror.errors import ConfigError

log = logging.getLogger(__name__)


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9237"`` or ``"[::1]:9237"`` -> (host, port)."""
    host, _, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _start(listen: str, registry: CollectorRegistry) -> tuple[WSGIServer, threading.Thread]:
    host, port = split_listen(listen)
    return start_http_server(port, addr=host, registry=registry)


def _stop(server: WSGIServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


async def serve_metrics(
    listen: str, registry: CollectorRegistry, *, source: str = "config",
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        # Binding may resolve a host name: one thread hop.
        server, thread = await trio.to_thread.run_sync(_start, listen, registry)
    except OSError as e:
        raise ConfigError(f"{source}: metrics.listen: cannot listen on {listen}: {e.strerror or e}") from None
    host, port = str(server.server_address[0]), int(server.server_address[1])
    bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info("metrics: serving http://%s/metrics", bound)
    try:
        task_status.started(bound)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_stop, server, thread)
