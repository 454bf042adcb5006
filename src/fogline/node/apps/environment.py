"""Per-app Python environments for apps whose manifest lists `requirements`.

The rule: an app with requirements runs on the interpreter of a virtual environment in
`DATA/apps/envs/<hash>`, made with `--system-site-packages` so fogline and what it
depends on are there already, and the app's requirements installed on top by pip. The
hash covers the Python version and the sorted requirement strings, so apps asking for
the same list share one environment and a changed list gets a new one. A requirement
may add packages; pinning another version of a package fogline itself uses shadows the
node's copy for that app only. pip needs its index (or `PIP_FIND_LINKS` pointing at a
wheelhouse, for offline sites) when an environment is first made; after that the node
starts the app with the network down. An environment is used only once a marker file
says its install finished, so one cut short by a crash is made again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sys
from pathlib import Path

from fogline.errors import ConfigError

INSTALL_TIMEOUT_S = 600.0
DONE_MARKER = ".fogline-complete"


def environment_dir(envs_dir: Path, requirements: list[str]) -> Path:
    key = json.dumps([sys.version.split()[0], sorted(requirements)])
    return envs_dir / hashlib.sha256(key.encode()).hexdigest()[:16]


def interpreter(env: Path) -> Path:
    return env / "bin" / "python"


async def _run(*args: str, timeout_s: float) -> None:
    process = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ConfigError(f"{args[0]} {' '.join(args[1:4])}... took over "
                          f"{timeout_s:.0f}s") from None
    if process.returncode != 0:
        tail = output.decode(errors="replace").strip().splitlines()[-3:]
        raise ConfigError(f"installing requirements failed: {' / '.join(tail)}")


async def ensure_environment(envs_dir: Path, requirements: list[str]) -> str:
    """The interpreter to run an app with `requirements`, made and installed if needed;
    ConfigError (with pip's last lines) if the install fails."""
    env = environment_dir(envs_dir, requirements)
    marker = env / DONE_MARKER
    if marker.exists():
        return str(interpreter(env))
    shutil.rmtree(env, ignore_errors=True)  # a half-made one from an interrupted start
    env.parent.mkdir(parents=True, exist_ok=True)
    await _run(sys.executable, "-m", "venv", "--system-site-packages", str(env),
               timeout_s=INSTALL_TIMEOUT_S)
    await _run(str(interpreter(env)), "-m", "pip", "install", "--disable-pip-version-check",
               "--no-input", "--quiet", *requirements, timeout_s=INSTALL_TIMEOUT_S)
    marker.write_text(json.dumps(sorted(requirements)) + "\n")
    return str(interpreter(env))
