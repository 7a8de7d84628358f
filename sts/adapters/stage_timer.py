"""Times the pipeline's stages (:class:`~sts.core.ports.PipelineStages`) for the request being served.

The HTTP layer starts and finishes each request (:mod:`sts.http.metrics`); in
between, each stage the pipeline enters ends the one before, and every ended
stage is reported to each observer as ``observer(route, stage, seconds)`` (the
per-stage latency histogram, :meth:`sts.adapters.metrics.Metrics.observe_stage`).
The last stage ends with the request.  Outside a request nothing is timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

#: ``observer(route, stage, seconds)``, called as each pipeline stage ends.
StageObserver = Callable[[str, str, float], None]


@dataclass
class _RequestStages:
    route: str
    stage: str | None = None
    started: float = 0.0


#: The request being served by this thread, if any.
_current: ContextVar[_RequestStages | None] = ContextVar("sts_request_stages", default=None)


class StageTimer:
    """ports.PipelineStages: reports how long each stage of the current request took."""

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self.timer = timer
        self.observers: list[StageObserver] = []

    def add_observer(self, observer: StageObserver) -> None:
        self.observers.append(observer)

    def start_request(self, route: str) -> None:
        _current.set(_RequestStages(route))

    def finish_request(self) -> None:
        """End the request's last stage."""
        request = _current.get()
        if request is not None:
            self._end_stage(request)
            _current.set(None)

    def enter(self, stage: str) -> None:
        request = _current.get()
        if request is None:
            return
        self._end_stage(request)
        request.stage, request.started = stage, self.timer()

    def _end_stage(self, request: _RequestStages) -> None:
        if request.stage is None:
            return
        seconds = self.timer() - request.started
        stage, request.stage = request.stage, None
        for observe in self.observers:
            observe(request.route, stage, seconds)
