"""Real S3 servers for the object-storage tests, started on 127.0.0.1.

* ``moto_server``: moto's server mode (``python -m moto.server``), a
  separate process speaking S3's REST protocol.  It accepts any
  credentials, serves anonymous GETs (so nginx can proxy it), and does
  *not* check ``Content-MD5`` or ``x-amz-checksum-*``.  With ``auth=True``
  it enforces IAM credentials (``INITIAL_NO_AUTH_ACTION_COUNT``): the test
  user is created in the first requests, and every later one must be
  signed with its key.
* ``radosgw``: Ceph's RADOS gateway on a one-node test cluster (one
  monitor, one memstore OSD, no cephx), from Debian's ceph packages.  It
  checks signatures and ``Content-MD5`` (Pacific does not know
  ``x-amz-checksum-sha256`` and ignores it), so the corrupted-upload and
  wrong-credentials tests run against it.
* ``CorruptingProxy``: a TCP relay between the mirror and a server that
  flips one byte in the body of chosen PUT requests, the way a bad NIC or
  middlebox would; the server must refuse them.

``bucket_snapshot`` copies a bucket's objects into a directory so that the
filesystem consistency checker (``tests.harness.consistency``) can follow
every link of every page.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.e2e import start_on_free_port, stop_process, free_port

REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    kind: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self, *, access_key: str | None = None, secret_key: str | None = None, endpoint: str | None = None) -> Any:
        import boto3
        from botocore.config import Config as BotoConfig

        return boto3.client(
            "s3", endpoint_url=endpoint or self.endpoint, region_name=REGION,
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key,
            config=BotoConfig(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                              response_checksum_validation="when_required", retries={"max_attempts": 2}),
        )

    def make_bucket(self, name: str, *, public_read: bool = True) -> str:
        c = self.client()
        c.create_bucket(Bucket=name)
        if public_read:  # what nginx in front of the bucket needs (conf/nginx-s3.conf)
            c.put_bucket_policy(Bucket=name, Policy=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": {"AWS": ["*"]} if self.kind == "radosgw" else "*",
                               "Action": ["s3:GetObject"],
                               "Resource": [f"arn:aws:s3:::{name}/*"]}],
            }))
        return name

    def storage(self, tmp: Path, bucket: str, *, prefix: str = "web", endpoint: str | None = None,
                secret_key: str | None = None, **s3: Any) -> dict[str, Any]:
        """A ``[storage]`` section for this server (the secret in a file, as an operator keeps it)."""
        secret = tmp / f"s3-secret-{uuid.uuid4().hex[:8]}"
        secret.write_text((secret_key or self.secret_key) + "\n")
        secret.chmod(0o600)
        section = {"endpoint_url": endpoint or self.endpoint, "bucket": bucket, "prefix": prefix, "region": REGION,
                   "addressing": "path", "access_key_id": s3.pop("access_key_id", self.access_key),
                   "secret_access_key_file": str(secret), "timeout": 20}
        if self.kind == "radosgw":
            section["checksum"] = "md5"  # Pacific ignores x-amz-checksum-sha256
        section.update(s3)
        return {"backend": "s3", "s3": section}


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("AWS_") or k.lower().endswith("_proxy"):
            del env[k]
    return env


@contextmanager
def moto_server(tmp: Path, *, auth: bool = False) -> Iterator[S3Server]:
    log = tmp / f"moto-{uuid.uuid4().hex[:6]}.log"
    env = _python_env()
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"

    def start(port: int) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    proc, port = start_on_free_port(start, "moto server")
    server = S3Server(f"http://127.0.0.1:{port}", "AKIDMIRRORTEST", "mirror-test-secret", "moto", log, proc)
    try:
        if auth:
            import boto3

            iam = boto3.client("iam", endpoint_url=server.endpoint, region_name=REGION,
                               aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
            iam.create_user(UserName="mirror")
            iam.put_user_policy(UserName="mirror", PolicyName="all", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
            key = iam.create_access_key(UserName="mirror")["AccessKey"]
            server.access_key, server.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        yield server
    finally:
        stop_process(proc)


# -- Ceph -------------------------------------------------------------------------

CEPH_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")


def ceph_missing() -> str | None:
    """Why radosgw cannot run here, or None."""
    missing = [b for b in CEPH_BINARIES if shutil.which(b) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (.ci/run installs Debian's ceph-mon, ceph-osd and radosgw)"
    if os.geteuid() != 0:
        return "the Ceph daemons are run as root here"
    return None


def _ceph(conf: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["ceph", "-c", str(conf), *args], capture_output=True, timeout=timeout, check=True)


@contextmanager
def radosgw(tmp: Path, *, attempts: int = 3) -> Iterator[S3Server]:
    """A one-node Ceph cluster with a RADOS gateway; stopped (and its data,
    in memory, gone) on exit.  A start that fails is tried again on a fresh
    cluster (seen here: an OSD's first boot refused once with 'wrong fsid')."""
    for attempt in range(1, attempts + 1):
        pids: list[Path] = []
        try:
            server = _start_radosgw(tmp / f"ceph-{attempt}", pids)
        except (RuntimeError, subprocess.TimeoutExpired):
            for pid_file in reversed(pids):
                _kill_pid_file(pid_file)
            if attempt == attempts:
                raise
            continue
        try:
            yield server
        finally:
            for pid_file in reversed(pids):
                _kill_pid_file(pid_file)
        return


def _start_radosgw(base: Path, pids: list[Path]) -> S3Server:
    for d in ("mon", "osd0", "run", "log", "rgw"):
        (base / d).mkdir(parents=True, exist_ok=True)
    fsid, osd_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    mon_port, rgw_port = free_port(), free_port()
    conf = base / "ceph.conf"
    conf.write_text(f"""[global]
fsid = {fsid}
mon_host = v1:127.0.0.1:{mon_port}
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
mon_max_pg_per_osd = 1000
run_dir = {base}/run
log_file = {base}/log/$name.log
admin_socket = {base}/run/$name.asok
pid_file = {base}/run/$name.pid
osd_objectstore = memstore
memstore_device_bytes = 4294967296
ms_bind_ipv4 = true
ms_bind_ipv6 = false
public_addr = 127.0.0.1
[mon.a]
public_addr = v1:127.0.0.1:{mon_port}
mon_data = {base}/mon
[osd.0]
osd_data = {base}/osd0
[client.rgw]
rgw_frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw_data = {base}/rgw
""")
    log = base / "log" / "client.rgw.log"
    server = S3Server(f"http://127.0.0.1:{rgw_port}", "AKIDMIRRORRGW", "mirror-rgw-secret", "radosgw", log)

    def step(cmd: list[str], timeout: float = 120) -> None:
        r = subprocess.run(cmd, capture_output=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}")

    step(["monmaptool", "--create", "--add", "a", f"v1:127.0.0.1:{mon_port}", "--fsid", fsid, str(base / "monmap")])
    step(["ceph-mon", "--mkfs", "-i", "a", "-c", str(conf), "--monmap", str(base / "monmap")])
    step(["ceph-mon", "-i", "a", "-c", str(conf)])
    pids.append(base / "run" / "mon.a.pid")
    step(["ceph", "-c", str(conf), "osd", "create", osd_uuid])
    step(["ceph-osd", "-i", "0", "-c", str(conf), "--mkfs", "--osd-uuid", osd_uuid])
    step(["ceph-osd", "-i", "0", "-c", str(conf)])
    pids.append(base / "run" / "osd.0.pid")
    step(["radosgw", "-c", str(conf), "-n", "client.rgw"], timeout=180)
    pids.append(base / "run" / "client.rgw.pid")
    deadline = time.monotonic() + 180
    while True:
        try:
            with socket.create_connection(("127.0.0.1", rgw_port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"radosgw did not listen on {rgw_port}: {_tail(log)}") from None
            time.sleep(0.5)
    step(["radosgw-admin", "-c", str(conf), "user", "create", "--uid", "mirror", "--display-name", "mirror",
          "--access-key", server.access_key, "--secret", server.secret_key])
    return server


def _tail(p: Path, n: int = 3000) -> str:
    try:
        return p.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _kill_pid_file(p: Path) -> None:
    try:
        pid = int(p.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


# -- faults -------------------------------------------------------------------------

class CorruptingProxy:
    """127.0.0.1:<port> relaying to ``target``; the body of the next
    ``count`` PUTs whose path contains ``match`` gets one byte flipped."""

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("http://").partition(":")
        self.target = (host, int(port))
        self.match = ""
        self.count = 0
        self.corrupted: list[str] = []
        self.delay = 0.0  # seconds before each request whose path contains delay_match is relayed
        self.delay_match = ""
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.endpoint = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def corrupt(self, match: str, count: int = 1) -> None:
        with self._lock:
            self.match, self.count = match, count

    def close(self) -> None:
        self._stop = True
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        pipe = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
        pipe.start()
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = client.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, path = lines[0].split(b" ")[:2]
                length = 0
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                with self._lock:
                    hit = method == b"PUT" and self.count > 0 and self.match.encode() in path and length > 0
                    if hit:
                        self.count -= 1
                        self.corrupted.append(path.decode())
                if self.delay and self.delay_match.encode() in path:
                    time.sleep(self.delay)
                # The head at once: botocore sends "Expect: 100-continue" and
                # waits for the answer before the body.
                upstream.sendall(head + b"\r\n\r\n")
                left = length
                while left > 0:
                    if not buf:
                        buf = client.recv(min(65536, left))
                        if not buf:
                            return
                    chunk, buf = buf[:left], buf[left:]
                    left -= len(chunk)
                    if hit and left == 0:
                        chunk = chunk[:-1] + bytes([chunk[-1] ^ 0x01])
                    upstream.sendall(chunk)
        except OSError:
            pass
        finally:
            _shutdown(client, upstream)
            pipe.join(timeout=10)
            client.close()
            upstream.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _shutdown(src, dst)


def _shutdown(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# -- looking at a bucket ----------------------------------------------------------------

def objects(client: Any, bucket: str, prefix: str = "web") -> dict[str, dict[str, Any]]:
    """Every object under ``prefix/`` by web-relative path: size and key."""
    out: dict[str, dict[str, Any]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []) or []:
            out[obj["Key"][len(prefix) + 1:]] = obj
    return out


def bucket_snapshot(client: Any, bucket: str, dest: Path, prefix: str = "web") -> Path:
    """The bucket's objects under ``prefix/`` as files under ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for rel in objects(client, bucket, prefix):
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(client.get_object(Bucket=bucket, Key=f"{prefix}/{rel}")["Body"].read())
    return dest


def unfinished_uploads(client: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) or []]
