"""Importing an app's entrypoint: what an app worker does first.

Kept apart from the manifest (pydantic, YAML) so a worker starts with only the modules
it needs. The entrypoint is imported under a unique module name with the app directory
on `sys.path` only while importing, so two apps with a module of the same name (or two
versions of one app) do not see each other's code.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import threading
from pathlib import Path
from typing import Any

from fogline.app import App
from fogline.errors import ConfigError

_import_lock = threading.Lock()
_import_counter = itertools.count(1)


def _inside(file: str | None, directory: Path) -> bool:
    return file is not None and Path(file).resolve().is_relative_to(directory)


def _import_module(directory: Path, module_name: str) -> Any:
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


def import_entrypoint(directory: Path, entrypoint: str, name: str, source: str) -> App:
    """The `App` at `entrypoint` (`module:attribute`) in `directory`; ConfigError (naming
    `source`) if it cannot be imported, is not an App or is not called `name`."""
    module_name, attribute = entrypoint.split(":")
    try:
        module = _import_module(directory, module_name)
    except Exception as exc:  # user code: any import-time failure is a config problem
        raise ConfigError(f"{source}: cannot import {module_name!r}: "
                          f"{type(exc).__name__}: {exc}") from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, App):
        raise ConfigError(f"{source}: {entrypoint!r} is {type(app).__name__}, "
                          "not a fogline App")
    if app.name != name:
        raise ConfigError(f"{source}: the App is named {app.name!r} but metadata.name is "
                          f"{name!r}")
    return app
