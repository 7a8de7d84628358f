"""Each request's trace: read the caller's W3C ``traceparent``, start the request's trace, end it.

A valid ``traceparent`` (exactly one, strictly formed) is continued; an absent,
invalid or repeated one starts a new trace (W3C Trace Context §3.2.4).  The
trace id is in ``g.trace_id`` for the access log and the audit record.  No
``traceparent`` is sent back: W3C Trace Context does not ask a server to.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

from flask import Flask, Response, g, request

from ..protocol.trace_context import TraceContext, parse_traceparent
from .responses import UNMATCHED_ROUTE
from .wire import header_values


class TracedRequest(Protocol):
    """A request being traced: it knows its trace id."""

    @property
    def trace_id(self) -> str: ...


Trace = TypeVar("Trace", bound=TracedRequest)


class RequestTracing(Protocol[Trace]):
    """Starts and ends each request's trace (:class:`sts.adapters.tracing.Tracing`, wired in by
    :func:`sts.app.create_app`)."""

    def start_request(
        self, request_id: str, method: str, route: str, incoming: TraceContext | None
    ) -> Trace: ...

    def finish_request(self, trace: Trace, status: int | None) -> None: ...


_TRACE = "sts.request_trace"
_STATUS = "sts.response_status"


def start_trace(
    tracing: RequestTracing[Trace], environ: Mapping[str, Any], request_id: str, method: str, route: str
) -> Trace:
    """Start the request's trace, continuing the caller's when it sent exactly one valid ``traceparent``."""
    values = header_values(environ, "traceparent")
    incoming = parse_traceparent(values[0]) if len(values) == 1 else None
    return tracing.start_request(request_id, method, route, incoming)


def install(app: Flask, tracing: RequestTracing[Trace]) -> None:
    """Register the hooks; call after :func:`sts.http.responses.install` (the request id comes first)."""

    def start() -> None:
        environ = request.environ
        rule = request.url_rule
        trace = start_trace(
            tracing,
            environ,
            g.get("request_id", "-"),
            request.method,
            rule.rule if rule is not None else UNMATCHED_ROUTE,
        )
        # Kept with the request itself: ``g`` belongs to the application context, which a
        # request made from inside another one (tests do) shares with it.
        environ[_TRACE] = trace
        g.trace_id = trace.trace_id

    def status(response: Response) -> Response:
        request.environ[_STATUS] = response.status_code
        return response

    def finish(_exc: BaseException | None) -> None:
        trace: Trace | None = request.environ.pop(_TRACE, None)
        if trace is not None:
            tracing.finish_request(trace, request.environ.get(_STATUS))

    app.before_request(start)
    app.after_request(status)
    app.teardown_request(finish)
