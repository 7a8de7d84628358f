"""Request latency and stage timing for the Prometheus metrics (:mod:`sts.adapters.metrics`).

Every request is timed from its arrival in the application (the request id is
assigned) to its response, by route rule (``/token``; ``<unmatched>`` for a
path no route serves, never the raw path), and counted by status.  The
pipeline's stages are timed by :mod:`sts.http.tracing` (each request's trace), whose
observers include the per-stage histogram.  The metrics themselves are served on
their own listener (``metrics_listen``), not here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flask import Flask, Response, g, request

from .responses import UNMATCHED_ROUTE

#: ``observe(route, status, seconds)``: one request served
#: (:meth:`sts.adapters.metrics.Metrics.observe_request`, wired in by :func:`sts.app.create_app`).
RequestObserver = Callable[[str, int, float], None]


def _route() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED_ROUTE


def observe_served(observe_request: RequestObserver, route: str, status: int, started: float | None) -> None:
    """Count one request served, timed from ``started`` (its arrival; not counted without one)."""
    if started is not None:
        observe_request(route, status, time.perf_counter() - started)


def install(app: Flask, observe_request: RequestObserver) -> None:
    """Register the hook; call after :func:`sts.http.responses.install` (it stamps the arrival)."""

    def observe(response: Response) -> Response:
        observe_served(observe_request, _route(), response.status_code, g.get("request_started"))
        return response

    app.after_request(observe)
