"""The lean token endpoint: ``POST /token`` answered in front of Flask, with the same answer.

A token exchange is the request this service exists for, and Flask's per-request
machinery (request and application contexts, URL matching, the request and
response objects, the hooks) cost about a sixth of its CPU time.  This WSGI
callable sits in front of the Flask application and serves ``POST`` to the token
endpoint's routes (:func:`sts.http.oauth.token_paths`) itself; every other
request (another method on ``/token``, answered ``405`` with ``Allow``; any other
path) goes on to Flask.

It does what Flask's hooks and the token view do, by calling the same functions
in the same order: the request id and client address
(:class:`~sts.http.responses.Arrival`), the trace (:func:`~sts.http.tracing.start_trace`),
the form read by Werkzeug's parser with Flask's limits (:func:`~sts.http.wire.read_wire`),
the endpoint (:meth:`~sts.http.oauth.TokenEndpoint.answer`), the error mapping
(:func:`~sts.http.responses.oauth_error_answer`, ``server_error`` for anything
unexpected), the metrics, the response headers and the access-log line.  The
response is the one Flask would send: the same status line, headers and body
(``tests/http/test_token_fast.py`` compares the two).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from ..errors import OAuthError
from .client_address import Network
from .metrics import RequestObserver, observe_served
from .oauth import TokenEndpoint
from .responses import (
    QUEUED,
    Answer,
    Arrival,
    http_error_answer,
    json_text,
    log_access,
    oauth_error_answer,
    stamp_headers,
    unexpected_answer,
)
from .tracing import RequestTracing, start_trace
from .wire import FormLimits, read_wire

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

_METHOD = "POST"


@functools.cache
def status_line(status: int) -> str:
    """The status line Werkzeug writes (``400 BAD REQUEST``)."""
    return f"{status} {HTTP_STATUS_CODES.get(status, 'Unknown').upper()}"


class LeanTokenEndpoint:
    """WSGI: ``POST`` to a token route is answered here, anything else by ``app`` (Flask)."""

    def __init__(
        self,
        app: WSGIApplication,
        endpoint: TokenEndpoint,
        *,
        paths: Sequence[str],
        trusted_proxies: Sequence[Network],
        tracing: RequestTracing[Any],
        observe_request: RequestObserver,
        limits: FormLimits,
    ) -> None:
        self.app = app
        self.endpoint = endpoint
        #: ``PATH_INFO`` -> the route rule it matches (the same text: the rules have no variables).
        self.routes = {path: path for path in paths}
        self.trusted_proxies = tuple(trusted_proxies)
        self.tracing = tracing
        self.observe_request = observe_request
        self.limits = limits

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        route = self.routes.get(environ.get("PATH_INFO", ""))
        if route is None or environ.get("REQUEST_METHOD") != _METHOD:
            return self.app(environ, start_response)
        return self._serve(environ, start_response, route)

    def _serve(self, environ: WSGIEnvironment, start_response: StartResponse, route: str) -> Iterable[bytes]:
        # Flask's before_request hooks: the request id, then the trace.
        arrival = Arrival(environ, self.trusted_proxies)
        trace: Any = None
        answer: Answer
        try:
            trace = start_trace(self.tracing, environ, arrival.request_id, _METHOD, route)
            arrival.trace_id = trace.trace_id
            wire = read_wire(
                environ,
                self.limits,
                request_id=arrival.request_id,
                source_ip=arrival.client_address,
                via_trusted_proxy=arrival.via_trusted_proxy,
                trace_id=arrival.trace_id,
                mtls_header=self.endpoint.mtls_header,
                refuse_early=self.endpoint.refuse_early,
            )
            answer = self.endpoint.answer(wire)
        except OAuthError as exc:
            answer = oauth_error_answer(exc)
        except HTTPException as exc:
            answer = http_error_answer(exc)
        except Exception:  # noqa: BLE001 - as Flask's handler for Exception: server_error, logged.
            answer = unexpected_answer(_METHOD, route, arrival.request_id)
        body = json_text(answer.body).encode()
        status = answer.status
        headers: dict[str, str] = {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            **answer.headers,
        }
        # Flask's after_request hooks, in the order Flask runs them.
        observe_served(self.observe_request, route, status, arrival.started)
        stamp_headers(headers, arrival.request_id)
        log_access(
            client=arrival.client_address or environ.get("REMOTE_ADDR") or "-",
            method=_METHOD,
            route=route,
            status=status,
            size=len(body),
            started=arrival.started,
            request_id=arrival.request_id,
            trace_id=arrival.trace_id,
            queued=environ.get(QUEUED, 0.0),
        )
        try:
            start_response(status_line(status), list(headers.items()))
        finally:
            # Flask's teardown: the trace ends with the response's status.
            if trace is not None:
                self.tracing.finish_request(trace, status)
        return [body]
