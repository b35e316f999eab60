"""The tree in a bucket on a real object store: Ceph's RADOS gateway on a
one-node test cluster, started by the module (``tests.harness.s3.radosgw``).

radosgw checks request signatures and ``Content-MD5`` (Ceph Pacific, as in
Debian 12, does not know ``x-amz-checksum-sha256``), so these are the tests
where the server itself must refuse: bytes corrupted on the way, a wrong
secret.  Without the Ceph packages the module is skipped, and
``MIRROR_REQUIRE_RGW=1`` (set by ``.ci/run``) turns that skip into a failure.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from mirror import cli
from mirror.metrics import Metrics
from tests.harness.consistency import check_tree
from tests.harness.e2e import make_config, write_config
from tests.harness.fakepypi import FakePyPI
from tests.harness.s3 import CorruptingProxy, S3Server, bucket_snapshot, ceph_missing, objects, radosgw, \
    unfinished_uploads
from tests.harness.wheels import BuiltDist

pytest.importorskip("boto3")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rgw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    why = ceph_missing()
    if why is not None:
        if os.environ.get("MIRROR_REQUIRE_RGW") == "1":
            pytest.fail(f"radosgw is required here (MIRROR_REQUIRE_RGW=1) but {why}")
        pytest.skip(why)
    with radosgw(tmp_path_factory.mktemp("rgw")) as server:
        yield server


def sync(cfg: object) -> object:
    return trio.run(lambda: cli.run_sync(cfg, metrics=Metrics()))  # type: ignore[arg-type]


def mirror_cli(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", args[0], "--config", str(path), *args[1:]],
                          capture_output=True, text=True, timeout=180)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_sync_changes_and_verify_on_radosgw(rgw: S3Server, tmp_path: Path) -> None:
    bucket = rgw.make_bucket("mirror-rgw-e2e")
    client = rgw.client()
    with FakePyPI(seed=11) as up:
        up.add_release("alpha", "1.0")
        up.add_release("alpha", "1.1")
        up.add_release("beta", "2.0")
        big = os.urandom(6 * 1024 * 1024 + 5)
        up.add_file("beta", "2.0", BuiltDist("beta-2.0.zip", big, None))
        storage = rgw.storage(tmp_path, bucket, multipart_threshold="5MiB", part_size="5MiB")
        cfg = make_config(up.url, tmp_path / "m", storage=storage, mirror={"retire_after": "1s"})
        assert sync(cfg).failed == {}  # type: ignore[attr-defined]
        snap = bucket_snapshot(client, bucket, tmp_path / "snap")
        assert check_tree(snap) == []
        assert (snap / up.file_path("beta", "beta-2.0.zip").lstrip("/")).read_bytes() == big
        head = client.head_object(Bucket=bucket, Key="web/simple/alpha/index.v1_json")
        assert head["ContentType"] == "application/vnd.pypi.simple.v1+json"
        assert head["CacheControl"] == "public, max-age=600"
        # Changes: a release, a removed file, a yank, a removed project.
        up.add_release("beta", "2.1")
        gone = up.file_path("alpha", up.filenames("alpha")[0]).lstrip("/")
        up.remove_file("alpha", up.filenames("alpha")[0])
        up.yank("alpha", "1.1")
        up.add_release("gamma", "1.0")
        assert sync(cfg).failed == {}  # type: ignore[attr-defined]
        up.remove_project("gamma")
        assert sync(cfg).failed == {}  # type: ignore[attr-defined]
        snap = bucket_snapshot(client, bucket, tmp_path / "snap")
        assert check_tree(snap) == []
        assert "2.1" in (snap / "simple/beta/index.v1_json").read_text()
        assert not (snap / "simple/gamma/index.v1_json").exists()
        time.sleep(1.2)
        assert sync(cfg).failed == {}  # type: ignore[attr-defined]
        assert gone not in objects(client, bucket)
        assert unfinished_uploads(client, bucket) == []
        path = write_config(tmp_path / "mirror.toml", up.url, tmp_path / "m", storage=storage,
                            mirror={"retire_after": "1s"})
        r = mirror_cli(path, "verify")
        assert r.returncode == 0, r.stdout + r.stderr


def test_an_upload_corrupted_in_transit_is_refused_by_the_server(rgw: S3Server, tmp_path: Path) -> None:
    bucket = rgw.make_bucket("mirror-rgw-corrupt")
    client = rgw.client()
    proxy = CorruptingProxy(rgw.endpoint)
    try:
        with FakePyPI(seed=12) as up:
            up.add_release("alpha", "1.0")
            wheel = next(f for f in up.filenames("alpha") if f.endswith(".whl"))
            # Once: the server refuses it, the mirror sends it again from its verified temp.
            proxy.corrupt(wheel, count=1)
            storage = rgw.storage(tmp_path, bucket, endpoint=proxy.endpoint)
            metrics = Metrics()
            cfg = make_config(up.url, tmp_path / "m", storage=storage)
            report = trio.run(lambda: cli.run_sync(cfg, metrics=metrics))
            assert report.failed == {}
            assert len(proxy.corrupted) == 1
            assert metrics.upload_errors.labels("checksum")._value.get() == 1
            snap = bucket_snapshot(client, bucket, tmp_path / "snap")
            assert check_tree(snap) == []
            rel = up.file_path("alpha", wheel).lstrip("/")
            assert (snap / rel).read_bytes() == up.file_content("alpha", wheel)

            # Every time: the sync fails with one line; nothing under the key, no page links it.
            up.add_release("beta", "1.0")
            bwheel = next(f for f in up.filenames("beta") if f.endswith(".whl"))
            proxy.corrupt(bwheel, count=1000)
            path = write_config(tmp_path / "mirror.toml", up.url, tmp_path / "m", storage=storage)
            r = mirror_cli(path, "sync")
            assert r.returncode == 5, r.stderr
            line = r.stderr.strip().splitlines()[-1]
            # Over plain http botocore signs the body's sha256, so radosgw
            # refuses the bytes on that (over https, on Content-MD5: BadDigest).
            assert bwheel in line and ("XAmzContentSHA256Mismatch" in line or "BadDigest" in line), r.stderr
            assert "Traceback" not in r.stderr
            keys = objects(client, bucket)
            assert up.file_path("beta", bwheel).lstrip("/") not in keys
            assert "simple/beta/index.v1_json" not in keys
            assert check_tree(bucket_snapshot(client, bucket, tmp_path / "snap")) == []
            # The path heals: the next run publishes it.
            proxy.corrupt("", count=0)
            r = mirror_cli(path, "sync")
            assert r.returncode == 0, r.stderr
            assert check_tree(bucket_snapshot(client, bucket, tmp_path / "snap")) == []
            assert "simple/beta/index.v1_json" in objects(client, bucket)
    finally:
        proxy.close()


def test_wrong_credentials_and_a_missing_bucket_on_radosgw(rgw: S3Server, tmp_path: Path) -> None:
    bucket = rgw.make_bucket("mirror-rgw-auth")
    with FakePyPI(seed=13) as up:
        up.add_release("alpha", "1.0")
        path = write_config(tmp_path / "a.toml", up.url, tmp_path / "m",
                            storage=rgw.storage(tmp_path, bucket, secret_key="wrong-secret"))
        r = mirror_cli(path, "sync")
        assert r.returncode == 2
        line = one_line(r.stderr)
        assert f"s3://{bucket}/web" in line and "access denied" in line
        path = write_config(tmp_path / "b.toml", up.url, tmp_path / "m",
                            storage=rgw.storage(tmp_path, "mirror-rgw-nope"))
        r = mirror_cli(path, "sync")
        assert r.returncode == 2
        line = one_line(r.stderr)
        assert "s3://mirror-rgw-nope/web" in line and "does not exist" in line


class _Flipping(io.BytesIO):
    """A file whose last byte flips once the checksum has been read off it
    (the first ``seek(0)``): bytes that change between verification and the
    wire, below SigV4 (which signs what it is handed)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.flipped = False

    def seek(self, pos: int, whence: int = 0) -> int:
        at = super().seek(pos, whence)
        if not self.flipped and pos == 0 and whence == 0:
            self.flipped = True
            view = self.getbuffer()
            view[-1] ^= 0x01
            del view
        return at


