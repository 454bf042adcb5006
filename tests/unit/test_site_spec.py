"""`kind: Site` validation: every rejection names its field."""

from __future__ import annotations

from typing import Any

import pytest

from fogline.errors import ConfigError
from fogline.protocol import SiteSetting
from fogline.site_spec import check_site_name, site_spec, to_setting

GOOD: dict[str, Any] = {"origin": "http://127.0.0.1:9000", "path_prefixes": ["/catalog"]}


def rejected(**changes: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        site_spec({**GOOD, **changes}, "site.yaml")
    return str(caught.value)


def test_a_full_site_becomes_a_setting() -> None:
    spec = site_spec({**GOOD, "hosts": ["catalog.example.com"],
                      "cache": {"memory_mb": 8, "disk_mb": 16, "stale_if_error": "5m"},
                      "placement": {"selector": {"regions": ["eu-west"]}}}, "site.yaml")
    assert to_setting("catalog", spec) == SiteSetting(
        name="catalog", origin="http://127.0.0.1:9000", hosts=("catalog.example.com",),
        path_prefixes=("/catalog",), memory_bytes=8 * 1024**2, disk_bytes=16 * 1024**2,
        stale_if_error_s=300.0)
    assert to_setting("catalog", site_spec(GOOD, "s")).stale_if_error_s == 0.0


@pytest.mark.parametrize("origin", ["ftp://example.com", "example.com", "http://"])
def test_the_origin_is_an_http_or_https_url(origin: str) -> None:
    assert "spec.origin" in rejected(origin=origin)


def test_hosts_or_prefixes_are_required() -> None:
    assert "hosts or path_prefixes" in rejected(path_prefixes=[])


def test_a_prefix_starts_with_a_slash() -> None:
    assert "spec.path_prefixes" in rejected(path_prefixes=["catalog"])


@pytest.mark.parametrize("prefix", ["/", "/healthz", "/metrics/", "/local/x"])
def test_a_prefix_may_not_take_the_nodes_own_paths(prefix: str) -> None:
    message = rejected(path_prefixes=[prefix])
    assert "spec.path_prefixes" in message and "collides" in message


def test_a_prefix_sharing_only_letters_with_a_node_path_is_fine() -> None:
    assert site_spec({**GOOD, "path_prefixes": ["/healthzone", "/l"]}, "s")


@pytest.mark.parametrize("field", ["memory_mb", "disk_mb"])
@pytest.mark.parametrize("size", [0, -1])
def test_sizes_are_positive(field: str, size: int) -> None:
    assert f"spec.cache.{field}" in rejected(cache={field: size})


def test_stale_if_error_is_an_interval() -> None:
    assert "spec.cache.stale_if_error" in rejected(cache={"stale_if_error": "5 minutes"})


def test_unknown_fields_are_refused() -> None:
    assert "spec.ttl" in rejected(ttl=5)
    assert "spec.cache.max_mb" in rejected(cache={"max_mb": 5})


def test_hosts_are_host_names_without_port() -> None:
    assert "spec.hosts" in rejected(hosts=["catalog.example.com:8080"])


@pytest.mark.parametrize("name", ["", "../x", "Catalog", "a/b", 5])
def test_site_names_are_safe_file_names(name: Any) -> None:
    with pytest.raises(ConfigError, match=r"metadata\.name"):
        check_site_name(name)


HTTPS = {**GOOD, "origin": "https://origin.internal:8443"}


def test_tls_settings_reach_the_setting() -> None:
    spec = site_spec({**HTTPS, "tls": {"ca_file": "/etc/fogline/origin-ca.pem",
                                       "server_name": "origin.internal"}}, "s")
    setting = to_setting("catalog", spec)
    assert (setting.tls_verify, setting.tls_ca_file, setting.tls_server_name) == (
        True, "/etc/fogline/origin-ca.pem", "origin.internal")
    insecure = to_setting("catalog", site_spec({**HTTPS, "tls": {"verify": False}}, "s"))
    assert (insecure.tls_verify, insecure.tls_ca_file) == (False, None)
    default = to_setting("catalog", site_spec(HTTPS, "s"))
    assert (default.tls_verify, default.tls_ca_file, default.tls_server_name) == (
        True, None, None)


@pytest.mark.parametrize(("tls", "field", "says"), [
    ({"verify": "yes"}, "spec.tls.verify", "boolean"),
    ({"verify": 1}, "spec.tls.verify", "boolean"),
    ({"ca_file": "certs/ca.pem"}, "spec.tls.ca_file", "absolute path"),
    ({"ca_file": ""}, "spec.tls.ca_file", "at least 1"),
    ({"ca_file": "/" + "a" * 5000}, "spec.tls.ca_file", "at most"),
    ({"server_name": "Origin.Internal"}, "spec.tls.server_name", "lowercase host"),
    ({"server_name": "origin.internal:8443"}, "spec.tls.server_name", "without port"),
    ({"verify": False, "ca_file": "/ca.pem"}, "spec.tls", "no effect with verify: false"),
    ({"ciphers": "ALL"}, "spec.tls.ciphers", "Extra inputs"),
    ("strict", "spec.tls", "valid dictionary"),
])
def test_bad_tls_settings_are_refused_naming_the_field(tls: Any, field: str,
                                                       says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        site_spec({**HTTPS, "tls": tls}, "site.yaml")
    assert field in str(caught.value) and says in str(caught.value)


def test_tls_settings_need_an_https_origin() -> None:
    message = rejected(tls={"verify": True})
    assert "spec" in message and "https:// origin only" in message
