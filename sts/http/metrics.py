"""Request latency and stage timing for the Prometheus metrics (:mod:`sts.adapters.metrics`).

Every request is timed from its arrival in the application (the request id is
assigned) to its response, by route rule (``/token``; ``<unmatched>`` for a
path no route serves, never the raw path), and counted by status.  The
pipeline's stage timer is started and finished around each request.  The
metrics themselves are served on their own listener (``metrics_listen``), not here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from flask import Flask, Response, g, request

from .responses import UNMATCHED_ROUTE

#: ``observe(route, status, seconds)``: one request served
#: (:meth:`sts.adapters.metrics.Metrics.observe_request`).
RequestObserver = Callable[[str, int, float], None]


class RequestStages(Protocol):
    """Times the pipeline's stages of the request being served
    (:class:`sts.adapters.stage_timer.StageTimer`)."""

    def start_request(self, route: str) -> None: ...

    def finish_request(self) -> None: ...


def _route() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED_ROUTE


def install(app: Flask, observe_request: RequestObserver, stages: RequestStages) -> None:
    """Register the hooks; call after :func:`sts.http.responses.install` (it stamps the arrival).

    ``observe_request`` is told of every request served; ``stages`` is started and finished
    around each (both wired in by :func:`sts.app.create_app`).
    """

    def start() -> None:
        stages.start_request(_route())

    def observe(response: Response) -> Response:
        started = g.get("request_started")
        if started is not None:
            observe_request(_route(), response.status_code, time.perf_counter() - started)
        return response

    def finish(_exc: BaseException | None) -> None:
        stages.finish_request()

    app.before_request(start)
    app.after_request(observe)
    app.teardown_request(finish)
