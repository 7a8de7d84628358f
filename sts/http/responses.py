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
import uuid
from collections.abc import Sequence
from typing import Any

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from ..errors import OAuthError
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


def _json_default(value: Any) -> Any:
    """What Flask's JSON provider makes of a value JSON has no type for (a date, a dataclass...)."""
    return current_app.json.default(value)  # type: ignore[attr-defined]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``body`` as compact JSON, written as Flask's JSON provider writes it (sorted keys, non-ASCII
    escaped) but without looking the provider up on every call."""
    text = json.dumps(body, separators=(",", ":"), sort_keys=True, default=_json_default)
    response = Response(text, status=status, mimetype="application/json")
    if headers:
        response.headers.update(headers)
    return response


def oauth_error_response(exc: OAuthError) -> Response:
    return json_response(exc.body(), exc.status, {**NO_STORE, **exc.headers()})


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if isinstance(exc, RequestEntityTooLarge):
        body = {"error": "invalid_request", "error_description": "The request body is too large."}
        status = 413
    elif status >= 500:
        body = {"error": "server_error", "error_description": "The server could not complete the request."}
    elif isinstance(exc, MethodNotAllowed):
        body = {"error": "invalid_request", "error_description": "The HTTP method is not allowed here."}
    elif status == 404:
        body = {"error": "not_found", "error_description": "No such endpoint."}
    else:
        body = {"error": "invalid_request", "error_description": "The request is malformed."}
    response = json_response(body, status, NO_STORE)
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _route() -> str:
    """The rule the request matched (``/token``), never the path the client sent."""
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED_ROUTE


def _method() -> str:
    return request.method if request.method in _LOGGED_METHODS else "<other>"


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error on %s %s (request %s)", _method(), _route(), getattr(g, "request_id", "-"))
    return json_response(
        {"error": "server_error", "error_description": "The server could not complete the request."},
        500,
        NO_STORE,
    )


def request_id(incoming: str) -> str:
    """The caller's ``X-Request-Id`` when well formed, else a fresh one (also for the server's own errors)."""
    return incoming if _REQUEST_ID.fullmatch(incoming) else str(uuid.uuid4())


def _assign_request_id(trusted: Sequence[Network]) -> None:
    started = time.perf_counter()
    environ = request.environ
    remote_addr = environ.get("REMOTE_ADDR")
    g.request_started = started
    g.request_id = request_id(environ.get("HTTP_X_REQUEST_ID", ""))
    g.client_address = client_address(remote_addr, header_values(environ, "X-Forwarded-For"), trusted)
    g.via_trusted_proxy = is_trusted_proxy(remote_addr, trusted)


def _echo_request_id(response: Response) -> Response:
    response.headers["X-Request-Id"] = getattr(g, "request_id", "")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


def _log_access(response: Response) -> Response:
    """One line per request: client, method, route rule, status, size, duration, request id.

    The same values are attached to the record (``extra``) for structured log
    formatters.  The raw path and query are never logged.
    """
    if not access_log.isEnabledFor(logging.INFO):
        return response
    started = g.get("request_started")
    duration_ms = (time.perf_counter() - started) * 1000 if started is not None else 0.0
    size = response.content_length
    fields = {
        "client_address": g.get("client_address") or request.remote_addr or "-",
        "http_method": _method(),
        "http_route": _route(),
        "http_status": response.status_code,
        "response_bytes": size,
        "duration_ms": round(duration_ms, 3),
        "request_id": g.get("request_id", "-"),
        "trace_id": g.get("trace_id"),
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
    return response


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
