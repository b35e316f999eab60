"""``mirror run``: the long-running daemon.

Theory of operation
-------------------
One trio run owns everything for the life of the process: the directory lock
(taken by the CLI before trio starts) and one ``Mirror`` (``open_mirror``:
the tree, the state, the httpx client), with a ``Syncer`` built on it.
``Daemon.run`` opens them, then starts in one nursery: the signal watcher,
the metrics exporter, the sd_notify watchdog, and the poll loop
(``mirror.ops.poll.Scheduler``), which calls ``sync_once``.

* READY=1 goes out once the state is open, the exporter listens and the
  signals are caught, just before the first cycle (a first sync may take
  days; systemd must not wait for it).
* Every gauge is set from the state DB at start and again after every cycle,
  good or bad, so a restarted daemon reports its true lag at once; the
  number of projects still pending moves while a long cycle runs.
* SIGTERM/SIGINT: the Syncer stops handing out projects, the cycle gets
  ``stop_timeout`` for what is in flight, then the loop ends and the process
  exits 0.  A second signal, or ``stop_timeout`` + ``HARD_GRACE`` without
  having stopped, ends the process at once with ``os._exit``: safe for the
  same reason kill -9 is (every publish is a rename of a complete file, every
  state change one SQLite transaction; the kernel drops the flock).
* SIGHUP: the config file is read again between cycles.  A bad file, or one
  that moves ``mirror.directory``, is logged and the running config kept.
  systemd hears ``RELOADING=1`` (with ``MONOTONIC_USEC``) at the signal and
  ``READY=1`` once the new config is in force or was refused, which is the
  ``Type=notify-reload`` protocol; a reload during a cycle waits for its end.
  The Syncer is rebuilt (workers, filters); the httpx client only when the
  upstream settings or its pool size changed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import httpx
import trio
from prometheus_client import ProcessCollector

from mirror import __version__
from mirror.config import Config, DaemonConfig, load_config
from mirror.errors import ConfigError, MirrorError
from mirror.metrics import Metrics
from mirror.ops.compose import Mirror, open_mirror
from mirror.ops.exporter import serve_metrics
from mirror.ops.poll import Scheduler
from mirror.ops.sdnotify import Notifier
from mirror.publish.state import State
from mirror.sync.cycle import CycleReport, Syncer

log = logging.getLogger(__name__)

# Errors after which the daemon backs off and tries again instead of exiting.
TRANSIENT: tuple[type[Exception], ...] = (MirrorError, httpx.HTTPError, httpx.StreamError, OSError, sqlite3.OperationalError)
# Time allowed after stop_timeout for shielded cleanup before a forced exit.
HARD_GRACE = 5.0
STATUS_EVERY = 2.0


def config_changes(old: Config, new: Config) -> list[str]:
    """``section.key: old -> new`` for every value that differs."""
    out = []
    for section in ("upstream", "mirror", "daemon", "metrics"):
        a, b = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb:
                shown = ("(changed)", "(changed)") if f.name == "user_agent" else (va, vb)
                out.append(f"{section}.{f.name}: {shown[0]} -> {shown[1]}")
    if old.filters_fingerprint != new.filters_fingerprint:
        out.append("filters: changed")
    return out


class Daemon:
    def __init__(
        self, cfg: Config, *, config_path: Path | None, metrics: Metrics, notifier: Notifier | None = None,
        handle_signals: bool = True, exit_now: Callable[[int], object] = os._exit,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.metrics = metrics
        self.notifier = notifier or Notifier()
        self.handle_signals = handle_signals
        self.exit_now = exit_now
        self.scheduler = Scheduler(cfg.daemon, transient=TRANSIENT, on_wait=self._on_wait,
                                   in_flight=self._downloads_in_flight)
        self.metrics_address: str | None = None
        self._mirror: Mirror | None = None
        self._syncer: Syncer | None = None
        # The best known upstream serial: from the state at start, then from
        # every cycle that read the feed.
        self._upstream_serial = 0
        self._last_status = -1e9
        self._nursery: trio.Nursery | None = None

    @property
    def state(self) -> State:
        assert self._mirror is not None, "Daemon.run has not opened the mirror"
        return self._mirror.state

    @property
    def syncer(self) -> Syncer:
        assert self._syncer is not None, "Daemon.run has not built the syncer"
        return self._syncer

    # -- life cycle -------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped; ``started()`` once READY=1 has been sent."""
        try:
            async with open_mirror(self.cfg, metrics=self.metrics) as mirror, trio.open_nursery() as nursery:
                self._mirror = mirror
                self._nursery = nursery
                if self.handle_signals:
                    await nursery.start(self._watch_signals)
                if self.cfg.metrics.listen:
                    ProcessCollector(registry=self.metrics.registry)
                    self.metrics_address = await nursery.start(
                        partial(serve_metrics, source=self.cfg.source), self.cfg.metrics.listen, self.metrics.registry)
                self._syncer = mirror.syncer(progress=self._progress)
                self._state_gauges(initial=True)
                self.metrics.up.set(1)
                log.info("mirror %s running on %s: polling %s every %.0fs",
                         __version__, self.cfg.mirror.directory, self.cfg.upstream.url, self.cfg.daemon.poll_interval)
                self.notifier.ready(self._summary("starting"))
                await nursery.start(self.notifier.run_watchdog)
                task_status.started()
                await self.scheduler.run(self.sync_once, self.reload)
                nursery.cancel_scope.cancel()
                synced = mirror.state.synced_serial()
        finally:
            self.metrics.up.set(0)
        log.info("stopped cleanly at serial %d", synced)

    def request_stop(self, why: str) -> None:
        if self.scheduler.stop_requested.is_set():
            return
        log.info("%s: stopping (in-flight work gets %.0fs)", why, self.cfg.daemon.stop_timeout)
        if self._syncer is not None:
            self._syncer.request_stop()
        self.scheduler.request_stop()
        self.notifier.stopping(f"stopping ({why})")
        if self._nursery is not None:
            self._nursery.start_soon(self._hard_deadline)

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    when = "after this cycle" if self.scheduler.in_cycle else "now"
                    log.info("SIGHUP: reloading %s %s", self.config_path, when)
                    if not self.scheduler.reload_requested:
                        self.notifier.reloading(self._summary(f"reloading the config {when}"))
                    self.scheduler.request_reload()
                elif not self.scheduler.stop_requested.is_set():
                    self.request_stop(name)
                else:
                    self._force_exit(f"second {name}", 128 + signum)

    async def _hard_deadline(self) -> None:
        # Cancellation cannot interrupt a thread (an fsync on a hung disk):
        # past this point the process ends without waiting for it.
        limit = self.cfg.daemon.stop_timeout + HARD_GRACE
        await trio.sleep(limit)
        self._force_exit(f"not stopped after {limit:g}s", 1)

    def _force_exit(self, why: str, code: int) -> None:
        log.error("%s: exiting now; the tree stays consistent, the next run resumes", why)
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except (OSError, ValueError):
                pass  # stderr gone: exiting matters more than the last line
        self.exit_now(code)

    # -- cycles -----------------------------------------------------------------
    async def sync_once(self) -> CycleReport:
        log.debug("cycle %d: start", self.scheduler.cycles)
        self.notifier.status(self._summary("syncing"))
        try:
            report = await self.syncer.sync_once()
        except Exception:  # not Cancelled: a cycle cut by a stop is no error
            self.metrics.cycles.labels("error").inc()
            self._state_gauges()
            raise
        self.metrics.failed_cycles.set(0)
        if report.upstream_serial is not None:
            self._upstream_serial = report.upstream_serial
        if report.changed or report.failed or report.files_downloaded:
            log.info("cycle %d done: %s", self.scheduler.cycles, report.summary())
        else:
            log.debug("cycle %d: no change (serial %d)", self.scheduler.cycles, report.synced_serial)
        return report

    def _downloads_in_flight(self) -> bool:
        return self._syncer is not None and self._syncer.downloads_in_flight()

    def _on_wait(self, delay: float, errors: Sequence[BaseException]) -> None:
        self.metrics.failed_cycles.set(self.scheduler.failures)
        what = f"error: {type(errors[0]).__name__}, retrying" if errors else "idle"
        self.notifier.status(self._summary(f"{what}; next poll in {delay:.0f}s"))

    def _progress(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last_status >= STATUS_EVERY or done == total:
            self._last_status = now
            self.notifier.status(self._summary(f"syncing {stage} {done}/{total}"))

    def _summary(self, what: str) -> str:
        """The STATUS= line: read from the state (and, during a cycle, the
        syncer's own count of projects still pending)."""
        state = self.state
        synced = state.synced_serial()
        lag = max(0, self._upstream_serial - synced)
        pending = self._syncer.pending if self._syncer is not None and self.scheduler.in_cycle else state.todo_count()
        return f"{what}; serial {synced}, lag {lag}, {pending} pending, {state.failure_count()} failed"

    def _state_gauges(self, *, initial: bool = False) -> None:
        """Gauges from the state DB, so a fresh process reports the truth at once."""
        state, m = self.state, self.metrics
        self.syncer.update_state_gauges()
        synced = state.synced_serial()
        m.synced_serial.set(synced)
        if initial:
            # Until the first feed read, the best known upstream serial is
            # the feed position we recorded (or the root index's serial).
            self._upstream_serial = max(int(state.meta("upstream_serial", "0") or 0), state.serial)
            m.upstream_serial.set(self._upstream_serial)
            last = float(state.meta("last_success", "0") or 0)
            if last:
                m.last_success.set(last)
        m.serial_lag.set(max(0, self._upstream_serial - synced))

    # -- reload -----------------------------------------------------------------
    async def reload(self) -> DaemonConfig:
        """Apply the config file again; on any problem keep the running one.
        READY=1 follows either way: a refused reload is a finished one too,
        and systemd's reload job (``Type=notify-reload``) waits for it."""
        try:
            settings, outcome = await self._reload()
        except BaseException:
            self.notifier.ready(self._summary("reload failed"))
            raise
        self.notifier.ready(self._summary(outcome))
        return settings

    async def _reload(self) -> tuple[DaemonConfig, str]:
        old = self.cfg
        try:
            if self.config_path is None:
                raise ConfigError("no config file to reload")
            new = await trio.to_thread.run_sync(load_config, self.config_path)
            if new.mirror.directory != old.mirror.directory:
                raise ConfigError(f"{new.source}: mirror.directory cannot change while running (restart instead)")
            if new.storage != old.storage:
                raise ConfigError(f"{new.source}: [storage] cannot change while running (restart instead)")
        except ConfigError as e:
            self.metrics.reloads.labels("error").inc()
            log.error("reload failed, keeping the running config: %s", e)
            return old.daemon, "reload refused, running config kept"
        if new.metrics.listen != old.metrics.listen:
            log.warning("metrics.listen: the change to %r takes effect at the next restart", new.metrics.listen)
            new = dataclasses.replace(new, metrics=old.metrics)
        changes = config_changes(old, new)
        assert self._mirror is not None
        # Between cycles nothing is in flight on the old client.
        await self._mirror.reconfigure(new)
        self.cfg = new
        self._syncer = self._mirror.syncer(progress=self._progress)
        self.metrics.reloads.labels("ok").inc()
        log.info("config reloaded from %s: %s", new.source, "; ".join(changes) or "no change")
        return new.daemon, "config reloaded"

