"""Security Event Tokens on the wire: RFC 8417 SETs pushed over HTTP (RFC 8935), CAEP 1.0 events.

A transmitter (an identity provider, an EDR, a CI platform...) tells this
service that something happened to a workload identity, by pushing a
Security Event Token (SET, RFC 8417) over HTTP (RFC 8935 §2)::

    POST /ssf/events HTTP/1.1
    Host: sts.example.com
    Content-Type: application/secevent+jwt

    eyJ0eXAiOiJzZWNldmVudCtqd3QiLCJhbGciOiJSUzI1NiIsImtpZCI6Ii4uLiJ9.eyJpc3MiOi...

    HTTP/1.1 202 Accepted

whose verified payload (JWS header ``typ: secevent+jwt``) reads::

    {"iss": "https://idp.example.com", "aud": "https://sts.example.com",
     "iat": 1700000000, "jti": "4d3559ec67504aaba65d40b0363faad8",
     "sub_id": {"format": "iss_sub", "iss": "https://token.actions.githubusercontent.com",
                "sub": "repo:acme/app:ref:refs/heads/main"},
     "events": {"https://schemas.openid.net/secevent/caep/event-type/session-revoked":
                    {"event_timestamp": 1699999990}}}

A refused SET is answered ``400`` with an RFC 8935 §2.4 error (IANA
"Security Event Token Error Codes")::

    HTTP/1.1 400 Bad Request
    Content-Type: application/json

    {"err": "invalid_audience", "description": "The SET audience does not name this receiver."}

This module holds the wire format only: the media type and ``typ``, the CAEP
event-type URIs and values, the delivery as it arrived (:class:`SetDelivery`,
:func:`check_media_type`, :func:`decode_body`) and the refusals with their
``err`` code, status and fixed description.  The receiver that decides what a
SET means is :mod:`sts.core.signals`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

#: RFC 8417 §2.3 / RFC 8935 §2: the JOSE ``typ`` and the request's media type.
SET_TYP: Final = "secevent+jwt"
SET_MEDIA_TYPE: Final = "application/secevent+jwt"

CAEP_PREFIX: Final = "https://schemas.openid.net/secevent/caep/event-type/"
SESSION_REVOKED: Final = CAEP_PREFIX + "session-revoked"
CREDENTIAL_CHANGE: Final = CAEP_PREFIX + "credential-change"
DEVICE_COMPLIANCE_CHANGE: Final = CAEP_PREFIX + "device-compliance-change"
ASSURANCE_LEVEL_CHANGE: Final = CAEP_PREFIX + "assurance-level-change"
RISK_LEVEL_CHANGE: Final = CAEP_PREFIX + "risk-level-change"
TOKEN_CLAIMS_CHANGE: Final = CAEP_PREFIX + "token-claims-change"

#: CAEP 1.0 ``risk-level-change``: LOW, MEDIUM, HIGH; ``critical`` is accepted as the
#: level above HIGH that :mod:`sts.core.subject_state` and the risk engine know.
RISK_LEVELS: Final = ("low", "medium", "high", "critical")
#: CAEP 1.0 ``device-compliance-change``.
COMPLIANCE_STATUSES: Final = frozenset({"compliant", "not-compliant"})

#: Bounds on what one SET may ask for, so a hostile (but validly signed) SET stays cheap.
MAX_EVENTS: Final = 16
MAX_IDENTITIES: Final = 32
MAX_SUBJECT_CHARS: Final = 512
MAX_JTI_CHARS: Final = 256
#: How much of a value from a SET the audit record shows.
SHOWN_CHARS: Final = 200


# ---------------------------------------------------------------------------
# Errors: RFC 8935 §2.4
# ---------------------------------------------------------------------------

#: Fixed, safe descriptions by error code; never built from input.
DESCRIPTIONS: Final[Mapping[str, str]] = {
    "invalid_request": "The request is not a valid SET, or an event in it does not conform to its type.",
    "invalid_key": "The key used to sign the SET is invalid or not acceptable.",
    "invalid_issuer": "The SET issuer is not a transmitter of this receiver.",
    "invalid_audience": "The SET audience does not name this receiver.",
    "authentication_failed": "The SET transmitter could not be authenticated.",
    "access_denied": "The SET transmitter may not send this SET to this receiver.",
    "temporarily_unavailable": "The receiver is temporarily unavailable; deliver the SET again later.",
}


class SetRefused(Exception):
    """A SET that is refused: RFC 8935 §2.4 ``err`` code, HTTP status, and a fixed description.

    ``reason`` is a machine-readable tag for the audit record (``set.typ``,
    ``subject.unknown_format``...); ``detail`` is operator text.  Neither
    reaches the transmitter.
    """

    status: int = 400

    def __init__(self, err: str, reason: str, detail: str = "") -> None:
        super().__init__(reason if not detail else f"{reason}: {detail}")
        self.err = err
        self.reason = reason
        self.detail = detail

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.err]

    def body(self) -> dict[str, str]:
        return {"err": self.err, "description": self.description}


class ReceiverUnavailable(SetRefused):
    """A store, the audit trail or the transmitter's keys cannot be reached: ``503``, fail closed.

    RFC 8935 has no code for this; the transmitter treats any non-202 answer as
    a failed delivery and retries, which is what we want.
    """

    status = 503

    def __init__(self, reason: str, detail: str = "", *, retry_after: int = 5) -> None:
        super().__init__("temporarily_unavailable", reason, detail)
        self.retry_after = retry_after


class ReceiverRateLimited(ReceiverUnavailable):
    """A rate limit refused the delivery: ``429`` with ``Retry-After`` (RFC 6585 §4).

    RFC 8935 has no code for it either; the transmitter retries, later.
    """

    status = 429

    @property
    def description(self) -> str:
        return "Too many deliveries; deliver the SET again after Retry-After seconds."


def invalid_set(reason: str, detail: str = "") -> SetRefused:
    """RFC 8935 §2.4 ``invalid_request``: the SET is not valid, and must not be delivered again."""
    return SetRefused("invalid_request", reason, detail)


def shown(value: object) -> str:
    """A value from a SET as the audit record's detail shows it: bounded, and quoted."""
    text = value if isinstance(value, str) else type(value).__name__
    return repr(text[:SHOWN_CHARS])


# ---------------------------------------------------------------------------
# The delivery: RFC 8935 §2
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SetDelivery:
    """One push delivery as the HTTP layer saw it (RFC 8935 §2)."""

    body: bytes
    content_type: str | None
    request_id: str
    source_ip: str | None = None
    user_agent: str | None = None
    #: The W3C Trace Context trace id this delivery belongs to (recorded in the audit details).
    trace_id: str | None = None


def check_media_type(content_type: str | None) -> None:
    """RFC 8935 §2: ``Content-Type: application/secevent+jwt`` (parameters ignored, case-insensitive)."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != SET_MEDIA_TYPE:
        raise invalid_set("request.content_type", shown(content_type or ""))


def decode_body(body: bytes) -> str:
    """The compact JWS: ASCII, surrounding whitespace (a trailing newline) tolerated."""
    try:
        token = body.decode("ascii").strip()
    except UnicodeDecodeError:
        raise invalid_set("request.not_ascii") from None
    if not token:
        raise invalid_set("request.empty_body")
    return token
