"""An app directory: its `fogline.yaml` manifest and the `App` object its code defines.

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
  requirements: []                    # optional pip requirement strings (see below)
```

Unknown fields are errors (a typo must not be silently ignored), and every error is a
`ConfigError` naming the file and the field (`fogline.yaml: spec.streams.0.overflow:
...`). `requirements` are pip requirement strings the runtime installs into a per-app
virtual environment; an app without them runs on the node's own interpreter.

`load_app` imports the entrypoint under a unique module name with the app directory on
`sys.path` only while importing, so two apps with a module of the same name (or two
versions of one app) do not see each other's code.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import sys
import threading
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fogline.app import App
from fogline.core.crdt import CollectionType, Scope
from fogline.core.outbox import DEFAULT_QUOTA_BYTES, Overflow, StreamPolicy
from fogline.errors import ConfigError

MANIFEST_FILE = "fogline.yaml"
MANIFEST_BYTES_MAX = 1024 * 1024
REQUIREMENTS_MAX = 200

_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_RESOURCE_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # as core.sync checks collection names
_ENTRYPOINT = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*)$")
_import_lock = threading.Lock()
_import_counter = itertools.count(1)


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


class AppSpec(_Model):
    entrypoint: str
    collections: list[CollectionSpec] = []
    streams: list[StreamSpec] = []
    config: dict[str, Any] = {}
    requirements: list[str] = Field(default=[], max_length=REQUIREMENTS_MAX)

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


def _inside(file: str | None, directory: Path) -> bool:
    return file is not None and Path(file).resolve().is_relative_to(directory)


def _import_entrypoint(directory: Path, module_name: str) -> Any:
    """Import `module_name` from `directory` only, under a fresh unique name."""
    parts = module_name.split(".")
    base = directory.joinpath(*parts)
    candidates = [base.with_suffix(".py"), base / "__init__.py"]
    location = next((c for c in candidates if c.is_file()), None)
    if location is None:
        raise FileNotFoundError(f"no module {module_name!r} in {directory}")
    unique = f"_fogline_app_{next(_import_counter)}_{parts[-1]}"
    with _import_lock:
        # The app directory is on sys.path only while its entrypoint imports, so its
        # sibling modules resolve; afterwards they leave sys.modules again (the
        # entrypoint keeps its references), so another app's `helpers` is its own.
        before = set(sys.modules)
        sys.path.insert(0, str(directory))
        try:
            spec = importlib.util.spec_from_file_location(
                unique, location,
                submodule_search_locations=[str(location.parent)]
                if location.name == "__init__.py" else None)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {location}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[unique] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(unique, None)
                raise
            return module
        finally:
            if str(directory) in sys.path:
                sys.path.remove(str(directory))
            for name in set(sys.modules) - before - {unique}:
                if _inside(getattr(sys.modules[name], "__file__", None), directory):
                    del sys.modules[name]


def load_app(directory: Path | str) -> tuple[AppManifest, App]:
    """The validated manifest and the `App` of an app directory; ConfigError if the
    manifest is bad, the entrypoint cannot be imported or is not the named App."""
    root = Path(directory).resolve()
    manifest = read_manifest(root)
    source = f"{root / MANIFEST_FILE}: spec.entrypoint"
    module_name, attribute = manifest.spec.entrypoint.split(":")
    try:
        module = _import_entrypoint(root, module_name)
    except Exception as exc:  # user code: any import-time failure is a config problem
        raise ConfigError(f"{source}: cannot import {module_name!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise ConfigError(f"{source}: {manifest.spec.entrypoint!r} is "
                          f"{type(app).__name__}, not a fogline App")
    if app.name != manifest.metadata.name:
        raise ConfigError(f"{source}: the App is named {app.name!r} but metadata.name is "
                          f"{manifest.metadata.name!r}")
    return manifest, app
