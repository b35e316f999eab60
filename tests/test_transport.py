"""The pool's idle-connection probe is skipped for recently used connections."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from mirror.upstream import transport
from mirror.upstream.transport import open_client
from tests.harness.e2e import make_config


async def test_the_client_uses_the_probe_skipping_pool(tmp_path: Path) -> None:
    cfg = make_config("http://127.0.0.1:1", tmp_path / "m")
    async with open_client(cfg.upstream, workers=4, version="test") as client:
        # If an httpx upgrade moves the pool, this fails instead of the
        # optimisation silently disappearing.
        assert transport.probe_skipping(client)


async def test_an_idle_connection_is_asked_at_most_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    stream = await transport._Backend().connect_tcp("127.0.0.1", port)
    server = await listeners[0].accept()
    try:
        await stream.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await server.receive_some(100)
        monkeypatch.setattr(transport, "PROBE_AFTER", 1.0)
        await trio.sleep(1.05)
        assert stream.get_extra_info("is_readable") is False  # asked: still open
        await server.aclose()  # the peer hangs up: the socket turns readable (EOF)
        await trio.sleep(0.05)
        assert stream.get_extra_info("is_readable") is False  # asked 50 ms ago: not asked again
        await trio.sleep(1.0)
        assert stream.get_extra_info("is_readable") is True  # idle long enough: asked
        assert stream.get_extra_info("socket") is not None
    finally:
        await stream.aclose()
        await listeners[0].aclose()
