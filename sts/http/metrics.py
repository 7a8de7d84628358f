"""Request latency and stage timing for the Prometheus metrics (:mod:`sts.adapters.metrics`).

Every request is timed from its arrival in the application (the request id is
assigned) to its response, by route rule (``/token``; ``<unmatched>`` for a
path no route serves, never the raw path), and counted by status.  The
pipeline's stage timer is started and finished around each request.  The
metrics themselves are served on their own listener (``metrics_listen``), not here.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g, request

from ..adapters.metrics import Metrics
from ..adapters.stage_timer import StageTimer
from .responses import UNMATCHED_ROUTE


def _route() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED_ROUTE


def install(app: Flask, metrics: Metrics, stages: StageTimer) -> None:
    """Register the hooks; call after :func:`sts.http.responses.install` (it stamps the arrival)."""

    def start() -> None:
        stages.start_request(_route())

    def observe(response: Response) -> Response:
        started = g.get("request_started")
        if started is not None:
            metrics.observe_request(_route(), response.status_code, time.perf_counter() - started)
        return response

    def finish(_exc: BaseException | None) -> None:
        stages.finish_request()

    app.before_request(start)
    app.after_request(observe)
    app.teardown_request(finish)
