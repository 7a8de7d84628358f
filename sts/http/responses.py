"""JSON responses and the error handlers shared by every endpoint.

Errors carry their OAuth code, status and fixed description (RFC 6749 §5.2);
an unexpected failure is ``server_error`` with no stack trace.  Responses
that carry tokens or errors are ``Cache-Control: no-store`` (RFC 6749 §5.1,
RFC 8693 §2.2.1).

Every request gets an id (``X-Request-Id``) and one access-log line on the
``sts.access`` logger.  The line names the matched route rule (``/token``),
never the path or query the client sent: a misguided client may put a token
in either (RFC 6750 §5.3 warns against bearer tokens in URLs), and the log
must not keep it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from flask import Flask, Response, g, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from ..errors import OAuthError
from ..protocol.identifiers import uuid4_text
from .client_address import Network, client_address, is_trusted_proxy
from .wire import header_values

log = logging.getLogger(__name__)
access_log = logging.getLogger("sts.access")

#: A caller's request id is kept only when it is a short token that starts with a letter or digit:
#: an empty, punctuation-only (``-``, ``...``), over-long, non-ASCII or repeated (joined with a
#: comma by the WSGI server) value is replaced with a fresh UUID.
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
#: Methods logged by name (RFC 9110 §9 and PATCH); any other token is logged as ``<other>``.
_LOGGED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
UNMATCHED_ROUTE = "<unmatched>"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


#: The body of every unexpected failure (RFC 6749 §5.2 ``server_error``, no detail).
SERVER_ERROR = {"error": "server_error", "error_description": "The server could not complete the request."}


class Arrival:
    """What is known of a request once it has arrived, before it is routed: when, its id, whom it
    is from.  Flask keeps these in ``g`` (:func:`install`); the lean token endpoint
    (:mod:`sts.http.token_fast`) keeps them here."""

    __slots__ = ("client_address", "request_id", "started", "trace_id", "via_trusted_proxy")

    def __init__(self, environ: Mapping[str, Any], trusted: Sequence[Network]) -> None:
        self.started = time.perf_counter()
        remote_addr = environ.get("REMOTE_ADDR")
        self.request_id = request_id(environ.get("HTTP_X_REQUEST_ID", ""))
        self.client_address = client_address(remote_addr, header_values(environ, "X-Forwarded-For"), trusted)
        self.via_trusted_proxy = is_trusted_proxy(remote_addr, trusted)
        #: Set once the request's trace has started (:mod:`sts.http.tracing`).
        self.trace_id: str | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """A JSON answer before it is a response: status, body and the headers beyond ``Content-Type``."""

    status: int
    body: Any
    headers: Mapping[str, str]


#: The encoder :func:`json.dumps` would build on every call with these arguments, built once.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True, default=DefaultJSONProvider.default)


def json_text(body: Any) -> str:
    """``body`` as compact JSON, written as Flask's JSON provider writes it (sorted keys, non-ASCII
    escaped) but without looking the provider up on every call."""
    return _COMPACT_JSON.encode(body)


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """``body`` as a compact JSON response (:func:`json_text`)."""
    response = Response(json_text(body), status=status, mimetype="application/json")
    if headers:
        response.headers.update(headers)
    return response


def oauth_error_answer(exc: OAuthError) -> Answer:
    """RFC 6749 §5.2: the error's code, fixed description and status, never stored."""
    return Answer(exc.status, exc.body(), {**NO_STORE, **exc.headers()})


def oauth_error_response(exc: OAuthError) -> Response:
    answer = oauth_error_answer(exc)
    return json_response(answer.body, answer.status, answer.headers)


def http_error_answer(exc: HTTPException) -> Answer:
    """A refusal of Werkzeug's (no route, a method not allowed, a body too large...) in JSON."""
    status = exc.code or 500
    if isinstance(exc, RequestEntityTooLarge):
        body = {"error": "invalid_request", "error_description": "The request body is too large."}
        status = 413
    elif status >= 500:
        body = SERVER_ERROR
    elif isinstance(exc, MethodNotAllowed):
        body = {"error": "invalid_request", "error_description": "The HTTP method is not allowed here."}
    elif status == 404:
        body = {"error": "not_found", "error_description": "No such endpoint."}
    else:
        body = {"error": "invalid_request", "error_description": "The request is malformed."}
    headers = dict(NO_STORE)
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        headers["Allow"] = ", ".join(exc.valid_methods)
    return Answer(status, body, headers)


def _http_error(exc: HTTPException) -> Response:
    answer = http_error_answer(exc)
    return json_response(answer.body, answer.status, answer.headers)


def _route() -> str:
    """The rule the request matched (``/token``), never the path the client sent."""
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED_ROUTE


def logged_method(method: str) -> str:
    """The method as the logs name it: a standard one by name, any other token as ``<other>``."""
    return method if method in _LOGGED_METHODS else "<other>"


def unexpected_answer(method: str, route: str, request_id: str) -> Answer:
    """An unexpected failure: logged with its stack trace, answered ``server_error`` without one.
    Call from an ``except`` block."""
    log.exception("unhandled error on %s %s (request %s)", logged_method(method), route, request_id)
    return Answer(500, SERVER_ERROR, NO_STORE)


def _unexpected(exc: Exception) -> Response:
    answer = unexpected_answer(request.method, _route(), getattr(g, "request_id", "-"))
    return json_response(answer.body, answer.status, answer.headers)


