"""Command line: argparse, the exit codes, and every ``trio.run``.

``main`` maps every ``MirrorError`` to its exit code (``EXIT_CODES``) and a
one-line message; a traceback is reserved for real bugs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import trio

from mirror import __version__, logfmt
from mirror.config import Config, load_config
from mirror.errors import (
    ConfigError,
    DiskError,
    LockHeld,
    MassDeleteBlocked,
    MirrorError,
    PullError,
    SyncIncomplete,
    UpstreamError,
    leaves,
)
from mirror.metrics import Metrics
from mirror.model import normalize_name
from mirror.ops.compose import open_mirror
from mirror.ops.daemon import Daemon
from mirror.ops.progress import terminal_progress
from mirror.ops.sdnotify import Notifier
from mirror.ops.status import read_status, render_text
from mirror.upstream.transport import proxy_rules
from mirror.ops.verify import FILE_KINDS, PAGE_KINDS, verify, work_queue
from mirror.plan import filters
from mirror.publish.lock import DirectoryLock
from mirror.publish.state import State
from mirror.sync.cycle import CycleReport, Progress

log = logging.getLogger("mirror")

# What each error means to a script; the first row that matches wins.
EXIT_CODES: tuple[tuple[type[MirrorError], int], ...] = (
    (SyncIncomplete, 1),  # some projects were deferred to the next run
    (ConfigError, 2),  # bad config or arguments
    (LockHeld, 3),  # another instance owns the directory
    (UpstreamError, 4),  # the upstream is unusable
    (PullError, 4),  # `mirror pull`: the rsync source failed
    (DiskError, 5),  # full, read-only or failing disk
    (MassDeleteBlocked, 6),  # the safety valve held the cycle back
)


def exit_code(e: BaseException) -> int:
    for kind, code in EXIT_CODES:
        if isinstance(e, kind):
            return code
    return 1


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the record, not at
    setup: a handler bound to an old stream (closed, or swapped out by a
    progress line or a test's capture) would fail on every later record."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(level: str, fmt: str) -> None:
    handler = _StderrHandler()
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logfmt.formatter_for(logfmt.stderr_is_journal(os.environ.get("JOURNAL_STREAM"), os.fstat)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # httpx logs every request at INFO; that is our debug level.
    logging.getLogger("httpx").setLevel(logging.WARNING if level.upper() != "DEBUG" else logging.DEBUG)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


async def run_sync(
    cfg: Config, *, metrics: Metrics, progress: Progress | None = None, allow_mass_delete: bool = False
) -> CycleReport:
    async with open_mirror(cfg, metrics=metrics) as mirror:
        return await mirror.syncer(progress=progress, allow_mass_delete=allow_mass_delete).sync_once()


def cmd_sync(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    metrics = Metrics()
    with DirectoryLock(cfg.layout.lock):
        started = time.monotonic()
        try:
            with terminal_progress(sys.stderr) as line:
                report = trio.run(lambda: run_sync(cfg, metrics=metrics, progress=line,
                                                   allow_mass_delete=args.allow_mass_delete))
        finally:
            if args.metrics_textfile:
                metrics.write_textfile(Path(args.metrics_textfile))
    log.info("sync done in %.2fs: %s", time.monotonic() - started, report.summary())
    if report.blocked:
        raise MassDeleteBlocked(report.blocked)
    if report.failed:
        raise SyncIncomplete(report.failed)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if not cfg.layout.db.is_file():
        raise ConfigError(f"{cfg.mirror.directory}: no mirror state to verify (has `mirror sync` run?)")
    # Checks take no lock (a running mirror holds it for good); changes do,
    # or, for repairs, are queued for the mirror that holds it.
    lock = DirectoryLock(cfg.layout.lock)
    holder = None
    if (args.repair or args.orphans == "delete") and not args.dry_run:
        try:
            lock.acquire()
        except LockHeld as e:
            if args.orphans == "delete":
                log.error("--orphans delete needs the mirror stopped: a file it has just published "
                          "is not recorded yet and would look like an orphan")
                raise
            holder = e.pid
    try:
        report = verify(cfg, sys.stdout, hash=args.hash, repair=args.repair, dry_run=args.dry_run,
                        orphans=args.orphans, exclusive=lock.fd is not None)
        if report.needs_repair and lock.fd is not None:
            report.repair = trio.run(work_queue, cfg)
    finally:
        lock.release()
    log.info("verify: %s", report.summary())
    remaining = sum(report.problems.values())
    fixable = report.bad_files + report.bad_pages + report.root
    if args.dry_run and args.repair and fixable:
        log.info("dry run: would download %d file(s) again and rewrite the pages of %d project(s)%s",
                 report.bad_files, report.bad_pages, " and the root index" if report.root else "")
    elif args.repair and holder is not None and fixable:
        log.warning("mirror pid %s is running: queued %d project(s) for its next cycle; verify again after it",
                    holder, report.queued)
    elif report.repair is not None:
        log.info("repair: %s", report.repair.summary())
        if not report.repair.failed:
            remaining -= sum(report.problems[k] for k in (*FILE_KINDS, *PAGE_KINDS, "root"))
    if args.orphans == "delete":
        orphans = report.problems["orphan"] + report.problems["orphan_page"]
        if args.dry_run:
            log.info("dry run: would delete %d orphan(s)", orphans - len(report.undeletable))
        else:
            log.info("deleted %d orphaned file(s)", report.deleted)
            remaining -= orphans - len(report.undeletable)
        for path in report.undeletable:
            log.warning("not deleting %s: not a name the mirror writes; look at it yourself", path)
    if remaining:
        log.error("verify: %d problem(s) remain", remaining)
        return 1
    return 0



def explain_project(cfg: Config, state: State, name: str) -> list[str]:
    """Why a project, and each of its files, is or is not mirrored."""
    norm = normalize_name(name)
    f = cfg.mirror_filters
    lines = []
    why = filters.project_allowed(f, norm) if f.active else None
    published = state.project(norm)
    lines.append(f"{norm}: " + (f"excluded ({why})" if why else "allowed by the filters")
                 + ("; published" if published else "; not published"))
    snap = state.snapshot(norm)
    if snap is None:
        lines.append("  no upstream snapshot in the state yet (never fetched); file-level filters not evaluated")
        return lines
    kept, dropped = filters.apply(f, snap) if f.active else (snap, [])
    for rf in kept.files:
        lines.append(f"  kept      {rf.filename}")
    for filename, reason in dropped:
        lines.append(f"  excluded  {filename}: {reason}")
    return lines


def cmd_filters(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if not cfg.layout.db.exists():
        raise ConfigError(f"{cfg.layout.state}: no mirror state yet; run `mirror sync` first")
    # Read-only, without the lock: this explains, it never changes anything.
    state = State.open_readonly(cfg.layout.db)
    try:
        for name in args.explain:
            print("\n".join(explain_project(cfg, state, name)))
    finally:
        state.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    # No lock and a read-only database: this must answer while a sync runs.
    cfg = load_config(args.config)
    status = dataclasses.replace(read_status(cfg.layout), upstream=cfg.upstream.url,
                                 network=proxy_rules(cfg.upstream).describe(),
                                 storage=cfg.storage.s3.where if cfg.storage.s3 is not None else "")
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        print(render_text(status, now=time.time()), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    with DirectoryLock(cfg.layout.lock):
        daemon = Daemon(cfg, config_path=Path(args.config), metrics=Metrics(), notifier=Notifier.from_environ())
        try:
            trio.run(daemon.run)
        finally:
            daemon.notifier.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirror", description="A PyPI mirror that publishes a verified static tree.")
    p.add_argument("--version", action="version", version=f"mirror {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sync", help="run one sync cycle and exit")
    s.add_argument("--config", "-c", required=True, help="path to mirror.toml")
    s.add_argument("--metrics-textfile", help="write metrics for node_exporter's textfile collector")
    s.add_argument("--allow-mass-delete", action="store_true",
                   help="let this run publish a cycle the safety valve (max_retire, 10%% of projects) would stop")
    s.set_defaults(func=cmd_sync)

    v = sub.add_parser("verify", help="check the tree against the state; optionally repair it")
    v.add_argument("--config", "-c", required=True, help="path to mirror.toml")
    v.add_argument("--hash", action="store_true", help="also check every file's sha256 (reads the whole tree)")
    v.add_argument("--repair", action="store_true",
                   help="download missing or corrupt files again and rewrite broken pages "
                        "(queued for the running mirror if there is one)")
    v.add_argument("--dry-run", action="store_true", help="say what --repair / --orphans delete would do; change nothing")
    v.add_argument("--orphans", choices=["list", "delete"],
                   help="also walk the tree for files no state row accounts for (delete needs the mirror stopped)")
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser("run", help="run as a daemon: sync every [daemon] poll_interval until SIGTERM")
    r.add_argument("--config", "-c", required=True, help="path to mirror.toml (read again on SIGHUP)")
    r.set_defaults(func=cmd_run)

    f = sub.add_parser("filters", help="explain why projects and files are (not) mirrored")
    f.add_argument("--config", "-c", required=True, help="path to mirror.toml")
    f.add_argument("--explain", nargs="+", required=True, metavar="NAME", help="project name(s)")
    f.set_defaults(func=cmd_filters)

    st = sub.add_parser("status", help="show serials, lag, pending and failing projects, tree size")
    st.add_argument("--config", "-c", required=True, help="path to mirror.toml")
    st.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    st.set_defaults(func=cmd_status)

    pl = sub.add_parser("pull", help="copy a primary's web/ with rsync, consistently (for secondaries)")
    pl.add_argument("source", metavar="SOURCE", help="rsync://host[:port]/module/, host::module/, host:/path/ or /path/")
    pl.add_argument("dest", metavar="DEST", help="local directory to serve (the copy of web/)")
    pl.add_argument("--name", default=socket.gethostname(), help="this site's name in DEST/trace/ (default: host name)")
    pl.add_argument("--trace", dest="source_trace", help="the source's trace name (default: its newest trace)")
    pl.add_argument("--rsync", default="rsync", help="rsync binary (default: rsync from PATH)")
    pl.add_argument("--timeout", type=int, default=600, help="rsync I/O timeout in seconds")
    pl.set_defaults(func=cmd_pull)
    return p


def cmd_pull(args: argparse.Namespace) -> int:
    from mirror.downstream.pull import pull
    from mirror.downstream.rsync import Rsync

    rsync = Rsync(args.rsync, timeout=args.timeout)
    report = trio.run(lambda: pull(args.source, Path(args.dest), name=args.name, rsync=rsync, want=args.source_trace))
    log.info("pull: %s", report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args))
    except MirrorError as e:
        log.error("%s", e)
        return exit_code(e)
    except BaseExceptionGroup as group:
        # A nursery wraps task errors in a group: report ours the same way.
        errors = leaves(group)
        if not all(isinstance(e, MirrorError) for e in errors):
            raise
        for message in list(dict.fromkeys(map(str, errors)))[:5]:
            log.error("%s", message)
        return exit_code(errors[0])
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
