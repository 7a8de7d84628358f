"""The ``parse`` stage: the token-exchange request read from the wire, and its part of the record.

RFC 8693 §2.1, a form POST (RFC 6749 §3.2)::

    POST /token HTTP/1.1
    Content-Type: application/x-www-form-urlencoded

    grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange
    &subject_token=eyJhbGciOiJSUzI1NiJ9...
    &subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt
    &audience=https%3A%2F%2Fdeploy.example.com&scope=deploy%3Aread

The form itself is parsed by :mod:`sts.protocol.token_exchange`; this step
refuses what the token endpoint does not take and records what was asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...errors import InvalidRequest
from ...protocol.identifiers import uuid4_text
from ...protocol.token_exchange import TokenExchangeRequest, parse_grant_type, parse_token_exchange
from ...protocol.wire import WireRequest, check_content_type
from ..assurance import lowest_known
from ..audit import AuditRecord, token_hash


def start_record(wire: WireRequest, now: float) -> AuditRecord:
    """The audit record of one request to the token endpoint, before anything is decided."""
    return AuditRecord(
        event_id=uuid4_text(),
        time=now,
        request_id=wire.request_id,
        endpoint="token",
        source_ip=wire.source_ip,
        user_agent=(wire.user_agent or "")[:200] or None,
        details=trace_details(wire),
    )


def trace_details(wire: WireRequest) -> dict[str, Any]:
    """The record's ``details`` to start with: the W3C trace id, when the request has one."""
    return {"trace_id": wire.trace_id} if wire.trace_id else {}


def presented_subject_token_hash(wire: WireRequest) -> str | None:
    """SHA-256 of the first ``subject_token`` in the form (else the query string), if any.

    It goes into the record even when the request is refused before it is parsed, so a
    reviewer can match the token.
    """
    for source in (wire.form, wire.query):
        for value in source.get("subject_token", ()):
            if value:
                return token_hash(value)
    return None


def hashed_subject_token(wire: WireRequest, request: TokenExchangeRequest, record: AuditRecord) -> str | None:
    """The record's ``subject_token_sha256`` when it is the hash of ``request.subject_token`` (the very
    string :func:`presented_subject_token_hash` hashed: the form's first value), else None."""
    values = wire.form.get("subject_token")
    if values and request.subject_token and values[0] is request.subject_token:
        return record.subject_token_sha256
    return None


#: The characters of one requested audience or resource, and of one requested scope, kept in a
#: record (a longer one ends in "…").
RECORDED_TARGET_CHARS = 512
RECORDED_SCOPE_CHARS = 128


def recorded(values: Sequence[str], limit: int) -> list[str]:
    """``values`` for a record: each cut to ``limit`` characters, marked with "…" when cut."""
    return [value if len(value) <= limit else value[:limit] + "\u2026" for value in values]


def parse_request(wire: WireRequest, record: AuditRecord) -> TokenExchangeRequest:
    """The request (RFC 8693 §2.1), with what it asks for in ``record``; or raise ``invalid_request``.

    RFC 6749 §3.2: a form POST, with no parameter in the query string (where a credential
    would be logged by every proxy on the way).  RFC 9470 ``acr_values`` must name levels
    this service knows (its metadata's ``acr_values_supported``).
    """
    if wire.query:
        raise InvalidRequest("request.query_parameters")
    check_content_type(wire.content_type)
    parse_grant_type(wire.form)
    request = parse_token_exchange(wire.form)
    record.subject_token_type = request.subject_token_type
    # What the client asks for is recorded before anything is checked: each value is kept to a
    # size of the record's choosing (one 5,300-character audience made an unauthenticated refusal's
    # record 17 times the usual size; the counts are bounded by the parser).
    record.requested_audience = recorded(request.audiences, RECORDED_TARGET_CHARS)
    record.requested_resource = recorded(request.resources, RECORDED_TARGET_CHARS)
    record.requested_scope = (
        recorded(request.scopes, RECORDED_SCOPE_CHARS) if request.scopes is not None else None
    )
    record.requested_lifetime = request.requested_lifetime
    record.requested_token_type = request.requested_token_type
    if request.actor_token is not None:
        record.actor_token_sha256 = token_hash(request.actor_token)
    if request.acr_values and lowest_known(request.acr_values) is None:
        raise InvalidRequest("request.unsupported_acr_values", " ".join(request.acr_values)[:200])
    return request
