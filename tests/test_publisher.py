"""The publisher's batch protocol, step by step, against a real tree whose
barriers the test holds: a project handed over while a barrier runs is not
covered by that barrier (the per-directory race of the old protocol,
where a directory fsynced while another thread added to it was marked
clean, has no counterpart here)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import trio

from mirror.config import Config
from mirror.layout import Layout, project_pages
from mirror.metrics import Metrics
from mirror.model import NormalizedName, ProjectSnapshot, ReleaseFile, Serial
from mirror.publish.state import State
from mirror.publish.tree import FileTree, Tree
from mirror.sync.project import CycleReport, Deps, Publication
from mirror.sync.publisher import Publisher

SHA = "a" * 64


class RecordingTree(FileTree):
    """A real tree that logs what happens, and whose first barrier waits for the test."""

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout.web, layout.tmp)
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.first_barrier_started = threading.Event()
        self.release_first = threading.Event()

    def log(self, what: str, detail: str = "") -> None:
        with self.lock:
            self.events.append((what, detail))

    def place(self, tmp: Path, rel: str, sha256: str | None = None) -> None:
        super().place(tmp, rel, sha256)
        self.log("place", rel)

    def barrier(self) -> None:
        n = sum(1 for e, _ in self.events if e == "barrier start")
        self.log("barrier start", str(n))
        if n == 0:
            self.first_barrier_started.set()
            assert self.release_first.wait(10)
        super().barrier()
        self.log("barrier end", str(n))


def publication(tree: Tree, name: str) -> Publication:
    rel = f"packages/{name}/{name}-1.0.tar.gz"
    tmp = tree.new_temp()
    tmp.write_bytes(b"file of " + name.encode())
    f = ReleaseFile(filename=f"{name}-1.0.tar.gz", url=f"https://x/{rel}", path=rel, sha256=SHA, size=10)
    snap = ProjectSnapshot(name=NormalizedName(name), display_name=name, serial=Serial(1), files=(f,))
    pages = [(p, f"page of {name}".encode()) for p in project_pages(name)]
    return Publication(name, temps=[(tmp, rel)], files=[(rel, 10, SHA)], pages=pages, op="add",
                       published=snap, upstream=snap, digest="d", refs={rel})


async def test_a_project_handed_over_during_a_barrier_waits_for_the_next_one(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "m")
    tree = RecordingTree(layout)
    tree.prepare()
    state = State.open(layout.db)
    deps = Deps(Config(), state, tree, upstream=None, downloader=None, metrics=Metrics())  # type: ignore[arg-type]
    report = CycleReport()
    publisher = Publisher(deps, report)
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        publisher.submit(publication(tree, "early"))
        await trio.to_thread.run_sync(tree.first_barrier_started.wait)
        publisher.submit(publication(tree, "late"))  # while barrier 0 runs
        await trio.sleep(0.05)
        assert state.project("early") is None, "nothing is recorded before its barriers returned"
        tree.release_first.set()
        await publisher.close()
    ev = tree.events

    def at(what: str, detail: str) -> int:
        return ev.index((what, detail))

    for name in ("early", "late"):
        file_placed = at("place", f"packages/{name}/{name}-1.0.tar.gz")
        pages_placed = min(at("place", p) for p in project_pages(name))
        # the barrier that makes the file durable started after the file was placed...
        covering = min(int(d) for e, d in ev[file_placed:] if e == "barrier start")
        assert at("barrier end", str(covering)) < pages_placed, (name, ev)
        # ...and the pages are placed only after it ended, then made durable themselves.
        assert any(e == "barrier end" and int(d) > covering for e, d in ev[pages_placed:]), (name, ev)
    # The late project was placed after barrier 0 began: barrier 0 does not count for it.
    assert at("place", "packages/late/late-1.0.tar.gz") > at("barrier start", "0")
    assert publisher.batches == 2 and report.projects_synced == 2
    assert state.project("early") is not None and state.project("late") is not None
    assert state.tree_totals() == (2, 20)
    assert sorted(p.name for p in layout.tmp.iterdir()) == []
    state.close()


async def test_temps_of_unpublished_projects_go_when_the_publisher_stops(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "m")
    tree = RecordingTree(layout)
    tree.prepare()
    tree.release_first.set()
    state = State.open(layout.db)
    deps = Deps(Config(), state, tree, upstream=None, downloader=None, metrics=Metrics())  # type: ignore[arg-type]
    publisher = Publisher(deps, CycleReport())
    items: list[Any] = [publication(tree, f"p{i}") for i in range(3)]
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            for item in items:
                publisher.submit(item)
            scope.cancel()  # a stop before any batch went out
    assert list(layout.tmp.iterdir()) == []
    publisher.submit(publication(tree, "after"))  # the publisher is gone: the temps go at once
    assert list(layout.tmp.iterdir()) == []
    state.close()
