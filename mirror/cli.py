"""Command line: ``mirror sync``, and the other subcommands as they arrive.

``main`` maps every ``MirrorError`` to its exit code and a one-line message;
a traceback is reserved for real bugs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import trio

from mirror import __version__, filters
from mirror.config import Config, load_config
from mirror.daemon import run_daemon
from mirror.errors import ConfigError, MirrorError, SyncIncomplete, leaves
from mirror.model import normalize_name
from mirror.lock import DirectoryLock
from mirror.metrics import Metrics
from mirror.progress import terminal_progress
from mirror.state import State
from mirror.status import read_status, render_text
from mirror.sync import CycleReport, Progress, Syncer
from mirror.tree import Tree
from mirror.upstream import open_client

log = logging.getLogger("mirror")


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


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        # journald stamps every line itself.
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # httpx logs every request at INFO; that is our debug level.
    logging.getLogger("httpx").setLevel(logging.WARNING if level.upper() != "DEBUG" else logging.DEBUG)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


async def run_sync(cfg: Config, *, metrics: Metrics, progress: Progress | None = None) -> CycleReport:
    directory = cfg.mirror.directory
    tree = Tree(directory)
    removed = await trio.to_thread.run_sync(tree.prepare)
    if removed:
        log.info("removed %d temp file(s) left by an interrupted run", removed)
    state = State.open(directory / "state")
    try:
        async with open_client(cfg.upstream, workers=cfg.mirror.workers, version=__version__) as client:
            syncer = Syncer(cfg, client=client, state=state, tree=tree, metrics=metrics, progress=progress)
            return await syncer.sync_once()
    finally:
        state.close()


def cmd_sync(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    metrics = Metrics()
    with DirectoryLock(cfg.mirror.directory / "state" / "lock"):
        started = time.monotonic()
        try:
            with terminal_progress(sys.stderr) as line:
                report = trio.run(lambda: run_sync(cfg, metrics=metrics, progress=line))
        finally:
            if args.metrics_textfile:
                metrics.write_textfile(Path(args.metrics_textfile))
    log.info("sync done in %.2fs: %s", time.monotonic() - started, report.summary())
    if report.failed:
        raise SyncIncomplete(report.failed)
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
    state_dir = cfg.mirror.directory / "state"
    if not (state_dir / "mirror.sqlite3").exists():
        raise ConfigError(f"{state_dir}: no mirror state yet; run `mirror sync` first")
    state = State.open(state_dir)
    try:
        for name in args.explain:
            print("\n".join(explain_project(cfg, state, name)))
    finally:
        state.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    # No lock and a read-only database: this must answer while a sync runs.
    cfg = load_config(args.config)
    status = read_status(cfg.mirror.directory)
    if args.json:
        print(json.dumps(status.to_json(), indent=2))
    else:
        print(render_text(status, now=time.time()), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    with DirectoryLock(cfg.mirror.directory / "state" / "lock"):
        return run_daemon(cfg, config_path=Path(args.config))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirror", description="A PyPI mirror that publishes a verified static tree.")
    p.add_argument("--version", action="version", version=f"mirror {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sync", help="run one sync cycle and exit")
    s.add_argument("--config", "-c", required=True, help="path to mirror.toml")
    s.add_argument("--metrics-textfile", help="write metrics for node_exporter's textfile collector")
    s.set_defaults(func=cmd_sync)

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return int(args.func(args))
    except MirrorError as e:
        log.error("%s", e)
        return e.exit_code
    except BaseExceptionGroup as group:
        # A nursery wraps task errors in a group: report ours the same way.
        errors = leaves(group)
        if not all(isinstance(e, MirrorError) for e in errors):
            raise
        for message in list(dict.fromkeys(map(str, errors)))[:5]:
            log.error("%s", message)
        return int(getattr(errors[0], "exit_code", 1))
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
