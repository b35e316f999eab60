"""The end of a cycle on the primary: retirement, the change list, the trace.

Theory of operation
-------------------
These steps run after the root index is written (see the order in
``mirror.sync.cycle``), one after the other:

1. *Retirement.*  Files that no page has referenced for ``retire_after``
   are deleted, in batches of ``RETIRE_BATCH`` taken from the ``retire``
   table by age (an index on ``since``: the cost is the number of files
   due, not the size of the tree).  For each batch, one transaction drops
   the ``files`` rows, adjusts the totals and notes the paths for the change
   list; a barrier makes that durable; then one thread hop through
   ``Tree.remove`` (which prunes the directories it empties) deletes the
   files, and their ``retire`` rows go.  A path referenced again is no longer in
   ``retire`` (``record_file``/``publish_project`` remove it), so it is
   kept.  Retirement is skipped while pages of removed projects are still
   on disk (``gone`` not empty: the root rewrite failed), because those
   pages still link the files.
2. *Change list.*  Everything noted since the last list is sealed under the
   next generation number and written to ``changes/``; then the index.
   A crash after sealing is harmless: the next cycle writes the sealed
   lists it finds unwritten before anything else.
3. *Trace*, written last: a reader that sees generation N in the trace finds
   lists 1..N complete and every change they name in place.

Everything goes through ``Tree`` (temp, fsync, rename, directory fsync).
"""

from __future__ import annotations

import functools
import logging
import time

import trio

from mirror import __version__, layout
from mirror.downstream import changes, trace
from mirror.publish.state import State
from mirror.publish.tree import Tree

log = logging.getLogger(__name__)

RETIRE_BATCH = 1000


async def retire_due(state: State, tree: Tree, *, retire_after: float, now: float | None = None) -> int:
    """Delete files unreferenced for at least ``retire_after``; return how many."""
    if state.gone():
        log.warning("retirement postponed: pages of removed projects are still published")
        return 0
    before = (time.time() if now is None else now) - retire_after
    total = 0
    while True:
        paths = state.due_retirements(before, RETIRE_BATCH)
        if not paths:
            break
        # Rows first, durably, then the files: a power cut in between leaves
        # files that no row names (deleted again next cycle), never a row
        # that names a deleted file.
        state.forget_files(paths)
        await trio.to_thread.run_sync(tree.barrier)
        await trio.to_thread.run_sync(tree.remove, paths)
        state.retired(paths)
        total += len(paths)
        if len(paths) < RETIRE_BATCH:
            break
    if total:
        log.info("retired %d file(s) unreferenced for more than %gs", total, retire_after)
    return total


async def publish_changes(
    state: State, tree: Tree, *, mirror_name: str, upstream: str, keep: float, serial: int, started: float,
    duration: float, now: float | None = None,
) -> int | None:
    """Write pending change lists, the index and then ``trace/<mirror_name>``.
    Lists are kept for ``keep`` seconds (at least ``changes.MIN_KEEP_SECONDS``).

    Returns the generation the trace now shows, or None when this cycle
    changed nothing (then nothing is written).
    """
    now = time.time() if now is None else now
    journal = state.changes
    journal.seal(serial=serial, now=now)
    epoch = journal.epoch()
    for gen, s_from, s_to, created in journal.unwritten():
        count = journal.count(gen)
        head = changes.ChangeList(epoch, gen, s_from, s_to, trace.format_date(created),
                                  complete=count <= changes.MAX_ENTRIES)
        parts = [changes.render_list(head)]
        after = ""
        # Paged from SQLite: memory is bounded by the list's size on disk.
        while head.complete and (rows := journal.sealed(gen, after=after)):
            parts.append(changes.render_entries(rows))
            after = rows[-1][1]
        await trio.to_thread.run_sync(tree.write_files, [(layout.change_list(epoch, gen), b"".join(parts))])
        journal.written(gen)
        if not head.complete:
            log.info("change list %d: %d changes, written as incomplete (secondaries will copy the whole tree)",
                     gen, count)
    gen = journal.generation()
    if gen == int(state.meta("trace_generation", "0") or 0):
        return None
    written = journal.lists()
    old = changes.expired({g: t for g, _, _, t in written}, now=now, keep=keep)
    if old:
        await trio.to_thread.run_sync(
            functools.partial(tree.remove, [layout.change_list(epoch, g) for g in old], prune=False)
        )
        journal.drop(old)
    dropped = set(old)
    entries = [
        changes.IndexEntry(g, a, b, t, layout.change_list(epoch, g).rpartition("/")[2])
        for g, a, b, t in written if g not in dropped
    ]
    await trio.to_thread.run_sync(tree.write_files, [(layout.CHANGES_INDEX, changes.render_index(epoch, entries))])
    files, nbytes = state.tree_totals()
    body = trace.render_trace({
        "Date": trace.format_date(now),
        "Date-Started": trace.format_date(started),
        "Creator": f"mirror {__version__}",
        "Mirror": mirror_name,
        "Upstream": upstream,
        "Serial": serial,
        "Epoch": epoch,
        "Generation": gen,
        "Files": files,
        "Bytes": nbytes,
        "Cycle-Seconds": float(duration),
        "Changes": layout.change_list(epoch, gen),
    })
    # Last: the trace promises that everything above is in place.
    await trio.to_thread.run_sync(tree.write_files, [(layout.trace(mirror_name), body)])
    state.set_meta(trace_generation=gen)
    log.info("published change list %d (serial %d) and %s", gen, serial, layout.trace(mirror_name))
    return gen
