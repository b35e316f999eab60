"""The poll loop's timing, with an injected cycle and trio's autojump clock."""

from __future__ import annotations

import random
from collections.abc import Callable

import httpx
import pytest
import trio

from mirror.config import DaemonConfig
from mirror.ops.daemon import TRANSIENT
from mirror.errors import DiskError, UpstreamUnavailable, leaves
from mirror.ops.poll import Scheduler, next_delay

SETTINGS = DaemonConfig(poll_interval=60.0, max_backoff=900.0, stop_timeout=30.0)


class Recorder:
    """A cycle that records when it starts and fails the first ``fail`` times."""

    def __init__(self, fail: int = 0, exc: Callable[[], BaseException] = lambda: UpstreamUnavailable("down")) -> None:
        self.fail = fail
        self.exc = exc
        self.starts: list[float] = []

    async def __call__(self) -> None:
        self.starts.append(trio.current_time())
        if len(self.starts) <= self.fail:
            raise self.exc()

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


async def keep_settings() -> DaemonConfig:
    return SETTINGS


async def run_until(sched: Scheduler, cycle: Recorder, n: int) -> None:
    """Run the loop until ``cycle`` has started ``n`` times, then stop it."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sched.run, cycle, keep_settings)
        while len(cycle.starts) < n:
            await trio.sleep(1)
        sched.request_stop()


@pytest.mark.parametrize(
    ("failures", "low", "high"),
    [
        (0, 54.0, 66.0),
        (1, 54.0, 66.0),
        (2, 108.0, 132.0),
        (4, 432.0, 528.0),
        (5, 810.0, 900.0),
        (40, 810.0, 900.0),
    ],
)
def test_next_delay_jitter_and_backoff(failures: int, low: float, high: float) -> None:
    rng = random.Random(1)
    delays = [next_delay(SETTINGS, failures, rng) for _ in range(200)]
    assert low <= min(delays) and max(delays) <= high
    assert max(delays) - min(delays) > (high - low) / 3  # really jittered


def test_next_delay_never_spins_on_errors_with_zero_interval() -> None:
    s = DaemonConfig(poll_interval=0.0, max_backoff=900.0, stop_timeout=1.0)
    rng = random.Random(0)
    assert next_delay(s, 0, rng) == 0.0
    assert next_delay(s, 1, rng) >= 0.9 and next_delay(s, 3, rng) >= 3.6


async def test_cycles_are_spaced_by_the_poll_interval(autojump_clock: trio.testing.MockClock) -> None:
    cycle = Recorder()
    sched = Scheduler(SETTINGS, transient=TRANSIENT, rng=random.Random(3))
    await run_until(sched, cycle, 8)
    gaps = cycle.gaps()
    assert all(54 <= g <= 66 for g in gaps), gaps
    assert len({round(g, 3) for g in gaps}) > 1, "no jitter"


async def test_errors_back_off_up_to_max_backoff_and_recover(autojump_clock: trio.testing.MockClock) -> None:
    cycle = Recorder(fail=7)
    sched = Scheduler(SETTINGS, transient=TRANSIENT, rng=random.Random(4))
    waits: list[tuple[float, int]] = []
    sched.on_wait = lambda delay, errors: waits.append((delay, len(errors)))
    await run_until(sched, cycle, 10)
    expected = [60, 120, 240, 480, 900, 900, 900, 60, 60]
    for gap, base in zip(cycle.gaps(), expected):
        assert base * 0.9 <= gap <= min(base * 1.1, 900.0), (cycle.gaps(), expected)
    assert [n for _, n in waits[:9]] == [1] * 7 + [0, 0]
    assert sched.failures == 0


async def test_exception_groups_of_transient_errors_are_retried(autojump_clock: trio.testing.MockClock) -> None:
    def group() -> BaseException:
        return ExceptionGroup("cycle", [DiskError("disk full"), ExceptionGroup("inner", [httpx.ConnectError("refused")])])

    cycle = Recorder(fail=2, exc=group)
    seen: list[list[str]] = []
    sched = Scheduler(SETTINGS, transient=TRANSIENT, rng=random.Random(5))
    sched.on_wait = lambda delay, errors: seen.append([type(e).__name__ for e in errors])
    await run_until(sched, cycle, 3)
    assert seen[:2] == [["DiskError", "ConnectError"]] * 2


async def test_a_bug_is_not_swallowed(autojump_clock: trio.testing.MockClock) -> None:
    cycle = Recorder(fail=1, exc=lambda: KeyError("bug"))
    sched = Scheduler(SETTINGS, transient=TRANSIENT)
    with pytest.raises(BaseExceptionGroup) as info:
        await sched.run(cycle, keep_settings)
    assert [type(e) for e in leaves(info.value)] == [KeyError]
    assert len(cycle.starts) == 1


async def test_stop_during_the_wait_returns_at_once(autojump_clock: trio.testing.MockClock) -> None:
    cycle = Recorder()
    sched = Scheduler(SETTINGS, transient=TRANSIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sched.run, cycle, keep_settings)
        await trio.sleep(10)
        sched.request_stop()
        t0 = trio.current_time()
    assert trio.current_time() == t0 and cycle.starts == [0.0]


# A stop at t=5 while downloads are in flight until ``idle_at``: the cycle
# ends when they are done, or at the stop_timeout deadline (5 + 30).
@pytest.mark.parametrize(("idle_at", "ends_at"), [(0.0, 5.0), (12.0, 12.0), (1000.0, 35.0)])
async def test_a_stopping_cycle_ends_when_idle_or_at_stop_timeout(
    autojump_clock: trio.testing.MockClock, idle_at: float, ends_at: float
) -> None:
    ended: list[float] = []

    async def stuck() -> None:
        try:
            await trio.sleep(10_000)  # in-flight work that ignores the stop
        finally:
            ended.append(trio.current_time())

    sched = Scheduler(SETTINGS, transient=TRANSIENT, in_flight=lambda: trio.current_time() < idle_at)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sched.run, stuck, keep_settings)
        await trio.sleep(5)
        sched.request_stop()
        sched.request_stop()  # idempotent: does not move the deadline
    assert ends_at <= ended[0] <= ends_at + 0.2


async def test_a_cycle_that_finishes_its_work_ends_before_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    stop = trio.Event()
    ended: list[float] = []

    async def cooperative() -> None:
        await stop.wait()  # the Syncer stops handing out projects...
        await trio.sleep(3)  # ...and finishes the ones in flight
        ended.append(trio.current_time())

    sched = Scheduler(SETTINGS, transient=TRANSIENT)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sched.run, cooperative, keep_settings)
        await trio.sleep(5)
        stop.set()
        sched.request_stop()
    assert ended == [8.0] and trio.current_time() == 8.0


async def test_reload_waits_for_the_cycle_and_retimes_the_wait(autojump_clock: trio.testing.MockClock) -> None:
    reloads: list[float] = []
    configs = [DaemonConfig(poll_interval=p, max_backoff=900.0, stop_timeout=30.0) for p in (20.0, 100.0)]

    async def reload() -> DaemonConfig:
        reloads.append(trio.current_time())
        return configs[len(reloads) - 1]

    starts: list[float] = []
    sched = Scheduler(SETTINGS, transient=TRANSIENT, rng=random.Random(6))

    async def cycle() -> None:
        starts.append(trio.current_time())
        if len(starts) == 1:
            sched.request_reload()  # a SIGHUP mid-cycle
            await trio.sleep(4)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sched.run, cycle, reload)
        await trio.sleep(30)
        assert reloads == [4.0], "applied when the cycle ended, not during it"
        assert 4 + 18 <= starts[1] <= 4 + 22
        # A SIGHUP during a wait is applied at once and re-times that wait
        # from its start with the new interval (20 s -> 100 s).
        await trio.sleep(starts[1] + 5 - trio.current_time())
        sched.request_reload()
        await trio.testing.wait_all_tasks_blocked()
        assert reloads[-1] == starts[1] + 5 and len(starts) == 2
        while len(starts) < 3:
            await trio.sleep(1)
        sched.request_stop()
    assert 90 <= starts[2] - starts[1] <= 110


def test_leaves_flattens_nested_groups() -> None:
    a, b, c = ValueError("a"), KeyError("b"), OSError("c")
    assert leaves(ExceptionGroup("x", [a, ExceptionGroup("y", [b, c])])) == [a, b, c]
    assert leaves(a) == [a]
