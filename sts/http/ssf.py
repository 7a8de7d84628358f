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
made in :mod:`sts.core.shared_signals`; this module only reads the body and
writes the answer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, cast

from flask import Flask, Response, current_app, g, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from ..adapters.jwks import FileJWKS, HttpJWKS
from ..adapters.metrics import CountedIssuerKeys
from ..core.ports import IssuerKeys
from ..core.shared_signals import (
    ReceiverUnavailable,
    SetDelivery,
    SetRefused,
    SignalReceiver,
    Transmitter,
    TransmitterPolicy,
)
from ..settings import Settings, TransmitterSettings
from .responses import NO_STORE, json_response

if TYPE_CHECKING:
    from ..app import Runtime

EVENTS_PATH = "/ssf/events"
EXTENSION_KEY = "sts.ssf"


def transmitter_keys(t: TransmitterSettings, runtime: Runtime) -> IssuerKeys:
    if t.jwks_file is not None:
        return FileJWKS(t.jwks_file, algorithms=t.algorithms)
    assert t.jwks_uri is not None
    metrics, source = runtime.metrics, f"transmitter:{t.name}"
    keys = HttpJWKS(
        t.jwks_uri,
        algorithms=t.algorithms,
        max_stale=t.jwks_max_stale,
        clock=runtime.clock,
        on_fetch=metrics.jwks_fetch_recorder(source) if metrics else None,
    )
    return CountedIssuerKeys(keys, metrics, "transmitter_keys", source) if metrics else keys


def build_transmitters(settings: Settings, runtime: Runtime) -> list[Transmitter]:
    return [
        Transmitter(
            TransmitterPolicy(
                name=t.name,
                issuer=t.issuer,
                audience=t.audience or settings.issuer,
                algorithms=frozenset(t.algorithms),
                block_duration=t.block_duration,
                max_age=t.max_age,
                subject_issuers=frozenset(t.subject_issuers) if t.subject_issuers is not None else None,
            ),
            transmitter_keys(t, runtime),
        )
        for t in settings.transmitters
    ]


def install(app: Flask, runtime: Runtime) -> None:
    """Register the receiver's endpoint when transmitters are configured.

    The transmitters' key sources are built here, once, at start.
    """
    settings = runtime.settings
    if not settings.transmitters:
        return
    if runtime.subject_states is None:
        raise RuntimeError("the shared signals receiver needs a subject state store")
    app.extensions[EXTENSION_KEY] = SignalReceiver(
        build_transmitters(settings, runtime),
        issuers=runtime.exchange.issuers,
        replay=runtime.replay,
        states=runtime.subject_states,
        # The exchange's sink: the audit trail, with each decision counted.
        audit=runtime.exchange.audit,
        clock=runtime.clock,
        leeway=settings.leeway,
        limits=runtime.limits,
    )
    app.add_url_rule(EVENTS_PATH, "ssf_events", receive_set, methods=["POST"])


def _error(exc: SetRefused) -> Response:
    headers = dict(NO_STORE)
    if isinstance(exc, ReceiverUnavailable):
        headers["Retry-After"] = str(exc.retry_after)
    return json_response(exc.body(), exc.status, headers)


def receive_set() -> Response:
    """RFC 8935 §2: receive one SET pushed by a transmitter."""
    receiver = cast("SignalReceiver", current_app.extensions[EXTENSION_KEY])
    delivery = SetDelivery(
        body=b"",
        content_type=request.headers.get("Content-Type"),
        request_id=g.request_id,
        source_ip=g.get("client_address", request.remote_addr),
        user_agent=request.headers.get("User-Agent"),
        trace_id=g.get("trace_id"),
    )
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
