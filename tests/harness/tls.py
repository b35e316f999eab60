"""A test CA and a server certificate for 127.0.0.1, made by the openssl CLI
(no Python dependency), and an https server of our own on top of it."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_ca(d: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) in ``d``; the server
    certificate is for IP 127.0.0.1, signed by the CA, valid two days."""
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mirror test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (d / "ext.cnf").write_text("subjectAltName = IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "ext.cnf", "-out", "server.pem")
    return d / "ca.pem", d / "server.pem", d / "server.key"
