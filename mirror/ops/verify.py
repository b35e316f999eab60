"""``mirror verify``: run the checks (``mirror.ops.checks``), print one line
per problem, and delete orphans or repair what is broken.

A running mirror holds ``state/lock`` for its whole life, so the checks take
no lock: they read through a read-only SQLite connection, each batch its own
short transaction.  Changes need more care:

* ``--repair`` queues the work in the state (``State.queue_repair``: forget
  the bad files, clear the page digests, put the projects in ``todo``).  With
  no mirror running, the CLI takes the lock and ``work_queue`` works through
  the queue with the sync engine itself (fresh pages, verified downloads,
  ordered publish); a running mirror picks the queue up on its next cycle
  instead.  A queue, not a second writer, so the one-writer rule of the
  tree holds.
* ``--orphans delete`` needs the lock: a file that a running mirror renamed
  into place a moment ago is not recorded yet and looks like an orphan.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO

from mirror import layout
from mirror.config import Config
from mirror.errors import UnsafePath
from mirror.metrics import Metrics
from mirror.model import safe_relpath
from mirror.ops.bucketchecks import BucketVerifier
from mirror.ops.checks import FILE_KINDS, PAGE_KINDS, Problem, Verifier
from mirror.ops.compose import open_mirror
from mirror.layout import Layout
from mirror.publish.state import State
from mirror.publish.tree import FileTree, Tree
from mirror.publish.s3tree import S3Tree
from mirror.publish.trees import open_tree
from mirror.sync.cycle import CycleReport

__all__ = ["FILE_KINDS", "PAGE_KINDS", "VerifyReport", "Verifier", "verify", "work_queue"]

log = logging.getLogger(__name__)

@dataclass
class VerifyReport:
    problems: Counter[str] = field(default_factory=Counter)
    stats: Counter[str] = field(default_factory=Counter)
    bad_files: int = 0  # to download again
    bad_pages: int = 0  # projects whose pages must be rewritten (files' projects not included)
    queued: int = 0  # projects put in todo (a project may count once per batch)
    root: bool = False
    deleted: int = 0
    undeletable: list[str] = field(default_factory=list)
    needs_repair: bool = False  # repairs were queued: ``work_queue`` can do them
    repair: CycleReport | None = None

    def summary(self) -> str:
        found = ", ".join(f"{k}={v}" for k, v in sorted(self.problems.items())) or "none"
        s = self.stats
        hashed = f" ({s['bytes_hashed'] / 1e6:.1f} MB hashed)" if s["bytes_hashed"] else ""
        text = f"{s['files']} file(s){hashed} and {s['projects']} project(s) checked; problems: {found}"
        if s["walked"]:
            text += f"; {s['walked']} entries walked"
        if s["too_recent"]:
            text += f" ({s['too_recent']} too recent to call orphans: a running mirror may be writing them)"
        return text


def verify(
    cfg: Config, out: TextIO, *, hash: bool = False, repair: bool = False, dry_run: bool = False,
    orphans: str | None = None, exclusive: bool = False, batch: int = 1000,
) -> VerifyReport:
    """Run the checks, print one line per problem to ``out``, and delete
    orphans or queue repairs as asked (blocking).  ``exclusive``: the caller
    holds ``state/lock``; it then runs ``work_queue`` when ``needs_repair``."""
    lay = cfg.layout
    tree = open_tree(cfg.storage, lay)
    try:
        return _verify(tree, lay, out, hash=hash, repair=repair, dry_run=dry_run, orphans=orphans,
                       exclusive=exclusive, batch=batch)
    finally:
        tree.close()


def _verify(
    tree: Tree, lay: Layout, out: TextIO, *, hash: bool, repair: bool, dry_run: bool,
    orphans: str | None, exclusive: bool, batch: int,
) -> VerifyReport:
    tree.check()
    v: Verifier
    if isinstance(tree, S3Tree):
        v = BucketVerifier(tree, State.open_readonly(lay.db), hash=hash, live=not exclusive, batch=batch)
    else:
        assert isinstance(tree, FileTree)
        v = Verifier(tree, State.open_readonly(lay.db), hash=hash, live=not exclusive, batch=batch)
    ro = v.state
    rw = State.open(lay.db) if repair and not dry_run else None
    report = VerifyReport()
    try:
        # Orphans first: queueing a repair forgets the bad files' rows, which
        # would make them look orphaned.
        if orphans is not None:
            delete: list[str] = []
            for problem in v.find_orphans():
                out.write(problem.line() + "\n")
                report.problems[problem.kind] += 1
                if orphans == "delete" and problem.kind in ("orphan", "orphan_page"):
                    delete.extend(_orphan_paths(problem, report))
                    if len(delete) >= batch and not dry_run:
                        report.deleted += len(tree.remove(delete))
                        delete = []
            if orphans == "delete" and not dry_run:
                report.deleted += len(tree.remove(delete))
        queue = _RepairQueue(rw, batch, report)
        for problem in itertools.chain(v.check_files(), v.check_pages(), v.check_root()):
            out.write(problem.line() + "\n")
            report.problems[problem.kind] += 1
            queue.add(problem)
        queue.flush()
        report.stats = v.stats
        report.needs_repair = rw is not None and bool(report.queued or report.root)
    finally:
        ro.close()
        if rw is not None:
            rw.close()
    return report


def _orphan_paths(problem: Problem, report: VerifyReport) -> list[str]:
    """What deleting an orphan means, for names the tree may touch at all."""
    if problem.kind == "orphan":
        paths = [problem.path]
    elif problem.path.startswith("pypi/"):
        paths = [layout.api_json(problem.path.split("/")[1])]
    else:
        paths = list(layout.project_pages(problem.project or ""))
    try:
        for p in paths:
            safe_relpath(p)
    except UnsafePath:
        report.undeletable.append(problem.path)  # a name we never write: left for a human
        return []
    return paths


class _RepairQueue:
    """Hands problems to ``State.queue_repair`` a batch at a time, so memory
    stays bounded however many problems there are.  ``state=None``: count only."""

    def __init__(self, state: State | None, batch: int, report: VerifyReport) -> None:
        self.state = state
        self.batch = batch
        self.report = report
        self.paths: list[str] = []
        self.names: list[str] = []

    def add(self, problem: Problem) -> None:
        if problem.kind in FILE_KINDS:
            self.paths.append(problem.path)
            self.report.bad_files += 1
        elif problem.kind in PAGE_KINDS and problem.project:
            if self.names[-1:] != [problem.project]:  # a project's problems come together
                self.names.append(problem.project)
                self.report.bad_pages += 1
        elif problem.kind == "root":
            self.report.root = True
        if len(self.paths) + len(self.names) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.state is not None and (self.paths or self.names or self.report.root):
            self.report.queued += len(self.state.queue_repair(self.paths, self.names, root=self.report.root))
        self.paths, self.names = [], []


async def work_queue(cfg: Config) -> CycleReport:
    """What ``mirror sync`` does, minus the feed: the queued projects are
    fetched, their files verified and their pages republished in order.
    The caller holds the directory lock."""
    async with open_mirror(cfg, metrics=Metrics()) as mirror:
        return await mirror.syncer().sync_once(feed=False)
