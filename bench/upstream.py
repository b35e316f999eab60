"""The benchmark's upstream: nginx for pages and files, a small Python server for XML-RPC.

nginx (Debian's ``/usr/sbin/nginx``) serves everything static at full speed:
``/packages/...`` files, ``/simple/...`` PEP 691 pages and the legacy
``/pypi/<name>/json`` API, each page with its ``X-PyPI-Last-Serial`` header
(from the corpus' ``serials.map``, as PyPI sends it; bandersnatch refuses a
page without it).  nginx cannot answer XML-RPC, so it
proxies ``POST /pypi`` to ``FeedServer`` (a ``ThreadingHTTPServer`` in its
own process).  The mirror only ever talks to nginx, so nginx's access log
(method, URI, status, request bytes, response bytes) counts every upstream
request and byte at the server.

Without nginx, ``FeedServer`` also serves the static tree itself (slower;
the report says which server served the files).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import xmlrpc.client
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

NGINX = "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the XML-RPC feed -------------------------------------------------------------


class _FeedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FeedHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        feed = self.server
        if self.path == "/_bench/events":
            with feed.lock:
                for e in json.loads(body):
                    feed.journal.append(tuple(e))
                    feed.serial = max(feed.serial, int(e[4]))
                    feed.listing[e[0]] = int(e[4])
            self._reply(200, b"ok\n", "text/plain")
            return
        params, method = xmlrpc.client.loads(body)
        with feed.lock:
            if method == "changelog_last_serial":
                result: Any = feed.serial
            elif method == "changelog_since_serial":
                result = [list(e) for e in feed.journal if e[4] > params[0]][:50000]
            elif method == "list_packages_with_serial":
                result = dict(feed.listing)
            else:
                self._reply(200, xmlrpc.client.dumps(xmlrpc.client.Fault(-32601, str(method)), methodresponse=True).encode(), "text/xml")
                return
        self._reply(200, xmlrpc.client.dumps((result,), methodresponse=True, allow_none=True).encode(), "text/xml")

    def do_GET(self) -> None:
        # Only used when nginx is absent: serve the static tree.
        root = self.server.static_root
        path = self.path.split("?", 1)[0]
        if root is None or ".." in path:
            self._reply(404, b"not found\n", "text/plain")
            return
        target = root / path.lstrip("/")
        if target.is_dir():
            target = target / "index.v1_json"
        try:
            data = target.read_bytes()
        except OSError:
            self._reply(404, b"not found\n", "text/plain")
            return
        ctype = "application/vnd.pypi.simple.v1+json" if target.name.endswith("v1_json") else "application/octet-stream"
        self._reply(200, data, ctype)


class _FeedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, feed: dict[str, Any], static_root: Path | None) -> None:
        super().__init__(("127.0.0.1", port), _FeedHandler)
        self.lock = threading.Lock()
        self.serial = int(feed.get("serial", 0))
        self.listing: dict[str, int] = dict(feed.get("listing", {}))
        self.journal: list[tuple[Any, ...]] = [tuple(e) for e in feed.get("journal", [])]
        self.static_root = static_root

    def server_bind(self) -> None:
        # No FQDN lookup.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()


def feed_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.upstream")
    p.add_argument("--feed", required=True, help="JSON: serial, listing, journal")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--static", help="also serve this tree (no nginx)")
    args = p.parse_args(argv)
    feed = json.loads(Path(args.feed).read_bytes())
    server = _FeedHTTPServer(args.port, feed, Path(args.static) if args.static else None)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print("ready", flush=True)
    server.serve_forever(poll_interval=0.2)
    return 0


# -- the whole upstream -------------------------------------------------------------

_NGINX_CONF = """\
worker_processes 2;
daemon off;
master_process on;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    log_format bench '$request_method $request_uri $status $request_length $bytes_sent';
    sendfile on; tcp_nopush on; tcp_nodelay on;
    keepalive_requests 1000000; keepalive_timeout 120s;
    open_file_cache max=20000 inactive=60s;
    default_type application/octet-stream;
    types {{ application/vnd.pypi.simple.v1+json v1_json; }}
    client_body_temp_path {run}/body; proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi; uwsgi_temp_path {run}/uwsgi; scgi_temp_path {run}/scgi;
    upstream feed {{ server 127.0.0.1:{feed_port}; keepalive 8; }}
    {gzip}
    map_hash_bucket_size 128;
    map_hash_max_size 1048576;
    map $uri $pypi_serial {{ default ""; {serials} }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        access_log {run}/access.log bench;
        location /simple/ {{ index index.v1_json; add_header X-PyPI-Last-Serial $pypi_serial always; }}
        location /pypi/ {{ default_type application/json; add_header X-PyPI-Last-Serial $pypi_serial always; }}
        location = /pypi {{
            proxy_pass http://feed;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


@dataclass
class Traffic:
    requests: int
    request_bytes: int
    response_bytes: int
    by_kind: dict[str, int]

    @property
    def total_bytes(self) -> int:
        return self.request_bytes + self.response_bytes


class Upstream:
    """nginx + FeedServer over a static ``root``; ``with Upstream(...) as up: up.url``."""

    def __init__(self, root: Path, run: Path, *, use_nginx: bool = True, gzip: bool = False) -> None:
        self.root = root
        # As PyPI's CDN does: gzip for the JSON pages and the XML-RPC answers
        # of clients that ask for it (level 1, nginx's default).
        self.gzip = gzip
        self.run = run
        self.use_nginx = use_nginx and os.path.exists(NGINX)
        self.server = "nginx (files and pages) + Python XML-RPC behind it" if self.use_nginx else \
            "Python ThreadingHTTPServer (nginx not found)"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = 0
        self.feed_port = 0
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def feed_url(self) -> str:
        return f"http://127.0.0.1:{self.feed_port}"

    def __enter__(self) -> Upstream:
        self.run.mkdir(parents=True, exist_ok=True)
        self.feed_port = free_port()
        feed = subprocess.Popen(
            [sys.executable, "-m", "bench.upstream", "--feed", str(self.root / "feed.json"),
             "--port", str(self.feed_port)] + ([] if self.use_nginx else ["--static", str(self.root)]),
            stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent,
        )
        self.procs.append(feed)
        assert feed.stdout is not None
        if feed.stdout.readline().strip() != b"ready":
            self.__exit__(None, None, None)
            raise RuntimeError("feed server did not start")
        if not self.use_nginx:
            self.port = self.feed_port
            return self
        self.port = free_port()
        conf = self.run / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(
            run=self.run, root=self.root, port=self.port, feed_port=self.feed_port,
            serials=f"include {self.root / 'serials.map'};" if (self.root / "serials.map").exists() else "",
            user="user root root;" if os.geteuid() == 0 else "",
            gzip="gzip on; gzip_proxied any; gzip_min_length 1024; "
                 "gzip_types application/vnd.pypi.simple.v1+json application/json text/xml;" if self.gzip else "",
        ))
        (self.run / "access.log").touch()
        nginx = subprocess.Popen([NGINX, "-p", str(self.run), "-c", str(conf), "-e", str(self.run / "error.log")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(nginx)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if nginx.poll() is not None:
                    break
                time.sleep(0.05)
        err = (self.run / "error.log").read_text(errors="replace") if (self.run / "error.log").exists() else ""
        self.__exit__(None, None, None)
        raise RuntimeError(f"nginx did not start: {err[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                # nginx: SIGQUIT is its graceful stop.
                p.send_signal(signal.SIGQUIT if p is not self.procs[0] else signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def add_events(self, events: list[list[object]]) -> None:
        """Append journal rows (name, version, ts, action, serial) to the XML-RPC feed."""
        import urllib.request

        req = urllib.request.Request(self.feed_url + "/_bench/events", data=json.dumps(events).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    def traffic(self) -> Traffic:
        """Requests and bytes the server saw since the previous call (nginx only)."""
        log = self.run / "access.log"
        if not self.use_nginx or not log.exists():
            return Traffic(0, 0, 0, {})
        # nginx writes each line when the response is done; give the last
        # one a moment to land after the client returned.
        time.sleep(0.05)
        with open(log, "rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._log_offset += end
        t = Traffic(0, 0, 0, {})
        for line in data[:end].decode(errors="replace").splitlines():
            method, uri, _status, req_len, sent = line.split(" ")
            kind = "feed" if uri == "/pypi" else "page" if uri.startswith(("/simple/", "/pypi/")) else "file"
            t.requests += 1
            t.request_bytes += int(req_len)
            t.response_bytes += int(sent)
            t.by_kind[kind] = t.by_kind.get(kind, 0) + 1
        return t


def have_nginx() -> bool:
    return os.path.exists(NGINX) or shutil.which("nginx") is not None


if __name__ == "__main__":
    sys.exit(feed_main())
