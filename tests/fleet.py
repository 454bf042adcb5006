"""Running real `fogline hub` and `fogline node` processes from tests."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats

from fogline.node.identity import EnrollOptions, NodeFiles, enroll
from fogline.protocol import inbox_prefix

FOGLINE = [sys.executable, "-m", "fogline"]


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str,
              interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class HubProcess:
    data: Path
    process: subprocess.Popen[bytes]
    url: str = ""
    token: str = ""
    verify: ssl.SSLContext | bool = True
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.verify, timeout=10,
                            headers={"Authorization": f"Bearer {self.token}"})

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        with self.client() as client:
            response = client.request(method, path, **kwargs)
        assert response.status_code < 400, response.text
        return response.json()

    def create_token(self, **body: Any) -> str:
        return str(self.api("POST", "/v1/tokens", json=body)["token"])

    def nodes_by_name(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.api("GET", "/v1/nodes")}

    def start_node(self, data: Path, name: str, token: str | None = None,
                   *extra: str) -> subprocess.Popen[bytes]:
        args = [*FOGLINE, "node", "--data", str(data), "--name", name]
        if token is not None:
            args += ["--hub", self.url, "--token", token]
        log = open(data.parent / f"{data.name}.log", "ab")  # noqa: SIM115 - lives with the process
        process = subprocess.Popen([*args, *extra], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.nodes.append(process)
        return process


@contextlib.contextmanager
def run_hub(data: Path, *extra: str, listen: str = "127.0.0.1:0") -> Iterator[HubProcess]:
    """A `fogline hub` process; every node started through it is stopped on exit."""
    data.mkdir(parents=True, exist_ok=True)
    (data / "hub.url").unlink(missing_ok=True)  # a restart must not see the old one
    log = open(data.parent / f"{data.name}.log", "ab")  # noqa: SIM115 - lives with the process
    process = subprocess.Popen([*FOGLINE, "hub", "--data", str(data), "--listen", listen,
                                *extra], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    hub = HubProcess(data=data, process=process)
    try:
        def started() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"hub exited: {(data.parent / f'{data.name}.log').read_text()[-3000:]}")
            return (data / "hub.url").exists()

        wait_for(started, 30, "hub to start")
        hub.url = (data / "hub.url").read_text().strip()
        hub.token = (data / "admin.token").read_text().strip()
        if hub.url.startswith("https://"):
            hub.verify = ssl.create_default_context(cafile=str(data / "pki" / "ca.crt"))
        yield hub
    finally:
        for node in hub.nodes:
            stop(node)
        stop(process)


class ThreadedWan:
    """A WanEmulator on its own event loop thread, so sync tests can steer it while
    blocking calls in the test never stall the proxied traffic."""

    def __init__(self) -> None:
        import asyncio
        import threading

        from fogline.sim.wan import WanEmulator

        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.emulator = WanEmulator()

        async def main() -> None:
            self._stop = asyncio.Event()
            async with self.emulator:
                self._ready.set()
                await self._stop.wait()

        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(main(),),
                                        daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def call(self, fn: Callable[[], Any]) -> Any:
        import asyncio

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def add_link(self, name: str, upstream: tuple[str, int], latency_ms: float = 0.0) -> int:
        from fogline.sim.wan import LinkConfig

        link = self.call(lambda: self.emulator.add_link(name, upstream,
                                                        LinkConfig(latency_ms=latency_ms)))
        return int(link.port)

    def partition(self, name: str) -> None:
        self.call(lambda: self.emulator.link(name).partition("reset"))

    def heal(self, name: str) -> None:
        self.call(lambda: self.emulator.link(name).heal())

    def close(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()


@dataclass
class LocalNode:
    """A node's local collection API, as apps on the node would use it."""

    data: Path

    def _client(self) -> httpx.Client:
        endpoint = (self.data / "endpoint").read_text().strip()
        token = (self.data / "local.token").read_text().strip()
        return httpx.Client(base_url=endpoint, timeout=10,
                            headers={"Authorization": f"Bearer {token}"})

    def write(self, collection: str, **body: Any) -> dict[str, Any]:
        with self._client() as client:
            response = client.post(f"/local/collections/{collection}", json=body)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def emit(self, stream: str, record: Any) -> int:
        with self._client() as client:
            response = client.post(f"/local/streams/{stream}", json={"record": record})
        assert response.status_code == 200, response.text
        return int(response.json()["seq"])

    def value(self, collection: str) -> Any:
        with self._client() as client:
            response = client.get(f"/local/collections/{collection}")
        if response.status_code != 200:
            return None
        return response.json()["value"]

    def knows(self, collection: str) -> bool:
        return self.value(collection) is not None


def enrolled_node(hub: HubProcess, directory: Path, name: str) -> tuple[NodeFiles, str]:
    """A node enrolled with the hub, without a node process: its files and id."""
    files = NodeFiles(directory)
    identity = enroll(files, EnrollOptions(hub_url=hub.url, token=hub.create_token(),
                                           name=name), {}, time.time())
    return files, identity.node_id


async def connect_as(files: NodeFiles, node_id: str, url: str,
                     errors: list[Exception] | None = None) -> nats.NATS:
    """A NATS connection with the node's own credentials (and so its permissions)."""
    seed, jwt = files.nkey(), files.nats_jwt.read_text().strip()

    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(exc)

    return await nats.connect(
        url, user_jwt_cb=lambda: jwt.encode(),
        signature_cb=lambda nonce: base64.b64encode(seed.sign(nonce.encode())),
        inbox_prefix=inbox_prefix(node_id), error_cb=on_error, allow_reconnect=False,
        connect_timeout=3)


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[int]:
    """An ASGI app (an origin, say) on its own event loop in a thread, so blocking calls
    in a sync test never stall it; yields its port."""
    import asyncio
    import threading

    from fogline.transport.http_server import serve_http

    loop = asyncio.new_event_loop()
    ports: list[int] = []
    ready = threading.Event()
    stop: list[asyncio.Event] = []

    async def serve() -> None:
        stop.append(asyncio.Event())
        async with serve_http(app, "127.0.0.1", 0) as port:
            ports.append(port)
            ready.set()
            await stop[0].wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "the server did not start"
        yield ports[0]
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)
        loop.close()
