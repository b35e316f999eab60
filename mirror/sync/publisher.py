"""Publishing in batches: projects whose files are in place go out together,
each batch behind two durability barriers.

Theory of operation
-------------------
A worker that has downloaded a project's files (``place``-d into the tree,
not yet durable) and rendered its pages hands a ``Publication`` to the
``Publisher`` and moves on to the next project.  The publisher's one task
takes everything handed in so far as a batch and runs the protocol of
``mirror.publish.tree``:

1. the batch's page bytes into temps;
2. barrier: every file of the batch, its directory entry and the page temps
   are durable (one ``syncfs`` for the whole batch);
3. the files are recorded in the state (their rows never outlive their
   bytes in a power cut), and the pages noted for the change list;
4. the pages are renamed into place;
5. barrier: the pages are durable;
6. the projects are recorded as published, in one transaction.

While one batch waits on its barriers, the next one fills up, so the number
of barriers follows the disk, not the number of files: a first sync of 10k
files costs tens of ``syncfs`` calls instead of 10k fsyncs.

A kill -9 anywhere leaves placed files that are not recorded (adopted after a
hash check by the next run) and pages that are newer than the state (written
again by the next run): never a page that links a missing file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import trio

from mirror.errors import UnsafePath
from mirror.publish.tree import Tree
from mirror.sync.project import CycleReport, Deps, Publication

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, deps: Deps, report: CycleReport,
                 on_unsafe: Callable[[str, UnsafePath], None] = lambda name, e: None) -> None:
        self.d = deps
        self.report = report
        # A project whose page directory turns out to be unsafe (a symlink)
        # is left out of its batch and handed here; the others go on.
        self.on_unsafe = on_unsafe
        self._send, self._recv = trio.open_memory_channel[Publication](math.inf)
        self.batches = 0

    def submit(self, item: Publication) -> None:
        self._send.send_nowait(item)

    async def close(self) -> None:
        """No more publications: ``run`` publishes what is queued and returns."""
        await self._send.aclose()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._recv:
            while True:
                try:
                    batch = [await self._recv.receive()]
                except trio.EndOfChannel:
                    return
                while True:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self.publish(batch)

    async def _barrier(self) -> None:
        t0 = trio.current_time()
        await trio.to_thread.run_sync(self.d.tree.barrier)
        self.d.metrics.barrier_duration.observe(trio.current_time() - t0)

    async def publish(self, batch: list[Publication]) -> None:
        state, tree = self.d.state, self.d.tree
        self.batches += 1
        pages = [page for item in batch for page in item.pages]
        temps: list[tuple[Path, str]] = await trio.to_thread.run_sync(tree.write_temps, pages) if pages else []
        unsafe: dict[str, UnsafePath] = {}
        placed = False
        try:
            await self._barrier()
            with state.db:
                state.record_files([f for item in batch for f in item.files])
                # Noted before the rename: a crash in between lists a page
                # that did not change, never the other way round.
                state.changes.note((rel, item.op) for item in batch for rel, _ in item.pages)
            if temps:
                # One thread hop that runs to its end: the pages are placed
                # (or discarded, on an error) whatever happens meanwhile.
                with trio.CancelScope(shield=True):
                    unsafe = await trio.to_thread.run_sync(_place_by_project, tree, batch, temps)
                placed = True
                await self._barrier()
        except BaseException:
            # A disk error (or a stop) before the pages went out: no temp may stay behind.
            if not placed:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(tree.discard_all, temps)
            raise
        for name, e in unsafe.items():
            self.on_unsafe(name, e)
        with state.db:
            for item in batch:
                if item.published is None or item.upstream is None or item.name in unsafe:
                    continue
                orphans = state.publish_project(item.published, upstream=item.upstream, page_sha256=item.digest,
                                                refs=item.refs)
                self.report.files_retired += len(orphans)
                self.report.projects_synced += 1
                self.report.pages_written += bool(item.pages)
        log.debug("published a batch of %d project(s), %d page(s)", len(batch), len(pages))


def _place_by_project(tree: Tree, batch: list[Publication], temps: list[tuple[Path, str]]) -> dict[str, UnsafePath]:
    """Place every project's page temps (in batch order, as ``write_temps``
    made them); a project whose directory is unsafe is skipped whole, and
    its temps discarded.  A disk error ends it, discarding what is left."""
    unsafe: dict[str, UnsafePath] = {}
    at = 0
    for item in batch:
        mine = temps[at:at + len(item.pages)]
        at += len(item.pages)
        try:
            tree.place_all(mine)
        except UnsafePath as e:
            unsafe[item.name] = e
        except BaseException:
            tree.discard_all(temps[at:])
            raise
    return unsafe
