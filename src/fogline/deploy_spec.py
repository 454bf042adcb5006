"""How and where an app is deployed: the `placement`, `rollout` and `pins` of its manifest.

```yaml
spec:
  placement:
    selector: {regions: [eu-west], tiers: [near], labels: {line: a}}
    requires: {memory_mb: 512, cores: 2, arch: [x86_64], gpu: false, accelerators: []}
  rollout:
    steps: [1, 10%, 50%, 100%]   # node counts or percentages of the eligible nodes
    bake: 30s                   # per step, once its nodes run the new revision
    gates: {error_rate: 0.01, p99_ms: 250, restarts: 2, min_requests: 20,
            metrics: {handler_errors: 0}}
    on_failure: rollback        # or pause
    progress_deadline: 2m
  pins:                          # these nodes stay on a version whatever is applied
    - {nodes: [node-id], version: 1.0.0}
    - {labels: {line: b}, version: 1.0.0}
```

These fields travel with the deployment, not in the bundle: changing them never needs
a new app version. Validation errors name the field; `to_*` turn them into the sans-IO
core's values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fogline.core.approutes import parse_interval
from fogline.core.placement import NodeFacts, Placement, Requirements, Selector
from fogline.core.rollout import Gates, Step, Strategy
from fogline.errors import ConfigError

DEPLOY_FIELDS = ("placement", "rollout", "pins")
STEPS_MAX = 20
_STEP = re.compile(r"^(\d+(?:\.\d+)?)%$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SelectorSpec(_Model):
    regions: list[str] = []
    tiers: list[Literal["device", "near", "far", "cloud"]] = []
    labels: dict[str, str] = {}


class RequiresSpec(_Model):
    memory_mb: int = Field(default=0, ge=0)
    cores: int = Field(default=0, ge=0)
    arch: list[str] = []
    gpu: bool = False
    accelerators: list[str] = []


class PlacementSpec(_Model):
    selector: SelectorSpec = SelectorSpec()
    requires: RequiresSpec = RequiresSpec()


class GatesSpec(_Model):
    error_rate: float | None = Field(default=None, ge=0, le=1)
    p99_ms: float | None = Field(default=None, gt=0)
    restarts: int | None = Field(default=None, ge=0)
    min_requests: int = Field(default=20, ge=1)
    metrics: dict[str, float] = {}


class RolloutSpec(_Model):
    steps: list[int | str] = Field(default=["100%"], min_length=1, max_length=STEPS_MAX)
    bake: str | float = "30s"
    gates: GatesSpec = GatesSpec()
    on_failure: Literal["rollback", "pause"] = "rollback"
    progress_deadline: str | float = "2m"

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[int | str]) -> list[int | str]:
        parsed = [parse_step(step) for step in steps]
        counts = [s.count for s in parsed if s.count is not None]
        percents = [s.percent for s in parsed if s.percent is not None]
        if counts != sorted(counts) or percents != sorted(percents):
            raise ValueError(f"steps must grow, got {steps}")
        return steps

    @field_validator("bake", "progress_deadline")
    @classmethod
    def _interval(cls, value: str | float) -> str | float:
        try:
            parse_interval(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return value


class PinSpec(_Model):
    nodes: list[str] = []
    labels: dict[str, str] = {}
    version: str = Field(min_length=1, max_length=64)

    def matches(self, node: NodeFacts) -> bool:
        if node.id in self.nodes:
            return True
        return bool(self.labels) and all(node.labels.get(k) == v
                                         for k, v in self.labels.items())


class DeploySpec(_Model):
    placement: PlacementSpec = PlacementSpec()
    rollout: RolloutSpec = RolloutSpec()
    pins: list[PinSpec] = Field(default=[], max_length=100)


def parse_step(step: int | str) -> Step:
    if isinstance(step, bool):
        raise ValueError(f"a step is a node count or a percentage, got {step!r}")
    if isinstance(step, int):
        if step < 1:
            raise ValueError(f"a node count must be at least 1, got {step}")
        return Step(count=step)
    match = _STEP.match(step.strip())
    if not match or not 0 < float(match.group(1)) <= 100:
        raise ValueError(f"a step is a node count or a percentage in (0, 100], got {step!r}")
    return Step(percent=float(match.group(1)))


def deploy_spec(spec: Mapping[str, Any], source: str) -> DeploySpec:
    """The deploy fields of an App manifest's `spec`; ConfigError naming the field."""
    from pydantic import ValidationError

    data = {key: spec[key] for key in DEPLOY_FIELDS if key in spec}
    try:
        result = DeploySpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"spec.{'.'.join(str(p) for p in e['loc'])}: "
            f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from exc
    for pin in result.pins:
        if not pin.nodes and not pin.labels:
            raise ConfigError(f"{source}: spec.pins: a pin names nodes or labels")
    return result


def to_placement(spec: PlacementSpec) -> Placement:
    s, r = spec.selector, spec.requires
    return Placement(
        Selector(frozenset(s.regions), frozenset(s.tiers), dict(s.labels)),
        Requirements(r.memory_mb, r.cores, frozenset(r.arch), r.gpu,
                     frozenset(r.accelerators)))


def to_strategy(spec: RolloutSpec) -> Strategy:
    g = spec.gates
    return Strategy(
        steps=tuple(parse_step(step) for step in spec.steps),
        bake_s=parse_interval(spec.bake),
        gates=Gates(g.error_rate, g.p99_ms, g.restarts, dict(g.metrics), g.min_requests),
        on_failure=spec.on_failure,
        progress_deadline_s=parse_interval(spec.progress_deadline))
