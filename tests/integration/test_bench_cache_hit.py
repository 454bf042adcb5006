"""`fogline bench cache-hit` runs both halves for real: a hub, a node and a Site in front
of the bench origin, and Varnish in front of the same origin.

The fogline half needs nothing installed and always runs. Varnish and wrk come from
Debian: the Varnish half and the tiny full run need them present, or
FOGLINE_BENCH_PEERS=1 to let the benchmark install them; otherwise they skip saying so.
Speed goals live in the benchmark's own `met`, never here.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from fogline.bench import BENCHMARKS, cache_hit
from tests.benchcheck import assert_result_shape


def have(tool: str) -> bool:
    return bool(shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin"))


def require_peer_tools(*tools: str) -> None:
    if os.environ.get("FOGLINE_BENCH_PEERS") == "1":
        return
    missing = [tool for tool in tools if not have(tool)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian packages); set "
                    "FOGLINE_BENCH_PEERS=1 to let the benchmark install them")


def test_cache_hit_is_registered() -> None:
    assert BENCHMARKS["cache-hit"][0] == "fogline.bench.cache_hit"


@pytest.mark.timeout(90)
def test_the_fogline_half_serves_the_object_as_a_hit_from_a_site_applied_at_the_hub(
) -> None:
    with cache_hit.running_origin() as origin, \
            cache_hit.fogline_site(origin, cpu=None) as node:
        assert node.url.endswith(cache_hit.OBJECT_PATH)
        with httpx.Client() as client:
            responses = [client.get(node.url) for _ in range(5)]
        assert {r.headers["x-cache"] for r in responses} == {"HIT"}
        assert {len(r.content) for r in responses} == {cache_hit.OBJECT_BYTES}
        assert responses[0].headers["cache-control"] == cache_hit.CACHE_CONTROL
        assert origin.requests.count(cache_hit.OBJECT_PATH) == 1  # the one fill


@pytest.mark.timeout(120)
def test_the_varnish_half_serves_the_object_as_a_hit() -> None:
    require_peer_tools("varnishd")
    with cache_hit.running_origin() as origin, \
            cache_hit.varnish_cache(origin, cpu=None) as varnish:
        assert varnish.version and "varnish" in varnish.version
        with httpx.Client() as client:
            response = client.get(varnish.url)
        assert len(response.headers["x-varnish"].split()) == 2  # a hit names two
        assert len(response.content) == cache_hit.OBJECT_BYTES
        assert origin.requests.count(cache_hit.OBJECT_PATH) <= 2


@pytest.mark.timeout(150)
def test_a_tiny_run_reports_the_shared_shape_with_both_figures() -> None:
    require_peer_tools("varnishd", "wrk", "taskset")
    result = cache_hit.run(quick=True, rounds=1, seconds=1.0, latency_seconds=1.0)
    assert_result_shape(result, "cache-hit", "higher")
    conditions = result["conditions"]
    assert result["figure"] > 0 and result["peer_figure"] > 0
    assert "Varnish" in result["peer"] or "varnish" in result["peer"]
    for side in ("fogline", "peer"):
        assert conditions[side]["errors"] == 0
        assert conditions[side]["origin_requests"] <= 2  # fills only: the rest were hits
    assert conditions["fogline_p99_ms_at_half"] == conditions["fogline"]["half_p99_ms"]
