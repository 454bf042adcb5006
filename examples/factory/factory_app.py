"""The factory demo app: per-machine vibration state at the edge, summaries upstream.

Sensors publish batches (`{"machine": "m1", "samples": [0.12, 0.4, ...]}`) to
`factory/<machine>/vibration`. Each batch updates the machine's entry in the `machines`
collection (region scope, so every node of the region can answer for the machine) in
one atomic read-modify-write. A summary of the samples since the last one goes to the
`summaries` stream every `summary_every_samples` samples, and every 10 s for machines
that got fewer; only the node that last wrote a machine flushes it, so two nodes of a
region do not both report the same window.

`error_ratio` (config, default 0) makes the user-facing routes answer that fraction of
their requests with a 500, spread evenly (every fifth at 0.2) rather than at random, so
even a short window shows the ratio: `fogline demo` deploys it as a faulty version that
its rollout's error-rate gate must stop.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from fogline.app import App, Context, Message, Request, Response

app = App("factory")

SUMMARY_EVERY_SAMPLES = 500
SAMPLES_PER_MESSAGE_MAX = 10_000
_route_calls = itertools.count(1)  # per worker process


def _samples(payload: Any) -> tuple[str | None, list[float]] | None:
    """(machine, samples) from a payload, or None if its shape is wrong."""
    if not isinstance(payload, dict):
        return None
    machine, samples = payload.get("machine"), payload.get("samples")
    if machine is not None and not (isinstance(machine, str) and machine):
        return None
    if not isinstance(samples, list) or not samples:
        return None
    if not all(isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s)
               for s in samples):
        return None
    return machine, [float(s) for s in samples]


def _take_window(state: dict[str, Any], at: float) -> dict[str, Any]:
    """The summary record of the window in `state` (which must hold samples)."""
    return {"machine": state["machine"], "at": at,
            "window_count": state["window_count"],
            "window_mean": state["window_sum"] / state["window_count"],
            "window_max": state["window_max"],
            "count": state["count"], "mean": state["mean"], "max": state["max"],
            "last": state["last"]}


def _reset_window(state: dict[str, Any]) -> dict[str, Any]:
    return {**state, "window_count": 0, "window_sum": 0.0, "window_max": None}


def _public(state: dict[str, Any]) -> dict[str, Any]:
    keys = ("machine", "count", "mean", "max", "last", "updated_at")
    return {key: state[key] for key in keys}


@app.on_topic("factory/+/vibration", codec="json")
async def vibration(msg: Message, ctx: Context) -> None:
    parsed = _samples(msg.payload)
    limit = int(ctx.config.get("samples_per_message_max", SAMPLES_PER_MESSAGE_MAX))
    if parsed is None or len(parsed[1]) > limit:
        ctx.log.warning("vibration payload rejected", topic=msg.topic,
                        reason="want {machine: str, samples: [finite numbers]}",
                        samples_max=limit)
        return
    machine = parsed[0] or msg.topic.split("/")[1]
    samples = parsed[1]
    every = int(ctx.config.get("summary_every_samples", SUMMARY_EVERY_SAMPLES))
    now = ctx.now()
    node_id = ctx.node.id
    summaries: list[dict[str, Any]] = []

    def fold(old: dict[str, Any] | None) -> dict[str, Any]:
        count = (old["count"] if old else 0) + len(samples)
        total = (old["mean"] * old["count"] if old else 0.0) + sum(samples)
        peak = max(samples)
        window_max = old["window_max"] if old and old["window_max"] is not None else peak
        state = {
            "machine": machine, "node": node_id, "updated_at": now,
            "count": count, "mean": total / count,
            "max": max(old["max"], peak) if old else peak, "last": samples[-1],
            "window_count": (old["window_count"] if old else 0) + len(samples),
            "window_sum": (old["window_sum"] if old else 0.0) + sum(samples),
            "window_max": max(window_max, peak),
        }
        summaries.clear()  # the fold may be retried; only its last run counts
        if state["window_count"] >= every:
            summaries.append(_take_window(state, now))
            state = _reset_window(state)
        return state

    await ctx.collection("machines").update(machine, fold)
    for summary in summaries:
        await ctx.emit("summaries", summary)


@app.every("10s")
async def flush(ctx: Context) -> None:
    machines = ctx.collection("machines")
    now = ctx.now()
    for machine, state in machines.items():
        if state.get("node") != ctx.node.id or not state.get("window_count"):
            continue
        taken: list[dict[str, Any]] = []

        def take(old: dict[str, Any] | None, taken: list[dict[str, Any]] = taken) -> Any:
            taken.clear()
            if not old or not old.get("window_count"):
                return old
            taken.append(_take_window(old, now))
            return _reset_window(old)

        await machines.update(machine, take)
        for summary in taken:
            await ctx.emit("summaries", summary)
    ctx.log.debug("summaries flushed")


def _injected_failure(ctx: Context) -> Response | None:
    """A 500 for `error_ratio` of the calls (0 to 1), evenly spread; None otherwise."""
    ratio = min(1.0, max(0.0, float(ctx.config.get("error_ratio", 0) or 0)))
    if ratio == 0:
        return None
    call = next(_route_calls)
    if math.floor(call * ratio) > math.floor((call - 1) * ratio):
        return Response.json({"error": "injected failure", "error_ratio": ratio}, status=500)
    return None


@app.route("GET", "/machines")
async def list_machines(req: Request, ctx: Context) -> dict[str, Any] | Response:
    failure = _injected_failure(ctx)
    if failure is not None:
        return failure
    return {"machines": [_public(state) for _, state in ctx.collection("machines").items()]}


@app.route("GET", "/machines/{machine}")
async def machine_state(req: Request, ctx: Context) -> dict[str, Any] | Response:
    failure = _injected_failure(ctx)
    if failure is not None:
        return failure
    state = ctx.collection("machines").get(req.path_params["machine"])
    if state is None:
        return Response.json({"error": "unknown machine",
                              "machine": req.path_params["machine"]}, status=404)
    return _public(state)
