from __future__ import annotations

from fogline.core.appstatus import AppChange, failure_changes
from fogline.protocol import AppStatus


def app(name: str, state: str, restarts: int = 0, reason: str = "") -> AppStatus:
    return AppStatus(name, "1.0", state, restarts, reason)  # type: ignore[arg-type]


def test_only_entering_or_leaving_failed_is_a_change() -> None:
    before = [app("a", "starting"), app("b", "running"), app("c", "failed", 3, "oom")]
    after = [app("a", "running"), app("b", "restarting", 1, "crashed"), app("c", "failed", 4)]
    assert failure_changes(before, after) == []


def test_failing_and_recovering_apps() -> None:
    before = [app("a", "restarting", 2), app("b", "failed", 3, "memory limit 256 MB exceeded")]
    after = [app("a", "failed", 3, "crashed: exit code 1 (3 times in 60 s)"),
             app("b", "running", 3)]
    assert failure_changes(before, after) == [
        AppChange("a", "1.0", "restarting", "failed", 3,
                  "crashed: exit code 1 (3 times in 60 s)"),
        AppChange("b", "1.0", "failed", "running", 3, ""),
    ]


def test_appearing_failed_and_disappearing_while_failed_are_changes() -> None:
    assert failure_changes([], [app("a", "failed", 0, "bad entrypoint")]) == [
        AppChange("a", "1.0", "absent", "failed", 0, "bad entrypoint")]
    assert failure_changes([app("a", "failed")], []) == [
        AppChange("a", "1.0", "failed", "absent", 0, "")]
    assert failure_changes([app("a", "running")], []) == []
    assert failure_changes([], [app("a", "starting")]) == []
