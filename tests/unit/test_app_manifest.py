"""App directories (fogline.node.apps.manifest) and the factory demo app's logic."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from fogline.app import (
    App,
    MethodNotAllowed,
    NodeInfo,
    Request,
    decode_message,
    to_response,
)
from fogline.errors import ConfigError
from fogline.node.apps.manifest import load_app, parse_manifest

ROOT = Path(__file__).resolve().parents[2]
FACTORY = ROOT / "examples" / "factory"

VALID: dict[str, Any] = {
    "apiVersion": "fogline/v1",
    "kind": "App",
    "metadata": {"name": "demo", "version": "1.0.0"},
    "spec": {
        "entrypoint": "demo_app:app",
        "collections": [{"name": "things", "type": "map", "scope": "node"}],
        "streams": [{"name": "events", "priority": 3, "bandwidth_bps": 1000,
                     "quota_bytes": 10_000, "overflow": "drop-oldest"}],
        "config": {"threshold": 2.5},
    },
}
APP_CODE = 'from fogline.app import App\napp = App("demo")\n'


def write_app(tmp_path: Path, manifest: Any = None, code: str = APP_CODE,
              module: str = "demo_app") -> Path:
    (tmp_path / "fogline.yaml").write_text(yaml.safe_dump(VALID if manifest is None
                                                          else manifest))
    (tmp_path / f"{module}.py").write_text(code)
    return tmp_path


def changed(path: str, value: Any) -> dict[str, Any]:
    """A deep copy of VALID with the dotted `path` set to `value`, or removed if `...`."""
    data = msgspec.json.decode(msgspec.json.encode(VALID))
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


# Loading ------------------------------------------------------------------------------

def test_loads_the_factory_example() -> None:
    manifest, app = load_app(FACTORY)
    assert (manifest.metadata.name, app.name) == ("factory", "factory")
    assert [(c.name, c.type, c.scope) for c in manifest.spec.collections] == [
        ("machines", "map", "region")]
    assert [s.name for s in manifest.spec.streams] == ["summaries"]
    assert manifest.spec.streams[0].policy().priority == 5
    assert sorted((r.method, r.path) for r in app.routes) == [
        ("GET", "/machines"), ("GET", "/machines/{machine}")]
    assert [h.pattern for h in app.topics] == ["factory/+/vibration"]
    assert [s.interval_s for s in app.schedules] == [10.0]


def test_loads_a_valid_manifest_with_defaults(tmp_path: Path) -> None:
    manifest, app = load_app(write_app(tmp_path, changed("spec.streams", [{"name": "s"}])))
    stream = manifest.spec.streams[0]
    assert (stream.priority, stream.bandwidth_bps, stream.overflow) == (0, None, "block")
    assert manifest.spec.requirements == [] and manifest.spec.config == {"threshold": 2.5}
    assert isinstance(app, App)


def test_two_apps_with_same_module_names_stay_apart(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    for directory, value in ((first, 1), (second, 2)):
        directory.mkdir()
        write_app(directory, code="from helpers import VALUE\n" + APP_CODE
                  + "app.value = VALUE\n")
        (directory / "helpers.py").write_text(f"VALUE = {value}\n")
    _, app_one = load_app(first)
    _, app_two = load_app(second)
    assert (app_one.value, app_two.value) == (1, 2)  # type: ignore[attr-defined]
    assert str(first) not in sys.path and "helpers" not in sys.modules


# Manifest rejections: each names the file and the field -------------------------------

@pytest.mark.parametrize(("path", "value", "field"), [
    ("apiVersion", ..., "apiVersion"),
    ("kind", ..., "kind"),
    ("metadata.name", ..., "metadata.name"),
    ("metadata.version", ..., "metadata.version"),
    ("spec.entrypoint", ..., "spec.entrypoint"),
    ("spec.collections.0.scope", ..., "spec.collections.0.scope"),
])
def test_rejects_missing_field(tmp_path: Path, path: str, value: Any, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"fogline\.yaml: {field}: Field required"):
        load_app(write_app(tmp_path, changed(path, value)))


@pytest.mark.parametrize(("path", "field"), [
    ("extra", "extra"), ("metadata.labels", "metadata.labels"),
    ("spec.replicas", "spec.replicas"), ("spec.streams.0.colour", "spec.streams.0.colour"),
])
def test_rejects_extra_field(tmp_path: Path, path: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"fogline\.yaml: {field}: Extra inputs"):
        load_app(write_app(tmp_path, changed(path, "x")))


@pytest.mark.parametrize(("path", "value", "field"), [
    ("apiVersion", "fogline/v2", "apiVersion"),
    ("kind", "Deployment", "kind"),
    ("metadata.name", "Demo_App", "metadata.name"),
    ("metadata.version", 1.0, "metadata.version"),
    ("spec.collections.0.type", "list", "spec.collections.0.type"),
    ("spec.collections.0.scope", "planet", "spec.collections.0.scope"),
    ("spec.streams.0.overflow", "drop-newest", "spec.streams.0.overflow"),
    ("spec.streams.0.quota_bytes", 0, "spec.streams.0.quota_bytes"),
    ("spec.streams.0.bandwidth_bps", -5, "spec.streams.0.bandwidth_bps"),
    ("spec.config", [1, 2], "spec.config"),
    ("spec.requirements", "numpy", "spec.requirements"),
    ("spec.streams", [{"name": "a"}, {"name": "a"}], "spec.streams"),
    ("spec.limits", {"timeout": "soon"}, "spec.limits.timeout"),
    ("spec.limits", {"timeout": "2h"}, "spec.limits.timeout"),
    ("spec.limits", {"timeout": 0}, "spec.limits.timeout"),
    ("spec.limits", {"memory_mb": 8}, "spec.limits.memory_mb"),
    ("spec.limits", {"request_body_bytes": 0}, "spec.limits.request_body_bytes"),
    ("spec.limits", {"request_body_bytes": 10**9}, "spec.limits.request_body_bytes"),
    ("spec.limits", {"workers": 0}, "spec.limits.workers"),
    ("spec.limits", {"workers": 1000}, "spec.limits.workers"),
    ("spec.limits", {"cpu": 1}, "spec.limits.cpu"),
])
def test_rejects_wrong_values(tmp_path: Path, path: str, value: Any, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"fogline\.yaml: {field}: "):
        load_app(write_app(tmp_path, changed(path, value)))


def test_limits_default_and_parse_intervals(tmp_path: Path) -> None:
    manifest, _ = load_app(write_app(tmp_path, changed("spec.limits", {"timeout": "250ms",
                                                                       "workers": 2})))
    limits = manifest.spec.limits
    assert (limits.timeout_s, limits.workers, limits.memory_mb) == (0.25, 2, 256)
    assert limits.request_body_bytes == 1024 * 1024


def test_node_refuses_names_its_own_endpoints_use(tmp_path: Path) -> None:
    from fogline.node.apps.manager import read_definition

    for name in ("metrics", "healthz", "local"):
        with pytest.raises(ConfigError, match=rf"metadata.name: '{name}' is reserved"):
            read_definition(write_app(tmp_path, changed("metadata.name", name)))


@pytest.mark.parametrize("entrypoint", ["demo_app", "demo_app:", ":app", "demo-app:app",
                                        "demo_app:app:x", "../demo_app:app"])
def test_rejects_malformed_entrypoint(tmp_path: Path, entrypoint: str) -> None:
    with pytest.raises(ConfigError, match=r"fogline\.yaml: spec\.entrypoint: .*module:attr"):
        load_app(write_app(tmp_path, changed("spec.entrypoint", entrypoint)))


def test_rejects_entrypoint_module_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"fogline\.yaml: spec\.entrypoint: cannot import "
                                          r"'missing'"):
        load_app(write_app(tmp_path, changed("spec.entrypoint", "missing:app")))


def test_rejects_entrypoint_that_fails_to_import(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"spec\.entrypoint: cannot import 'demo_app': "
                                          r"ZeroDivisionError"):
        load_app(write_app(tmp_path, code="1 / 0\n"))


def test_rejects_entrypoint_with_a_bad_decorator(tmp_path: Path) -> None:
    code = APP_CODE + '@app.every("0s")\ndef tick(ctx): pass\n'
    with pytest.raises(ConfigError, match=r"spec\.entrypoint: .*ConfigError: interval"):
        load_app(write_app(tmp_path, code=code))


@pytest.mark.parametrize(("code", "kind"), [
    ("app = 42\n", "int"), ("", "NoneType"),
])
def test_rejects_entrypoint_that_is_not_an_app(tmp_path: Path, code: str, kind: str) -> None:
    with pytest.raises(ConfigError, match=rf"spec\.entrypoint: 'demo_app:app' is {kind}, "
                                          "not a fogline App"):
        load_app(write_app(tmp_path, code=code))


def test_rejects_app_name_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"spec\.entrypoint: the App is named 'other' but "
                                          r"metadata\.name is 'demo'"):
        load_app(write_app(tmp_path, code='from fogline.app import App\napp = App("other")\n'))


def test_rejects_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"fogline\.yaml: no app manifest"):
        load_app(tmp_path)


def test_rejects_invalid_yaml(tmp_path: Path) -> None:
    (tmp_path / "fogline.yaml").write_text("apiVersion: [unclosed\n")
    with pytest.raises(ConfigError, match=r"fogline\.yaml: not valid YAML"):
        load_app(tmp_path)


def test_rejects_a_document_that_is_not_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"app\.yaml: must be a mapping"):
        parse_manifest(["a"], "app.yaml")


# The factory app's logic, with an in-memory context -----------------------------------

class MemoryCollection:
    """A map collection in a dict; values round-trip msgpack as the node stores them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data: dict[str, bytes] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return msgspec.msgpack.decode(self.data[key]) if key in self.data else default

    def items(self, prefix: str = "") -> list[tuple[str, Any]]:
        return [(k, msgspec.msgpack.decode(v)) for k, v in sorted(self.data.items())
                if k.startswith(prefix)]

    async def update(self, key: str, fn: Callable[[Any], Any]) -> Any:
        value = fn(self.get(key))
        self.data[key] = msgspec.msgpack.encode(value)
        return value


class MemoryLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self.events.append((level, event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        self._log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log("error", event, **fields)


@dataclass
class MemoryContext:
    config: Mapping[str, Any]
    node: NodeInfo = field(default_factory=lambda: NodeInfo("n1", "eu", "edge"))
    log: MemoryLog = field(default_factory=MemoryLog)
    now_s: float = 1000.0
    collections: dict[str, MemoryCollection] = field(default_factory=dict)
    emitted: list[tuple[str, Any]] = field(default_factory=list)

    def now(self) -> float:
        return self.now_s

    def collection(self, name: str) -> MemoryCollection:
        return self.collections.setdefault(name, MemoryCollection(name))

    async def emit(self, stream: str, record: Any) -> None:
        self.emitted.append((stream, msgspec.json.decode(msgspec.json.encode(record))))

    async def publish(self, topic: str, payload: Any, qos: int = 0) -> None:
        raise AssertionError("the factory app does not publish")


@pytest.fixture
def factory() -> App:
    return load_app(FACTORY)[1]


async def deliver(app: App, ctx: MemoryContext, topic: str, payload: bytes) -> None:
    for handler in app.handlers_for_topic(topic):
        await handler.fn(decode_message(handler, topic, payload, ctx.now()), ctx)


async def get(app: App, ctx: MemoryContext, path: str) -> tuple[int, Any]:
    found = app.match_route("GET", path)
    assert found is not None and not isinstance(found, MethodNotAllowed)
    response = to_response(await found.handler.fn(
        Request("GET", path, path_params=found.path_params), ctx))
    return response.status, msgspec.json.decode(response.body)


async def test_factory_folds_samples_and_serves_state(factory: App) -> None:
    ctx = MemoryContext({"summary_every_samples": 1000})
    await deliver(factory, ctx, "factory/m1/vibration",
                  b'{"machine": "m1", "samples": [1.0, 3.0]}')
    await deliver(factory, ctx, "factory/m1/vibration", b'{"samples": [2, 6]}')
    await deliver(factory, ctx, "factory/m2/vibration", b'{"machine": "m2", "samples": [0.5]}')
    status, body = await get(factory, ctx, "/machines/m1")
    assert status == 200
    assert body == {"machine": "m1", "count": 4, "mean": 3.0, "max": 6.0, "last": 6.0,
                    "updated_at": 1000.0}
    status, listing = await get(factory, ctx, "/machines")
    assert status == 200 and [m["machine"] for m in listing["machines"]] == ["m1", "m2"]
    assert ctx.emitted == []


async def test_factory_unknown_machine_is_404(factory: App) -> None:
    status, body = await get(factory, MemoryContext({}), "/machines/nope")
    assert (status, body) == (404, {"error": "unknown machine", "machine": "nope"})


async def test_factory_emits_a_summary_every_n_samples(factory: App) -> None:
    ctx = MemoryContext({"summary_every_samples": 3})
    for samples in (b"[1, 2]", b"[3, 10]", b"[4]"):
        await deliver(factory, ctx, "factory/m1/vibration",
                      b'{"machine": "m1", "samples": ' + samples + b"}")
    assert len(ctx.emitted) == 1
    stream, summary = ctx.emitted[0]
    assert stream == "summaries"
    assert (summary["window_count"], summary["window_mean"], summary["window_max"]) == (
        4, 4.0, 10.0)
    state = ctx.collection("machines").get("m1")
    assert (state["window_count"], state["count"]) == (1, 5)  # [4] waits for the next one


async def test_factory_flush_emits_pending_windows_of_this_node_once(factory: App) -> None:
    ctx = MemoryContext({"summary_every_samples": 100})
    await deliver(factory, ctx, "factory/m1/vibration", b'{"samples": [1, 3]}')
    other = MemoryContext({}, node=NodeInfo("n2", "eu", "edge"),
                          collections=ctx.collections, emitted=ctx.emitted)
    await deliver(factory, other, "factory/m2/vibration", b'{"samples": [5]}')
    flush = factory.schedules[0].fn
    await flush(ctx)  # type: ignore[arg-type, misc]
    await flush(ctx)  # type: ignore[arg-type, misc]
    assert [(s["machine"], s["window_count"], s["window_mean"]) for _, s in ctx.emitted] == [
        ("m1", 2, 2.0)]


@pytest.mark.parametrize("payload", [
    b'{"machine": "m1"}', b'{"machine": "m1", "samples": []}',
    b'{"machine": "m1", "samples": ["x"]}', b'{"machine": 5, "samples": [1]}',
    b'[1, 2]', b'{"machine": "m1", "samples": [1, true]}',
])
async def test_factory_rejects_bad_shapes_without_writing(factory: App,
                                                          payload: bytes) -> None:
    ctx = MemoryContext({})
    await deliver(factory, ctx, "factory/m1/vibration", payload)
    assert ctx.collection("machines").items() == []
    assert [level for level, _, _ in ctx.log.events] == ["warning"]


def test_factory_handlers_are_async_and_topic_is_matched(factory: App) -> None:
    assert all(h.is_async for h in [*factory.routes, *factory.topics, *factory.schedules])
    assert factory.handlers_for_topic("factory/m1/temperature") == ()
