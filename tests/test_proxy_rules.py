"""``[upstream] proxy``: the rules, decided from the config and the environment."""

from __future__ import annotations

import pytest

from mirror.errors import ConfigError
from mirror.upstream.proxy import ProxyError, mask, rules
from tests.harness.e2e import make_config


def test_environment_as_pip_and_curl_read_it() -> None:
    env = {"HTTPS_PROXY": "http://corp:3128", "http_proxy": "http://plain:8080", "NO_PROXY": "internal.example, .lan"}
    r = rules("env", env)
    assert r.for_url("https", "pypi.org") == "http://corp:3128"
    assert r.for_url("http", "pypi.org") == "http://plain:8080"
    assert r.for_url("https", "internal.example") is None
    assert r.for_url("https", "a.b.internal.example") is None
    assert r.for_url("https", "notinternal.example") == "http://corp:3128"
    assert r.for_url("https", "box.lan") is None
    assert "HTTPS_PROXY" in r.describe() and "HTTP_PROXY" in r.describe()


def test_lower_case_wins_and_all_proxy_fills_in() -> None:
    r = rules("env", {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2", "ALL_PROXY": "http://all:3"})
    assert r.for_url("https", "x") == "http://lower:1"
    assert r.for_url("http", "x") == "http://all:3"
    assert not rules("env", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}).active
    assert not rules("env", {}).active and rules("env", {}).for_url("https", "x") is None


def test_none_ignores_the_environment_and_a_url_covers_everything() -> None:
    assert rules("none", {"HTTPS_PROXY": "http://p:1"}).for_url("https", "x") is None
    r = rules("http://user:s3cret@proxy:3128", {"NO_PROXY": "x"})
    assert r.for_url("https", "x") == r.for_url("http", "y") == "http://user:s3cret@proxy:3128"


def test_passwords_never_show() -> None:
    assert mask("http://user:s3cret@proxy:3128") == "http://user:***@proxy:3128"
    assert mask("http://proxy:3128") == "http://proxy:3128"
    r = rules("env", {"HTTPS_PROXY": "http://u:p%40ss@proxy:3128"})
    assert "p%40ss" not in r.describe() and "u:***@proxy:3128" in r.describe()
    with pytest.raises(ProxyError) as e:
        rules("env", {"HTTPS_PROXY": "ftp://u:hidden@proxy:21"})
    assert "hidden" not in str(e.value) and "HTTPS_PROXY" in str(e.value)


def test_config_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert make_config("http://127.0.0.1:1", tmp_path / "m").upstream.proxy == "env"
    cfg = make_config("http://127.0.0.1:1", tmp_path / "m", upstream={"proxy": "http://proxy:3128"})
    assert cfg.upstream.proxy == "http://proxy:3128"
    with pytest.raises(ConfigError, match="upstream.proxy"):
        make_config("http://127.0.0.1:1", tmp_path / "m", upstream={"proxy": "socks5://proxy:1080"})
    with pytest.raises(ConfigError, match="bad port"):
        make_config("http://127.0.0.1:1", tmp_path / "m", upstream={"proxy": "http://proxy:http"})
