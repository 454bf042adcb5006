"""How `fogline dev` sees its app on the local node, from outside: the state and reason
the node reports (`/local/apps`), whether a worker answers, and a reload
(`POST /local/apps/{app}/reload`) followed until a new worker serves."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx

POLL_INTERVAL_S = 0.05
NOT_RUNNING = ("restarting", "failed", "stopped")


class AppProbe:
    def __init__(self, name: str, node_pid: int, local: httpx.AsyncClient,
                 front: httpx.AsyncClient) -> None:
        """`local` carries the node's local token; `front` (for the app's own URLs) not."""
        self.name = name
        self.node_pid = node_pid
        self.local = local
        self.front = front

    async def status(self) -> dict[str, Any] | None:
        """The app's entry in `GET /local/apps`; None if the node does not answer."""
        try:
            response = await self.local.get("/local/apps")
            if response.status_code == 200:
                return next((a for a in response.json() if a.get("name") == self.name), None)
        except (httpx.HTTPError, ValueError):
            pass
        return None

    def describe(self, status: dict[str, Any] | None) -> str:
        if status is None:
            return f"{self.name}: the node reports no status"
        return f"{self.name} is {status['state']}: {status.get('reason') or 'no reason given'}"

    async def answers(self) -> bool:
        """Whether a worker of the app takes requests. TRACE is a method no app route can
        have, so no handler runs: a worker answers 404 or 405, the node's front 503 while
        no worker is ready."""
        try:
            response = await self.front.request("TRACE", f"/{self.name}/")
        except httpx.HTTPError:
            return False
        return response.status_code != 503

    async def reload(self) -> str:
        """'' once the node took the reload, or why not (its 422 names file and field)."""
        try:
            response = await self.local.post(f"/local/apps/{self.name}/reload")
        except httpx.HTTPError as exc:
            return f"the node did not answer: {exc}"
        if response.status_code == 422:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return str(response.json()["error"])
        if response.status_code != 200:
            return f"the node answered {response.status_code}: {response.text[:500]}"
        return ""

    async def wait_serving(self, timeout_s: float) -> tuple[str, dict[str, Any] | None]:
        """('', status) once the app is `running` and a worker answers; otherwise why
        not, with the app's state and reason from the node. A reload puts the app in
        `starting` at once and `running` only when a worker of the new code is ready (a
        reload is never lost while a worker starts), so the state is enough here."""
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            status = await self.status()
            if status is not None and status["state"] in NOT_RUNNING:
                return self.describe(status), status
            if status is not None and status["state"] == "running" and await self.answers():
                return "", status
            await asyncio.sleep(POLL_INTERVAL_S)
        return f"not serving within {timeout_s:.0f}s ({self.describe(status)})", status
