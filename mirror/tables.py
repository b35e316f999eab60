"""Typed reads from one TOML table: the one place that checks a config value.

Every section's owner (``mirror.config`` for ``[upstream]``, ``[mirror]``,
``[daemon]`` and ``[metrics]``; ``mirror.plan.filterconf`` for
``[filters]``) pops its keys through a ``Section`` and calls ``done()``, so
an unknown key, a wrong type or a bad value always raises ``ConfigError``
naming ``section.key`` and the file, and a typo never falls back to a
default silently.

Pure: no I/O.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, Final

from mirror.errors import ConfigError

_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_SIZE_UNITS: Final = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_duration(value: object, *, key: str, source: str) -> float:
    """Seconds from ``30``, ``"90s"``, ``"15m"``, ``"24h"`` or ``"7d"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{source}: {key}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(f"{source}: {key}: expected a duration like 30, '90s', '15m', '24h' or '7d', got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{source}: {key}: must not be negative, got {value!r}")
    return seconds


def parse_size(value: object, *, key: str, source: str) -> int:
    """A size: an integer (bytes) or a string like "500MB" / "1.5GiB".

    Units are B, KB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of
    1024), case-insensitive.  ``key`` is the full dotted key for the message.
    """
    # bool is an int subclass; `max_file_size = true` is a mistake, not 1 byte.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(
            f"{source}: {key}: expected an integer (bytes) or a string such as "
            f'"500MB", got {type(value).__name__}'
        )
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ConfigError(
                f"{source}: {key}: cannot parse size {value!r} (use e.g. 500MB, "
                "2GiB or a number of bytes; units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        # Decimal, not float: "1.1GB" must be exactly 1_100_000_000 bytes.
        size = int(Decimal(m.group(1)) * _SIZE_UNITS[unit or ""])
    if size <= 0:
        raise ConfigError(f"{source}: {key}: must be a positive size, got {value!r}")
    return size


class Section:
    """Pops typed values out of one TOML table and complains about leftovers."""

    def __init__(self, raw: object, name: str, source: str) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        self.raw = dict(raw)
        self.name = name
        self.source = source

    def key(self, k: str) -> str:
        return f"{self.name}.{k}"

    def error(self, k: str, detail: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key(k)}: {detail}")

    def has(self, k: str) -> bool:
        return k in self.raw

    def _get(self, k: str, types: tuple[type, ...], what: str) -> Any:
        v = self.raw.pop(k)
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            raise self.error(k, f"expected {what}, got {v!r:.200}")
        return v

    def string(self, k: str, default: str) -> str:
        return default if k not in self.raw else str(self._get(k, (str,), "a string"))

    def boolean(self, k: str, default: bool) -> bool:
        return default if k not in self.raw else bool(self._get(k, (bool,), "true or false"))

    def integer(self, k: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        if k not in self.raw:
            return default
        v = int(self._get(k, (int,), "an integer"))
        if v < minimum:
            raise self.error(k, f"must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise self.error(k, f"must be <= {maximum}, got {v}")
        return v

    def number(self, k: str, default: float, *, minimum: float = 0.0) -> float:
        if k not in self.raw:
            return default
        v = float(self._get(k, (int, float), "a number"))
        if v < minimum:
            raise self.error(k, f"must be >= {minimum}, got {v}")
        return v

    def duration(self, k: str, default: float) -> float:
        if k not in self.raw:
            return default
        return parse_duration(self.raw.pop(k), key=self.key(k), source=self.source)

    def size(self, k: str) -> int | None:
        if k not in self.raw:
            return None
        return parse_size(self.raw.pop(k), key=self.key(k), source=self.source)

    def strings(self, k: str) -> list[str] | None:
        """A list of strings, or None when the key is absent."""
        if k not in self.raw:
            return None
        v = self.raw.pop(k)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.error(k, f"expected a list of strings, got {v!r:.200}")
        return list(v)

    def raw_value(self, k: str) -> object:
        """The value as TOML gave it, for checks only its owner knows."""
        return self.raw.pop(k)

    def done(self) -> None:
        if self.raw:
            bad = ", ".join(self.key(k) for k in sorted(self.raw))
            raise ConfigError(f"{self.source}: unknown key(s): {bad}")
