"""The summary follower's loop (:mod:`sts.adapters.summary_follower`): when it catches up, and how it
waits after a look that moved nothing or failed.  The process around it is tested in
tests/e2e/test_serving.py, against a real trail."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time

import pytest

from sts.adapters.summary_follower import MAX_INTERVAL, follow
from sts.core.audit_views import SummaryStatus


class Trail:
    """Summaries whose next answers are scripted: ``newest`` per look, and what a refresh reaches."""

    errors = (OSError,)

    def __init__(self, looks: list[int | Exception], reach: list[int]) -> None:
        self.looks = looks
        self.reach = reach
        self.last_id = 0
        self.refreshes = 0
        self.newest = 0

    def status(self) -> SummaryStatus:
        look = self.looks.pop(0)
        if isinstance(look, Exception):
            raise look
        self.newest = look
        return SummaryStatus(self.last_id, self.newest)

    def refresh(self, *, budget: float | None = 0.25, batch: int = 5000) -> SummaryStatus:
        assert budget is None, "the follower catches up at once"
        self.refreshes += 1
        self.last_id = self.reach.pop(0)
        return SummaryStatus(self.last_id, self.newest)


class Stop(threading.Event):
    """Records each pause the loop asks for, and stops it after ``passes`` of them."""

    def __init__(self, passes: int) -> None:
        super().__init__()
        self.passes = passes
        self.pauses: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.pauses.append(timeout)
        if len(self.pauses) >= self.passes:
            self.set()
        return self.is_set()


def test_it_catches_up_only_when_enough_records_wait() -> None:
    trail = Trail([5, 12, 14], reach=[12])
    seen: list[SummaryStatus] = []
    follow(trail, Stop(3), behind=10, interval=1.0, on_pass=seen.append)
    # 5 waiting: nothing; 12: caught up in one refresh; then 2: nothing.
    assert trail.refreshes == 1 and trail.last_id == 12
    assert [s.behind for s in seen] == [5, 0, 2]


def test_a_look_that_moves_nothing_or_fails_backs_off_then_recovers() -> None:
    # PostgreSQL's unsettled records: a refresh that moves nothing doubles the pause; an error too.
    trail = Trail([50, 50, OSError("down"), 50, 60], reach=[0, 0, 0, 60])
    stop = Stop(5)
    follow(trail, stop, behind=10, interval=1.0)
    assert stop.pauses == [2.0, 4.0, 8.0, 16.0, 1.0]
    endless = Trail([OSError("down")] * 10, reach=[])
    stop = Stop(10)
    follow(endless, stop, behind=10, interval=1.0)
    assert max(stop.pauses) == MAX_INTERVAL and stop.pauses[-1] == MAX_INTERVAL


def test_a_follower_that_keeps_ending_is_started_again_ever_more_slowly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``sts serve``'s supervision of the follower: each ending starts a new one, the pause doubling
    up to the longest; after :meth:`KeptRunning.stop` nothing more is started."""
    from sts.cli import serve

    monkeypatch.setattr(serve, "RESTART_FIRST_PAUSE", 0.05)
    monkeypatch.setattr(serve, "RESTART_MAX_PAUSE", 0.2)
    starts: list[float] = []

    def start() -> subprocess.Popen[bytes]:
        starts.append(time.monotonic())
        return subprocess.Popen(["true"])

    kept = serve.KeptRunning(start)
    deadline = time.monotonic() + 20
    while len(starts) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    kept.stop()
    stopped_with = len(starts)
    assert stopped_with >= 6
    pauses = [b - a for a, b in itertools.pairwise(starts)]
    assert pauses[0] < pauses[3], pauses  # 0.05 s, 0.1, 0.2, 0.2
    assert all(p >= 0.05 for p in pauses)
    assert max(pauses) < 0.2 + 2.0, pauses  # capped (the process's own start time aside)
    assert kept.restarts == stopped_with - 1
    time.sleep(0.5)
    assert len(starts) == stopped_with, "started after stop"


def test_stopping_ends_the_running_follower() -> None:
    from sts.cli import serve

    kept = serve.KeptRunning(lambda: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
    process = kept.process
    kept.stop()
    assert process.poll() is not None
    assert kept.restarts == 0
