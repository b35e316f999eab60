"""Table-driven tests of the pure decisions in `mirror.planner`."""

from __future__ import annotations

import pytest

from mirror.model import ChangeEvent, NormalizedName, ProjectSnapshot, ReleaseFile, RootEntry, Serial
from mirror.plan.planner import Fetch, diff_root, finalize, group_events, group_listing, is_content_event, plan_project

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_M = "c" * 64
SHA_M2 = "d" * 64
SHA_P = "e" * 64


def ev(name: str, action: str, serial: int, version: str | None = "1.0") -> ChangeEvent:
    return ChangeEvent(name, version, 1_700_000_000, action, Serial(serial))


def rf(
    filename: str = "demo-1.0-py3-none-any.whl",
    sha256: str = SHA_A,
    *,
    core_metadata: bool = False,
    core_metadata_sha256: str | None = None,
    provenance: str | None = None,
    size: int | None = 10,
) -> ReleaseFile:
    path = f"packages/aa/bb/cc/{filename}"
    return ReleaseFile(
        filename=filename,
        url=f"https://files.test/{path}",
        path=path,
        sha256=sha256,
        size=size,
        core_metadata=core_metadata,
        core_metadata_sha256=core_metadata_sha256,
        provenance=provenance,
    )


def snap(*files: ReleaseFile) -> ProjectSnapshot:
    return ProjectSnapshot(name=NormalizedName("demo"), display_name="Demo", serial=Serial(7), files=files)


# -- group_events -------------------------------------------------------------

ROLE_ACTIONS = [
    "add Owner alice",
    "remove Owner alice",
    "add Maintainer bob",
    "remove Maintainer bob",
    "change Owner carol to Maintainer",
    "invite Owner x",
    "invite Maintainer y",
    "accepted Maintainer y",
]

CONTENT_ACTIONS = [
    "create",
    "new release",
    "add py3 file demo-1.0-py3-none-any.whl",
    "add source file demo-1.0.tar.gz",
    "remove file demo-1.0.tar.gz",
    "remove release",
    "yank release",
    "unyank release",
    "remove project",
    "project quarantined",
    "project quarantine cleared",
    # File names that merely contain a role word are still content changes.
    "add source file owner-1.0.tar.gz",
    "add py3 file repo_owner-1.0-py3-none-any.whl",
    "remove file project-maintainer-2.0.tar.gz",
    "some future action nobody knows yet",
]


@pytest.mark.parametrize("action", ROLE_ACTIONS)
def test_role_actions_are_ignored(action: str) -> None:
    assert not is_content_event(action)
    changes = group_events([ev("Demo", action, 10)])
    assert changes.targets == {}
    assert changes.rejected == ()


@pytest.mark.parametrize("action", CONTENT_ACTIONS)
def test_content_actions_are_kept(action: str) -> None:
    assert is_content_event(action)
    changes = group_events([ev("Demo", action, 10)])
    assert changes.targets == {"demo": 10}


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([], {}),
        ([ev("Demo", "create", 3), ev("demo", "new release", 9), ev("DEMO", "add py3 file x", 5)], {"demo": 9}),
        ([ev("Foo.Bar", "create", 4), ev("foo_bar", "remove release", 2), ev("foo-bar", "add Owner z", 99)],
         {"foo-bar": 4}),
        ([ev("a", "create", 1), ev("B", "create", 2), ev("a", "yank release", 3)], {"a": 3, "b": 2}),
        # A role change with a higher serial never raises the target.
        ([ev("x", "new release", 5), ev("x", "remove Maintainer bob", 50)], {"x": 5}),
    ],
)
def test_group_events_max_serial_per_normalized_name(events: list[ChangeEvent], expected: dict[str, int]) -> None:
    assert group_events(events).targets == expected


@pytest.mark.parametrize("bad", ["../x", "", "a" * 300, "foo bar", "foo/bar", "foo\x00", "-lead", "trail-", "foo\n"])
def test_group_events_rejects_invalid_names(bad: str) -> None:
    changes = group_events([ev(bad, "create", 3), ev("good", "create", 4)])
    assert changes.targets == {"good": 4}
    assert len(changes.rejected) == 1
    assert repr(bad)[:20] in changes.rejected[0]


# -- group_listing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("listing", "targets", "n_rejected"),
    [
        ({}, {}, 0),
        ({"Django": 10, "requests": 20}, {"django": 10, "requests": 20}, 0),
        # Names PyPI would never list together: the newest wins, the rest are reported.
        ({"Foo_Bar": 3, "foo.bar": 8, "FOO-BAR": 5}, {"foo-bar": 8}, 2),
        ({"ok": 1, "../evil": 2, "bad name": 3}, {"ok": 1}, 2),
    ],
)
def test_group_listing(listing: dict[str, int], targets: dict[str, int], n_rejected: int) -> None:
    changes = group_listing(listing)
    assert changes.targets == targets
    assert len(changes.rejected) == n_rejected


# -- diff_root ------------------------------------------------------------------


def root(**serials: int) -> list[RootEntry]:
    return [RootEntry(NormalizedName(n), n, Serial(s)) for n, s in serials.items()]


