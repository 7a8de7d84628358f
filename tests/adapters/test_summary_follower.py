"""The summary follower's loop (:mod:`sts.adapters.summary_follower`): when it catches up, and how it
waits after a look that moved nothing or failed.  The process around it is tested in
tests/e2e/test_serving.py, against a real trail."""

from __future__ import annotations

import threading

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
