"""Versions from untrusted text, parsed once: a project's files repeat the
same few hundred version strings, and filters, the filter config and the
renderer all ask.  Pure."""

from __future__ import annotations

from functools import lru_cache

from packaging.version import InvalidVersion, Version


@lru_cache(maxsize=8192)
def parse_version(text: str) -> Version | None:
    """``Version(text)``, or None when ``text`` is not a PEP 440 version."""
    try:
        return Version(text)
    except InvalidVersion:
        return None
