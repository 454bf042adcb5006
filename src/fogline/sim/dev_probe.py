"""How `fogline dev` sees its app on the local node, from outside: the state and reason
the node reports (`/local/apps`), the app's worker processes, whether a worker answers,
and a reload (`POST /local/apps/{app}/reload`) followed until a new worker serves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import httpx
import psutil

WORKER_MODULE = "fogline.node.apps.worker"
POLL_INTERVAL_S = 0.05
# A worker from before a change that still serves this long after a reload, while no
# worker of the new code runs, missed the reload (see `AppProbe.wait_serving`).
RESEND_AFTER_S = 1.0
NOT_RUNNING = ("restarting", "failed", "stopped")


def app_workers(node_pid: int, app: str) -> dict[int, float]:
    """The node's live worker processes for `app` (their command line carries the
    worker's spec as JSON): pid -> process start time (epoch seconds)."""
    workers: dict[int, float] = {}
    try:
        children = psutil.Process(node_pid).children()
    except psutil.Error:
        return workers
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            command, started_s = child.cmdline(), child.create_time()
        except psutil.Error:
            continue
        if len(command) > 3 and command[2] == WORKER_MODULE:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                if json.loads(command[3]).get("name") == app:
                    workers[child.pid] = started_s
    return workers


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

    async def wait_serving(self, timeout_s: float, changed_at_s: float | None = None,
                           recovering: bool = False) -> tuple[str, dict[str, Any] | None]:
        """('', status) once every worker of the app started after `changed_at_s` and one
        answers; otherwise why not, with the app's state and reason from the node.

        The state cannot tell alone: it stays `running` across a reload, and an app that
        was crash-looping (`recovering`) stays `failed` a while after it serves again; so
        a failure is the state leaving `running`, or for such an app the end of a worker
        started after the change."""
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] | None = None
        fresh_seen: set[int] = set()
        resent_s = time.monotonic()
        while time.monotonic() < deadline:
            status = await self.status()
            workers = app_workers(self.node_pid, self.name)
            stale = {pid for pid, started_s in workers.items()
                     if changed_at_s is not None and started_s < changed_at_s}
            fresh = set(workers) - stale
            fresh_ended = bool(fresh_seen - fresh)
            fresh_seen |= fresh
            if status is not None and status["state"] in NOT_RUNNING and (
                    not recovering or fresh_ended):
                return self.describe(status), status
            answers = await self.answers()
            if answers and not stale:
                return "", status
            if answers and not fresh and time.monotonic() - resent_s > RESEND_AFTER_S:
                # The node drops a reload that arrives while a worker is still starting
                # (after a crash, say): that worker then serves the code from before the
                # change. Ask again now that it serves.
                await self.reload()
                resent_s = time.monotonic()
            await asyncio.sleep(POLL_INTERVAL_S)
        return f"not serving within {timeout_s:.0f}s ({self.describe(status)})", status
