"""Shared Signals receiver endpoint: RFC 8935 push delivery of RFC 8417 Security Event Tokens.

Installed only when ``transmitters`` are configured; otherwise ``/ssf/events``
does not exist (404).  The request on the wire::

    POST /ssf/events HTTP/1.1
    Content-Type: application/secevent+jwt

    eyJ0eXAiOiJzZWNldmVudCtqd3QiLCJhbGciOiJSUzI1NiJ9.eyJpc3MiOi...

answered ``202 Accepted`` with an empty body, ``400`` with
``{"err": ..., "description": ...}`` (RFC 8935 §2.4), or ``503``
``{"err": "temporarily_unavailable", ...}`` with ``Retry-After`` when a store,
the audit trail or the transmitter's keys cannot be reached.  The decision is
made in :mod:`sts.core.signals`; this module only reads the body and
writes the answer.
"""

from __future__ import annotations

from dataclasses import replace

from flask import Blueprint, Response, g, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from ..core.signals.receiver import SignalReceiver
from ..protocol.security_events import ReceiverUnavailable, SetDelivery, SetRefused
from .responses import NO_STORE, json_response
from .wire import content_coding

EVENTS_PATH = "/ssf/events"


def events_blueprint(receiver: SignalReceiver) -> Blueprint:
    """``POST /ssf/events``, deciding with ``receiver`` (built with its transmitters' key sources,
    once, at start, by :func:`sts.app.create_app`; registered only when transmitters are configured)."""
    bp = Blueprint("ssf", __name__)

    def receive_set() -> Response:
        """RFC 8935 §2: receive one SET pushed by a transmitter."""
        return _receive(receiver)

    bp.add_url_rule(EVENTS_PATH, "ssf_events", receive_set, methods=["POST"])
    return bp


def _error(exc: SetRefused) -> Response:
    headers = dict(NO_STORE)
    if isinstance(exc, ReceiverUnavailable):
        headers["Retry-After"] = str(exc.retry_after)
    return json_response(exc.body(), exc.status, headers)


def _receive(receiver: SignalReceiver) -> Response:
    delivery = SetDelivery(
        body=b"",
        content_type=request.headers.get("Content-Type"),
        request_id=g.request_id,
        source_ip=g.get("client_address", request.remote_addr),
        user_agent=request.headers.get("User-Agent"),
        trace_id=g.get("trace_id"),
    )
    if content_coding(request.environ) is not None:
        problem = SetRefused("invalid_request", "request.content_encoding")
        receiver.refuse_early(delivery, problem)
        return _error(problem)
    try:
        # MAX_CONTENT_LENGTH (max_body_bytes) bounds the read, with or without Content-Length.
        body = request.get_data(cache=False)
    except RequestEntityTooLarge:
        problem = SetRefused("invalid_request", "request.body_too_large")
        receiver.refuse_early(delivery, problem)
        return _error(problem)
    except ClientDisconnected:
        problem = SetRefused("invalid_request", "request.body_incomplete")
        receiver.refuse_early(delivery, problem)
        return _error(problem)
    try:
        receiver.receive(replace(delivery, body=body))
    except SetRefused as exc:
        return _error(exc)
    accepted = Response(status=202, headers=NO_STORE)
    # RFC 8935 §2.2: 202 with no content.
    del accepted.headers["Content-Type"]
    return accepted
