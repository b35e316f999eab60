"""The poll loop of ``mirror run``: when the next cycle starts, and how a stop
or a reload cuts into it.

Theory of operation
-------------------
``Scheduler.run(cycle, reload)`` runs ``cycle()`` and then waits
``poll_interval`` ± 10 % (the jitter keeps many mirrors from hitting the
upstream in lockstep).  A cycle that raises one of the ``transient`` errors
(every ``MirrorError``, httpx and OS errors, SQLite's "disk full") is logged
and followed by an exponential backoff: ``poll_interval``, doubled after each
further failure, capped at ``max_backoff``.  One good cycle resets it.  Any
other exception is a bug and propagates: the process exits non-zero and
systemd restarts it.

``request_stop()`` ends a wait at once.  During a cycle it sets a deadline
``stop_timeout`` ahead on the cycle's cancel scope: the caller is expected to
make the cycle stop taking new work, so in-flight downloads and commits get
that long to finish before they are cancelled (which is safe: temp files are
discarded, a rename in a worker thread always completes).  As soon as
``in_flight()`` says nothing is being downloaded (e.g. the cycle is only
waiting out an upstream backoff) the cycle is cancelled without waiting.

``request_reload()`` is acted on between cycles only, so a cycle never sees
its configuration change under it.  A reload during a wait re-times the
wait from its start with the new settings.

All I/O is injected (``cycle``, ``reload``, ``rng``), so the timing is tested
with trio's ``autojump_clock``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence

import trio

from mirror.config import DaemonConfig
from mirror.errors import leaves

log = logging.getLogger(__name__)

JITTER = 0.10
# Floor of the first backoff step, so poll_interval = 0 never spins on errors.
MIN_BACKOFF = 1.0
# How often a stopping cycle checks whether downloads are still in flight.
IDLE_CHECK = 0.1


def next_delay(settings: DaemonConfig, failures: int, rng: random.Random) -> float:
    """Seconds to wait after a cycle; ``failures`` = errors in a row (0 after success)."""
    jitter = rng.uniform(1 - JITTER, 1 + JITTER)
    if failures <= 0:
        return settings.poll_interval * jitter
    step = min(settings.max_backoff, max(settings.poll_interval, MIN_BACKOFF) * 2.0 ** min(failures - 1, 32))
    # Above the cap, reflect the jitter below it: still spread, never longer.
    return step * (jitter if step * jitter <= settings.max_backoff else 2 - jitter)


Cycle = Callable[[], Awaitable[object]]
Reload = Callable[[], Awaitable[DaemonConfig]]
OnWait = Callable[[float, Sequence[BaseException]], None]


class Scheduler:
    def __init__(
        self, settings: DaemonConfig, *, transient: tuple[type[Exception], ...],
        rng: random.Random | None = None, on_wait: OnWait | None = None,
        in_flight: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = settings
        self.transient = transient
        self.rng = rng or random.Random()
        self.on_wait = on_wait
        self.in_flight = in_flight
        self.failures = 0
        self.cycles = 0
        self.stop_requested = trio.Event()
        self.reload_requested = False
        self.in_cycle = False
        self._wake = trio.Event()
        self._cycle_scope: trio.CancelScope | None = None

    def request_stop(self) -> None:
        if self.stop_requested.is_set():
            return
        self.stop_requested.set()
        self._wake.set()
        if self._cycle_scope is not None:
            self._cycle_scope.deadline = min(
                self._cycle_scope.deadline, trio.current_time() + self.settings.stop_timeout
            )

    def request_reload(self) -> None:
        self.reload_requested = True
        self._wake.set()

    async def run(self, cycle: Cycle, reload: Reload) -> None:
        """Cycle until a stop is requested; never returns on a transient error."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._end_cycle_when_idle)
            while not self.stop_requested.is_set():
                if self.reload_requested:
                    await self._reload(reload)
                errors = await self._run_cycle(cycle)
                if self.stop_requested.is_set():
                    break
                await self._wait(errors, reload)
            nursery.cancel_scope.cancel()

    async def _end_cycle_when_idle(self) -> None:
        """After a stop, end the cycle as soon as nothing is in flight: a
        cycle waiting out an upstream backoff has nothing worth waiting for."""
        await self.stop_requested.wait()
        while (scope := self._cycle_scope) is not None:
            if not self.in_flight():
                log.info("stop: no download in flight; ending the cycle now")
                scope.cancel()
                return
            await trio.sleep(IDLE_CHECK)

    async def _reload(self, reload: Reload) -> None:
        self.reload_requested = False
        self.settings = await reload()

    async def _run_cycle(self, cycle: Cycle) -> list[BaseException]:
        errors: list[BaseException] = []
        self.cycles += 1
        self.in_cycle = True
        with trio.CancelScope() as scope:
            self._cycle_scope = scope
            try:
                await cycle()
            except* self.transient as group:
                errors = leaves(group)
            finally:
                self._cycle_scope = None
                self.in_cycle = False
        if scope.cancelled_caught and trio.current_time() >= scope.deadline:
            log.warning("stop: cycle cut short after stop_timeout (%gs); the next run resumes it",
                        self.settings.stop_timeout)
        if errors:
            self.failures += 1
        elif not scope.cancelled_caught:
            self.failures = 0
        return errors

    async def _wait(self, errors: Sequence[BaseException], reload: Reload) -> None:
        started = trio.current_time()
        delay = next_delay(self.settings, self.failures, self.rng)
        if errors:
            what = "; ".join(dict.fromkeys(f"{type(e).__name__}: {e}" for e in errors[:5]))
            log.error("cycle failed (%d in a row), retrying in %.0fs: %s", self.failures, delay, what)
        self._notify_wait(delay, errors)
        while not self.stop_requested.is_set():
            with trio.move_on_at(started + delay):
                await self._wake.wait()
            if not self._wake.is_set():
                return  # timed out: time for the next cycle
            self._wake = trio.Event()
            if self.reload_requested and not self.stop_requested.is_set():
                await self._reload(reload)
                delay = next_delay(self.settings, self.failures, self.rng)
                self._notify_wait(max(0.0, started + delay - trio.current_time()), errors)

    def _notify_wait(self, delay: float, errors: Sequence[BaseException]) -> None:
        if self.on_wait is not None:
            self.on_wait(delay, errors)
