"""JSON responses and the error handlers shared by every endpoint.

Errors carry their OAuth code, status and fixed description (RFC 6749 §5.2);
an unexpected failure is ``server_error`` with no stack trace.  Responses
that carry tokens or errors are ``Cache-Control: no-store`` (RFC 6749 §5.1,
RFC 8693 §2.2.1).
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from flask import Flask, Response, current_app, g, json, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from ..errors import OAuthError
from .client_address import client_address, is_trusted_proxy

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = Response(json.dumps(body, separators=(",", ":")), status=status, mimetype="application/json")
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


def _unexpected(exc: Exception) -> Response:
    log.exception(
        "unhandled error on %s %s (request %s)", request.method, request.path, getattr(g, "request_id", "-")
    )
    return json_response(
        {"error": "server_error", "error_description": "The server could not complete the request."},
        500,
        NO_STORE,
    )


def request_id(incoming: str) -> str:
    """The caller's ``X-Request-Id`` when well formed, else a fresh one (also for the server's own errors)."""
    return incoming if _REQUEST_ID.fullmatch(incoming) else str(uuid.uuid4())


def _assign_request_id() -> None:
    g.request_id = request_id(request.headers.get("X-Request-Id", ""))
    trusted = current_app.config.get("STS_TRUSTED_PROXIES", ())
    g.client_address = client_address(
        request.remote_addr, request.headers.getlist("X-Forwarded-For"), trusted
    )
    g.via_trusted_proxy = is_trusted_proxy(request.remote_addr, trusted)


def _echo_request_id(response: Response) -> Response:
    response.headers["X-Request-Id"] = getattr(g, "request_id", "")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


def install(app: Flask) -> None:
    app.before_request(_assign_request_id)
    app.after_request(_echo_request_id)
    app.register_error_handler(OAuthError, oauth_error_response)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
