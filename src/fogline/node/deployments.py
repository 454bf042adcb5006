"""The node's IO shell for deployments: it makes the apps it runs match its desired state.

The hub's `DesiredState` arrives by `offer` (pushed, or asked for on connect); a newer
generation is written to `DATA/deploy/desired.msgpack` before anything acts on it, so a
node restarting with the hub away runs its last desired apps from the bundles it keeps
in `DATA/apps/bundles/<sha256 hex>/` (local first). `run` is a level-based loop: it
asks `core.reconcile.plan` what to do and applies the actions, one task per app and at
most `ACTIONS_IN_FLIGHT_MAX` at a time.

- Fetch: the signature is checked first (no download for a bundle the node would not
  run), then the bytes against the signed digest, then they are unpacked atomically.
- Activate: the signature again (the key may have been withdrawn), the manifest's name
  and version against the deployment's, then `NodeApps.activate` starts the new version
  beside the running one and switches once it runs.
- Remove: an app no longer desired stops.

A bundle the node must not run, or a version that does not come up, is a refusal: kept
(in `DATA/deploy/ledger.msgpack`) and reported, never retried for that revision, and
the running version keeps serving. Anything else (the hub away, a timeout, a full disk)
is retried with a capped backoff. The last `BUNDLES_KEPT` bundles of each app stay on
disk, so rolling back to one of them needs no fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from fogline.clock import Clock
from fogline.core.reconcile import Action, Activate, Fetch, Remove, plan, prunable
from fogline.errors import ConfigError, ProtocolError, RetryableError, TerminalError
from fogline.protocol import (
    APP_REASON_CHARS_MAX,
    APPS_PER_NODE_MAX,
    BundleRefusal,
    DesiredApp,
    DesiredState,
    decode,
    encode,
)

if TYPE_CHECKING:
    from fogline.node.apps.manager import NodeApps

log = logging.getLogger("fogline.node.deployments")

DESIRED_FILE = "desired.msgpack"
LEDGER_FILE = "ledger.msgpack"
LEDGER_BYTES_MAX = 4 * 1024 * 1024
BUNDLES_KEPT = 3
ACTIONS_IN_FLIGHT_MAX = 2  # each fetch holds a bundle (up to 64 MiB) in memory
REFUSALS_MAX = APPS_PER_NODE_MAX
RETRY_DELAY_S_MIN = 0.5
# No retry count: a node may wait hours for its hub, and the delay is capped instead.
RETRY_DELAY_S_MAX = 30.0
ACTIVATE_TIMEOUT_S = 30.0
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_BUNDLE_DIR = re.compile(r"^[0-9a-f]{64}$")

Fetcher = Callable[[DesiredApp], Awaitable[bytes]]


class DeploymentRefused(TerminalError):
    """A deployed revision this node will not run; `reason` is its refusal code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Ledger(msgspec.Struct):
    """What the node keeps beside its desired state: refusals (oldest first), each app's
    bundle digests (oldest first) and the revision of each app that last ran well."""

    refusals: list[BundleRefusal] = []
    history: dict[str, list[str]] = {}
    last_good: dict[str, DesiredApp] = {}


@dataclass
class _Retry:
    """An action that failed for a transient reason: not planned again before `due_s`."""

    target: tuple[str, int]  # (app, revision), revision -1 for a removal
    due_s: float
    delay_s: float


def _write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def _action_target(action: Action) -> tuple[str, int]:
    """(app, revision) an action is for; revision -1 for a removal."""
    if isinstance(action, Remove):
        return (action.name, -1)
    return (action.app.name, action.app.revision)


def _check_manifest(directory: Path, app: DesiredApp) -> None:
    # pydantic and YAML load only on nodes that get deployments.
    from fogline.node.apps.manifest import read_manifest

    try:
        manifest = read_manifest(directory)
    except ConfigError as exc:
        raise DeploymentRefused("bad-manifest", str(exc)) from exc
    found = (manifest.metadata.name, manifest.metadata.version)
    if found != (app.name, app.version):
        raise DeploymentRefused("manifest-mismatch",
                                f"bundle {app.digest} holds {found[0]} {found[1]}, the "
                                f"deployment says {app.name} {app.version}")


