"""sd_notify: datagrams on a socket the test binds, as systemd would."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from mirror.ops.sdnotify import Notifier, socket_address, watchdog_interval


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.setblocking(False)
    yield sock, str(path)
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_messages_reach_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    n.ready("serial 5")
    n.status("syncing\nREADY=1")  # a newline must not forge a second key
    n.stopping("bye")
    n.close()
    assert drain(sock) == ["READY=1\nSTATUS=serial 5", "STATUS=syncing READY=1", "STOPPING=1\nSTATUS=bye"]


def test_abstract_socket() -> None:
    name = f"mirror-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert n.send(READY="1")
        assert sock.recv(4096) == b"READY=1"
        n.close()
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_environ({})
    assert not n.enabled and not n.send(READY="1")
    n.ready("x")
    bad = Notifier.from_environ({"NOTIFY_SOCKET": "relative/path"})
    assert not bad.enabled
    assert "not a path or an abstract socket" in caplog.text


def test_a_vanished_socket_is_not_an_error(tmp_path: Path) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled and not n.send(STATUS="x")
    n.close()


def test_socket_address_and_watchdog_interval() -> None:
    assert socket_address("@sd") == "\0sd" and socket_address("/run/x") == "/run/x"
    assert socket_address("@") is None and socket_address("vsock:2:1") is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None and watchdog_interval({}) is None


async def test_watchdog_pings_at_half_the_interval(
    listener: tuple[socket.socket, str], autojump_clock: trio.testing.MockClock
) -> None:
    sock, path = listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"})
    with trio.move_on_after(22):
        await n.run_watchdog()
    n.close()
    assert drain(sock) == ["WATCHDOG=1"] * 5  # t = 0, 5, 10, 15, 20


async def test_a_blocked_event_loop_stops_pinging(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"})  # every 20 ms
    async with trio.open_nursery() as nursery:
        await nursery.start(n.run_watchdog)
        await trio.sleep(0.2)
        assert len(drain(sock)) >= 3
        time.sleep(0.3)  # the loop is wedged: no checkpoint, so no ping
        assert drain(sock) == []
        await trio.sleep(0.1)
        assert drain(sock), "pings resume once the loop turns again"
        nursery.cancel_scope.cancel()
    n.close()


def test_reloading_carries_the_monotonic_time(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading("reloading")
    n.ready("reloaded")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.close()
    first, second = drain(sock)
    fields = dict(line.split("=", 1) for line in first.split("\n"))
    assert fields["RELOADING"] == "1" and fields["STATUS"] == "reloading"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    assert second == "READY=1\nSTATUS=reloaded"


def test_a_full_queue_drops_status_but_waits_for_room_for_ready(listener: tuple[socket.socket, str]) -> None:
    """A Unix datagram queue holds ``net.unix.max_dgram_qlen`` messages: STATUS
    lines are dropped when it is full, READY=1 waits (briefly) for systemd
    to make room."""
    import threading

    sock, path = listener
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    sent = 0
    while n.send(STATUS=f"filler {sent}"):
        sent += 1
        assert sent < 100_000
    t0 = time.monotonic()
    assert not n.send(STATUS="dropped"), "a full queue drops a STATUS line"
    assert time.monotonic() - t0 < 0.1, "at once"
    drained: list[str] = []

    def systemd_reads_late() -> None:
        time.sleep(0.2)
        drained.extend(drain(sock))

    reader = threading.Thread(target=systemd_reads_late)
    reader.start()
    t0 = time.monotonic()
    n.ready("up")
    took = time.monotonic() - t0
    reader.join()
    assert 0.1 < took < 1.0, took
    assert "READY=1\nSTATUS=up" in drained + drain(sock)
    n.close()
