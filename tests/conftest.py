"""Shared fixtures for the test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakepypi import FakePyPI


@pytest.fixture
def upstream() -> Iterator[FakePyPI]:
    """A started, empty fake PyPI on 127.0.0.1 (stopped after the test)."""
    with FakePyPI(seed=0) as up:
        yield up
