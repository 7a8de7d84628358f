"""Keeps the audit summaries close behind the trail, in the background (``sts audit summarize --follow``).

The review page and ``sts audit query`` summarise a little at a time (about 0.2 s per view),
and judge the records past the watermark on their JSON, so their results stay exact however
far summaries lag; but each filtered view then reads every such record.  Records come as fast
as requests (a refusal needs no credential): an outside audit wrote 240,000 in two minutes, and
a timeline filtered by audience then took 2.9 s a view (26 s with a million), each view clearing
only a few thousand.  The follower looks every :data:`INTERVAL` seconds and catches up whenever
:data:`BEHIND` or more records wait, so such a view reads at most about that many.

``sts serve`` runs it, with the review page enabled, as a process of its own at the lowest CPU
priority (``nice`` 19): it takes the CPU requests leave, never theirs, and ends with the server.
On PostgreSQL, records younger than ``settle`` seconds wait in any case (see
:mod:`.audit_summaries`); a look that moves nothing backs off, up to :data:`MAX_INTERVAL`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from ..core.audit_views import SummaryStatus

log = logging.getLogger(__name__)

#: Records not yet summarised at which the follower catches up.
BEHIND = 10_000
#: Seconds between looks.
INTERVAL = 5.0
#: The longest pause after looks that moved nothing (PostgreSQL's unsettled records) or failed.
MAX_INTERVAL = 60.0


class Summaries(Protocol):
    errors: tuple[type[BaseException], ...]

    def status(self) -> SummaryStatus: ...

    def refresh(self, *, budget: float | None = ..., batch: int = ...) -> SummaryStatus: ...


def follow(
    summaries: Summaries,
    stop: threading.Event,
    *,
    behind: int = BEHIND,
    interval: float = INTERVAL,
    on_pass: Callable[[SummaryStatus], None] | None = None,
) -> None:
    """Until ``stop`` is set: look every ``interval`` seconds, and summarise until caught up when
    ``behind`` or more records wait.  A database that cannot be read is logged and tried again
    later (the pause doubling up to :data:`MAX_INTERVAL`), never the end of the loop."""
    pause = interval
    while not stop.is_set():
        try:
            status = summaries.status()
            if status.behind >= behind:
                before = status.last_id
                status = summaries.refresh(budget=None)
                pause = interval if status.last_id > before else min(pause * 2, MAX_INTERVAL)
                log.info("audit summaries: up to record %d, %d newer", status.last_id, status.behind)
            else:
                pause = interval
            if on_pass is not None:
                on_pass(status)
        except summaries.errors as exc:
            log.warning("audit summaries could not be refreshed: %s", type(exc).__name__)
            pause = min(pause * 2, MAX_INTERVAL)
        stop.wait(pause)
