"""The deterministic simulator: thousands of seeds hold every invariant, a broken model is
caught within a few hundred seeds, and a seed replays exactly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fogline.core.crdt import CollectionState, CounterOp, MapOp, Op, SetRemoveOp
from fogline.errors import ConfigError
from fogline.sim import check as sim_check
from fogline.sim.deterministic import SimOptions, SimResult, check, replay_command, run_seed

SEEDS = 2000
SEEDS_TO_CATCH_A_BUG = 400


def test_every_seed_holds_every_invariant() -> None:
    results = check(SEEDS, start=0)
    failures = [failure for result in results for failure in result.failures[:2]]
    assert not failures, "\n".join(failures)


# The checkers bite: each broken model fails some seed ------------------------------------

def last_arrival_wins(state: CollectionState, op: Op) -> bool:
    if isinstance(op, MapOp):
        changed = state.entries.get(op.key) != op
        state.entries[op.key] = op
        return changed
    return CollectionState.apply(state, op)


def counter_adds_up_deltas(state: CollectionState, op: Op) -> bool:
    if isinstance(op, CounterOp):
        p, n = state.counts.get(op.node, (0, 0))
        state.counts[op.node] = (p + op.p, n + op.n)
        return True
    return CollectionState.apply(state, op)


def remove_wins(state: CollectionState, op: Op) -> bool:
    if isinstance(op, SetRemoveOp):
        tags = state.adds.get(op.elem, set())
        state.removed |= set(op.tags) | tags
        state.adds[op.elem] = set()
        return True
    return CollectionState.apply(state, op)


BROKEN = {
    "lww by arrival": SimOptions(apply=last_arrival_wins),
    "counter sums totals": SimOptions(apply=counter_adds_up_deltas),
    "remove wins": SimOptions(apply=remove_wins),
    "hub applies duplicate records": SimOptions(hub_dedupes_streams=False),
    "hub does not replay a redelivered batch": SimOptions(hub_replays_redelivered=False),
    "hlc not restored after restart": SimOptions(restore_hlc=False),
}


def first_failure(options: SimOptions) -> SimResult | None:
    for seed in range(SEEDS_TO_CATCH_A_BUG):
        result = run_seed(seed, options)
        if not result.ok:
            return result
    return None


@pytest.mark.parametrize("bug", sorted(BROKEN))
def test_a_broken_model_fails_some_seed(bug: str) -> None:
    result = first_failure(BROKEN[bug])
    assert result is not None, f"{bug}: no seed in {SEEDS_TO_CATCH_A_BUG} caught it"
    assert all(failure.startswith(f"SEED={result.seed}: ") and
               failure.endswith(replay_command(result.seed)) for failure in result.failures)


# Replay --------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 7, 1234])
def test_a_seed_replays_exactly(seed: int) -> None:
    first, second = run_seed(seed), run_seed(seed)
    assert first.stats == second.stats and first.failures == second.failures
    assert first.stats["writes"] and first.stats["digest"]


def test_a_seed_replays_exactly_in_another_process() -> None:
    """Set and dict order must not leak into the run: another hash seed, same result."""
    code = "from fogline.sim.deterministic import run_seed; print(run_seed(7).stats)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    output = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=60, check=True).stdout
    assert output.strip() == str(run_seed(7).stats)


# The CLI entry point ------------------------------------------------------------------------

def test_check_prints_a_summary_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim_check.main(seeds=5, start=10, verbose=False) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [out[0]] and out[0].startswith("sim check: 5/5 seeds ok (seeds 10..14)")


def test_a_single_seed_prints_its_seed_first(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim_check.main(seeds=1, start=42, verbose=True) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "SEED=42" and "nodes=" in out[1]


def test_check_prints_the_replay_command_of_a_failure(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(seed: int, options: SimOptions | None = None, trace: object = None) -> SimResult:
        return run_seed(seed, BROKEN["hub applies duplicate records"])

    monkeypatch.setattr(sim_check, "run_seed", broken)
    assert sim_check.main(seeds=3, start=0, verbose=False) == 1
    out = capsys.readouterr().out
    assert "replay: fogline sim check --seeds 1 --start 0" in out


def test_check_refuses_no_seeds() -> None:
    with pytest.raises(ConfigError):
        sim_check.main(seeds=0, start=0, verbose=False)
