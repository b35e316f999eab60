"""The composition root: the one place that builds a mirror from its config.

``open_mirror`` prepares the tree (creating the layout, sweeping the temp
files a killed run left), opens the state database and the one pooled HTTP
client, and closes them again; ``Mirror.syncer`` builds the cycle engine on
them.  ``mirror sync``, ``mirror run`` and ``mirror verify --repair`` all
come through here, so they cannot differ in how a mirror is put together.
The caller holds the directory lock.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio

from mirror import __version__
from mirror.config import Config
from mirror.layout import Layout
from mirror.metrics import Metrics
from mirror.publish.state import State
from mirror.publish.tree import Tree
from mirror.publish.trees import open_tree
from mirror.sync.cycle import Progress, Syncer
from mirror.upstream.files import FilePool
from mirror.upstream.transport import open_client, open_files

log = logging.getLogger(__name__)

# Bound on closing the client: a hung peer must not hold up an exit.
CLOSE_GRACE = 5.0


class Mirror:
    """A mirror directory opened for cycles: its tree, state and client."""

    def __init__(self, cfg: Config, *, tree: Tree, state: State, metrics: Metrics) -> None:
        self.cfg = cfg
        self.layout: Layout = cfg.layout
        self.tree = tree
        self.state = state
        self.metrics = metrics
        self.client: httpx.AsyncClient = open_client(cfg.upstream, workers=cfg.mirror.workers, version=__version__)
        self.files: FilePool = open_files(cfg.upstream, workers=cfg.mirror.workers, version=__version__)
        log.info("upstream %s: %s", cfg.upstream.url, self.files.rules.describe())

    def syncer(self, *, progress: Progress | None = None, allow_mass_delete: bool = False) -> Syncer:
        return Syncer(self.cfg, client=self.client, files=self.files, state=self.state, tree=self.tree,
                      metrics=self.metrics, progress=progress, allow_mass_delete=allow_mass_delete)

    async def reconfigure(self, new: Config) -> None:
        """Use ``new`` from the next ``syncer()`` on; between cycles only,
        when nothing is in flight on the old client."""
        if new.mirror.directory != self.cfg.mirror.directory:
            raise ValueError("a mirror cannot move to another directory")
        if new.storage != self.cfg.storage:
            raise ValueError("[storage] cannot change while running")
        if new.upstream != self.cfg.upstream or new.mirror.workers != self.cfg.mirror.workers:
            await self.aclose()
            self.client = open_client(new.upstream, workers=new.mirror.workers, version=__version__)
            self.files = open_files(new.upstream, workers=new.mirror.workers, version=__version__)
            log.info("upstream %s: %s", new.upstream.url, self.files.rules.describe())
        self.cfg = new

    async def aclose(self) -> None:
        with trio.move_on_after(CLOSE_GRACE, shield=True):
            await self.files.aclose()
            await self.client.aclose()


@asynccontextmanager
async def open_mirror(cfg: Config, *, metrics: Metrics) -> AsyncIterator[Mirror]:
    layout = cfg.layout
    tree = open_tree(cfg.storage, layout, metrics=metrics)
    try:
        removed = await trio.to_thread.run_sync(tree.prepare)
    except BaseException:
        tree.close()
        raise
    if removed:
        log.info("removed %d temp file(s) left by an interrupted run", removed)
    log.info("publishing into %s", tree.description)
    state = State.open(layout.db)
    try:
        mirror = Mirror(cfg, tree=tree, state=state, metrics=metrics)
        try:
            yield mirror
        finally:
            await mirror.aclose()
    finally:
        state.close()
        tree.close()
