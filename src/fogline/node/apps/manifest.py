"""An app directory: its validated manifest and the `App` object its code defines."""

from __future__ import annotations

from pathlib import Path

from fogline.app import App
from fogline.manifest import MANIFEST_FILE, AppManifest, parse_manifest, read_manifest
from fogline.node.apps.loader import import_entrypoint

__all__ = ["MANIFEST_FILE", "AppManifest", "load_app", "parse_manifest", "read_manifest"]


def load_app(directory: Path | str) -> tuple[AppManifest, App]:
    """The validated manifest and the `App` of an app directory; ConfigError if the
    manifest is bad, the entrypoint cannot be imported or is not the named App."""
    root = Path(directory).resolve()
    manifest = read_manifest(root)
    source = f"{root / MANIFEST_FILE}: spec.entrypoint"
    app = import_entrypoint(root, manifest.spec.entrypoint, manifest.metadata.name, source)
    return manifest, app
