"""Pure formats of the downstream protocol: change lists, their index, traces, page links."""

from __future__ import annotations

import pytest

from mirror import layout
from mirror.downstream import changes
from mirror.publish import pagelinks
from mirror.publish import render
from mirror.downstream import trace
from mirror.model import ProjectSnapshot, ReleaseFile, RootEntry, Serial, NormalizedName

CL = changes.ChangeList(
    "abc123", 7, 100, 117, "Sat, 25 Jan 2025 08:00:27 +0000",
    (("add", "packages/aa/bb/x-1.0.tar.gz"), ("delete", "simple/gone/index.html"),
     ("replace", "simple/index.html"), ("retire", "packages/cc/dd/y-0.1.whl")),
)


def test_change_list_round_trip_and_layout() -> None:
    data = changes.render_list(CL)
    assert data.startswith(b"Epoch: abc123\nGeneration: 7\nSerial-From: 100\nSerial-To: 117\n")
    assert b"\n\nadd packages/aa/bb/x-1.0.tar.gz\ndelete simple/gone/index.html\n" in data
    assert changes.parse_list(data) == CL
    assert layout.change_list("abc123", 7) == "changes/0000000007-abc123.txt"
    empty = changes.ChangeList("e", 1, 0, 0, "d", complete=False)
    assert b"Complete: no" in changes.render_list(empty)
    assert changes.parse_list(changes.render_list(empty)) == empty


@pytest.mark.parametrize("bad", [
    b"Epoch: a\nGeneration: 1\n",  # truncated before the blank line
    b"Epoch: a\nGeneration: 1\nSerial-From: 1\nSerial-To: 2\n\nmove x\n",  # unknown op
    b"Generation: 1\nSerial-From: 1\nSerial-To: 2\n\nadd x\n",  # no epoch
    b"Epoch: a\nGeneration: x\nSerial-From: 1\nSerial-To: 2\n\n",
    b"\xff\xfe",
])
def test_bad_change_lists_are_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        changes.parse_list(bad)


def test_unlistable_paths_are_refused() -> None:
    with pytest.raises(ValueError):
        changes.render_entries([("add", "a b")])
    with pytest.raises(ValueError):
        changes.render_entries([("rename", "a")])


def test_index_round_trip_and_coverage() -> None:
    entries = [changes.IndexEntry(g, 10 * g, 10 * g + 5, 1000.0 + g, f"{g:010d}-e.txt") for g in (3, 4, 5, 6)]
    epoch, back = changes.parse_index(changes.render_index("e", entries))
    assert epoch == "e" and back == entries
    assert [e.generation for e in changes.covering(entries, after=3, upto=6) or []] == [4, 5, 6]
    assert changes.covering(entries, after=2, upto=6) is not None
    assert changes.covering(entries, after=1, upto=6) is None  # list 2 expired
    assert changes.covering(entries, after=6, upto=6) is None
    assert changes.covering(entries[:2] + entries[3:], after=3, upto=6) is None  # a hole
    with pytest.raises(ValueError):
        changes.parse_index(b"Epoch: e\n\n1 2 3 4 ../evil\n")


def test_net_changes_last_operation_wins() -> None:
    def cl(gen: int, *entries: tuple[str, str]) -> changes.ChangeList:
        return changes.ChangeList("e", gen, 0, 0, "", tuple(entries))

    net = changes.net_changes([
        cl(3, ("add", "a"), ("retire", "b")),
        cl(2, ("add", "b"), ("add", "c"), ("retire", "d")),  # out of order on purpose
        cl(4, ("retire", "c"), ("add", "d"), ("delete", "p"), ("replace", "q")),
    ])
    assert net is not None
    assert net.fetch == {"a", "d", "q"} and net.remove == {"b", "c", "p"}
    assert changes.net_changes([cl(1, ("add", "a")), changes.ChangeList("e", 2, 0, 0, "", complete=False)]) is None


