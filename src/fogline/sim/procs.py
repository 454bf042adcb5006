"""Child `fogline` processes for the demo and scenarios, owned and always reaped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fogline.errors import RetryableError, TerminalError
from fogline.transport.nats_server import die_with_parent, stop_process

FOGLINE = (sys.executable, "-m", "fogline")


@contextlib.asynccontextmanager
async def fogline_process(args: list[str], log_path: Path, own_session: bool = False,
                          ) -> AsyncIterator[asyncio.subprocess.Process]:
    """`fogline ARGS` with output to `log_path`; stopped (SIGTERM, then SIGKILL) on exit.

    The child also dies with this process if it is SIGKILLed, so no orphan survives.
    `own_session` keeps the terminal's Ctrl-C from reaching the child (and its children)
    directly, so this process stops them in its own order.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = await asyncio.create_subprocess_exec(
            *FOGLINE, *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            preexec_fn=die_with_parent, start_new_session=own_session,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield process
    finally:
        await stop_process(process)


async def wait_for_file(path: Path, process: asyncio.subprocess.Process, timeout_s: float,
                        log_path: Path) -> str:
    """The content of a file a child writes once it is ready."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if process.returncode is not None:
            raise TerminalError(f"process exited: {log_path.read_text()[-2000:]}")
        await asyncio.sleep(0.05)
    raise RetryableError(f"{path} did not appear within {timeout_s}s")


@contextlib.asynccontextmanager
async def python_module(module: str, config: dict[str, Any],
                        log_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m MODULE CONFIG_JSON` (the demo's measuring processes), output to
    `log_path`, running until the context exits (SIGTERM, then SIGKILL after a grace
    period); it also dies with this process."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, json.dumps(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            preexec_fn=die_with_parent)
    try:
        yield process
    finally:
        await stop_process(process)


async def run_reporting(runners: list[Callable[[asyncio.Event], Awaitable[None]]],
                        report: Callable[[], None], interval_s: float) -> None:
    """Run every runner (each stops once the event it is given is set) until cancelled,
    calling `report` every `interval_s` and once more at the very end."""
    stop = asyncio.Event()
    try:
        async with asyncio.TaskGroup() as group:
            for runner in runners:
                group.create_task(runner(stop))
            try:
                while True:
                    report()
                    await asyncio.sleep(interval_s)
            finally:
                stop.set()  # what is in flight finishes (each within its timeout)
    finally:
        report()