def test_content_md5_is_what_refuses_bytes_changed_before_signing(
    rgw: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Over plain http botocore signs the body's sha256, so a proxy's flipped
    byte is caught by the signature alone.  Bytes that change before boto3
    signs them (memory, a bad read) carry a valid signature: only the
    checksum taken from the verified temp refuses them."""
    from mirror.publish import s3tree

    bucket = rgw.make_bucket("mirror-rgw-md5")
    client = rgw.client()
    real_open = open
    left = {"n": 0}

    def flipping_open(path: object, mode: str = "r", *args: object, **kw: object) -> object:
        f = real_open(path, mode, *args, **kw)  # type: ignore[call-overload]
        if "b" in mode and left["n"] > 0 and target["rel"] and str(path).endswith(".part"):
            if target["size"] == os.path.getsize(str(path)):
                left["n"] -= 1
                with f:
                    return _Flipping(f.read())
        return f

    target: dict[str, object] = {"rel": "", "size": -1}
    monkeypatch.setattr(s3tree, "open", flipping_open, raising=False)
    with FakePyPI(seed=14) as up:
        up.add_release("alpha", "1.0")
        wheel = next(f for f in up.filenames("alpha") if f.endswith(".whl"))
        rel = up.file_path("alpha", wheel).lstrip("/")
        target.update(rel=rel, size=len(up.file_content("alpha", wheel)))
        left["n"] = 1
        metrics = Metrics()
        cfg = make_config(up.url, tmp_path / "m", storage=rgw.storage(tmp_path, bucket))  # checksum = "md5"
        assert trio.run(lambda: cli.run_sync(cfg, metrics=metrics)).failed == {}
        assert left["n"] == 0, "the flip happened"
        assert metrics.upload_errors.labels("checksum")._value.get() == 1
        # BadDigest: the Content-MD5 refused them (the signature was valid for the changed bytes).
        assert f"{rel}: the server refused the bytes (HTTP 400 BadDigest" in caplog.text, caplog.text
        body = client.get_object(Bucket=bucket, Key=f"web/{rel}")["Body"].read()
        assert body == up.file_content("alpha", wheel)
        assert check_tree(bucket_snapshot(client, bucket, tmp_path / "snap")) == []

