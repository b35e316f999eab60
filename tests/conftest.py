"""Shared fixtures for the test suite."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.harness.fakepypi import FakePyPI


@pytest.fixture
def upstream() -> Iterator[FakePyPI]:
    """A started, empty fake PyPI on 127.0.0.1 (stopped after the test)."""
    with FakePyPI(seed=0) as up:
        yield up


@pytest.fixture(autouse=True)
def _no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """``upstream.proxy = "env"`` is the default: a proxy set on the machine
    running the tests must not route the tests' loopback traffic (the tests
    that want a proxy set one themselves)."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """``cli.main`` points the root logger at the sys.stderr of the moment
    (pytest's capture); put the handlers back so later tests do not log into
    a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
