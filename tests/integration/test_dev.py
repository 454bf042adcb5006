"""`fogline dev` as a user runs it: a real hub, node and app workers as child processes.

One session walks the edit loop (serve, edit, break, fix, stop) so the expensive start
happens once; a bad app directory is refused before anything starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from fogline.errors import ConfigError
from fogline.node.apps.manager import read_definition

STEADY = Path(__file__).resolve().parent.parent / "apps" / "steady"
START_TIMEOUT_S = 30.0
RELOAD_TIMEOUT_S = 10.0
# A worker is started as `python -m fogline.node.apps.worker`; `fogline dev` is not.
WORKER_ONLY_FAILURE = """
import sys
if sys.argv[0].endswith("worker.py"):
    raise RuntimeError("only in the worker")
"""


class DevProcess:
    """`fogline dev` with its output collected line by line."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fogline", "dev", *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def expect(self, pattern: str, timeout_s: float, after: int = 0) -> re.Match[str]:
        """The first line from index `after` on that matches `pattern`."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self.lines[after:]:
                    found = re.search(pattern, line)
                    if found:
                        return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r} in:\n{self.output}")
                self._changed.wait(min(left, 0.2))

    def mark(self) -> int:
        with self._changed:
            return len(self.lines)

    def close(self) -> None:
        """Stop what is left (a failed test) and release the pipe."""
        if self.process.poll() is None:
            with_children = psutil.Process(self.process.pid).children(recursive=True)
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(15)
            self.process.kill()
            for child in with_children:
                with contextlib.suppress(psutil.Error):
                    child.kill()
            self.process.wait()
        self._reader.join(5)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    copy = tmp_path / "steady"
    shutil.copytree(STEADY, copy)
    return copy


@pytest.fixture
def dev(app_dir: Path) -> Iterator[DevProcess]:
    process = DevProcess(str(app_dir), "--port", "0")
    try:
        yield process
    finally:
        process.close()


def test_edit_loop_reloads_keeps_the_last_good_version_and_stops_cleanly(
        dev: DevProcess, app_dir: Path) -> None:
    base = dev.expect(r"^  app\s+(http://127\.0\.0\.1:\d+/steady/)$", START_TIMEOUT_S)[1]
    dev.expect(r"^  route\s+GET\s+http://127\.0\.0\.1:\d+/steady/ping$", 1)
    dev.expect(r"^  mqtt\s+mqtt://127\.0\.0\.1:\d+  topics: \(no topic handlers\)$", 1)
    dev.expect(r"^  hub\s+http://127\.0\.0\.1:\d+", 1)
    data_dir = Path(dev.expect(r"^  data\s+(\S+) \(temporary: removed at exit\)$", 1)[1])
    assert httpx.get(base + "ping", timeout=5).json() == {"ok": 1, "count": 1}
    dev.expect(r"INFO fogline\.node\.apps: app steady: running", 5)  # the node's log

    source = app_dir / "steady_app.py"
    good = source.read_text()
    mark = dev.mark()
    source.write_text(good.replace('"ok": 1', '"ok": 2'))
    dev.expect(r"^\[dev\] reloaded steady in \d+ ms$", RELOAD_TIMEOUT_S, mark)
    # A reload starts a new worker: the new code answers, and its counter starts anew.
    assert httpx.get(base + "ping", timeout=5).json() == {"ok": 2, "count": 1}

    # Code that does not import never reaches the node: the last good version serves on.
    mark = dev.mark()
    source.write_text(good.replace('"ok": 1', '"ok": 3') + "\ndef broken(:\n")
    dev.expect(r"^\[dev\] not reloaded: .*fogline\.yaml: spec\.entrypoint: cannot import "
               r"'steady_app': SyntaxError: .*steady_app\.py, line \d+", RELOAD_TIMEOUT_S, mark)
    dev.expect(r"^\[dev\] steady keeps serving the last version that loaded$", 1, mark)
    assert httpx.get(base + "ping", timeout=5).json() == {"ok": 2, "count": 2}

    # Likewise a manifest that no longer validates: the error names file and field.
    manifest = app_dir / "fogline.yaml"
    good_manifest = manifest.read_text()
    mark = dev.mark()
    manifest.write_text(good_manifest + "  limits: {workers: 0}\n")
    dev.expect(r"^\[dev\] not reloaded: .*fogline\.yaml: spec\.limits\.workers: ",
               RELOAD_TIMEOUT_S, mark)
    manifest.write_text(good_manifest)

    # Code that imports here but not in the node's worker goes through; the app's state
    # and reason from the node say why it does not serve.
    mark = dev.mark()
    source.write_text(good + WORKER_ONLY_FAILURE)
    dev.expect(r"^\[dev\] reload failed: steady is restarting: failed to load: .*"
               r"RuntimeError: only in the worker$", RELOAD_TIMEOUT_S, mark)
    assert httpx.get(base + "ping", timeout=5).status_code == 503

    # The next good save serves again (the node may still call the app failed a while).
    mark = dev.mark()
    source.write_text(good.replace('"ok": 1', '"ok": 4'))
    dev.expect(r"^\[dev\] reloaded steady in \d+ ms", RELOAD_TIMEOUT_S, mark)
    assert httpx.get(base + "ping", timeout=5).json()["ok"] == 4

    children = psutil.Process(dev.process.pid).children(recursive=True)
    commands = [" ".join(child.cmdline()) for child in children]
    assert sum("fogline.node.apps.worker" in c for c in commands) == 1, commands
    assert sum("nats-server" in c for c in commands) == 2, commands  # hub's, node's MQTT
    dev.process.send_signal(signal.SIGTERM)
    assert dev.process.wait(20) == 0, dev.output
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left behind: {alive}"
    assert not data_dir.exists()


@pytest.mark.parametrize("problem", ["bad field", "no manifest"])
def test_a_bad_app_dir_starts_nothing(app_dir: Path, tmp_path: Path, problem: str) -> None:
    if problem == "bad field":
        manifest = app_dir / "fogline.yaml"
        manifest.write_text(manifest.read_text() + "  limits: {workers: 0}\n")
    else:
        (app_dir / "fogline.yaml").unlink()
    with pytest.raises(ConfigError) as expected:
        read_definition(app_dir)
    data = tmp_path / "data"
    result = subprocess.run([sys.executable, "-m", "fogline", "dev", str(app_dir), "--data",
                             str(data)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    # The console wraps long lines; compare without whitespace.
    shown = "".join(result.stdout.split())
    assert "".join(str(expected.value).split()) in shown, result.stdout
    assert not data.exists()
