"""What a node does to match its desired state: a pure function of desired and observed.

For each deployed app the node either already runs the desired revision, lacks its
bundle (fetch it), has the bundle (activate it: start beside the running version and
switch once healthy), or refused that revision (keep what runs; the refusal is reported
and the same revision is never retried). A deployed app no longer desired is removed.
Apps given to the node locally (`--app DIR`) are not the hub's to change.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from fogline.protocol import DesiredApp


@dataclass(frozen=True)
class Fetch:
    app: DesiredApp


@dataclass(frozen=True)
class Activate:
    app: DesiredApp


@dataclass(frozen=True)
class Remove:
    name: str


Action = Fetch | Activate | Remove


def plan(desired: Mapping[str, DesiredApp], running: Mapping[str, int],
         local_digests: Collection[str], refused: Collection[tuple[str, int]],
         busy: Collection[str] = ()) -> list[Action]:
    """Actions that bring `running` (deployed app -> revision) to `desired`.

    `busy` names apps with an activation under way: nothing more is planned for them
    until it ends (the next plan sees its outcome)."""
    actions: list[Action] = [Remove(name) for name in sorted(running)
                             if name not in desired and name not in busy]
    for name in sorted(desired):
        app = desired[name]
        if name in busy or running.get(name) == app.revision \
                or (name, app.revision) in refused:
            continue
        actions.append(Activate(app) if app.digest in local_digests else Fetch(app))
    return actions


def prunable(history: Mapping[str, list[str]], in_use: Collection[str],
             keep: int = 3) -> set[str]:
    """Bundle digests a node may delete: beyond the `keep` most recent of each app
    (history lists digests oldest first) and not used by anything running."""
    keepers = {digest for digests in history.values() for digest in digests[-keep:]}
    every = {digest for digests in history.values() for digest in digests}
    return every - keepers - set(in_use)
