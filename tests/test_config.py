"""`mirror.config.load_config` on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirror.config import Config, load_config, parse_duration
from mirror.errors import ConfigError

MINIMAL = """
[upstream]
user_agent = "acme-mirror (ops@example.com)"

[mirror]
directory = "data"
"""

FULL = """
[upstream]
url = "https://pypi.example.org/"
feed = "changelog"
timeout = 12.5
user_agent = "acme-mirror (https://example.com/contact)"
allow_http = false
retries = 7
backoff = 0.5
max_backoff = 30
stale_retries = 2
xmlrpc_interval = 0.25
max_page_bytes = 2048

[mirror]
directory = "/srv/pypi"
workers = 4
json_api = true
name = "mirror-1.example"
retire_after = "2d"
max_retire = 10

[daemon]
poll_interval = "90s"
max_backoff = "15m"
stop_timeout = 5

[metrics]
listen = "0.0.0.0:9100"
"""


def write(tmp_path: Path, text: str, name: str = "mirror.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def refused(tmp_path: Path, text: str) -> str:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg, msg
    return msg


def test_full_valid_file(tmp_path: Path) -> None:
    p = write(tmp_path, FULL)
    cfg = load_config(p)
    u = cfg.upstream
    assert u.url == "https://pypi.example.org"  # trailing slash dropped
    assert u.feed == "changelog"
    assert u.timeout == 12.5
    assert u.user_agent == "acme-mirror (https://example.com/contact)"
    assert u.allow_http is False
    assert (u.retries, u.backoff, u.max_backoff, u.stale_retries) == (7, 0.5, 30.0, 2)
    assert (u.xmlrpc_interval, u.max_page_bytes) == (0.25, 2048)
    m = cfg.mirror
    assert m.directory == Path("/srv/pypi")
    assert (m.workers, m.json_api, m.name, m.retire_after, m.max_retire) == (4, True, "mirror-1.example", 172800.0, 10)
    d = cfg.daemon
    assert (d.poll_interval, d.max_backoff, d.stop_timeout) == (90.0, 900.0, 5.0)
    assert cfg.metrics.listen == "0.0.0.0:9100"
    assert cfg.source == str(p)


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL)
    assert cfg.upstream.url == "https://pypi.org"
    assert cfg.upstream.feed == "auto"
    assert cfg.upstream.retries == 5
    assert cfg.mirror.workers == 16
    assert cfg.daemon.poll_interval == 60.0
    assert cfg.metrics.listen == "127.0.0.1:9237"


def test_metrics_can_be_disabled(tmp_path: Path) -> None:
    assert load_text(tmp_path, MINIMAL + '\n[metrics]\nlisten = ""\n').metrics.listen == ""


# -- unknown keys and sections --------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("[upstream]\nuser_agent = 'x (a@b.c)'\nurll = 'https://x'\n", "upstream.urll"),
        ("[upstream]\nuser_agent = 'x (a@b.c)'\nretry = 3\n", "upstream.retry"),
        ("[daemon]\npoll = 5\n", "daemon.poll"),
        ("[metrics]\nport = 9100\n", "metrics.port"),
        ("[mirrors]\nx = 1\n", "mirrors"),
        ("[logging]\nlevel = 'debug'\n", "logging"),
        ("workers = 4\n", "workers"),
    ],
)
def test_unknown_key_or_section_named(tmp_path: Path, extra: str, named: str) -> None:
    base = MINIMAL if "[upstream]" not in extra else "[mirror]\ndirectory = 'data'\n"
    # Top-level keys must come before any table.
    text = extra + base if not extra.startswith("[") else base + extra
    msg = refused(tmp_path, text)
    assert named in msg


def test_unknown_key_in_mirror_section(tmp_path: Path) -> None:
    msg = refused(tmp_path, MINIMAL.replace('directory = "data"', 'directory = "data"\nworker = 3\nzzz = 1'))
    assert "mirror.worker" in msg
    assert "mirror.zzz" in msg


# -- wrong types and values -------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "line", "named"),
    [
        ("upstream", 'retries = "5"', "upstream.retries"),
        ("upstream", "retries = true", "upstream.retries"),
        ("upstream", "retries = 1.5", "upstream.retries"),
        ("upstream", "retries = -1", "upstream.retries"),
        ("upstream", 'timeout = "30"', "upstream.timeout"),
        ("upstream", "timeout = 0", "upstream.timeout"),
        ("upstream", "timeout = false", "upstream.timeout"),
        ("upstream", "allow_http = 1", "upstream.allow_http"),
        ("upstream", 'allow_http = "yes"', "upstream.allow_http"),
        ("upstream", "url = 5", "upstream.url"),
        ("upstream", "max_page_bytes = 100", "upstream.max_page_bytes"),
        ("mirror", "workers = 0", "mirror.workers"),
        ("mirror", 'workers = "16"', "mirror.workers"),
        ("mirror", "json_api = 1", "mirror.json_api"),
        ("mirror", 'name = "bad name"', "mirror.name"),
        ("mirror", 'name = "../x"', "mirror.name"),
        ("mirror", "retire_after = true", "mirror.retire_after"),
        ("daemon", 'poll_interval = "soon"', "daemon.poll_interval"),
        ("daemon", "poll_interval = -5", "daemon.poll_interval"),
        ("daemon", "stop_timeout = [1]", "daemon.stop_timeout"),
        ("metrics", 'listen = "9100"', "metrics.listen"),
        ("metrics", 'listen = "host:99999"', "metrics.listen"),
        ("metrics", 'listen = ":9100"', "metrics.listen"),
        ("metrics", "listen = 9100", "metrics.listen"),
    ],
)
def test_wrong_types_and_values(tmp_path: Path, section: str, line: str, named: str) -> None:
    text = MINIMAL.replace(f"[{section}]\n", f"[{section}]\n{line}\n") if f"[{section}]" in MINIMAL \
        else MINIMAL + f"\n[{section}]\n{line}\n"
    assert line in text
    assert named in refused(tmp_path, text)


@pytest.mark.parametrize("section", ["upstream", "mirror", "daemon", "metrics", "filters"])
def test_section_must_be_a_table(tmp_path: Path, section: str) -> None:
    rest = {
        "upstream": '[mirror]\ndirectory = "data"\n',
        "mirror": '[upstream]\nuser_agent = "x (a@b.c)"\n',
    }.get(section, MINIMAL)
    text = f"{section} = 5\n" + rest
    msg = refused(tmp_path, text)
    assert section in msg


def test_directory_required(tmp_path: Path) -> None:
    msg = refused(tmp_path, '[upstream]\nuser_agent = "x (a@b.c)"\n')
    assert "mirror.directory" in msg


@pytest.mark.parametrize("value", ['""', '"   "'])
def test_directory_must_not_be_empty(tmp_path: Path, value: str) -> None:
    msg = refused(tmp_path, MINIMAL.replace('"data"', value))
    assert "mirror.directory" in msg


# -- feed, http, user agent -------------------------------------------------------------


@pytest.mark.parametrize("feed", ["changelog", "simple", "auto"])
def test_good_feeds(tmp_path: Path, feed: str) -> None:
    cfg = load_text(tmp_path, MINIMAL.replace("[upstream]\n", f'[upstream]\nfeed = "{feed}"\n'))
    assert cfg.upstream.feed == feed


@pytest.mark.parametrize("feed", ["xmlrpc", "", "Changelog", "rss"])
def test_bad_feed(tmp_path: Path, feed: str) -> None:
    msg = refused(tmp_path, MINIMAL.replace("[upstream]\n", f'[upstream]\nfeed = "{feed}"\n'))
    assert "upstream.feed" in msg


def test_http_upstream_refused_without_allow_http(tmp_path: Path) -> None:
    msg = refused(tmp_path, MINIMAL.replace("[upstream]\n", '[upstream]\nurl = "http://pypi.internal"\n'))
    assert "allow_http" in msg


def test_http_upstream_with_allow_http(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path, MINIMAL.replace("[upstream]\n", '[upstream]\nurl = "http://pypi.internal"\nallow_http = true\n')
    )
    assert cfg.upstream.url == "http://pypi.internal"
    assert cfg.upstream.allow_http is True


@pytest.mark.parametrize("url", ["ftp://pypi.org", "pypi.org", "file:///srv/pypi", "https://", ""])
def test_bad_upstream_url(tmp_path: Path, url: str) -> None:
    msg = refused(tmp_path, MINIMAL.replace("[upstream]\n", f'[upstream]\nurl = "{url}"\n'))
    assert "upstream.url" in msg


@pytest.mark.parametrize("ua", ["", "   ", "acme-mirror", "acme-mirror/1.0 (ops team)", "me@localhost"])
def test_user_agent_without_contact_refused(tmp_path: Path, ua: str) -> None:
    msg = refused(tmp_path, MINIMAL.replace("acme-mirror (ops@example.com)", ua))
    assert "upstream.user_agent" in msg


def test_user_agent_missing_refused(tmp_path: Path) -> None:
    assert "upstream.user_agent" in refused(tmp_path, '[mirror]\ndirectory = "d"\n')


@pytest.mark.parametrize("ua", ["x (ops@example.com)", "x +https://example.com/mirror", "ops@example.org"])
def test_user_agent_with_contact(tmp_path: Path, ua: str) -> None:
    cfg = load_text(tmp_path, MINIMAL.replace("acme-mirror (ops@example.com)", ua))
    assert cfg.upstream.user_agent == ua


# -- durations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml_value", "seconds"),
    [('"90s"', 90.0), ('"15m"', 900.0), ('"24h"', 86400.0), ('"7d"', 604800.0), ("30", 30.0),
     ("2.5", 2.5), ('"45"', 45.0), ('"1.5m"', 90.0), ('" 10 s "', 10.0), ("0", 0.0)],
)
def test_durations(tmp_path: Path, toml_value: str, seconds: float) -> None:
    cfg = load_text(tmp_path, MINIMAL + f"\n[daemon]\npoll_interval = {toml_value}\n")
    assert cfg.daemon.poll_interval == seconds


@pytest.mark.parametrize("toml_value", ['"bad"', '"10w"', '"-5s"', '"5 minutes"', '""', "-1", "true", '"1e3"'])
def test_bad_durations(tmp_path: Path, toml_value: str) -> None:
    assert "daemon.poll_interval" in refused(tmp_path, MINIMAL + f"\n[daemon]\npoll_interval = {toml_value}\n")


def test_parse_duration_direct() -> None:
    assert parse_duration("7d", key="k", source="s") == 604800.0
    with pytest.raises(ConfigError, match="s: k:"):
        parse_duration("bad", key="k", source="s")


# -- paths ---------------------------------------------------------------------------


def test_relative_directory_resolved_against_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc" / "mirror"
    conf_dir.mkdir(parents=True)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    p = write(conf_dir, MINIMAL.replace('"data"', '"../../srv/data"'))
    cfg = load_config(p)
    assert cfg.mirror.directory == (tmp_path / "srv" / "data").resolve()
    assert cfg.mirror.directory.is_absolute()

    # Also when the config path itself is given relative to the cwd.
    rel = os.path.relpath(p, elsewhere)
    assert load_config(rel).mirror.directory == (tmp_path / "srv" / "data").resolve()


def test_home_directory_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_text(tmp_path, MINIMAL.replace('"data"', '"~/pypi"'))
    assert cfg.mirror.directory == (tmp_path / "home" / "pypi").resolve()


# -- unreadable / invalid files ------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read") as ei:
        load_config(p)
    assert str(p) in str(ei.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path: Path) -> None:
    p = write(tmp_path, MINIMAL)
    p.chmod(0)
    try:
        with pytest.raises(ConfigError, match="cannot read"):
            load_config(p)
    finally:
        p.chmod(0o600)


@pytest.mark.parametrize("text", ["[upstream\n", "x = = 1\n", "[mirror]\ndirectory = \n", "a = 1\na = 2\n"])
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    msg = refused(tmp_path, text)
    assert "not valid TOML" in msg


def test_invalid_utf8(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_bytes(b'[mirror]\ndirectory = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
