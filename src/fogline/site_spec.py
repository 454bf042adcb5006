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
  tls:                                   # the origin connection (https origins only)
    verify: true                         # check the origin's certificate (default)
    ca_file: /etc/fogline/origin-ca.pem  # trust this CA (a file on the nodes) instead
    server_name: origin.internal         # SNI and the name its certificate must carry
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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

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
CA_FILE_CHARS_MAX = 4096
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


class TlsSpec(_Model):
    """How a node's cache connects to an https origin."""

    verify: StrictBool = True  # false: any certificate (a test origin), never the default
    ca_file: str | None = Field(default=None, min_length=1, max_length=CA_FILE_CHARS_MAX)
    server_name: str | None = None  # SNI and the name checked; Host stays the origin's

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, path: str | None) -> str | None:
        if path is not None and (not path.startswith("/") or "\0" in path):
            raise ValueError(f"ca_file is an absolute path on the nodes, got {path!r}")
        return path

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, name: str | None) -> str | None:
        if name is not None and not _HOST.match(name):
            raise ValueError(f"server_name {name!r} is not a lowercase host name "
                             "without port")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> TlsSpec:
        if not self.verify and self.ca_file is not None:
            raise ValueError("ca_file has no effect with verify: false; drop one of them")
        return self


class SiteSpec(_Model):
    origin: str = Field(max_length=2048)
    hosts: list[str] = Field(default=[], max_length=HOSTS_MAX)
    path_prefixes: list[str] = Field(default=[], max_length=PREFIXES_MAX)
    cache: CacheSpec = CacheSpec()
    tls: TlsSpec | None = None
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
        if self.tls is not None and not self.origin.startswith("https://"):
            raise ValueError("tls settings apply to an https:// origin only")
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
    tls = spec.tls or TlsSpec()
    return SiteSetting(
        name=name, origin=spec.origin, hosts=tuple(spec.hosts),
        path_prefixes=tuple(spec.path_prefixes),
        memory_bytes=spec.cache.memory_mb * 1024 * 1024,
        disk_bytes=spec.cache.disk_mb * 1024 * 1024,
        stale_if_error_s=parse_interval(stale) if stale is not None else 0.0,
        tls_verify=tls.verify, tls_ca_file=tls.ca_file, tls_server_name=tls.server_name)
