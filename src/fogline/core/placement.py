"""Placement: which nodes a deployment targets, and which of those cannot run it.

A placement has a selector (regions, tiers, labels: which nodes are meant) and
requirements (memory, cores, architecture, GPU, accelerators: what the app needs). A
node the selector picks but that fails a requirement is *unsatisfied* and reported with
the reason, never silently skipped. Revoked nodes are never targeted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Selector:
    """Empty fields match every node; `labels` must all be present with equal values."""

    regions: frozenset[str] = frozenset()
    tiers: frozenset[str] = frozenset()
    labels: Mapping[str, str] = field(default_factory=dict)

    def matches(self, node: NodeFacts) -> bool:
        return ((not self.regions or node.region in self.regions)
                and (not self.tiers or node.tier in self.tiers)
                and all(node.labels.get(k) == v for k, v in self.labels.items()))


@dataclass(frozen=True)
class Requirements:
    memory_mb: int = 0
    cores: int = 0
    arch: frozenset[str] = frozenset()
    gpu: bool = False
    accelerators: frozenset[str] = frozenset()

    def unmet(self, node: NodeFacts) -> list[str]:
        """Why `node` cannot run the app; empty if it can."""
        reasons = []
        if node.memory_bytes < self.memory_mb * 1024 * 1024:
            reasons.append(f"needs {self.memory_mb} MB of memory, has "
                           f"{node.memory_bytes // (1024 * 1024)} MB")
        if node.cores < self.cores:
            reasons.append(f"needs {self.cores} cores, has {node.cores}")
        if self.arch and node.arch not in self.arch:
            reasons.append(f"needs arch {'|'.join(sorted(self.arch))}, is {node.arch}")
        if self.gpu and not node.gpu:
            reasons.append("needs a GPU")
        missing = sorted(self.accelerators - set(node.accelerators))
        if missing:
            reasons.append(f"needs accelerators {', '.join(missing)}")
        return reasons


@dataclass(frozen=True)
class Placement:
    selector: Selector = Selector()
    requires: Requirements = Requirements()


@dataclass(frozen=True)
class NodeFacts:
    """What placement and rollouts know of a node (from the hub's registry)."""

    id: str
    region: str = ""
    tier: str = "near"
    labels: Mapping[str, str] = field(default_factory=dict)
    cores: int = 1
    memory_bytes: int = 0
    arch: str = ""
    gpu: bool = False
    accelerators: tuple[str, ...] = ()
    status: str = "ready"

    @property
    def online(self) -> bool:
        """Reachable and healthy enough to take a new revision now."""
        return self.status in ("ready", "degraded")


@dataclass(frozen=True)
class PlacementResult:
    selected: tuple[str, ...]
    # Node id -> why it cannot run the app (the selector picked it).
    unsatisfied: Mapping[str, str]


def place(placement: Placement, nodes: Iterable[NodeFacts]) -> PlacementResult:
    selected: list[str] = []
    unsatisfied: dict[str, str] = {}
    for node in nodes:
        if node.status == "revoked" or not placement.selector.matches(node):
            continue
        unmet = placement.requires.unmet(node)
        if unmet:
            unsatisfied[node.id] = "; ".join(unmet)
        else:
            selected.append(node.id)
    return PlacementResult(tuple(sorted(selected)), unsatisfied)
