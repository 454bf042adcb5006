"""The apps of one node: read their manifests, prepare what they declare, supervise them.

Before an app's workers start, the collections it declares are defined locally (so it
can write with the hub unreachable; the agent asks the hub to create them once it is
reachable) and its streams get their policies in the node's outbox.

Apps come two ways: given locally (`--app DIR`, at construction) or deployed by the hub
(`activate(DIR, revision)`). A deployed revision starts beside the one serving; once
every worker of it is ready, one dict assignment in `supervisors` switches the front to
it for the next request, and the old one finishes its calls in flight before it stops.
A revision that does not start leaves the old one serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fogline.clock import Clock
from fogline.core.outbox import StreamPolicy
from fogline.core.supervision import RestartPolicy
from fogline.core.sync import CollectionDef
from fogline.errors import ConfigError, TerminalError
from fogline.node.apps.environment import ensure_environment
from fogline.node.apps.front import RESERVED_NAMES
from fogline.node.apps.host import AppServices
from fogline.node.apps.supervisor import (
    AppDefinition,
    AppLimits,
    AppSupervisor,
    AppUnavailable,
)
from fogline.node.collections import NodeCollections
from fogline.node.outbox import Outbox
from fogline.protocol import AppStatus

if TYPE_CHECKING:
    from fogline.node.app_cache import AppCache

log = logging.getLogger("fogline.node.apps")

# How long a replaced version gets to answer the calls it took before it is stopped.
DRAIN_TIMEOUT_S = 5.0
OUTPUT_LINES_REPORTED = 5
FAILURE_CHARS_MAX = 2000


class ActivationFailed(TerminalError):
    """A deployed revision did not start (or may not replace the app named); the
    version serving before is untouched. The message says why."""


def read_definition(directory: Path | str) -> tuple[AppDefinition, list[CollectionDef],
                                                     dict[str, StreamPolicy]]:
    """Validate `DIR/fogline.yaml` (ConfigError naming file and field) and return what the
    node needs to run the app."""
    # pydantic and YAML load only on nodes that run apps.
    from fogline.manifest import read_manifest

    root = Path(directory).resolve()
    manifest = read_manifest(root)
    spec = manifest.spec
    name = manifest.metadata.name
    if name in RESERVED_NAMES:
        raise ConfigError(f"{root / 'fogline.yaml'}: metadata.name: {name!r} is reserved for "
                          f"the node's own endpoints ({', '.join(sorted(RESERVED_NAMES))})")
    limits = AppLimits(spec.limits.timeout_s, spec.limits.memory_mb,
                       spec.limits.request_body_bytes, spec.limits.workers)
    definition = AppDefinition(
        name=name, version=manifest.metadata.version, directory=root,
        entrypoint=spec.entrypoint, config=dict(spec.config),
        collections={c.name: c.type for c in spec.collections},
        streams=frozenset(s.name for s in spec.streams), limits=limits,
        requirements=list(spec.requirements))
    defs = [CollectionDef(c.name, c.type, c.scope) for c in spec.collections]
    return definition, defs, {s.name: s.policy() for s in spec.streams}


class NodeApps:
    def __init__(self, directories: Iterable[Path | str], clock: Clock,
                 policy: RestartPolicy | None = None, *,
                 app_cache: AppCache | None = None) -> None:
        self.clock = clock
        self.policy = policy
        # `ctx.cache` / `ctx.fetch` of every app; None: they raise ConfigError. Apps
        # built after it is set (or replaced) use the new one.
        self.app_cache = app_cache
        self.loaded = [read_definition(d) for d in directories]
        names = [definition.name for definition, _, _ in self.loaded]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"two app directories define the same app: {', '.join(repeated)}")
        self.supervisors: dict[str, AppSupervisor] = {}
        self._local = frozenset(names)
        self._revisions: dict[str, int] = {}  # deployed app -> revision serving
        self._locks: dict[str, asyncio.Lock] = {}  # one change of an app at a time
        self.on_change: Callable[[AppSupervisor], None] | None = None
        self._collections: NodeCollections | None = None
        self._outbox: Outbox | None = None
        self._context: dict[str, Any] = {}

    def declared_collections(self) -> list[CollectionDef]:
        return [d for _, defs, _ in self.loaded for d in defs]

    def set_mqtt_url(self, mqtt_url: str) -> None:
        """The device broker for apps started from now on."""
        if self._context:
            self._context["mqtt_url"] = mqtt_url

    async def start(self, collections: NodeCollections, outbox: Outbox, node: dict[str, Any],
                    mqtt_url: str | None, envs_dir: Path) -> None:
        self._collections, self._outbox = collections, outbox
        self._context = {"node": node, "mqtt_url": mqtt_url, "envs_dir": envs_dir}
        for definition, defs, streams in self.loaded:
            await self._prepare(defs, streams)
            await self._start(definition)

    async def _prepare(self, defs: list[CollectionDef],
                       streams: dict[str, StreamPolicy]) -> None:
        assert self._collections is not None and self._outbox is not None
        await self._collections.define_local(defs)
        self._outbox.policies.update(streams)

    def _build(self, definition: AppDefinition, revision: int) -> AppSupervisor:
        assert self._collections is not None and self._outbox is not None
        collections, outbox = self._collections, self._outbox
        services = AppServices(definition.name, definition.collections, definition.streams,
                               lambda: collections, lambda: outbox, self.app_cache)
        return AppSupervisor(definition, services, self._context["node"],
                             collections.writer.path.resolve(), self._context["mqtt_url"],
                             self.clock, self.policy, revision=revision)

    async def _start(self, definition: AppDefinition) -> None:
        problem = await self._environment(definition)
        supervisor = self._build(definition, self._revisions.get(definition.name, 0))
        supervisor.on_change = self._changed
        self.supervisors[definition.name] = supervisor
        if problem:
            supervisor.fail(problem)  # never started; a reload tries again
        else:
            supervisor.start()

    async def _environment(self, definition: AppDefinition) -> str:
        """Point the app at its per-app interpreter; the reason if that failed."""
        if not definition.requirements:
            return ""
        log.info("app %s: preparing its environment (%d requirements)", definition.name,
                 len(definition.requirements))
        try:
            definition.python = await ensure_environment(self._context["envs_dir"],
                                                         definition.requirements)
        except ConfigError as exc:
            return str(exc)
        return ""

    def _changed(self, supervisor: AppSupervisor) -> None:
        if self.on_change is not None:
            self.on_change(supervisor)

    async def reload(self, name: str) -> AppStatus:
        """Re-read the app's manifest and replace its workers; ConfigError (the running
        workers untouched) if the manifest no longer validates."""
        supervisor = self.supervisors.get(name)
        if supervisor is None:
            raise ConfigError(f"no app {name!r} on this node")
        definition, defs, streams = read_definition(supervisor.definition.directory)
        if definition.name != name:
            raise ConfigError(f"{definition.directory}: metadata.name changed from {name!r} "
                              f"to {definition.name!r}; restart the node to rename an app")
        await self._prepare(defs, streams)
        self.loaded = [entry if entry[0].name != name else (definition, defs, streams)
                       for entry in self.loaded]
        same_shape = definition.limits.workers == supervisor.definition.limits.workers
        if same_shape and supervisor.started and not definition.requirements:
            await supervisor.reload(definition)
        else:
            await supervisor.stop()
            await self._start(definition)
        return self.supervisors[name].status()

    async def refuse(self, refused: dict[str, str]) -> None:
        """The hub refused these collections (name -> why): stop every app declaring
        one, as `failed`, rather than let it write state the fleet disagrees on."""
        for supervisor in list(self.supervisors.values()):
            hit = sorted(set(supervisor.definition.collections) & set(refused))
            if hit:
                await supervisor.stop()
                supervisor.fail("; ".join(f"the hub refused collection {name!r}: "
                                          f"{refused[name]}" for name in hit))

    # Deployed apps ----------------------------------------------------------------------

    def deployed(self) -> dict[str, int]:
        """Each app the hub deployed here (through `activate`) -> its revision serving."""
        return dict(self._revisions)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def activate(self, directory: Path, revision: int,
                       timeout_s: float = 30.0) -> AppStatus:
        """Run the app in `directory` as deployment `revision`: start it beside the
        version serving, switch to it once every worker is ready, then drain and stop
        the old one. ActivationFailed (nothing changed but the collections and stream
        policies it declares) if it is invalid, is a local app, or does not start
        within `timeout_s`. Activating the revision already serving returns its status.
        """
        try:
            definition, defs, streams = read_definition(directory)
        except ConfigError as exc:
            raise ActivationFailed(f"revision {revision}: {exc}") from exc
        name = definition.name
        if name in self._local:
            raise ActivationFailed(f"app {name!r} was given to this node locally (--app); "
                                   "a deployment cannot replace it")
        if self._collections is None:
            raise ActivationFailed(f"app {name!r} revision {revision}: the node's apps "
                                   "have not started yet")
        async with self._lock(name):
            old = self.supervisors.get(name)
            if old is not None and old.revision == revision and old.state != "failed" \
                    and old.definition.directory == definition.directory:
                return old.status()
            new = await self._candidate(definition, defs, streams, revision, timeout_s)
            # The switch: the front looks the app up per request, so the next request
            # goes to the new version and none is refused in between.
            self.supervisors[name] = new
            self._revisions[name] = revision
            self.loaded = [entry for entry in self.loaded if entry[0].name != name]
            self.loaded.append((definition, defs, streams))
            new.on_change = self._changed
            self._changed(new)
            log.info("app %s: revision %d (version %s) serving%s", name, revision,
                     definition.version, f", replacing revision {old.revision}" if old else "")
            if old is not None:
                old.on_change = None  # its stopping is no news: it no longer serves
                await old.drain(DRAIN_TIMEOUT_S)
                await old.stop()
            return new.status()

    async def _candidate(self, definition: AppDefinition, defs: list[CollectionDef],
                         streams: dict[str, StreamPolicy], revision: int,
                         timeout_s: float) -> AppSupervisor:
        """A started supervisor for the revision, every worker ready; ActivationFailed
        (it stopped again) if not."""
        label = f"app {definition.name!r} revision {revision}"
        try:
            await self._prepare(defs, streams)
        except ConfigError as exc:
            raise ActivationFailed(f"{label}: {exc}") from exc
        problem = await self._environment(definition)
        if problem:
            raise ActivationFailed(f"{label}: {problem}")
        candidate = self._build(definition, revision)
        candidate.start()
        started = False
        try:
            await candidate.wait_started(timeout_s)
            started = True
        except AppUnavailable as exc:
            raise ActivationFailed(_failure(label, str(exc), candidate)) from exc
        finally:
            if not started:  # failed, or the caller gave up: it must not outlive this
                await candidate.stop()
        return candidate

    async def remove(self, name: str) -> None:
        """Stop and forget a deployed app (its calls in flight finish first). A local
        app is not the hub's to remove (ConfigError); an unknown name is a no-op."""
        if name in self._local:
            raise ConfigError(f"app {name!r} was given to this node locally (--app); "
                              "the hub cannot remove it")
        async with self._lock(name):
            supervisor = self.supervisors.pop(name, None)
            self._revisions.pop(name, None)
            self.loaded = [entry for entry in self.loaded if entry[0].name != name]
            if supervisor is not None:
                log.info("app %s: revision %d removed", name, supervisor.revision)
                await supervisor.drain(DRAIN_TIMEOUT_S)
                await supervisor.stop()  # its on_change tells the heartbeat

    def statuses(self) -> tuple[AppStatus, ...]:
        return tuple(s.status() for s in self.supervisors.values())

    async def wait_running(self, timeout_s: float = 30.0) -> None:
        await asyncio.gather(*(s.wait_running(timeout_s) for s in self.supervisors.values()))

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.supervisors.values()))


