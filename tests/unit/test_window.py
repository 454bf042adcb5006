"""The rolling window of an app's recent traffic (pure, time passed in)."""

from __future__ import annotations

import math
import random

import pytest

from fogline.core.window import BUCKET_BOUNDS_MS, BUCKET_GROWTH, RollingWindow
from fogline.protocol import AppWindow


def _true_p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


@pytest.mark.parametrize("seed", range(5))
def test_p99_is_the_upper_bound_of_the_bucket_holding_the_true_p99(seed: int) -> None:
    rng = random.Random(seed)
    window = RollingWindow(seconds=10.0, slots=10)
    latencies = [rng.lognormvariate(1.5, 1.2) for _ in range(rng.randint(50, 5000))]
    for index, latency_ms in enumerate(latencies):
        window.observe(100.0 + 9.0 * index / len(latencies), latency_ms, False)
    true = _true_p99(latencies)
    reported = window.snapshot(109.5).p99_ms
    assert true <= reported < true * BUCKET_GROWTH * (1 + 1e-9), (seed, true, reported)


def test_p99_of_extremes_stays_within_the_bucket_range() -> None:
    window = RollingWindow()
    window.observe(1.0, 0.0, False)
    assert window.snapshot(1.0).p99_ms == BUCKET_BOUNDS_MS[0]
    for _ in range(10):
        window.observe(1.0, 10 * 60_000.0, True)  # past the last bucket: a floor
    assert window.snapshot(1.0).p99_ms == BUCKET_BOUNDS_MS[-1]


def test_counts_requests_errors_and_named_counters() -> None:
    window = RollingWindow(seconds=10.0, slots=10)
    for index in range(20):
        window.observe(50.0 + index * 0.1, 2.0, error=index % 4 == 0)
    window.count(50.5, "timeouts")
    window.count(51.5, "timeouts", 2)
    window.count(52.0, "malformed", 0.5)
    snapshot = window.snapshot(52.0)
    assert (snapshot.requests, snapshot.errors) == (20, 5)
    assert snapshot.metrics == {"malformed": 0.5, "timeouts": 3.0}
    assert snapshot.seconds == 10.0
    assert 2.0 <= snapshot.p99_ms < 2.0 * BUCKET_GROWTH


def test_old_slots_expire_as_time_passes() -> None:
    window = RollingWindow(seconds=10.0, slots=10)
    window.observe(100.2, 500.0, True)
    window.count(100.2, "timeouts")
    window.observe(105.5, 1.0, False)
    assert window.snapshot(109.9).requests == 2
    later = window.snapshot(110.5)  # the slot of 100.2 is out of the window
    assert (later.requests, later.errors, later.metrics) == (1, 0, {"timeouts": 0.0})
    assert later.p99_ms < 2.0
    # The ring reuses the expired slot for new time without mixing in the old counts.
    window.observe(110.7, 3.0, False)
    assert window.snapshot(110.7).requests == 2
    assert window.snapshot(200.0) == AppWindow(seconds=10.0, metrics={"timeouts": 0.0})


def test_an_empty_window_reads_zeros() -> None:
    assert RollingWindow(seconds=30.0).snapshot(0.0) == AppWindow(seconds=30.0)
    assert RollingWindow().snapshot(1e6) == AppWindow(seconds=10.0, requests=0, errors=0,
                                                      p99_ms=0.0, metrics={})


def test_times_already_out_of_the_window_are_ignored() -> None:
    window = RollingWindow(seconds=10.0, slots=10)
    window.observe(200.0, 1.0, False)
    window.observe(185.0, 1.0, True)  # a clock that went back past the window
    window.count(185.0, "timeouts")
    snapshot = window.snapshot(200.0)
    assert (snapshot.requests, snapshot.errors, snapshot.metrics) == (1, 0,
                                                                      {"timeouts": 0.0})


def test_counters_given_up_front_read_zero_until_counted() -> None:
    window = RollingWindow(counters=("timeouts", "malformed"))
    assert window.snapshot(5.0).metrics == {"malformed": 0.0, "timeouts": 0.0}
    window.count(5.0, "timeouts", 2)
    window.count(5.0, "other")
    assert window.snapshot(5.0).metrics == {"malformed": 0.0, "other": 1.0, "timeouts": 2.0}


def test_counter_names_are_limited() -> None:
    window = RollingWindow()
    for index in range(32):
        window.count(0.0, f"c{index}")
    window.count(0.0, "c0")
    with pytest.raises(ValueError, match="at most 32"):
        window.count(0.0, "one-more")


def test_a_window_needs_a_length_and_slots() -> None:
    with pytest.raises(ValueError):
        RollingWindow(seconds=0.0)
    with pytest.raises(ValueError):
        RollingWindow(slots=0)
