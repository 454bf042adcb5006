"""The demo's data story: every node writes to a `global` collection and emits
telemetry through its local API; while a region is cut off its backlog grows, after
heal it drains, and the summary reports convergence time and records lost (zero)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

COLLECTION = "readings"
STREAM = "telemetry"


@dataclass
class NodeData:
    name: str
    data_dir: Path
    acked_seqs: list[int] = field(default_factory=list)
    writes: int = 0
    backlog: int = 0
    backlog_max: int = 0
    at_hub: int = 0
    value: dict[str, Any] = field(default_factory=dict)

    def _local(self) -> tuple[str, dict[str, str]] | None:
        endpoint, token = self.data_dir / "endpoint", self.data_dir / "local.token"
        if not endpoint.exists() or not token.exists():
            return None
        return (endpoint.read_text().strip(),
                {"Authorization": f"Bearer {token.read_text().strip()}"})


@dataclass
class DataWorkload:
    nodes: dict[str, NodeData] = field(default_factory=dict)
    tick: int = 0
    healed_at_s: float | None = None
    healed_tick: int = 0
    converged_after_s: float | None = None

    async def setup(self, api: httpx.AsyncClient, nodes: list[tuple[str, Path]]) -> None:
        response = await api.post("/v1/collections", json={"name": COLLECTION, "type": "map",
                                                           "scope": "global"})
        response.raise_for_status()
        self.nodes = {name: NodeData(name, path) for name, path in nodes}

    async def step(self, api: httpx.AsyncClient, client: httpx.AsyncClient) -> None:
        """One round: each node writes and emits locally; then read back the views."""
        self.tick += 1
        for node in self.nodes.values():
            local = node._local()
            if local is None:
                continue
            endpoint, headers = local
            try:
                emitted = await client.post(f"{endpoint}/local/streams/{STREAM}",
                                            json={"record": {"tick": self.tick}},
                                            headers=headers)
                if emitted.status_code == 200:
                    node.acked_seqs.append(emitted.json()["seq"])
                written = await client.post(
                    f"{endpoint}/local/collections/{COLLECTION}", headers=headers,
                    json={"op": "put", "key": node.name, "value": self.tick})
                if written.status_code == 200:
                    node.writes += 1
                    node.value = written.json()["value"]
                streams = (await client.get(f"{endpoint}/local/streams",
                                            headers=headers)).json()
                node.backlog = streams.get(STREAM, {}).get("records", 0)
                node.backlog_max = max(node.backlog_max, node.backlog)
            except httpx.HTTPError:
                continue
        await self._hub_counts(api)
        if self.healed_at_s is not None and self.converged_after_s is None and all(
                self._caught_up(node) for node in self.nodes.values()):
            self.converged_after_s = time.time() - self.healed_at_s

    def _caught_up(self, node: NodeData) -> bool:
        """Writes keep coming, so 'converged' means: this replica holds every node's
        write from the moment of the heal (or a newer one)."""
        return all(isinstance(node.value.get(other), int)
                   and node.value[other] >= self.healed_tick for other in self.nodes)

    async def refresh(self, client: httpx.AsyncClient) -> None:
        for node in self.nodes.values():
            local = node._local()
            if local is None:
                continue
            try:
                response = await client.get(f"{local[0]}/local/collections/{COLLECTION}",
                                            headers=local[1])
                node.value = response.json()["value"]
                streams = (await client.get(f"{local[0]}/local/streams",
                                            headers=local[1])).json()
                node.backlog = streams.get(STREAM, {}).get("records", 0)
            except (httpx.HTTPError, KeyError, ValueError):
                continue

    async def settled(self, api: httpx.AsyncClient) -> bool:
        return self.drained() and self.converged(await self._hub_value(api))

    async def _hub_counts(self, api: httpx.AsyncClient) -> None:
        names = {n["id"]: n["name"] for n in (await api.get("/v1/nodes")).json()}
        for row in (await api.get("/v1/streams")).json():
            name = names.get(row["node_id"])
            if row["stream"] == STREAM and name in self.nodes:
                # The hub applies each node's records densely in seq order.
                self.nodes[name].at_hub = row["last_seq"]

    async def _hub_value(self, api: httpx.AsyncClient) -> dict[str, Any]:
        view = (await api.get(f"/v1/collections/{COLLECTION}")).json()
        return dict(view["replicas"].get("global", {}))

    def converged(self, at_hub: dict[str, Any]) -> bool:
        return all(node.value == at_hub for node in self.nodes.values())

    def healed(self) -> None:
        self.healed_at_s = time.time()
        self.healed_tick = self.tick

    def drained(self) -> bool:
        return all(not n.acked_seqs or n.at_hub >= max(n.acked_seqs)
                   for n in self.nodes.values())

    async def summary(self, api: httpx.AsyncClient) -> dict[str, Any]:
        await self._hub_counts(api)
        lost = {n.name: sum(seq > n.at_hub for seq in n.acked_seqs)
                for n in self.nodes.values()}
        return {
            "collection": COLLECTION, "stream": STREAM,
            "converged_after_heal_s": round(self.converged_after_s, 3)
            if self.converged_after_s is not None else None,
            "replicas_equal": self.converged(await self._hub_value(api)),
            "nodes": {n.name: {"writes": n.writes, "emitted_acked": len(n.acked_seqs),
                               "at_hub": n.at_hub, "backlog": n.backlog,
                               "backlog_max": n.backlog_max}
                      for n in self.nodes.values()},
            "records_lost": sum(lost.values()),
        }