@pytest.mark.parametrize(
    ("upstream", "published", "todo", "missing"),
    [
        (root(a=1), [], {"a": 1}, []),  # new
        (root(a=5), [("a", 3)], {"a": 5}, []),  # changed
        (root(a=5), [("a", 5)], {}, []),  # unchanged
        (root(a=4), [("a", 5)], {}, []),  # upstream behind us: not a change
        (root(), [("gone", 2)], {}, ["gone"]),  # missing upstream
        (root(a=1, b=9, c=3), [("b", 9), ("c", 1), ("d", 4)], {"a": 1, "c": 3}, ["d"]),
    ],
)
def test_diff_root(
    upstream: list[RootEntry], published: list[tuple[str, int]], todo: dict[str, int], missing: list[str]
) -> None:
    got_todo, got_missing = diff_root(
        upstream, iter([(NormalizedName(n), Serial(s)) for n, s in published])
    )
    assert got_todo == todo
    assert got_missing == missing


# -- plan_project -----------------------------------------------------------------

F = rf()
F_MD = rf(core_metadata=True, core_metadata_sha256=SHA_M)
F_MD_NOHASH = rf(core_metadata=True)
F_PROV = rf(provenance="https://files.test/prov")


def kinds(fetches: list[Fetch]) -> list[tuple[str, str]]:
    return [(f.kind, f.rel) for f in fetches]


@pytest.mark.parametrize(
    ("file", "known", "expected"),
    [
        (F, {}, [("dist", F.path)]),
        (F, {F.path: (10, SHA_A)}, []),
        (F, {F.path: (10, SHA_B)}, [("dist", F.path)]),
        (F_MD, {}, [("dist", F.path), ("metadata", F.metadata_path)]),
        (F_MD, {F.path: (10, SHA_A), F.metadata_path: (3, SHA_M)}, []),
        (F_MD, {F.path: (10, SHA_A), F.metadata_path: (3, SHA_M2)}, [("metadata", F.metadata_path)]),
        (F_MD_NOHASH, {F.path: (10, SHA_A)}, [("metadata", F.metadata_path)]),
        # Without an upstream hash any verified copy is good enough.
        (F_MD_NOHASH, {F.path: (10, SHA_A), F.metadata_path: (3, SHA_M2)}, []),
        (F_PROV, {F.path: (10, SHA_A)}, [("provenance", F.provenance_path)]),
        (F_PROV, {F.path: (10, SHA_A), F.provenance_path: (5, SHA_P)}, []),
    ],
)
def test_plan_project(file: ReleaseFile, known: dict[str, tuple[int, str]], expected: list[tuple[str, str]]) -> None:
    assert kinds(plan_project(snap(file), known)) == expected


def test_plan_project_fetch_details() -> None:
    f = rf(core_metadata=True, core_metadata_sha256=SHA_M, provenance="https://files.test/prov", size=123)
    dist, md, prov = plan_project(snap(f), {})
    assert dist == Fetch(f.path, f.url, SHA_A, 123, "dist", f.filename)
    assert md == Fetch(f.metadata_path, f.url + ".metadata", SHA_M, None, "metadata", f.filename + ".metadata")
    assert prov == Fetch(f.provenance_path, "https://files.test/prov", None, None, "provenance",
                         f.filename + ".provenance")


# -- finalize -----------------------------------------------------------------


def test_finalize_drops_missing_dist() -> None:
    a, b = rf("a-1.tar.gz"), rf("b-1.tar.gz", SHA_B)
    published, refs = finalize(snap(a, b), {b.path: (42, SHA_B)})
    assert [f.filename for f in published.files] == ["b-1.tar.gz"]
    assert published.files[0].size == 42
    assert refs == {b.path}


def test_finalize_drops_dist_with_other_sha() -> None:
    a = rf("a-1.tar.gz")
    published, refs = finalize(snap(a), {a.path: (10, SHA_B)})
    assert published.files == ()
    assert refs == set()


def test_finalize_unadvertises_missing_metadata_and_provenance() -> None:
    f = rf(core_metadata=True, core_metadata_sha256=SHA_M, provenance="https://files.test/prov")
    published, refs = finalize(snap(f), {f.path: (10, SHA_A)})
    (out,) = published.files
    assert out.core_metadata is False
    assert out.core_metadata_sha256 is None
    assert out.provenance is None
    assert refs == {f.path}


def test_finalize_metadata_hash_is_the_verified_one() -> None:
    # Upstream said "true" without a hash; we publish the hash we computed.
    f = rf(core_metadata=True)
    present = {f.path: (10, SHA_A), f.metadata_path: (3, SHA_M2)}
    published, refs = finalize(snap(f), present)
    (out,) = published.files
    assert out.core_metadata is True
    assert out.core_metadata_sha256 == SHA_M2
    assert refs == {f.path, f.metadata_path}


def test_finalize_ignores_metadata_file_when_not_advertised() -> None:
    f = rf(core_metadata=False)
    published, refs = finalize(snap(f), {f.path: (10, SHA_A), f.metadata_path: (3, SHA_M)})
    assert published.files[0].core_metadata is False
    assert refs == {f.path}


def test_finalize_keeps_provenance_when_present() -> None:
    f = rf(provenance="https://files.test/prov")
    published, refs = finalize(snap(f), {f.path: (10, SHA_A), f.provenance_path: (5, SHA_P)})
    assert published.files[0].provenance == "https://files.test/prov"
    assert refs == {f.path, f.provenance_path}


def test_finalize_keeps_the_rest_of_the_snapshot() -> None:
    f = rf()
    s = ProjectSnapshot(name=NormalizedName("demo"), display_name="Demo", serial=Serial(7), files=(f,),
                        versions=("1.0",), status="archived", status_reason="old")
    published, _ = finalize(s, {f.path: (10, SHA_A)})
    assert (published.name, published.display_name, published.serial) == ("demo", "Demo", 7)
    assert (published.versions, published.status, published.status_reason) == (("1.0",), "archived", "old")