def request_id(incoming: str) -> str:
    """The caller's ``X-Request-Id`` when well formed, else a fresh one (also for the server's own errors)."""
    return incoming if _REQUEST_ID.fullmatch(incoming) else uuid4_text()


def _assign_request_id(trusted: Sequence[Network]) -> None:
    arrival = Arrival(request.environ, trusted)
    g.request_started = arrival.started
    g.request_id = arrival.request_id
    g.client_address = arrival.client_address
    g.via_trusted_proxy = arrival.via_trusted_proxy


class _Headers(Protocol):
    def __setitem__(self, name: str, value: str, /) -> None: ...
    def setdefault(self, name: str, value: str, /) -> Any: ...


def stamp_headers(headers: _Headers, request_id: str) -> None:
    """The headers every response carries: its request id, and ``nosniff``."""
    headers["X-Request-Id"] = request_id
    headers.setdefault("X-Content-Type-Options", "nosniff")


def _echo_request_id(response: Response) -> Response:
    stamp_headers(response.headers, getattr(g, "request_id", ""))
    return response


#: The environ key ``sts serve`` puts the seconds a request queued for a request thread under.
QUEUED = "sts.queued_seconds"


def _log_access(response: Response) -> Response:
    if access_log.isEnabledFor(logging.INFO):
        log_access(
            client=g.get("client_address") or request.remote_addr or "-",
            method=request.method,
            route=_route(),
            status=response.status_code,
            size=response.content_length,
            started=g.get("request_started"),
            request_id=g.get("request_id", "-"),
            trace_id=g.get("trace_id"),
            queued=request.environ.get(QUEUED, 0.0),
        )
    return response


def log_access(
    *,
    client: str,
    method: str,
    route: str,
    status: int,
    size: int | None,
    started: float | None,
    request_id: str,
    trace_id: str | None,
    queued: float = 0.0,
) -> None:
    """One line per request: client, method, route rule, status, size, duration, request id.
    ``queued``: seconds the request waited for a request thread (:data:`QUEUED`), in the duration.

    The same values are attached to the record (``extra``) for structured log
    formatters.  The raw path and query are never logged.
    """
    if not access_log.isEnabledFor(logging.INFO):
        return
    # From its arrival in the worker: the time it queued for a request thread counts (a client
    # waits through it; a fault audit saw 10 s answers logged as 1.8 s).
    queued_ms = queued * 1000
    duration_ms = queued_ms + ((time.perf_counter() - started) * 1000 if started is not None else 0.0)
    fields = {
        "client_address": client,
        "http_method": logged_method(method),
        "http_route": route,
        "http_status": status,
        "response_bytes": size,
        "duration_ms": round(duration_ms, 3),
        "queued_ms": round(queued_ms, 3),
        "request_id": request_id,
        "trace_id": trace_id,
    }
    access_log.info(
        '%s "%s %s" %d %s %.1fms request_id=%s',
        fields["client_address"],
        fields["http_method"],
        fields["http_route"],
        fields["http_status"],
        "-" if size is None else size,
        duration_ms,
        fields["request_id"],
        extra=fields,
    )


#: The headers of every answer given before the application (by ``sts serve``), as the application's.
_BEFORE_APP_HEADERS = (
    ("Content-Type", "application/json"),
    ("Cache-Control", "no-store"),
    ("Pragma", "no-cache"),
    ("X-Content-Type-Options", "nosniff"),
)


def answer_before_app(
    status: int,
    description: str,
    *,
    error: str,
    request_id: str,
    close: bool,
    client: str,
    method: str,
    started: float | None,
) -> tuple[list[tuple[str, str]], bytes]:
    """Headers and body of a refusal ``sts serve`` answers before the application (a body too slow,
    too large or chunked, a bad header, a full queue): JSON like the application's, with its
    ``X-Request-Id``, and an access-log line like every request's (route ``-``: none was matched;
    an outside audit found those request ids in no log line)."""
    body = json.dumps({"error": error, "error_description": description}, separators=(",", ":")).encode()
    headers = [*_BEFORE_APP_HEADERS, ("X-Request-Id", request_id)]
    if close:
        headers.append(("Connection", "close"))
    if status == 503:
        headers.append(("Retry-After", "1"))
    log_access(
        client=client,
        method=method,
        route="-",
        status=status,
        size=len(body),
        started=started,
        request_id=request_id,
        trace_id=None,
    )
    return headers, body


def install(app: Flask, *, trusted_proxies: Sequence[Network] = ()) -> None:
    """Install the request id, access log and error handlers; call before any route is added.

    ``trusted_proxies``: the networks whose ``X-Forwarded-For`` is believed (the client's address,
    :mod:`sts.http.client_address`) and whose forwarded client certificates are (RFC 8705).

    Flask's automatic ``OPTIONS`` answer (``200``, an empty HTML body) is turned
    off for every route added afterwards, so ``OPTIONS`` is a ``405`` with
    ``Allow``, in JSON, like any other method a path does not serve.
    """
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # after_request functions run in reverse order of registration: the access log last.
    app.after_request(_log_access)
    app.before_request(lambda: _assign_request_id(trusted_proxies))
    app.after_request(_echo_request_id)
    app.register_error_handler(OAuthError, oauth_error_response)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