def test_expired_lists_keep_the_newest_and_a_minimum() -> None:
    created = {1: 0.0, 2: 100.0, 3: 5000.0, 4: 9000.0}
    assert changes.expired(created, now=10_000.0, keep=1.0) == [1, 2, 3]  # keep at least an hour
    assert changes.expired(created, now=10_000.0, keep=7200.0) == [1, 2]
    assert changes.expired(created, now=10_000.0, keep=9_950.0) == [1]
    assert changes.expired({4: 0.0}, now=1e9, keep=1.0) == []  # never the newest


def test_trace_round_trip() -> None:
    fields = {"Date": trace.format_date(1737792027), "Serial": 5, "Epoch": "e", "Generation": 9, "Cycle-Seconds": 1.5}
    data = trace.render_trace(fields)
    assert data.startswith(b"Date: Sat, 25 Jan 2025 08:00:27 +0000\nSerial: 5\n") and b"Cycle-Seconds: 1.50\n" in data
    parsed = trace.parse_trace(data)
    pos = trace.position(parsed)
    assert pos == trace.Position("e", 9, 5, 1737792027.0)
    assert pos.same_as(trace.Position("e", 9, 4, 0.0)) and not pos.same_as(trace.Position("f", 9, 5, 0.0))
    assert trace.position({"Date": parsed["Date"]}) is None  # a foreign trace
    with pytest.raises(ValueError):
        trace.render_trace({"Upstream": "x\nSerial: 99"})
    with pytest.raises(ValueError):
        trace.parse_trace(b"no colon here\n")


def _snap() -> ProjectSnapshot:
    f = ReleaseFile("demo-1.0-py3-none-any.whl", "https://x/packages/aa/bb/cc/demo-1.0-py3-none-any.whl",
                    "packages/aa/bb/cc/demo-1.0-py3-none-any.whl", "0" * 64, core_metadata=True,
                    core_metadata_sha256="1" * 64, provenance="https://x/p")
    g = ReleaseFile("demo-1.0.tar.gz", "https://x/packages/dd/ee/ff/demo-1.0.tar.gz",
                    "packages/dd/ee/ff/demo-1.0.tar.gz", "2" * 64)
    return ProjectSnapshot(NormalizedName("demo"), "Demo", Serial(3), (f, g), ("1.0",))


def test_page_links_agree_between_html_and_json() -> None:
    snap = _snap()
    expected = {
        "packages/aa/bb/cc/demo-1.0-py3-none-any.whl",
        "packages/aa/bb/cc/demo-1.0-py3-none-any.whl.metadata",
        "packages/aa/bb/cc/demo-1.0-py3-none-any.whl.provenance",
        "packages/dd/ee/ff/demo-1.0.tar.gz",
    }
    assert pagelinks.page_refs("simple/demo/index.v1_json", render.project_json(snap)) == expected
    assert pagelinks.page_refs("simple/demo/index.html", render.project_html(snap)) == expected
    api = render.project_api_json(snap, None)
    assert pagelinks.page_refs("pypi/demo/json", api) == expected - {p for p in expected if p.endswith((".metadata", ".provenance"))}
    entries = [RootEntry(NormalizedName("demo"), "Demo", Serial(3)), RootEntry(NormalizedName("a-b"), "A_B", Serial(1))]
    assert pagelinks.root_names("simple/index.v1_json", render.root_json(entries, serial=3)) == {"demo", "a-b"}
    assert pagelinks.root_names("simple/index.html", render.root_html(entries)) == {"demo", "a-b"}


@pytest.mark.parametrize("href", ["../../../etc/passwd", "../../%2e%2e/x", "/abs/olute"])
def test_page_links_that_leave_the_tree_are_refused(href: str) -> None:
    page = f'<a href="{href}">x</a>'.encode()
    with pytest.raises(ValueError):
        pagelinks.page_refs("simple/demo/index.html", page)


def test_absolute_links_are_not_ours() -> None:
    page = b'<a href="https://elsewhere.example/x.whl">x</a>'
    assert pagelinks.page_refs("simple/demo/index.html", page) == frozenset()
