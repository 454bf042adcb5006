"""Running real `fogline hub` and `fogline node` processes from tests."""

from __future__ import annotations

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
