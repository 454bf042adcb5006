"""`fogline sim check --seeds N --start S`: run simulator seeds, say how to replay failures.

Verbose (or a single seed) prints `SEED=<n>` before anything else of that seed, so any
log of a failing run starts with what is needed to replay it.
"""

from __future__ import annotations

import time

from fogline.errors import ConfigError
from fogline.sim.deterministic import SimResult, replay_command, run_seed

SEEDS_MAX = 10_000_000


def main(seeds: int, start: int, verbose: bool) -> int:
    """Run seeds `start .. start + seeds - 1`; exit code 0 if all held, 1 otherwise."""
    if not 1 <= seeds <= SEEDS_MAX:
        raise ConfigError(f"--seeds must be between 1 and {SEEDS_MAX}, got {seeds}")
    if start < 0:
        raise ConfigError(f"--start must not be negative, got {start}")
    loud = verbose or seeds == 1
    failed: list[SimResult] = []
    # Wall time only for the summary line; the simulation itself never reads it.
    started_s = time.perf_counter()
    for seed in range(start, start + seeds):
        if loud:
            print(f"SEED={seed}", flush=True)
        result = run_seed(seed, trace=print if verbose else None)
        if not result.ok:
            failed.append(result)
            for failure in result.failures:
                print(failure, flush=True)
    elapsed_s = time.perf_counter() - started_s
    print(f"sim check: {seeds - len(failed)}/{seeds} seeds ok (seeds {start}.."
          f"{start + seeds - 1}) in {elapsed_s:.1f} s")
    for result in failed:
        print(f"replay: {replay_command(result.seed)}")
    return 1 if failed else 0
