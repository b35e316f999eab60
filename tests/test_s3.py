"""The tree in a bucket (``[storage] backend = "s3"``), against moto's S3
server started on 127.0.0.1 (``tests.harness.s3``).

moto speaks S3's REST protocol and stores what it is sent, but checks no
checksum and (unless ``auth``) no credentials: the corrupted-upload and the
wrong-credentials tests that need a server to refuse run against Ceph's
radosgw in ``test_s3_radosgw.py``; this module covers everything else.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from mirror import cli, layout
from mirror.config import Config
from mirror.errors import ConfigError
from mirror.metrics import Metrics
from mirror.publish.state import State
from tests.harness.consistency import _Hashes, check_project, check_tree
from tests.harness.e2e import make_config, write_config
from tests.harness.fakepypi import FakePyPI
from tests.harness.wheels import BuiltDist
from tests.harness.s3 import S3Server, bucket_snapshot, moto_server, objects, unfinished_uploads

pytest.importorskip("boto3")
pytest.importorskip("moto")
pytestmark = pytest.mark.slow

JSON = "application/vnd.pypi.simple.v1+json"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


_buckets = iter(range(10_000))


def new_bucket(server: S3Server) -> str:
    return server.make_bucket(f"mirror-{os.getpid()}-{next(_buckets)}")


def s3_config(up: FakePyPI, tmp: Path, server: S3Server, bucket: str, **extra: Any) -> Config:
    s3 = extra.pop("s3", {})
    return make_config(up.url, tmp / "m", storage=server.storage(tmp, bucket, **s3), **extra)


def sync(cfg: Config, metrics: Metrics | None = None) -> Any:
    return trio.run(lambda: cli.run_sync(cfg, metrics=metrics or Metrics()))


def consistent(server: S3Server, bucket: str, tmp: Path, *, partial: bool = False) -> Path:
    """Every link of every page in the bucket resolves to the right bytes.
    ``partial``: a first sync killed before its first root: every project
    page there is checked instead."""
    snap = bucket_snapshot(server.client(), bucket, tmp / "snapshot")
    if partial and not (snap / "simple/index.v1_json").exists():
        hashes = _Hashes()
        problems = [p for d in sorted((snap / "simple").iterdir()) if d.is_dir()
                    for p in check_project(snap, d.name, hashes)]
    else:
        problems = check_tree(snap)
    assert problems == []
    return snap


def test_first_sync_and_every_change_land_in_the_bucket(moto: S3Server, tmp_path: Path) -> None:
    bucket = new_bucket(moto)
    with FakePyPI(seed=1) as up:
        up.add_release("alpha", "1.0", provenance=True)
        up.add_release("alpha", "1.1")
        up.add_release("beta", "2.0")
        up.add_release("gamma", "0.1")
        cfg = s3_config(up, tmp_path, moto, bucket, mirror={"retire_after": "1s"})
        metrics = Metrics()
        report = sync(cfg, metrics)
        assert report.failed == {}
        client = moto.client()
        objs = objects(client, bucket)
        snap = consistent(moto, bucket, tmp_path)
        # Every file upstream has is in the bucket, byte for byte.
        for name in ("alpha", "beta", "gamma"):
            for fn in up.filenames(name):
                rel = up.file_path(name, fn).lstrip("/")
                assert (snap / rel).read_bytes() == up.file_content(name, fn)
        assert {"simple/index.html", "simple/index.v1_html", "simple/index.v1_json",
                f"trace/{cfg.mirror.name}", "last-modified"} <= set(objs)
        # Nothing went to the local web/ (only state/ is local).
        web = cfg.layout.web
        assert not web.exists() or not any(web.rglob("*"))
        # Headers as nginx would send them, and the sha256 on every object.
        for rel in ("simple/alpha/index.v1_json", "simple/alpha/index.v1_html", "simple/alpha/index.html",
                    "simple/index.v1_json", up.file_path("alpha", up.filenames("alpha")[0]).lstrip("/"),
                    up.file_path("alpha", up.filenames("alpha")[0]).lstrip("/") + ".metadata", f"trace/{cfg.mirror.name}"):
            head = client.head_object(Bucket=bucket, Key=f"web/{rel}")
            assert head["ContentType"] == layout.content_type(rel), rel
            assert head["CacheControl"] == layout.cache_control(rel), rel
            body = client.get_object(Bucket=bucket, Key=f"web/{rel}")["Body"].read()
            assert head["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest(), rel
        assert client.head_object(Bucket=bucket, Key="web/simple/alpha/index.v1_json")["ContentType"] == JSON
        assert metrics.uploads._value.get() == len(objs)
        assert metrics.upload_bytes._value.get() == sum(o["Size"] for o in objs.values())

        # Incremental: a new release, a removed file, a yank, a removed project.
        up.add_release("beta", "2.1")
        gone_file = up.filenames("alpha")[0]
        gone_rel = up.file_path("alpha", gone_file).lstrip("/")
        up.remove_file("alpha", gone_file)
        up.yank("alpha", "1.1", reason="broken")
        gamma_files = [up.file_path("gamma", f).lstrip("/") for f in up.filenames("gamma")]
        up.remove_project("gamma")
        assert sync(cfg).failed == {}
        snap = consistent(moto, bucket, tmp_path)
        beta = (snap / "simple/beta/index.v1_json").read_text()
        assert "2.1" in beta
        alpha = (snap / "simple/alpha/index.v1_json").read_text()
        assert gone_file not in alpha and '"yanked":"broken"' in alpha.replace(" ", "")
        assert not (snap / "simple/gamma/index.v1_json").exists()
        assert "gamma" not in (snap / "simple/index.v1_json").read_text()
        # Unreferenced files stay for retire_after, then go.
        objs = objects(client, bucket)
        assert gone_rel in objs and all(r in objs for r in gamma_files)
        time.sleep(1.2)
        assert sync(cfg).failed == {}
        objs = objects(client, bucket)
        assert gone_rel not in objs and not any(r in objs for r in gamma_files)
        consistent(moto, bucket, tmp_path)


def test_large_files_go_up_in_parts(moto: S3Server, tmp_path: Path) -> None:
    bucket = new_bucket(moto)
    with FakePyPI(seed=2) as up:
        big = os.urandom(11 * 1024 * 1024 + 17)
        up.add_file("big", "1.0", BuiltDist("big-1.0.tar.gz", big, None))
        cfg = s3_config(up, tmp_path, moto, bucket, s3={"multipart_threshold": "5MiB", "part_size": "5MiB"})
        assert sync(cfg).failed == {}
        client = moto.client()
        rel = next(up.file_path("big", f).lstrip("/") for f in up.filenames("big") if f.endswith(".tar.gz"))
        head = client.head_object(Bucket=bucket, Key=f"web/{rel}")
        assert head["ContentLength"] == len(big)
        assert head["Metadata"]["sha256"] == hashlib.sha256(big).hexdigest()
        assert head["ETag"].strip('"').endswith("-3")  # three parts of 5 MiB, 5 MiB and 1 MiB
        assert client.get_object(Bucket=bucket, Key=f"web/{rel}")["Body"].read() == big
        assert unfinished_uploads(client, bucket) == []
        consistent(moto, bucket, tmp_path)


def test_a_missing_bucket_is_one_clear_line(moto: S3Server, tmp_path: Path) -> None:
    with FakePyPI(seed=3) as up:
        up.add_release("alpha", "1.0")
        path = write_config(tmp_path / "mirror.toml", up.url, tmp_path / "m",
                            storage=moto.storage(tmp_path, "no-such-bucket-here"))
        r = subprocess.run([sys.executable, "-m", "mirror", "sync", "--config", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert "s3://no-such-bucket-here/web" in lines[0] and "does not exist" in lines[0]
    assert "Traceback" not in r.stderr


def test_wrong_credentials_are_one_clear_line(tmp_path: Path) -> None:
    with moto_server(tmp_path, auth=True) as server, FakePyPI(seed=4) as up:
        bucket = server.make_bucket("mirror-auth")
        up.add_release("alpha", "1.0")
        # The right key works ...
        cfg = s3_config(up, tmp_path, server, bucket)
        assert sync(cfg).failed == {}
        # ... so does the standard AWS chain (here: the environment), with no key in the config ...
        chain = server.storage(tmp_path, bucket)
        for k in ("access_key_id", "secret_access_key_file"):
            del chain["s3"][k]
        path = write_config(tmp_path / "chain.toml", up.url, tmp_path / "m3", storage=chain)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        r = subprocess.run([sys.executable, "-m", "mirror", "sync", "--config", str(path)], capture_output=True,
                           text=True, timeout=60, env={**env, "AWS_ACCESS_KEY_ID": server.access_key,
                                                       "AWS_SECRET_ACCESS_KEY": server.secret_key})
        assert r.returncode == 0, r.stderr
        r = subprocess.run([sys.executable, "-m", "mirror", "sync", "--config", str(path)], capture_output=True,
                           text=True, timeout=60, env={**env, "AWS_ACCESS_KEY_ID": server.access_key,
                                                       "AWS_SECRET_ACCESS_KEY": "wrong"})
        assert r.returncode == 2 and "access denied" in r.stderr, r.stderr
        # ... a wrong secret in the secret file does not.
        path = write_config(tmp_path / "mirror.toml", up.url, tmp_path / "m2",
                            storage=server.storage(tmp_path, bucket, secret_key="not-the-secret"))
        r = subprocess.run([sys.executable, "-m", "mirror", "sync", "--config", str(path)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert f"s3://{bucket}/web" in lines[0] and "access denied" in lines[0]


def test_config_refuses_inline_secrets_and_half_credentials(tmp_path: Path) -> None:
    base = {"backend": "s3", "s3": {"bucket": "mirror-x"}}
    make_config("http://127.0.0.1:1", tmp_path / "m", storage=base)  # the AWS chain: fine
    bad = [
        ({"bucket": "mirror-x", "secret_access_key": "hunter2"}, "never goes in the config"),
        ({"bucket": "mirror-x", "access_key_id": "AKID"}, "go together"),
        ({"bucket": "mirror-x", "access_key_id": "AKID", "secret_access_key_file": "nope"}, "cannot read"),
        ({"bucket": "Bad_Bucket"}, "bucket"),
        ({"bucket": "mirror-x", "addressing": "sideways"}, "addressing"),
        ({"bucket": "mirror-x", "part_size": "1MiB"}, "5MiB to 5GiB"),
        ({"bucket": "mirror-x", "endpoint_url": "ftp://x"}, "endpoint_url"),
        ({"bucket": "mirror-x", "prefix": "a/../b"}, "prefix"),
        ({"bucket": "mirror-x", "colour": "red"}, "storage.s3.colour"),
    ]
    for s3, why in bad:
        with pytest.raises(ConfigError, match=why.replace(".", r"\.")):
            make_config("http://127.0.0.1:1", tmp_path / "m", storage={"backend": "s3", "s3": s3})
    with pytest.raises(ConfigError, match="storage.backend"):
        make_config("http://127.0.0.1:1", tmp_path / "m", storage={"backend": "tape"})
    with pytest.raises(ConfigError, match=r"\[storage.s3\]"):
        make_config("http://127.0.0.1:1", tmp_path / "m", storage={"backend": "s3"})


def test_kill_9_during_uploads_then_resume(moto: S3Server, tmp_path: Path) -> None:
    """A sync killed while uploads are in flight (among them a multipart one)
    leaves only complete objects under final keys and no page linking a
    missing file; the next start aborts the unfinished upload and finishes."""
    from tests.harness.s3 import CorruptingProxy

    bucket = new_bucket(moto)
    slow = CorruptingProxy(moto.endpoint.removeprefix("http://"))
    slow.delay, slow.delay_match = 1.0, "partNumber="  # each part of the big file takes a second
    try:
        with FakePyPI(seed=5) as up:
            for i in range(30):
                up.add_release(f"proj-{i:02d}", "1.0")
            big = os.urandom(12 * 1024 * 1024)
            up.add_file("proj-00", "1.0", BuiltDist("proj_00-1.0.zip", big, None))
            storage = moto.storage(tmp_path, bucket, endpoint=slow.endpoint,
                                   multipart_threshold="5MiB", part_size="5MiB", concurrency=4)
            path = write_config(tmp_path / "mirror.toml", up.url, tmp_path / "m", storage=storage)
            client = moto.client()
            proc = subprocess.Popen([sys.executable, "-m", "mirror", "sync", "--config", str(path)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if unfinished_uploads(client, bucket) and len(objects(client, bucket)) >= 5:
                    break
                if proc.poll() is not None:
                    break
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL, "the sync ended before the uploads were under way"
            # At this instant: objects are whole, and no page links a missing one.
            assert unfinished_uploads(client, bucket)  # the killed multipart upload
            snap = consistent(moto, bucket, tmp_path, partial=True)
            assert not (snap / up.file_path("proj-00", "proj_00-1.0.zip").lstrip("/")).exists()
            at_kill = [rel for rel in objects(client, bucket) if rel.startswith("packages/")]
            up.reset_log()
            slow.delay = 0
            r = subprocess.run([sys.executable, "-m", "mirror", "sync", "--config", str(path)],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            assert "aborted 1 unfinished multipart upload" in r.stderr or unfinished_uploads(client, bucket) == []
            assert unfinished_uploads(client, bucket) == []
            snap = consistent(moto, bucket, tmp_path)
            assert (snap / up.file_path("proj-00", "proj_00-1.0.zip").lstrip("/")).read_bytes() == big
            # What was in the bucket at the kill, recorded or not, was not fetched again
            # (the upload journal named the unrecorded ones; each was adopted after a HEAD).
            fetched = {r[1].split("?")[0].lstrip("/") for r in up.requests_matching("/packages/")}
            assert at_kill and not fetched & set(at_kill), sorted(fetched & set(at_kill))[:3]
            for i in range(30):
                assert (snap / f"simple/proj-{i:02d}/index.v1_json").exists()
            state = State.open(tmp_path / "m" / "state" / "mirror.sqlite3")
            try:
                assert state.project_count() == 30
            finally:
                state.close()
    finally:
        slow.close()


def test_verify_compares_listing_and_checksums_and_repairs(moto: S3Server, tmp_path: Path) -> None:
    bucket = new_bucket(moto)
    with FakePyPI(seed=6) as up:
        up.add_release("alpha", "1.0")
        up.add_release("beta", "1.0")
        path = write_config(tmp_path / "mirror.toml", up.url, tmp_path / "m",
                            storage=moto.storage(tmp_path, bucket))

        def mirror(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "mirror", args[0], "--config", str(path), *args[1:]],
                                  capture_output=True, text=True, timeout=120)

        assert mirror("sync").returncode == 0
        r = mirror("verify")
        assert r.returncode == 0, r.stdout + r.stderr
        client = moto.client()
        a = up.file_path("alpha", up.filenames("alpha")[0]).lstrip("/")
        b = up.file_path("beta", up.filenames("beta")[0]).lstrip("/")
        client.delete_object(Bucket=bucket, Key=f"web/{a}")
        # Same size, other bytes, stored with their own sha256.
        original = client.get_object(Bucket=bucket, Key=f"web/{b}")["Body"].read()
        other = bytes([original[0] ^ 1]) + original[1:]
        client.put_object(Bucket=bucket, Key=f"web/{b}", Body=other,
                          Metadata={"sha256": hashlib.sha256(other).hexdigest()},
                          ChecksumSHA256=base64.b64encode(hashlib.sha256(other).digest()).decode())
        client.put_object(Bucket=bucket, Key="web/packages/zz/orphan.whl", Body=b"x")
        r = mirror("verify", "--orphans", "list")
        assert r.returncode != 0
        assert f"missing\t{a}" in r.stdout
        assert f"hash\t{b}" in r.stdout
        # Too new to call an orphan while a mirror may be writing ...
        assert "too recent to call orphans" in r.stderr
        # --hash downloads and hashes the bytes: it finds the same.
        r = mirror("verify", "--hash")
        assert f"hash\t{b}" in r.stdout and f"missing\t{a}" in r.stdout
        r = mirror("verify", "--repair")
        assert "Traceback" not in r.stderr
        r = mirror("verify")
        assert r.returncode == 0, r.stdout + r.stderr
        assert client.get_object(Bucket=bucket, Key=f"web/{b}")["Body"].read() == original
        # ... but with the directory locked (--orphans delete) it is one, and goes.
        r = mirror("verify", "--orphans", "delete")
        assert "orphan\tpackages/zz/orphan.whl" in r.stdout, r.stdout + r.stderr
        assert "packages/zz/orphan.whl" not in objects(client, bucket)
        consistent(moto, bucket, tmp_path)


async def test_the_daemon_keeps_a_bucket_current_and_refuses_to_move_it(
    moto: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from mirror.config import load_config
    from mirror.ops.daemon import Daemon

    caplog.set_level(logging.INFO)
    bucket = new_bucket(moto)
    with FakePyPI(seed=7) as up:
        up.add_release("alpha", "1.0")
        storage = moto.storage(tmp_path, bucket)
        conf = write_config(tmp_path / "mirror.toml", up.url, tmp_path / "m", storage=storage,
                            daemon={"poll_interval": 0.2}, metrics={"listen": ""})
        metrics = Metrics()
        daemon = Daemon(load_config(conf), config_path=conf, metrics=metrics, handle_signals=False)
        client = moto.client()

        async def until(pred: Any, what: str) -> None:
            with trio.fail_after(30):
                while not pred():
                    await trio.sleep(0.05)

        def page(name: str) -> bytes | None:
            try:
                return bytes(client.get_object(Bucket=bucket, Key=f"web/simple/{name}/index.v1_json")["Body"].read())
            except client.exceptions.NoSuchKey:
                return None

        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            await until(lambda: page("alpha") is not None, "first cycle")
            up.add_release("beta", "1.0")
            await until(lambda: page("beta") is not None, "the next cycle")
            assert metrics.uploads._value.get() > 0
            # Another bucket prefix is another tree: refused while running.
            write_config(conf, up.url, tmp_path / "m", storage=moto.storage(tmp_path, bucket, prefix="elsewhere"),
                         daemon={"poll_interval": 0.2}, metrics={"listen": ""})
            daemon.scheduler.request_reload()
            await until(lambda: (metrics.registry.get_sample_value("mirror_config_reloads_total",
                                                                   {"outcome": "error"}) or 0) == 1, "refused")
            assert "[storage] cannot change while running" in caplog.text
            daemon.request_stop("test")
    consistent(moto, bucket, tmp_path)
