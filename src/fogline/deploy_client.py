"""`fogline apply` and `fogline delete` on the client side: read manifests, pack and sign.

A path is a manifest file or a directory searched for `*.yaml`/`*.yml` (hidden and
virtualenv directories skipped): a git repository of manifests is the fleet's desired
state. Every document is validated before anything is sent, so a bad manifest changes
nothing. An `App` manifest lives in its app directory as `fogline.yaml`; the bundle is
that directory with its manifest stripped of the deployment fields (placement, rollout,
pins), so changing where or how an app is deployed never changes the bundle.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fogline.bundle import Bundle, load_key, pack, sign
from fogline.deploy_spec import DEPLOY_FIELDS, deploy_spec
from fogline.errors import ConfigError

KINDS = ("App", "Collection", "Stream", "Site")
STREAM_FIELDS = ("priority", "bandwidth_bps", "quota_bytes", "overflow")
_SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", "node_modules"}


@dataclass(frozen=True)
class Document:
    source: Path
    kind: str
    name: str
    body: dict[str, Any]


def _files(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
        return
    if not path.is_dir():
        raise ConfigError(f"{path}: no such file or directory")
    for child in sorted(path.rglob("*")):
        relative = child.relative_to(path).parts
        if any(part in _SKIPPED_DIRS or part.startswith(".") for part in relative[:-1]):
            continue
        if child.is_file() and child.suffix in (".yaml", ".yml"):
            yield child


def read_documents(path: Path) -> list[Document]:
    """Every fogline manifest under `path`, validated; ConfigError naming file and field."""
    from fogline.manifest import MANIFEST_FILE, parse_manifest

    documents: list[Document] = []
    for file in _files(path):
        try:
            loaded = list(yaml.safe_load_all(file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{file}: cannot read YAML: {exc}") from exc
        for body in loaded:
            if body is None:
                continue
            if not isinstance(body, dict) or body.get("apiVersion") != "fogline/v1":
                if path.is_file():
                    raise ConfigError(f"{file}: not a fogline manifest (apiVersion "
                                      "fogline/v1)")
                continue  # other YAML in a repository is not ours
            kind = body.get("kind")
            if kind not in KINDS:
                raise ConfigError(f"{file}: kind {kind!r} is not one of {', '.join(KINDS)}")
            if kind == "App":
                if file.name != MANIFEST_FILE:
                    raise ConfigError(f"{file}: an App manifest is its app directory's "
                                      f"{MANIFEST_FILE}")
                parse_manifest(body, str(file))
                deploy_spec(body.get("spec", {}), str(file))
            elif kind == "Collection":
                _check_collection(body, file)
            elif kind == "Site":
                _check_site(body, file)
            else:
                _check_stream(body, file)
            documents.append(Document(file, kind, body["metadata"]["name"], body))
    if not documents:
        raise ConfigError(f"{path}: no fogline manifests found")
    seen: set[tuple[str, str]] = set()
    for doc in documents:
        if (doc.kind, doc.name) in seen:
            raise ConfigError(f"{doc.source}: {doc.kind} {doc.name!r} is defined twice")
        seen.add((doc.kind, doc.name))
    return documents


def _check_collection(body: dict[str, Any], file: Path) -> None:
    from fogline.core.sync import check_definition

    metadata, spec = body.get("metadata"), body.get("spec")
    if not isinstance(metadata, dict) or not isinstance(spec, dict) \
            or not isinstance(metadata.get("name"), str):
        raise ConfigError(f"{file}: a Collection has metadata.name and spec.type/scope")
    unknown = set(spec) - {"type", "scope"}
    if unknown:
        raise ConfigError(f"{file}: spec: unknown fields {', '.join(sorted(unknown))}")
    try:
        check_definition(metadata["name"], str(spec.get("type")), str(spec.get("scope")))
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from exc


def _check_stream(body: dict[str, Any], file: Path) -> None:
    from fogline.core.outbox import StreamPolicy, check_stream_name

    metadata, spec = body.get("metadata"), body.get("spec", {})
    if not isinstance(metadata, dict) or not isinstance(metadata.get("name"), str) \
            or not isinstance(spec, dict):
        raise ConfigError(f"{file}: a Stream has metadata.name and a spec mapping")
    unknown = set(spec) - set(STREAM_FIELDS)
    if unknown:
        raise ConfigError(f"{file}: spec: unknown fields {', '.join(sorted(unknown))} "
                          f"(a Stream has {', '.join(STREAM_FIELDS)})")
    try:
        check_stream_name(metadata["name"])
        StreamPolicy(**spec)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{file}: {exc}") from exc


def _check_site(body: dict[str, Any], file: Path) -> None:
    from fogline.site_spec import check_site_name, site_spec

    metadata, spec = body.get("metadata"), body.get("spec")
    if not isinstance(metadata, dict) or not isinstance(spec, dict):
        raise ConfigError(f"{file}: a Site has metadata.name and a spec mapping")
    try:
        check_site_name(metadata.get("name"))
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from exc
    site_spec(spec, str(file))


def app_bundle(doc: Document) -> Bundle:
    """The app directory packed with its manifest minus the deployment fields."""
    app_only = dict(doc.body)
    app_only["spec"] = {k: v for k, v in doc.body["spec"].items() if k not in DEPLOY_FIELDS}
    with tempfile.TemporaryDirectory(prefix="fogline-pack-") as tmp:
        copy = Path(tmp) / doc.name
        shutil.copytree(doc.source.parent, copy, symlinks=True,
                        ignore=shutil.ignore_patterns(*_SKIPPED_DIRS, "*.pyc"))
        (copy / doc.source.name).write_text(yaml.safe_dump(app_only, sort_keys=True))
        return pack(copy)


def apply_request(doc: Document, key_path: Path, reason: str) -> dict[str, Any]:
    """The body of POST /v1/apply for an App document: bundle, digest, signature."""
    key, public = load_key(key_path)
    bundle = app_bundle(doc)
    version = str(doc.body["metadata"]["version"])
    return {"manifest": doc.body, "bundle": base64.b64encode(bundle.data).decode(),
            "digest": bundle.digest, "key_id": public.key_id,
            "signature": sign(key, doc.name, version, bundle.digest), "reason": reason}
