"""Restart backoff and crash-loop rules for app workers (pure)."""

from __future__ import annotations

from fogline.core.supervision import CrashHistory, RestartPolicy

POLICY = RestartPolicy(backoff_initial_s=0.2, backoff_max_s=2.0, crash_loop_crashes=3,
                       crash_loop_window_s=60.0, stable_after_s=30.0)


def test_backoff_doubles_per_consecutive_crash_up_to_the_max() -> None:
    history = CrashHistory(POLICY)
    delays = []
    now = 0.0
    for _ in range(6):
        history.started(now)
        now += 1.0
        delays.append(history.exited(now).delay_s)
    assert delays == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert history.restarts == 5


def test_three_exits_in_the_window_are_a_crash_loop_and_stay_failed_until_stable() -> None:
    history = CrashHistory(POLICY)
    history.started(0.0)
    assert not history.exited(1.0).crash_loop
    history.started(1.2)
    assert not history.exited(2.0).crash_loop
    history.started(2.4)
    decision = history.exited(3.0)
    assert decision.crash_loop and decision.crashes_in_window == 3 and history.failed
    history.started(4.0)
    assert not history.check_stable(20.0)  # up, but not for long enough yet
    assert history.failed
    assert history.check_stable(34.0)
    assert not history.failed
    assert not history.check_stable(40.0)  # reported once


def test_exits_spread_beyond_the_window_are_not_a_loop() -> None:
    history = CrashHistory(POLICY)
    for start in (0.0, 100.0, 200.0, 300.0):
        history.started(start)
        assert not history.exited(start + 40.0).crash_loop


def test_a_worker_that_ran_stably_resets_the_backoff() -> None:
    history = CrashHistory(POLICY)
    history.started(0.0)
    history.exited(1.0)
    history.started(1.2)
    assert history.exited(2.0).delay_s == 0.4
    history.started(2.4)
    assert history.exited(100.0).delay_s == 0.2  # ran 97 s: a fresh crash, not a loop


def test_reset_forgets_a_crash_loop_but_not_the_restart_count() -> None:
    history = CrashHistory(POLICY)
    for start in (0.0, 1.0, 2.0):
        history.started(start)
        history.exited(start + 0.5)
    assert history.failed
    history.reset()
    assert not history.failed and history.restarts == 2
    history.started(3.0)
    decision = history.exited(3.5)
    assert not decision.crash_loop and decision.delay_s == 0.2


def test_a_worker_is_replaced_for_a_silent_loop_a_stuck_thread_or_its_memory() -> None:
    from fogline.core.supervision import replace_reason

    fine = {"silent_s": 0.5, "stuck_s": 0.0, "rss_bytes": 100 * 2**20, "timeout_s": 1.0,
            "memory_mb": 160}
    assert replace_reason(**fine) is None
    assert replace_reason(**{**fine, "silent_s": 2.9}) is None  # within timeout + grace
    assert replace_reason(**{**fine, "silent_s": 3.1}) == \
        "hung: event loop blocked for over 3s"
    assert replace_reason(**{**fine, "stuck_s": 3.5}) == \
        "hung: a sync handler ran for over 3s"
    assert replace_reason(**{**fine, "rss_bytes": 200 * 2**20}) == \
        "memory limit 160 MB exceeded (RSS 200 MB)"
