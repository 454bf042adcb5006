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
