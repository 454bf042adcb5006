"""`fogline dev APPDIR`: one app on a local hub and node, reloaded as its files change.

The `wrangler dev` of fogline. The app directory is validated and its code imported here
first (a bad one starts nothing), then a `fogline hub` and one `fogline node --app
APPDIR` run as child processes (never outliving this one), the app's URLs are printed
and the node's log (with the app's own log lines) is streamed to the terminal.

On a change to a `*.py` file or `fogline.yaml`, the app is imported here again before
the node is asked to reload it: a change that does not load (a syntax error, an invalid
manifest) is reported and never reaches the node, so the last good version keeps
serving and the node's crash backoff never slows the next fix. A change that loads is
sent to `POST /local/apps/{app}/reload`, and dev waits until a new worker answers
(`dev_probe`); if the worker fails where this process did not (code that depends on
being in a worker), dev prints the app's state and reason from the node, the app does
not serve, and the next save that loads is reloaded as usual.

Importing here runs the app's module-level code in this process too, synchronously
(as a worker would, with the app directory as working directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from watchfiles import Change, DefaultFilter, awatch

from fogline.errors import ConfigError, TerminalError
from fogline.node.apps.manager import read_definition
from fogline.node.apps.manifest import MANIFEST_FILE, load_app
from fogline.node.identity import NodeFiles
from fogline.sim.dev_probe import AppProbe
from fogline.sim.procs import fogline_process, wait_for_file
from fogline.transport.mqtt_link import parse_mqtt_url, redact

DEFAULT_PORT = 8787  # as `wrangler dev`
START_TIMEOUT_S = 60.0
RELOAD_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 5.0
# Changes are batched until the files were quiet this long (an editor's save is often a
# few writes), and for at most the second value.
WATCH_QUIET_MS = 100
WATCH_BATCH_MS_MAX = 1600
LOG_POLL_INTERVAL_S = 0.1
LOG_READ_BYTES_MAX = 1024 * 1024
HEARTBEAT_INTERVAL = "1s"

Echo = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class DevConfig:
    app_dir: Path
    data_dir: Path | None = None  # None: a fresh temporary dir, removed at exit
    port: int = DEFAULT_PORT  # the node's listen port; 0 picks a free one
    mqtt_url: str | None = None  # None: the node's embedded broker

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0-65535, not {self.port}")
        if self.mqtt_url is not None:
            parse_mqtt_url(self.mqtt_url)


@dataclass(frozen=True)
class AppInfo:
    """What dev shows of an app, read from its manifest and its code."""

    name: str
    version: str
    routes: tuple[tuple[str, str], ...]  # (method, path template)
    topics: tuple[str, ...]  # MQTT topic filters

    def route_lines(self, base_url: str) -> list[str]:
        """`METHOD  URL` per route, the URL as a client calls it."""
        return [f"{method:<7} {base_url.rstrip('/')}{path}" for method, path in self.routes]


def inspect_app(directory: Path) -> AppInfo:
    """Validate the app as the node will (ConfigError naming file and field) and import
    its code as a worker does, here in this process."""
    definition, _, _ = read_definition(directory)
    with contextlib.chdir(definition.directory):  # where a worker imports it, too
        _, app = load_app(definition.directory)
    return AppInfo(definition.name, definition.version,
                   tuple((r.method, r.path) for r in app.routes),
                   tuple(app.subscriptions()))


class SourceFilter(DefaultFilter):
    """The files an app's behaviour depends on: its `*.py` files and its manifest
    (DefaultFilter already leaves out `__pycache__`, `.git` and editors' swap files)."""

    def __init__(self, app_dir: Path) -> None:
        super().__init__()
        self.manifest = str(app_dir.resolve() / MANIFEST_FILE)

    def __call__(self, change: Change, path: str) -> bool:
        return (path.endswith(".py") or path == self.manifest) and super().__call__(
            change, path)


def banner(info: AppInfo, endpoint: str, mqtt_url: str, hub_url: str, data_dir: Path,
           temporary: bool, app_dir: Path) -> list[str]:
    base = f"{endpoint.rstrip('/')}/{info.name}/"
    routes = info.route_lines(base) or ["(none)"]
    topics = ", ".join(info.topics) or "(no topic handlers)"
    kept = "temporary: removed at exit" if temporary else "kept"
    return [
        f"fogline dev: {info.name} {info.version} is running",
        f"  app     {base}",
        *(f"  {'route' if index == 0 else '':<7} {line}" for index, line in enumerate(routes)),
        f"  mqtt    {redact(mqtt_url)}  topics: {topics}",
        f"  hub     {hub_url}  (admin token: {data_dir / 'hub' / 'admin.token'})",
        f"  logs    {data_dir / 'node.log'} (node and app, streamed below), "
        f"{data_dir / 'hub.log'}",
        f"  data    {data_dir} ({kept})",
        f"watching {app_dir} for changes to *.py and {MANIFEST_FILE}; Ctrl-C stops",
    ]


@contextlib.contextmanager
def _open_data_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    temporary = Path(tempfile.mkdtemp(prefix="fogline-dev-"))
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


async def tail_log(path: Path, offset: int, echo: Echo) -> None:
    """Echo each complete line appended to `path` after `offset`, until cancelled."""
    pending = b""
    while True:
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as file:
            file.seek(offset)
            chunk = file.read(LOG_READ_BYTES_MAX)
            offset += len(chunk)
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > LOG_READ_BYTES_MAX:  # a line that never ends is shown cut
                lines, pending = [*lines, pending], b""
            for line in lines:
                echo(line.decode(errors="replace"))
        await asyncio.sleep(LOG_POLL_INTERVAL_S)


def _log_tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


@dataclass
class _Child:
    name: str
    process: asyncio.subprocess.Process
    log: Path


class DevSession:
    """One `fogline dev` run. Constructing it validates and imports the app, so a bad
    app directory raises ConfigError before anything starts."""

    def __init__(self, config: DevConfig, echo: Echo = _print) -> None:
        self.config = config
        self.echo = echo
        self.app_dir = config.app_dir.resolve()
        self.info = inspect_app(self.app_dir)
        self.children: list[_Child] = []
        self.endpoint = ""
        self.log_offset = 0

    def say(self, message: str) -> None:
        self.echo(f"[dev] {message}")

    @property
    def name(self) -> str:
        return self.info.name

    async def run(self) -> None:
        """Start the hub and the node, then stream the log and reload until cancelled."""
        with _open_data_dir(self.config.data_dir) as data:
            async with contextlib.AsyncExitStack() as stack:
                hub_url, nats_url, admin = await self._start_hub(stack, data)
                node = await self._start_node(stack, data, hub_url, nats_url, admin)
                token = await wait_for_file(data / "node" / "local.token", node.process,
                                            START_TIMEOUT_S, node.log)
                local = await stack.enter_async_context(httpx.AsyncClient(
                    base_url=self.endpoint, timeout=HTTP_TIMEOUT_S,
                    headers={"Authorization": f"Bearer {token}"}))
                # The app's own requests go without the node's local token.
                front = await stack.enter_async_context(httpx.AsyncClient(
                    base_url=self.endpoint, timeout=HTTP_TIMEOUT_S))
                probe = AppProbe(self.name, node.process.pid, local, front)
                failure, _ = await probe.wait_serving(START_TIMEOUT_S)
                mqtt_url = await wait_for_file(data / "node" / "mqtt.url", node.process,
                                               START_TIMEOUT_S, node.log)
                for line in banner(self.info, self.endpoint, mqtt_url, hub_url, data,
                                   self.config.data_dir is None, self.app_dir):
                    self.echo(line)
                if failure:
                    self.say(failure)
                try:
                    await self._serve(probe, node.log)
                except asyncio.CancelledError:
                    self.say("stopping the node and the hub")
                    raise

    async def _start_hub(self, stack: contextlib.AsyncExitStack,
                         data: Path) -> tuple[str, str, str]:
        hub_dir, log = data / "hub", data / "hub.log"
        # A kept data dir keeps the hub's port: the node's identity names the hub's URL.
        listen_file = data / "hub.listen"
        listen = listen_file.read_text().strip() if listen_file.exists() else "127.0.0.1:0"
        for stale in ("hub.url", "nats.url"):
            (hub_dir / stale).unlink(missing_ok=True)
        process = await stack.enter_async_context(fogline_process(
            ["hub", "--data", str(hub_dir), "--listen", listen,
             "--heartbeat-interval", HEARTBEAT_INTERVAL], log, own_session=True))
        self.children.append(_Child("hub", process, log))
        hub_url = await wait_for_file(hub_dir / "hub.url", process, START_TIMEOUT_S, log)
        nats_url = await wait_for_file(hub_dir / "nats.url", process, START_TIMEOUT_S, log)
        listen_file.write_text(hub_url.split("://", 1)[1] + "\n")
        admin = (hub_dir / "admin.token").read_text().strip()
        return hub_url, nats_url, admin

    async def _start_node(self, stack: contextlib.AsyncExitStack, data: Path, hub_url: str,
                          nats_url: str, admin: str) -> _Child:
        node_dir, log = data / "node", data / "node.log"
        # --nats: the hub's NATS port is new each start, the node's identity keeps the old.
        args = ["node", "--data", str(node_dir), "--hub", hub_url, "--nats", nats_url,
                "--name", "dev", "--region", "dev", "--tier", "near",
                "--heartbeat-interval", HEARTBEAT_INTERVAL,
                "--listen", f"127.0.0.1:{self.config.port}", "--app", str(self.app_dir)]
        if not NodeFiles(node_dir).enrolled():
            args += ["--token", await self._create_token(hub_url, admin)]
        if self.config.mqtt_url is not None:
            args += ["--mqtt", self.config.mqtt_url]
        for stale in ("endpoint", "mqtt.url"):
            (node_dir / stale).unlink(missing_ok=True)
        self.log_offset = log.stat().st_size if log.exists() else 0
        process = await stack.enter_async_context(fogline_process(args, log,
                                                                  own_session=True))
        child = _Child("node", process, log)
        self.children.append(child)
        self.endpoint = await wait_for_file(node_dir / "endpoint", process, START_TIMEOUT_S,
                                            log)
        return child

    @staticmethod
    async def _create_token(hub_url: str, admin: str) -> str:
        try:
            async with httpx.AsyncClient(base_url=hub_url, timeout=HTTP_TIMEOUT_S) as api:
                response = await api.post("/v1/tokens", json={"ttl_s": 600, "region": "dev"},
                                          headers={"Authorization": f"Bearer {admin}"})
                response.raise_for_status()
                return str(response.json()["token"])
        except httpx.HTTPError as exc:
            raise TerminalError(f"the dev hub refused a bootstrap token: {exc}") from exc

    async def _serve(self, probe: AppProbe, node_log: Path) -> None:
        stop_watching = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(tail_log(node_log, self.log_offset, self.echo))
                group.create_task(self._reload_on_change(probe, stop_watching))
                group.create_task(self._fail_on_exit())
                try:
                    await asyncio.Event().wait()
                finally:
                    # awatch waits in a thread that only its stop event ends promptly.
                    stop_watching.set()
        except BaseExceptionGroup as errors:
            raise _first_error(errors) from None

    async def _fail_on_exit(self) -> None:
        while True:
            for child in self.children:
                if child.process.returncode is not None:
                    raise TerminalError(
                        f"the {child.name} exited with code {child.process.returncode}; the "
                        f"end of {child.log}:\n{_log_tail(child.log)}")
            await asyncio.sleep(LOG_POLL_INTERVAL_S)

    async def _reload_on_change(self, probe: AppProbe, stop: asyncio.Event) -> None:
        try:
            async for changes in awatch(self.app_dir, watch_filter=SourceFilter(self.app_dir),
                                        debounce=WATCH_BATCH_MS_MAX, step=WATCH_QUIET_MS,
                                        stop_event=stop):
                paths = sorted({str(Path(path).relative_to(self.app_dir))
                                for _, path in changes})
                self.say(f"changed: {', '.join(paths)}")
                await self.reload(probe)
        except OSError as exc:
            raise TerminalError(f"cannot watch {self.app_dir}: {exc}") from exc

    async def reload(self, probe: AppProbe) -> None:
        """Import the changed app here; only if it loads, have the node replace its
        workers and wait until a new one answers."""
        started_s = time.monotonic()
        try:
            info = inspect_app(self.app_dir)
        except ConfigError as exc:
            self.say(f"not reloaded: {exc}")
            self.say(f"{self.name} keeps serving the last version that loaded")
            return
        error = await probe.reload()
        if error:
            self.say(f"not reloaded: {error}")
            self.say(f"{self.name} keeps serving the last version that loaded")
            return
        failure, _ = await probe.wait_serving(RELOAD_TIMEOUT_S)
        if failure:
            self.say(f"reload failed: {failure}")
            self.say(f"the node retries {self.name} with backoff; save a fix to reload it")
            return
        elapsed_ms = (time.monotonic() - started_s) * 1000
        self.say(f"reloaded {self.name} in {elapsed_ms:.0f} ms")
        if info.routes != self.info.routes:
            base = f"{self.endpoint}/{self.name}/"
            for line in info.route_lines(base) or ["(no routes)"]:
                self.say(f"route {line}")
        if info.topics != self.info.topics:
            self.say(f"topics: {', '.join(info.topics) or '(no topic handlers)'}")
        self.info = info
