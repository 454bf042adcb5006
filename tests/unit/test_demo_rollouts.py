"""The demo's rollout story (fogline.sim.demo_rollouts) and the factory app's injected
failures it relies on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from fogline.app import App
from fogline.deploy_client import read_documents
from fogline.errors import ConfigError
from fogline.sim.demo_rollouts import (
    Release,
    RolloutSettings,
    RolloutStory,
    bumped,
    prepare_release,
    requests_between,
)
from tests.unit.test_app_manifest import FACTORY, MemoryContext, get


def test_versions_bump_the_patch_number() -> None:
    assert [bumped("0.1.0", n) for n in (0, 1, 2)] == ["0.1.0", "0.1.1", "0.1.2"]
    assert bumped("2024-05", 2) == "2024-05.2"


def test_settings_keep_v2_before_v3() -> None:
    with pytest.raises(ConfigError):
        RolloutSettings(v2_at_s=70, v3_at_s=40)


def test_a_release_is_a_copy_with_its_version_config_and_strategy(tmp_path: Path) -> None:
    source = tmp_path / "app"
    source.mkdir()
    (source / "app.py").write_text("x = 1\n")
    (source / "__pycache__").mkdir()
    manifest = {"apiVersion": "fogline/v1", "kind": "App",
                "metadata": {"name": "factory", "version": "0.1.0"},
                "spec": {"entrypoint": "app:app", "config": {"keep": 1, "error_ratio": 0},
                         "placement": {"selector": {"regions": ["eu-west"]}}}}
    (source / "fogline.yaml").write_text(yaml.safe_dump(manifest))
    strategy = RolloutSettings().strategy()
    target = prepare_release(source, tmp_path / "apps", "0.1.2", {"error_ratio": 0.2},
                             strategy)
    assert target == tmp_path / "apps" / "factory-0.1.2"
    assert sorted(p.name for p in target.iterdir()) == ["app.py", "fogline.yaml"]
    written = yaml.safe_load((target / "fogline.yaml").read_text())
    assert written["metadata"]["version"] == "0.1.2"
    assert written["spec"]["config"] == {"keep": 1, "error_ratio": 0.2}
    assert written["spec"]["rollout"] == strategy and "placement" not in written["spec"]
    assert yaml.safe_load((source / "fogline.yaml").read_text()) == manifest  # untouched


def test_the_factory_release_is_a_valid_manifest(tmp_path: Path) -> None:
    target = prepare_release(FACTORY, tmp_path, "0.1.1", {"error_ratio": 0},
                             RolloutSettings().strategy())
    [document] = read_documents(target / "fogline.yaml")
    assert document.body["spec"]["rollout"]["steps"] == [1, "100%"]


def test_requests_are_counted_in_the_seconds_a_window_overlaps() -> None:
    paths = {"eu/edge": {"by_second": {"99": [5, 5], "100": [8, 2], "101": [9, 1],
                                       "103": [7, 0]}},
             "eu/cloud": {"by_second": {"101": [3, 0]}}}
    window = requests_between(paths, 100.5, 102.2)
    assert (window["ok"], window["failed"]) == (20, 3)
    assert window["by_path"]["eu/edge"] == {"ok": 17, "failed": 3}


def _deployment(phase: str, step: int, cohort: list[str], running: dict[str, int],
                reason: str = "", ended_s: float | None = None) -> dict[str, Any]:
    return {"rollout": {"to_revision": 3, "from_revision": 2, "phase": phase, "step": step,
                        "cohort": cohort, "reason": reason, "ended_s": ended_s,
                        "steps": [{"index": 0, "started_s": 1000.0, "converged_s": 1001.0,
                                   "ended_s": ended_s}]},
            "nodes": [{"node_id": node, "running": revision}
                      for node, revision in running.items()],
            "step_sizes": [1, 2]}


def test_a_rollback_is_over_once_every_node_that_got_it_runs_the_previous_revision(
        tmp_path: Path) -> None:
    notes: list[tuple[str, dict[str, Any]]] = []
    story = RolloutStory(FACTORY, tmp_path, RolloutSettings(), 930.0,
                         lambda event, **detail: notes.append((event, detail)),
                         lambda: {"nd-a": "us-east-1", "nd-b": "cloud-1"})
    story.releases = [Release(2, "0.1.1", {}, 40.0, revision=2),
                      Release(3, "0.1.2", {"error_ratio": 0.2}, 70.0, revision=3)]
    story.observe(_deployment("progressing", 0, ["nd-a"], {"nd-a": 3, "nd-b": 2}), 1001.0)
    breach = "error rate 20.0% > 5.0% (4 of 20 requests)"
    story.observe(_deployment("rolled_back", 0, ["nd-a"], {"nd-a": 3, "nd-b": 2}, breach,
                              1002.0), 1002.5)
    assert story.releases[1].back_t_s is None  # the canary still runs v3
    story.observe(_deployment("rolled_back", 0, ["nd-a"], {"nd-a": 2, "nd-b": 2}, breach,
                              1002.0), 1003.5)
    summary = story.summary({"paths": {}}, {"us-east-1": ["us-east/edge"]})["v3"]
    assert summary["phase"] == "rolled_back" and summary["reason"] == breach
    assert (summary["breach_t_s"], summary["fleet_back_t_s"], summary["rollback_s"]) == (
        72.0, 73.5, 1.5)
    assert summary["canary"] == "us-east-1" and summary["canary_user_paths"] == [
        "us-east/edge"]
    assert summary["steps"][0]["nodes"] == ["us-east-1"]
    assert [event for event, _ in notes] == ["rollout", "rollout", "fleet back"]
    assert notes[1][1]["reason"] == breach


@pytest.fixture
def factory() -> App:
    from fogline.node.apps.manifest import load_app

    return load_app(FACTORY)[1]


async def test_factory_fails_the_configured_ratio_of_user_requests(factory: App) -> None:
    ctx = MemoryContext({"error_ratio": 0.2})
    statuses = [(await get(factory, ctx, "/machines"))[0] for _ in range(50)]
    assert statuses.count(500) == 10 and set(statuses) == {200, 500}
    # Both routes: any 5 calls in a row hold one failure.
    statuses = [(await get(factory, ctx, "/machines/m1"))[0] for _ in range(5)]
    assert sorted(statuses) == [404, 404, 404, 404, 500]
    healthy = [(await get(factory, MemoryContext({}), "/machines"))[0] for _ in range(20)]
    assert healthy == [200] * 20
