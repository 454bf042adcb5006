"""A `kind: Site` manifest: an origin the nodes front as a shared HTTP cache.

```yaml
apiVersion: fogline/v1
kind: Site
metadata: {name: catalog}
spec:
  origin: http://127.0.0.1:9000          # http or https URL
  hosts: [catalog.example.com]           # Host headers served (without port)
  path_prefixes: [/catalog]              # and/or path prefixes on the node's front
  cache: {memory_mb: 64, disk_mb: 512, stale_if_error: 5m}
  placement: {selector: {regions: [eu-west]}}   # default: every node
```

Validation errors are ConfigErrors naming the field; `to_setting` turns a spec into the
`SiteSetting` a node's desired state carries.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fogline.core.approutes import parse_interval
from fogline.deploy_spec import PlacementSpec
from fogline.errors import ConfigError
from fogline.protocol import SiteSetting

# The node's own paths (fogline.node.apps.front.RESERVED_NAMES): a site may not take them.
NODE_PATHS = ("/healthz", "/metrics", "/local")
HOSTS_MAX = 100
PREFIXES_MAX = 100
MEMORY_MB_MAX = 64 * 1024
DISK_MB_MAX = 1024 * 1024
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")  # also the cache file's name
_HOST = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CacheSpec(_Model):
    memory_mb: int = Field(default=64, gt=0, le=MEMORY_MB_MAX)
    disk_mb: int = Field(default=512, gt=0, le=DISK_MB_MAX)
    stale_if_error: str | float | None = None  # a site rule; None: only what responses allow

    @field_validator("stale_if_error")
    @classmethod
    def _interval(cls, value: str | float | None) -> str | float | None:
        if value is not None:
            try:
                parse_interval(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from exc
        return value


class SiteSpec(_Model):
    origin: str = Field(max_length=2048)
    hosts: list[str] = Field(default=[], max_length=HOSTS_MAX)
    path_prefixes: list[str] = Field(default=[], max_length=PREFIXES_MAX)
    cache: CacheSpec = CacheSpec()
    placement: PlacementSpec = PlacementSpec()

    @field_validator("origin")
    @classmethod
    def _origin(cls, origin: str) -> str:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the origin is an http:// or https:// URL, got {origin!r}")
        return origin

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if not _HOST.match(host):
                raise ValueError(f"{host!r} is not a lowercase host name without port")
        return hosts

    @field_validator("path_prefixes")
    @classmethod
    def _prefixes(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            if not prefix.startswith("/") or len(prefix) > 1024:
                raise ValueError(f"a path prefix starts with '/', got {prefix!r}")
            taken = next((p for p in NODE_PATHS if overlaps(prefix, p)), None)
            if taken is not None:
                raise ValueError(f"{prefix!r} collides with the node's own {taken}")
        return prefixes

    @model_validator(mode="after")
    def _something_served(self) -> SiteSpec:
        if not self.hosts and not self.path_prefixes:
            raise ValueError("hosts or path_prefixes: a site serves at least one of them")
        return self


def overlaps(prefix: str, path: str) -> bool:
    """Whether requests matched by `prefix` and by `path` (both whole segments) can meet."""
    a, b = prefix.rstrip("/"), path.rstrip("/")
    return a == b or b.startswith(a + "/") or a.startswith(b + "/")


def check_site_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"metadata.name: invalid site name {name!r}: use 1-63 of "
                          "[a-z0-9-], starting with a letter or digit")
    return name


def site_spec(spec: Mapping[str, Any], source: str) -> SiteSpec:
    """A Site manifest's `spec`, validated; ConfigError naming the field."""
    from pydantic import ValidationError

    try:
        return SiteSpec.model_validate(spec)
    except ValidationError as exc:
        problems = "; ".join(
            f"spec{''.join('.' + str(p) for p in e['loc'])}: "
            f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from exc


def to_setting(name: str, spec: SiteSpec) -> SiteSetting:
    stale = spec.cache.stale_if_error
    return SiteSetting(
        name=name, origin=spec.origin, hosts=tuple(spec.hosts),
        path_prefixes=tuple(spec.path_prefixes),
        memory_bytes=spec.cache.memory_mb * 1024 * 1024,
        disk_bytes=spec.cache.disk_mb * 1024 * 1024,
        stale_if_error_s=parse_interval(stale) if stale is not None else 0.0)
