"""Placement, node reconciliation and the deployment fields of a manifest."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fogline.core.placement import NodeFacts, Placement, Requirements, Selector, place
from fogline.core.reconcile import Activate, Fetch, Remove, plan, prunable
from fogline.deploy_spec import deploy_spec, to_placement, to_strategy
from fogline.errors import ConfigError
from fogline.protocol import DesiredApp

GiB = 1024 ** 3
NODES = [
    NodeFacts("a", "eu-west", "near", {"line": "1"}, cores=4, memory_bytes=8 * GiB,
              arch="x86_64"),
    NodeFacts("b", "eu-west", "far", {"line": "2"}, cores=1, memory_bytes=GiB // 2,
              arch="aarch64"),
    NodeFacts("c", "us-east", "near", {}, cores=8, memory_bytes=32 * GiB, arch="x86_64",
              gpu=True),
    NodeFacts("d", "us-east", "near", {}, status="revoked"),
]


def test_selector_and_requirements() -> None:
    result = place(Placement(Selector(regions=frozenset({"eu-west"}))), NODES)
    assert result.selected == ("a", "b") and not result.unsatisfied
    result = place(Placement(Selector(labels={"line": "1"})), NODES)
    assert result.selected == ("a",)
    result = place(Placement(requires=Requirements(memory_mb=1024, cores=2)), NODES)
    assert result.selected == ("a", "c")
    assert "needs 1024 MB of memory, has 512 MB" in result.unsatisfied["b"]
    assert "needs 2 cores, has 1" in result.unsatisfied["b"]
    gpu = place(Placement(requires=Requirements(gpu=True, arch=frozenset({"x86_64"}))),
                NODES)
    assert gpu.selected == ("c",)
    assert gpu.unsatisfied["a"] == "needs a GPU"
    assert "needs arch x86_64, is aarch64" in gpu.unsatisfied["b"]
    assert "d" not in gpu.selected and "d" not in gpu.unsatisfied  # revoked


@settings(max_examples=200, deadline=None)
@given(memory_mb=st.integers(0, 64 * 1024), cores=st.integers(0, 16),
       regions=st.sets(st.sampled_from(["eu-west", "us-east", "ap-south"])))
def test_every_selected_node_is_placed_or_reported(memory_mb: int, cores: int,
                                                   regions: set[str]) -> None:
    placement = Placement(Selector(regions=frozenset(regions)),
                          Requirements(memory_mb=memory_mb, cores=cores))
    result = place(placement, NODES)
    for node in NODES:
        meant = node.status != "revoked" and (not regions or node.region in regions)
        assert (node.id in result.selected or node.id in result.unsatisfied) == meant
        assert not (node.id in result.selected and node.id in result.unsatisfied)


def app(name: str, revision: int) -> DesiredApp:
    return DesiredApp(name, revision, f"{revision}.0", f"sha256:{name}{revision}", 10,
                      "k", "s")


def test_reconcile_plan() -> None:
    desired = {"x": app("x", 2), "y": app("y", 1)}
    assert plan(desired, {"x": 2, "y": 1}, set(), set()) == []
    assert plan(desired, {"x": 1, "z": 4}, {"sha256:x2"}, set()) == [
        Remove("z"), Activate(app("x", 2)), Fetch(app("y", 1))]
    # A refused revision is not tried again; a busy app waits for its activation.
    assert plan(desired, {"x": 1}, set(), {("x", 2)}, busy={"y"}) == []


def test_prunable_keeps_recent_and_in_use_bundles() -> None:
    history = {"x": ["d1", "d2", "d3", "d4", "d5"], "y": ["e1"]}
    assert prunable(history, in_use={"d1"}, keep=3) == {"d2"}


def test_deploy_spec_converts_and_rejects() -> None:
    spec = deploy_spec({"placement": {"selector": {"regions": ["eu-west"]},
                                      "requires": {"memory_mb": 256}},
                        "rollout": {"steps": [1, "10%", "50%"], "bake": "5s",
                                    "gates": {"error_rate": 0.05}},
                        "pins": [{"labels": {"line": "2"}, "version": "1.0"}],
                        "entrypoint": "ignored:here"}, "m.yaml")
    strategy = to_strategy(spec.rollout)
    assert [str(s) for s in strategy.steps] == ["1", "10%", "50%", "100%"]
    assert strategy.bake_s == 5 and strategy.gates.error_rate == 0.05
    assert to_placement(spec.placement).requires.memory_mb == 256


@pytest.mark.parametrize(("spec", "message"), [
    ({"rollout": {"steps": [0]}}, "spec.rollout.steps"),
    ({"rollout": {"steps": ["150%"]}}, "percentage"),
    ({"rollout": {"steps": ["50%", "10%"]}}, "steps must grow"),
    ({"rollout": {"bake": "soon"}}, "spec.rollout.bake"),
    ({"rollout": {"on_failure": "explode"}}, "spec.rollout.on_failure"),
    ({"rollout": {"gates": {"error_rate": 2}}}, "spec.rollout.gates.error_rate"),
    ({"placement": {"selector": {"tiers": ["moon"]}}}, "spec.placement.selector.tiers"),
    ({"placement": {"nodes": ["a"]}}, "spec.placement.nodes"),
    ({"pins": [{"version": "1"}]}, "a pin names nodes or labels"),
])
def test_deploy_spec_rejections(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        deploy_spec(spec, "m.yaml")
