"""The feed: which projects changed upstream, and the serial each must reach.

Theory of operation
-------------------
``Feed.read`` asks upstream what changed since the recorded feed position
and records the answer in the state's ``todo`` table together with the new
position, in one transaction; from then on a crash loses nothing.

* ``changelog``: XML-RPC ``changelog_since_serial`` from the position, one
  call when nothing changed.  A first sync uses ``list_packages_with_serial``
  instead of replaying tens of millions of journal rows.
* ``simple``: the PEP 691 root index with ``If-None-Match``; projects whose
  ``_last-serial`` moved are queued, and published projects missing from it
  are queued with serial 0 so that fetching their page confirms the removal
  (the root can be 30 minutes stale).
* ``auto``: the changelog, and the root when XML-RPC is unavailable.

Projects the filters exclude are remembered in the ``upstream`` table but
never queued.  ``refilter_if_changed`` replays the state after a filter
change without asking upstream.
"""

from __future__ import annotations

import logging

from mirror.config import Config
from mirror.errors import UnsupportedAPIVersion, UpstreamError, UpstreamUntrusted
from mirror.metrics import Metrics
from mirror.model import NormalizedName, Serial
from mirror.plan import filters, planner
from mirror.publish.state import State
from mirror.upstream.client import Upstream

log = logging.getLogger(__name__)


class Feed:
    def __init__(self, cfg: Config, *, state: State, upstream: Upstream, metrics: Metrics) -> None:
        self.cfg = cfg
        self.state = state
        self.upstream = upstream
        self.metrics = metrics

    async def read(self) -> int | None:
        """Queue what changed upstream; return the upstream serial (if known)."""
        feed = self.cfg.upstream.feed
        if feed in ("changelog", "auto"):
            try:
                return await self._read_changelog()
            except UpstreamError as e:
                if feed == "changelog" or isinstance(e, (UnsupportedAPIVersion, UpstreamUntrusted)):
                    raise
                log.warning("XML-RPC feed unavailable (%s); using the simple root index", e)
        return await self._read_root()

    async def _read_changelog(self) -> int | None:
        up = self.upstream
        pos = self.state.serial
        if pos == 0 and self.state.project_count() == 0:
            # First sync: the journal from serial 0 is tens of millions of
            # rows; the listing gives every project's serial in one call.
            last = await up.changelog_last_serial()
            changes = planner.group_listing(await up.list_packages_with_serial())
            position = max(changes.targets.values(), default=last)
            upstream_serial = max(last, position)
        else:
            # One call answers both "anything new?" and "what?": a no-change
            # cycle is a single small request, with no XML-RPC spacing wait.
            events, position = await up.changelog_since(pos)
            upstream_serial = position
            if not events:
                return upstream_serial
            changes = planner.group_events(events)
        self._reject_names(changes.rejected)
        self.state.add_todo(self._wanted(changes.targets), position=max(pos, position),
                            display=changes.display, seen=changes.targets)
        log.info("feed: %d project(s) changed between serial %d and %d", len(changes.targets), pos, position)
        return upstream_serial

    async def _read_root(self) -> int | None:
        res = await self.upstream.root_index(self.state.meta("root_etag"))
        if res is None:
            return int(self.state.meta("upstream_serial", "0") or 0) or None
        entries, serial, etag, rejected = res
        self._reject_names(rejected)
        targets, missing = planner.diff_root(entries, self.state.project_serials())
        # A project missing from the root is confirmed by fetching its page
        # (404 -> removed); serial 0 so a live page is never "stale".
        for name in missing:
            targets.setdefault(name, Serial(0))
        position = serial if serial is not None else max((e.serial for e in entries), default=0)
        self.state.add_todo(self._wanted(targets), position=max(self.state.serial, position),
                            display={e.name: e.display_name for e in entries if e.name in targets},
                            seen=targets, root_etag=etag or "", upstream_serial=position)
        log.info("root index: %d project(s) to sync, %d missing upstream", len(targets), len(missing))
        return position

    def _wanted(self, targets: dict[NormalizedName, Serial]) -> dict[NormalizedName, Serial]:
        """Projects the filters exclude are remembered, never fetched; a
        published project is always kept so an exclusion can unpublish it."""
        f = self.cfg.mirror_filters
        if not f.active:
            return targets
        return {n: s for n, s in targets.items()
                if filters.project_allowed(f, n) is None or self.state.project(n) is not None}

    def refilter_if_changed(self) -> int:
        """After a filter change, queue every project whose outcome may differ.

        Published projects are replayed from their stored upstream snapshot
        (no upstream request); upstream projects never mirrored but now
        allowed are queued with the serial the feed gave them.  This is the
        one O(projects) step, and it runs only when the filters change."""
        fingerprint = self.cfg.filters_fingerprint
        if self.state.meta("filters", "") == fingerprint:
            return 0
        f = self.cfg.mirror_filters
        queued: dict[NormalizedName, Serial] = dict(self.state.project_serials())
        for name, serial in self.state.upstream_projects():
            if name not in queued and (not f.active or filters.project_allowed(f, name) is None):
                queued[name] = serial
        self.state.add_todo(queued, seen={}, filters=fingerprint)
        log.info("filters changed: %d project(s) queued to be re-checked", len(queued))
        return len(queued)

    def _reject_names(self, rejected: tuple[str, ...] | list[str]) -> None:
        for name in rejected:
            self.metrics.rejected.labels("name").inc()
            log.warning("upstream: refused project name %s", name)