def _failure(label: str, reason: str, supervisor: AppSupervisor) -> str:
    """Why a revision did not start: the reason, and the worker's last lines when the
    reason does not already carry its error."""
    message = f"{label} did not start: {reason}"
    if not reason.startswith("failed to load") and supervisor.last_output:
        lines = supervisor.last_output[-OUTPUT_LINES_REPORTED:]
        message += "; last output: " + " | ".join(lines)
    if len(message) > FAILURE_CHARS_MAX:
        message = message[:FAILURE_CHARS_MAX - 1] + "…"
    return message


class AppsCollector(Collector):
    """Per-app counters and state for the node's /metrics."""

    COUNTERS = (("requests", "HTTP requests served by the app"),
                ("errors", "HTTP responses with a 5xx status from the app"),
                ("timeouts", "handler runs stopped at the app's timeout"),
                ("messages", "device messages received for the app"),
                ("malformed", "device messages dropped as malformed for the codec"),
                ("handler_errors", "topic and schedule handler runs that raised"),
                ("schedule_runs", "schedule handler runs"))

    def __init__(self, apps: Callable[[], NodeApps | None]) -> None:
        self._apps = apps

    def collect(self) -> Iterator[Any]:
        apps = self._apps()
        supervisors = list(apps.supervisors.values()) if apps else []
        families = {name: CounterMetricFamily(f"fogline_app_{name}", help_text, labels=["app"])
                    for name, help_text in self.COUNTERS}
        restarts = CounterMetricFamily("fogline_app_restarts", "app worker restarts",
                                       labels=["app"])
        up = GaugeMetricFamily("fogline_app_up", "1 while the app's state is running",
                               labels=["app", "state"])
        for supervisor in supervisors:
            stats = supervisor.stats()
            for name, family in families.items():
                family.add_metric([supervisor.name], getattr(stats, name))
            status = supervisor.status()
            restarts.add_metric([supervisor.name], status.restarts)
            up.add_metric([supervisor.name, status.state], float(status.state == "running"))
        yield from families.values()
        yield restarts
        yield up
        cache_calls = CounterMetricFamily(
            "fogline_app_cache_calls", "ctx.cache and ctx.fetch calls (result: get hit|miss, "
            "put ok, delete deleted|absent, fetch the X-Cache value)",
            labels=["app", "call", "result"])
        if apps is not None and apps.app_cache is not None:
            for (app, call, result), n in sorted(apps.app_cache.counts.items()):
                cache_calls.add_metric([app, call, result], n)
        yield cache_calls
