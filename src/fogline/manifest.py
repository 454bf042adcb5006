"""An app's manifest: `fogline.yaml` in its directory, validated.

The manifest, in the Kubernetes style of every fogline manifest:

```yaml
apiVersion: fogline/v1
kind: App
metadata:
  name: factory            # the App(...) name in the code; 1-63 of a-z 0-9 '-'
  version: 1.2.0           # free text, 1-64 characters; rollouts compare it for equality
spec:
  entrypoint: factory_app:app         # module:attribute, imported from the app directory
  collections:                        # replicated state the app uses (created at the hub)
    - {name: machines, type: map, scope: region}     # type map|counter|set,
                                                     # scope node|region|global
  streams:                            # upstream streams the app emits to
    - {name: summaries, priority: 5, bandwidth_bps: 50000, quota_bytes: 10000000,
       overflow: block}               # all but name optional; see core.outbox.StreamPolicy
  config: {summary_every_samples: 100}   # any mapping; handlers read it as ctx.config
  limits:                             # all optional; the defaults are shown
    timeout: 10s                      # a handler running longer gets 504 / is cancelled
    memory_mb: 256                    # a worker above this RSS is replaced
    request_body_bytes: 1048576       # larger request bodies get 413
    workers: 1                        # worker processes serving the app's routes
  requirements: []                    # optional pip requirement strings (see below)
```

Unknown fields are errors (a typo must not be silently ignored), and every error is a
`ConfigError` naming the file and the field (`fogline.yaml: spec.streams.0.overflow:
...`). `requirements` are pip requirement strings the runtime installs into a per-app
virtual environment; an app without them runs on the node's own interpreter.

The hub validates it on apply; the node when it runs the app
(`fogline.node.apps.manifest.load_app` also imports the entrypoint).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fogline.core.approutes import parse_interval
from fogline.core.crdt import CollectionType, Scope
from fogline.core.outbox import DEFAULT_QUOTA_BYTES, Overflow, StreamPolicy
from fogline.deploy_spec import PinSpec, PlacementSpec, RolloutSpec
from fogline.errors import ConfigError

MANIFEST_FILE = "fogline.yaml"
MANIFEST_BYTES_MAX = 1024 * 1024
REQUIREMENTS_MAX = 200
DEFAULT_TIMEOUT = "10s"
TIMEOUT_S_MAX = 3600.0
REQUEST_BODY_BYTES_MAX = 32 * 1024 * 1024
WORKERS_MAX = 64

_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_RESOURCE_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # as core.sync checks collection names
_ENTRYPOINT = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Metadata(_Model):
    name: str = Field(pattern=_NAME)
    version: str = Field(min_length=1, max_length=64)


class CollectionSpec(_Model):
    name: str = Field(pattern=_RESOURCE_NAME)
    type: CollectionType
    scope: Scope


class StreamSpec(_Model):
    name: str = Field(pattern=_RESOURCE_NAME)
    priority: int = 0
    bandwidth_bps: float | None = Field(default=None, gt=0)
    quota_bytes: int = Field(default=DEFAULT_QUOTA_BYTES, gt=0)
    overflow: Overflow = "block"

    def policy(self) -> StreamPolicy:
        return StreamPolicy(self.priority, self.bandwidth_bps, self.quota_bytes, self.overflow)


class Limits(_Model):
    timeout: str | float = DEFAULT_TIMEOUT
    memory_mb: int = Field(default=256, ge=32, le=1024 * 1024)
    request_body_bytes: int = Field(default=1024 * 1024, gt=0, le=REQUEST_BODY_BYTES_MAX)
    workers: int = Field(default=1, ge=1, le=WORKERS_MAX)

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: str | float) -> str | float:
        try:
            seconds = parse_interval(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        if seconds > TIMEOUT_S_MAX:
            raise ValueError(f"must be at most {TIMEOUT_S_MAX:.0f}s")
        return value

    @property
    def timeout_s(self) -> float:
        return parse_interval(self.timeout)


class AppSpec(_Model):
    entrypoint: str
    collections: list[CollectionSpec] = []
    streams: list[StreamSpec] = []
    config: dict[str, Any] = {}
    requirements: list[str] = Field(default=[], max_length=REQUIREMENTS_MAX)
    limits: Limits = Limits()
    # Where and how the hub deploys the app (fogline.deploy_spec); the node ignores them.
    placement: PlacementSpec | None = None
    rollout: RolloutSpec | None = None
    pins: list[PinSpec] | None = None

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, value: str) -> str:
        if not _ENTRYPOINT.match(value):
            raise ValueError("must be 'module:attribute', e.g. 'factory_app:app'")
        return value

    @field_validator("collections", "streams")
    @classmethod
    def _unique(cls, value: list[Any]) -> list[Any]:
        names = [item.name for item in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"names must be unique, repeated: {', '.join(repeated)}")
        return value


class AppManifest(_Model):
    api_version: Literal["fogline/v1"] = Field(alias="apiVersion")
    kind: Literal["App"]
    metadata: Metadata
    spec: AppSpec


def _field_path(location: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in location) or "(document)"


def _describe(error: Any) -> str:
    """`field.path: message (got value)`, without pydantic's 'Value error, ' prefix."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] not in ("missing", "extra_forbidden"):
        shown = repr(error.get("input"))
        message += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
    return f"{_field_path(error['loc'])}: {message}"


def parse_manifest(data: Any, source: str = MANIFEST_FILE) -> AppManifest:
    """Validate a parsed YAML document; ConfigError names `source` and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping with apiVersion, kind, metadata, "
                          f"spec; got {type(data).__name__}")
    try:
        return AppManifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise ConfigError(f"{source}: {problems}") from exc


def read_manifest(directory: Path) -> AppManifest:
    """Read and validate `DIR/fogline.yaml`."""
    path = Path(directory) / MANIFEST_FILE
    try:
        size = path.stat().st_size
        if size > MANIFEST_BYTES_MAX:
            raise ConfigError(f"{path}: {size} bytes exceeds {MANIFEST_BYTES_MAX}")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no app manifest here (an app directory needs "
                          f"{MANIFEST_FILE})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_manifest(data, str(path))