class NodeDeployments:
    def __init__(self, data_dir: Path, node_id: str, apps: NodeApps, clock: Clock,
                 fetch: Fetcher, on_change: Callable[[], None] | None = None,
                 activate_timeout_s: float = ACTIVATE_TIMEOUT_S) -> None:
        self.node_id = node_id
        self.apps = apps
        self.clock = clock
        self.fetch = fetch
        self.on_change = on_change
        self.activate_timeout_s = activate_timeout_s
        self.deploy_dir = data_dir / "deploy"
        self.bundles_dir = data_dir / "apps" / "bundles"
        self.applied_generation = 0  # the last generation fully applied or refused
        self._desired = DesiredState(node_id=node_id, generation=0)
        self._refusals: dict[tuple[str, int], BundleRefusal] = {}
        self._history: dict[str, list[str]] = {}
        # Per app, the revision that last activated: it is what runs again after a
        # restart when the desired revision was refused.
        self._last_good: dict[str, DesiredApp] = {}
        self._in_flight: set[str] = set()
        self._retries: dict[str, _Retry] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._load()

    # What the node reports -------------------------------------------------------------

    @property
    def generation(self) -> int:
        """The generation of the desired state the node acts on."""
        return self._desired.generation

    @property
    def desired(self) -> DesiredState:
        return self._desired

    def running(self) -> dict[str, int]:
        """Deployed app -> the revision it runs."""
        return self.apps.deployed()

    def refusals(self) -> tuple[BundleRefusal, ...]:
        """Refusals of revisions still desired (older ones no longer concern the hub)."""
        wanted = {(app.name, app.revision) for app in self._desired.apps}
        return tuple(r for key, r in sorted(self._refusals.items()) if key in wanted)

    async def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Until the desired state is applied or refused (TimeoutError after `timeout_s`)."""
        async with asyncio.timeout(timeout_s):
            await self._idle.wait()

    # Desired state -----------------------------------------------------------------

    def offer(self, state: DesiredState) -> bool:
        """Act on `state` if it is this node's and newer; False (and nothing changes) if
        not. It is on disk before this returns."""
        if state.node_id != self.node_id:
            log.warning("desired state for node %r ignored", state.node_id)
            return False
        if state.generation <= self._desired.generation:
            return False
        names = [app.name for app in state.apps]
        if len(names) > APPS_PER_NODE_MAX or len(set(names)) != len(names):
            log.error("desired state generation %d ignored: %d apps, %d distinct names",
                      state.generation, len(names), len(set(names)))
            return False
        _write_atomic(self.deploy_dir / DESIRED_FILE, encode(state))
        self._desired = state
        log.info("desired state generation %d: %s", state.generation,
                 ", ".join(f"{a.name} r{a.revision}" for a in state.apps) or "no apps")
        self._idle.clear()
        self._wake.set()
        self._changed()
        return True

    def _load(self) -> None:
        path = self.deploy_dir / DESIRED_FILE
        try:
            state = decode(path.read_bytes())
        except FileNotFoundError:
            state = None
        except (OSError, ProtocolError) as exc:
            log.error("cannot read %s (%s); waiting for the hub's desired state", path, exc)
            state = None
        if isinstance(state, DesiredState) and state.node_id == self.node_id:
            self._desired = state
        ledger_path = self.deploy_dir / LEDGER_FILE
        try:
            data = ledger_path.read_bytes()
            if len(data) > LEDGER_BYTES_MAX:
                raise ProtocolError(f"{len(data)} bytes exceeds {LEDGER_BYTES_MAX}")
            ledger = msgspec.msgpack.decode(data, type=_Ledger)
        except FileNotFoundError:
            return
        except (OSError, ProtocolError, msgspec.DecodeError) as exc:
            log.error("cannot read %s (%s); starting without refusals", ledger_path, exc)
            return
        self._refusals = {(r.app, r.revision): r for r in ledger.refusals}
        self._history = ledger.history
        self._last_good = ledger.last_good

    def _save_ledger(self) -> None:
        ledger = _Ledger(refusals=list(self._refusals.values()), history=self._history,
                         last_good=self._last_good)
        _write_atomic(self.deploy_dir / LEDGER_FILE, msgspec.msgpack.encode(ledger))

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # The loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Reconcile until cancelled."""
        await asyncio.to_thread(self._tidy_bundles)
        async with asyncio.TaskGroup() as group:
            while True:
                self._wake.clear()
                self._start_actions(group)
                await self._wait(self._next_retry_s())

    def _start_actions(self, group: asyncio.TaskGroup) -> None:
        state = self._desired
        desired = self._effective(state)
        now_s = self.clock.monotonic()
        # A backoff holds only the action it was for; the desired state may have moved on.
        self._retries = {name: retry for name, retry in self._retries.items()
                         if retry.target == (name, desired[name].revision
                                             if name in desired else -1)}
        waiting = {name for name, retry in self._retries.items() if retry.due_s > now_s}
        actions = plan(desired, self.apps.deployed(), self._local_digests(),
                       self._refusals.keys(), busy=self._in_flight | waiting)
        if not actions and not self._in_flight and not waiting:
            self.applied_generation = state.generation
            self._idle.set()
            return
        self._idle.clear()
        for action in actions[:max(0, ACTIONS_IN_FLIGHT_MAX - len(self._in_flight))]:
            name, _ = _action_target(action)
            self._in_flight.add(name)
            group.create_task(self._execute(action, state), name=f"deploy-{name}")

    def _effective(self, state: DesiredState) -> dict[str, DesiredApp]:
        """App -> the revision to run: the desired one, or, where that was refused, the
        one that last ran well (so a restart brings back what served before)."""
        effective = {}
        for app in state.apps:
            fallback = self._last_good.get(app.name)
            if (app.name, app.revision) in self._refusals and fallback is not None \
                    and (fallback.name, fallback.revision) not in self._refusals:
                app = fallback
            effective[app.name] = app
        return effective

    def _next_retry_s(self) -> float | None:
        """Seconds until the next backoff ends; None if none is pending."""
        now_s = self.clock.monotonic()
        due = [r.due_s - now_s for r in self._retries.values() if r.due_s > now_s]
        return min(due) if due else None

    async def _wait(self, timeout_s: float | None) -> None:
        """Until woken (an offer, an action's end) or `timeout_s` on the node's clock."""
        if timeout_s is None:
            await self._wake.wait()
            return
        waiters = {asyncio.ensure_future(self._wake.wait()),
                   asyncio.ensure_future(self.clock.sleep(timeout_s))}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _execute(self, action: Action, state: DesiredState) -> None:
        # Loaded here, not at import: a node without deployments never needs them.
        from fogline.bundle import BundleRejected
        from fogline.node.apps.manager import ActivationFailed
        from fogline.node.artifacts import ArtifactRefused

        app = None if isinstance(action, Remove) else action.app
        target = _action_target(action)
        name = target[0]
        try:
            if isinstance(action, Fetch):
                await self._fetch(action.app, state)
            elif isinstance(action, Activate):
                await self._activate(action.app, state)
            else:
                await self._remove(name)
        except (BundleRejected, ArtifactRefused, DeploymentRefused) as exc:
            self._refuse_or_back_off(app, target, exc.reason, exc)
        except ActivationFailed as exc:
            self._refuse_or_back_off(app, target, "unhealthy", exc)
        except ConfigError as exc:  # the app's definition, as NodeApps reads it
            self._refuse_or_back_off(app, target, "bad-manifest", exc)
        except Exception as exc:
            # The hub away, a timeout, a full disk, a malformed reply, or a bug: one app's
            # deployment must not stop the others, so it is logged and retried later.
            self._back_off(name, target, exc)
        else:
            self._retries.pop(name, None)
        finally:
            self._in_flight.discard(name)
            self._wake.set()

    # Actions -----------------------------------------------------------------------

    def _bundle_dir(self, digest: str) -> Path:
        from fogline.bundle import BundleRejected

        found = _DIGEST.match(digest)
        if found is None:  # it names a directory: nothing else may pass
            raise BundleRejected("digest-mismatch", f"{digest!r} is not a sha256 digest")
        return self.bundles_dir / found.group(1)

    def _local_digests(self) -> set[str]:
        try:
            names = os.listdir(self.bundles_dir)
        except FileNotFoundError:
            return set()
        return {"sha256:" + name for name in names if _BUNDLE_DIR.match(name)}

    @staticmethod
    def _verify(app: DesiredApp, state: DesiredState) -> None:
        from fogline.bundle import verify

        trusted = {key.key_id: key.public_key for key in state.keys}
        verify(trusted, app.key_id, app.signature, app.name, app.version, app.digest)

    async def _fetch(self, app: DesiredApp, state: DesiredState) -> None:
        from fogline.bundle import check_digest, unpack

        directory = self._bundle_dir(app.digest)
        self._verify(app, state)
        log.info("fetching %s revision %d (%s, %d bytes)", app.name, app.revision,
                 app.digest, app.size)
        data = await self.fetch(app)

        def store() -> None:
            check_digest(data, app.digest)
            directory.parent.mkdir(parents=True, exist_ok=True)
            if not directory.exists():
                unpack(data, directory)

        await asyncio.to_thread(store)
        self._remember(app)

    async def _activate(self, app: DesiredApp, state: DesiredState) -> None:
        directory = self._bundle_dir(app.digest)
        self._verify(app, state)
        await asyncio.to_thread(_check_manifest, directory, app)
        if app.name in self.apps.supervisors and app.name not in self.apps.deployed():
            raise DeploymentRefused("name-taken", f"app {app.name!r} was given to this node "
                                                  "locally (--app); the hub cannot replace it")
        log.info("activating %s %s revision %d", app.name, app.version, app.revision)
        await self.apps.activate(directory, app.revision, timeout_s=self.activate_timeout_s)
        self._last_good[app.name] = app
        log.info("%s revision %d is running", app.name, app.revision)
        self._remember(app)
        await asyncio.to_thread(self._prune)
        self._changed()

    async def _remove(self, name: str) -> None:
        log.info("removing %s: no longer desired", name)
        await self.apps.remove(name)
        self._last_good.pop(name, None)
        self._save_ledger()
        await asyncio.to_thread(self._prune)
        self._changed()

    def _refuse_or_back_off(self, app: DesiredApp | None, target: tuple[str, int], code: str,
                            exc: Exception) -> None:
        if app is None:  # a removal is never refused: it is retried
            self._back_off(target[0], target, exc)
        else:
            self._refuse(app, code, str(exc))

    def _refuse(self, app: DesiredApp, code: str, reason: str) -> None:
        log.error("refused %s revision %d (%s): %s", app.name, app.revision, code, reason)
        if len(reason) > APP_REASON_CHARS_MAX:
            reason = reason[:APP_REASON_CHARS_MAX - 1] + "…"
        self._refusals.pop((app.name, app.revision), None)
        self._refusals[(app.name, app.revision)] = BundleRefusal(app.name, app.revision,
                                                                 code, reason)
        wanted = {(a.name, a.revision) for a in self._desired.apps}
        for key in [k for k in self._refusals if k not in wanted]:
            if len(self._refusals) <= REFUSALS_MAX:
                break
            del self._refusals[key]  # the oldest refusals of revisions no longer desired
        self._save_ledger()
        self._changed()

    def retry_now(self) -> None:
        """The hub is back: try what waits out a backoff now rather than later."""
        if self._retries:
            self._retries.clear()
            self._wake.set()

    def _back_off(self, name: str, target: tuple[str, int], exc: Exception) -> None:
        previous = self._retries.get(name)
        delay_s = RETRY_DELAY_S_MIN
        if previous is not None and previous.target == target:
            delay_s = min(previous.delay_s * 2, RETRY_DELAY_S_MAX)
        self._retries[name] = _Retry(target, self.clock.monotonic() + delay_s, delay_s)
        message = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if isinstance(exc, OSError | TimeoutError | ProtocolError | RetryableError):
            log.warning("deploying %s: %s; retrying in %.1fs", name, message, delay_s)
        else:
            log.exception("deploying %s failed unexpectedly; retrying in %.1fs", name,
                          delay_s)

    # Bundles on disk ---------------------------------------------------------------

    def _remember(self, app: DesiredApp) -> None:
        digests = [d for d in self._history.get(app.name, []) if d != app.digest]
        self._history[app.name] = [*digests, app.digest]
        self._save_ledger()

    def _in_use(self) -> set[str]:
        return {app.digest for app in (*self._last_good.values(), *self._desired.apps)}

    def _prune(self) -> None:
        doomed = prunable(self._history, self._in_use(), keep=BUNDLES_KEPT)
        if not doomed:
            return
        for digest in doomed:
            shutil.rmtree(self._bundle_dir(digest), ignore_errors=True)
        self._history = {name: [d for d in digests if d not in doomed]
                         for name, digests in self._history.items()}
        self._history = {name: digests for name, digests in self._history.items() if digests}
        self._save_ledger()

    def _tidy_bundles(self) -> None:
        """At start: drop half-unpacked directories a crash left, adopt bundles unpacked
        but not yet remembered, and delete any other bundle nothing refers to."""
        if not self.bundles_dir.is_dir():
            return
        known = {d for digests in self._history.values() for d in digests}
        desired = {app.digest: app for app in self._desired.apps}
        for entry in os.scandir(self.bundles_dir):
            digest = "sha256:" + entry.name
            if entry.name.startswith("."):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif _BUNDLE_DIR.match(entry.name) and digest not in known:
                if digest in desired:
                    self._remember(desired[digest])
                else:
                    with contextlib.suppress(OSError):
                        shutil.rmtree(entry.path)
