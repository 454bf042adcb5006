"""Benchmark `desired-propagation`: a new desired revision reaching every connected
hollow node (the measurement lives with the rollout benchmark in `rollout.py`)."""

from fogline.bench.rollout import run_propagation as run

__all__ = ["run"]
