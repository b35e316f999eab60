"""A bare TCP server on 127.0.0.1 for HTTP behaviour the fake upstream does
not produce (chunked bodies, dropped idle connections, gzip, raw heads)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import trio

Handler = Callable[[trio.SocketStream, int], Awaitable[None]]


async def read_request(stream: trio.abc.Stream) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b""
        buf += chunk
    return buf


async def serve(nursery: trio.Nursery, handler: Handler) -> int:
    """A TCP server on 127.0.0.1 whose every connection runs ``handler(stream, n)``
    (n: the connection's number, from 1)."""
    count = 0

    async def on_conn(stream: trio.SocketStream) -> None:
        nonlocal count
        count += 1
        try:
            await handler(stream, count)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, on_conn, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


