"""Publishing in batches: projects whose files are downloaded go out
together, each batch behind two durability barriers.

Theory of operation
-------------------
A worker that has downloaded a project's files (verified temps in
``state/tmp``) and rendered its pages hands a ``Publication`` to the
``Publisher`` and moves on to the next project.  The publisher's one task
takes everything handed in so far as a batch and runs the protocol of
``mirror.publish.tree``:

1. one thread hop places every file of the batch at its path (no page links
   them yet) and writes the batch's page bytes into temps;
2. barrier: the files, their directory entries and the page temps are
   durable (one ``syncfs`` for the whole batch);
3. the files are recorded in the state (their rows never outlive their
   bytes in a power cut), and the pages noted for the change list;
4. the pages are renamed into place;
5. barrier: the pages are durable;
6. the projects are recorded as published, in one transaction.

While one batch waits on its barriers the next one fills up, so the number
of barriers and thread hops follows the disk, not the number of files: a
first sync of 10k files costs tens of ``syncfs`` calls instead of 10k fsyncs,
and a handful of thread hops per batch instead of one per file.

A project whose files or pages would land below a symlink (``UnsafePath``)
is left out of its batch, whole, and handed to ``on_unsafe``; the others go
on.  A kill -9 anywhere leaves placed files that are not recorded (adopted
after a hash check by the next run) and pages that are newer than the state
(written again by the next run): never a page that links a missing file.
Temps that were never placed are discarded on any error or stop, so a
long-running daemon does not accumulate them.
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
                 on_unsafe: Callable[[str, str], None] = lambda name, why: None) -> None:
        self.d = deps
        self.report = report
        # A project that would write below a symlink is left out of its
        # batch and handed here (name, why); the others go on.
        self.on_unsafe = on_unsafe
        self._send, self._recv = trio.open_memory_channel[Publication](math.inf)
        self.batches = 0

    def submit(self, item: Publication) -> None:
        try:
            self._send.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The publisher is gone: the cycle is failing with its error, and
            # nothing will place these temps, so they go now.
            for tmp, _ in item.temps:
                self.d.tree.discard(tmp)

    async def close(self) -> None:
        """No more publications: ``run`` publishes what is queued and returns."""
        await self._send.aclose()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        batch: list[Publication] = []
        try:
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
                batch = []
        finally:
            # Stopped or failed: what was never placed must not stay behind.
            left = [t for item in batch for t in item.temps]
            while True:
                try:
                    left += self._recv.receive_nowait().temps
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            self._recv.close()
            if left:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.d.tree.discard_all, left)

    async def _barrier(self) -> None:
        t0 = trio.current_time()
        await trio.to_thread.run_sync(self.d.tree.barrier)
        self.d.metrics.barrier_duration.observe(trio.current_time() - t0)

    async def publish(self, batch: list[Publication]) -> None:
        state, tree = self.d.state, self.d.tree
        self.batches += 1
        # Uncancellable: once the hop starts, every temp is placed or discarded.
        with trio.CancelScope(shield=True):
            unsafe, temps = await trio.to_thread.run_sync(_stage, tree, batch)
        for item in batch:
            item.temps = []  # placed, or discarded by _stage
        safe = [item for item in batch if item.name not in unsafe]
        placed = False
        try:
            await self._barrier()
            with state.db:
                state.record_files([f for item in safe for f in item.files])
                # Noted before the rename: a crash in between lists a page
                # that did not change, never the other way round.
                state.changes.note((rel, item.op) for item in safe for rel, _ in item.pages)
            if temps:
                with trio.CancelScope(shield=True):
                    unsafe |= await trio.to_thread.run_sync(_place_pages, tree, safe, temps)
                placed = True
                await self._barrier()
        except BaseException:
            # A disk error (or a stop) before the pages went out: no temp may stay behind.
            if not placed:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(tree.discard_all, temps)
            raise
        for name, why in unsafe.items():
            self.on_unsafe(name, why)
        with state.db:
            for item in safe:
                if item.published is None or item.upstream is None or item.name in unsafe:
                    continue
                orphans = state.publish_project(item.published, upstream=item.upstream, page_sha256=item.digest,
                                                refs=item.refs)
                self.report.files_retired += len(orphans)
                self.report.projects_synced += 1
                self.report.pages_written += bool(item.pages)
        log.debug("published a batch of %d project(s)", len(batch))


def _stage(tree: Tree, batch: list[Publication]) -> tuple[dict[str, str], list[tuple[Path, str]]]:
    """Place every file of the batch and write the page temps of the projects
    whose files all landed: ({unsafe project: why}, page temps in batch order).

    On a disk error nothing stays in ``state/tmp``: the temps not placed yet
    are discarded before the error goes up."""
    unsafe: dict[str, str] = {}
    done = 0
    try:
        for i, item in enumerate(batch):
            digests = {rel: sha for rel, _, sha in item.files}
            for tmp, rel in item.temps:
                if item.name in unsafe:
                    tree.discard(tmp)
                    continue
                try:
                    tree.place(tmp, rel, digests.get(rel))
                except UnsafePath as e:
                    # e.g. a directory on the path is a symlink: refuse the project.
                    log.warning("%s: refused to write %s: %s", item.name, rel, e)
                    unsafe[item.name] = f"{rel}: unsafe path: {e}"
            done = i + 1
        pages = [page for item in batch if item.name not in unsafe for page in item.pages]
        return unsafe, tree.write_temps(pages) if pages else []
    except BaseException:
        tree.discard_all([t for item in batch[done:] for t in item.temps])
        raise


def _place_pages(tree: Tree, safe: list[Publication], temps: list[tuple[Path, str]]) -> dict[str, str]:
    """Place each project's page temps (in the order ``_stage`` wrote them);
    a project whose page directory is unsafe is skipped whole, its temps
    discarded.  A disk error ends it, discarding what is left."""
    unsafe: dict[str, str] = {}
    at = 0
    for item in safe:
        mine = temps[at:at + len(item.pages)]
        at += len(item.pages)
        try:
            tree.place_all(mine)
        except UnsafePath as e:
            unsafe[item.name] = str(e)
        except BaseException:
            tree.discard_all(temps[at:])
            raise
    return unsafe
