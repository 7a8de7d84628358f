"""Shared Signals receiver: verify a pushed Security Event Token, then act on its CAEP events.

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

This module is the pure part: :func:`verify_set` (signature and claims),
:func:`resolve_subject` (RFC 9493 subject identifiers to identity keys),
:func:`apply_event` (the CAEP event's effect on a :class:`SubjectState`), and
:class:`SignalReceiver`, which runs them in order and talks to storage only
through the ports.  The HTTP layer (:mod:`sts.http.ssf`) reads the request
and writes the response; nothing here knows HTTP exists.

Decisions (see README "Shared signals"):

* A bad signature, an unknown ``kid``, or an ``alg`` outside the
  transmitter's allow-list (``none``, ``HS256``...) is ``invalid_key``: the SET
  signature is how a transmitter authenticates, and RFC 8935 defines
  ``invalid_key`` as "keys used to sign the SET [are] invalid or otherwise
  unacceptable".  ``authentication_failed`` is not used (no HTTP-level
  transmitter credential exists to fail).
* A second delivery of a ``jti`` is ``invalid_request``: the first one was
  applied, and RFC 8417 §2.2 makes ``jti`` the replay guard.
* A subject the receiver cannot place (an ``iss_sub`` whose ``iss`` is no
  configured issuer, an unknown format, a ``complex`` subject without a
  usable member) refuses the whole SET with ``invalid_request``: accepting it
  silently would hide a misconfigured stream.  A subject outside a
  transmitter's ``subject_issuers`` is ``access_denied``.
* Unknown event types are accepted and ignored (RFC 8417 §2.2: a receiver
  ignores events it does not understand); they are named in the audit record.
* Revocation (``revoked_before``) takes effect at the time the SET is
  received, on this service's clock, not at the transmitter's
  ``event_timestamp``: every token issued before we could act is revoked, and
  the comparison is between two readings of the same clock.  Step-up
  (``reauth_after``) uses the event time: attestation issued after the event
  is fresh.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import RateLimited, TemporarilyUnavailable
from .attest import IssuerDirectory
from .audit import AuditRecord, log_unaudited, token_hash
from .claims import ClaimInvalid, ClaimRules, check_claims, normalise_typ, numeric_date, numeric_date_value
from .jose import JWSInvalid, peek, verify_signature
from .ports import (
    AuditSink,
    AuditUnavailable,
    IssuerKeys,
    KeysUnavailable,
    ReplayCache,
    ReplayWindowLost,
    StoreUnavailable,
    SubjectStateStore,
    UnknownKeyId,
)
from .rate_limit import NO_LIMITS, RateLimiter
from .subject_state import ANY_ISSUER, STATE_TTL, SubjectState, identity_key

log = logging.getLogger(__name__)

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
#: The CAEP 1.0 event types this receiver acts on; any other is accepted and ignored.
ACTED_ON: Final = frozenset(
    {
        SESSION_REVOKED,
        CREDENTIAL_CHANGE,
        DEVICE_COMPLIANCE_CHANGE,
        ASSURANCE_LEVEL_CHANGE,
        RISK_LEVEL_CHANGE,
        TOKEN_CLAIMS_CHANGE,
    }
)

#: CAEP 1.0 ``risk-level-change``: LOW, MEDIUM, HIGH; ``critical`` is accepted as the
#: level above HIGH that :mod:`sts.core.subject_state` and the risk engine know.
RISK_LEVELS: Final = ("low", "medium", "high", "critical")
STEP_UP_RISK_LEVELS: Final = frozenset({"high", "critical"})
#: CAEP 1.0 ``device-compliance-change``.
COMPLIANCE_STATUSES: Final = frozenset({"compliant", "not-compliant"})

#: Bounds on what one SET may ask for, so a hostile (but validly signed) SET stays cheap.
MAX_EVENTS: Final = 16
MAX_IDENTITIES: Final = 32
MAX_SUBJECT_CHARS: Final = 512
MAX_JTI_CHARS: Final = 256
_SHOWN_CHARS: Final = 200

#: The members of an SSF 1.0 ``complex`` subject (§3.2) that may name the workload; others are ignored.
COMPLEX_MEMBERS: Final = ("user", "device", "session", "application", "tenant", "org_unit", "group")


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


def _invalid(reason: str, detail: str = "") -> SetRefused:
    return SetRefused("invalid_request", reason, detail)


# ---------------------------------------------------------------------------
# Configuration, compiled
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TransmitterPolicy:
    """One configured transmitter (settings ``transmitters``), compiled."""

    name: str
    issuer: str
    audience: str
    algorithms: frozenset[str]
    block_duration: int = 3600
    max_age: int = 86400
    #: Issuer names whose subjects this transmitter may name; None: every issuer.
    subject_issuers: frozenset[str] | None = None


@dataclass(frozen=True)
class Transmitter:
    policy: TransmitterPolicy
    keys: IssuerKeys


# ---------------------------------------------------------------------------
# Verification: RFC 8417 §2, §4; RFC 8725
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedSET:
    transmitter: TransmitterPolicy
    claims: Mapping[str, Any]
    jti: str
    iat: float


def _show(value: object) -> str:
    text = value if isinstance(value, str) else type(value).__name__
    return repr(text[:_SHOWN_CHARS])


def verify_set(
    token: str, transmitters: Mapping[str, Transmitter], *, now: float, leeway: int
) -> VerifiedSET:
    """Verify a SET's JWS (:func:`authenticate_set`) and claims (:func:`check_set_claims`)."""
    policy, claims = authenticate_set(token, transmitters)
    jti, iat = check_set_claims(claims, policy, now=now, leeway=leeway)
    return VerifiedSET(transmitter=policy, claims=claims, jti=jti, iat=iat)


def authenticate_set(
    token: str, transmitters: Mapping[str, Transmitter]
) -> tuple[TransmitterPolicy, dict[str, Any]]:
    """The transmitter that signed this SET, and its claims; or raise :class:`SetRefused`.

    RFC 8417 §2.3 and RFC 8725 §3.11: ``typ`` must be ``secevent+jwt``, so no
    other JWT (an ID token, an access token) can pass as a SET.  The key is the
    one the transmitter publishes for the header's ``kid``, for an algorithm on
    its allow-list; nothing in the header chooses it.
    """
    try:
        peeked = peek(token)
    except JWSInvalid as exc:
        # A crit header lands here too: this receiver understands no JWS extension.
        raise _invalid(f"set.{exc.reason}", exc.detail) from None
    if normalise_typ(peeked.header.get("typ")) != SET_TYP:
        raise _invalid("set.typ", _show(peeked.header.get("typ")))
    iss = peeked.claims.get("iss")
    transmitter = transmitters.get(iss) if isinstance(iss, str) else None
    if transmitter is None:
        raise SetRefused("invalid_issuer", "set.unknown_issuer", _show(iss))
    try:
        verify_signature(token, peeked, transmitter.policy.algorithms, transmitter.keys.key_for)
    except JWSInvalid as exc:
        raise SetRefused("invalid_key", f"set.{exc.reason}", exc.detail) from None
    except UnknownKeyId as exc:
        raise SetRefused("invalid_key", "set.unknown_kid", str(exc)) from None
    except KeysUnavailable as exc:
        raise ReceiverUnavailable("transmitter_keys.unavailable", str(exc)) from None
    return transmitter.policy, peeked.claims


def check_set_claims(
    claims: Mapping[str, Any], policy: TransmitterPolicy, *, now: float, leeway: int
) -> tuple[str, float]:
    """RFC 8417 §2.2 claims of a SET whose signature has verified; its ``jti`` and ``iat``.

    Checked by :mod:`.claims` like every other token: ``aud`` naming this
    receiver (else ``invalid_audience``); ``iat`` required, not in the future
    and at most ``max_age`` (+ ``leeway``) old; ``exp`` and ``toe``, when
    present, NumericDates; ``jti`` a string of at most :data:`MAX_JTI_CHARS`.
    A time claim that is not a usable number (a string, ``null``, an integer
    too large for a float) is ``invalid_request`` (RFC 8935 §2.4: the SET is
    not valid, so the transmitter must not retry it), never a server error.
    """
    rules = ClaimRules(
        leeway=leeway,
        issuer=policy.issuer,
        accepted_audiences=(policy.audience,),
        require_exp=False,
        require_iat=True,
        max_age=policy.max_age + leeway,
        require_sub=False,
        require_jti=True,
        max_jti_length=MAX_JTI_CHARS,
    )
    try:
        checked = check_claims(claims, rules, now=now)
        numeric_date(claims, "toe")
    except ClaimInvalid as exc:
        if exc.reason.endswith("_aud") or exc.reason == "audience_mismatch":
            raise SetRefused("invalid_audience", f"set.{exc.reason}", _show(claims.get("aud"))) from None
        raise _invalid(f"set.{exc.reason}", exc.detail) from None
    if checked.jti is None or checked.iat is None:  # Required by the rules; this keeps the types honest.
        raise _invalid("set.missing_jti" if checked.jti is None else "set.missing_iat")
    return checked.jti, checked.iat


# ---------------------------------------------------------------------------
# Subjects: RFC 9493 subject identifiers (SSF 1.0 ``sub_id``)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SubjectScope:
    """What a subject identifier may be resolved to, for one transmitter."""

    issuers: IssuerDirectory
    #: Issuer names whose subjects the transmitter may name; None: every issuer.
    allowed: frozenset[str] | None = None


def _subject_text(value: object, member: str) -> str:
    if not isinstance(value, str) or not value:
        raise _invalid("subject.malformed", f"{member} is not a non-empty string")
    if len(value) > MAX_SUBJECT_CHARS:
        raise _invalid("subject.malformed", f"{member} longer than {MAX_SUBJECT_CHARS} characters")
    return value


def _scoped(issuer_name: str, subject: str, scope: SubjectScope) -> tuple[str, ...]:
    if scope.allowed is not None and issuer_name not in scope.allowed:
        raise SetRefused("access_denied", "subject.issuer_not_allowed", issuer_name)
    return (identity_key(issuer_name, subject),)


def _any_issuer(subject: str, scope: SubjectScope) -> tuple[str, ...]:
    """A subject named without an issuer: every issuer's, or every issuer the transmitter may name."""
    if scope.allowed is None:
        return (identity_key(ANY_ISSUER, subject),)
    return tuple(identity_key(name, subject) for name in sorted(scope.allowed))


def resolve_subject(sub_id: object, scope: SubjectScope, *, nested: bool = False) -> tuple[str, ...]:
    """The identity keys (``<issuer name>|<subject>``) an RFC 9493 subject identifier names.

    * ``iss_sub`` ``{iss, sub}``: the configured issuer with exactly that
      ``iss`` (this service's own issuer is ``self``); none is ``invalid_request``.
    * ``opaque`` ``{id}``, ``email`` ``{email}``: ``*|<value>``, which applies to the
      subject from every issuer.
    * ``uri`` ``{uri}``: a ``spiffe://`` ID goes to the issuer configured for its
      trust domain; any other URI (or an unknown trust domain) is ``*|<uri>``.
    * ``aliases`` ``{identifiers: [...]}``: every alias (RFC 9493 §3.2.6).
    * ``complex`` (SSF 1.0 §3.2): every member named in :data:`COMPLEX_MEMBERS`;
      at least one is required.

    The older SSE drafts' ``subject_type`` (``iss-sub``) is read as ``format``.
    Anything else is ``invalid_request``.
    """
    if not isinstance(sub_id, dict):
        raise _invalid("subject.missing")
    fmt = sub_id.get("format", sub_id.get("subject_type"))
    if not isinstance(fmt, str):
        raise _invalid("subject.missing_format")
    fmt = fmt.replace("-", "_")
    if fmt == "iss_sub":
        iss = _subject_text(sub_id.get("iss"), "iss")
        sub = _subject_text(sub_id.get("sub"), "sub")
        trusted = scope.issuers.by_iss(iss)
        if trusted is None:
            raise _invalid("subject.unknown_issuer", _show(iss))
        return _scoped(trusted.policy.name, sub, scope)
    if fmt == "opaque":
        return _any_issuer(_subject_text(sub_id.get("id"), "id"), scope)
    if fmt == "email":
        return _any_issuer(_subject_text(sub_id.get("email"), "email"), scope)
    if fmt == "uri":
        uri = _subject_text(sub_id.get("uri"), "uri")
        spiffe = scope.issuers.by_spiffe_subject(uri)
        if spiffe is not None:
            return _scoped(spiffe.policy.name, uri, scope)
        return _any_issuer(uri, scope)
    if fmt in {"aliases", "complex"} and nested:
        raise _invalid("subject.nested", fmt)
    if fmt == "aliases":
        identifiers = sub_id.get("identifiers")
        if not isinstance(identifiers, list) or not identifiers:
            raise _invalid("subject.malformed", "aliases without identifiers")
        return _unique(key for item in identifiers for key in resolve_subject(item, scope, nested=True))
    if fmt == "complex":
        members = [sub_id[m] for m in COMPLEX_MEMBERS if m in sub_id]
        if not members:
            raise _invalid("subject.complex_without_known_member")
        return _unique(key for item in members for key in resolve_subject(item, scope, nested=True))
    raise _invalid("subject.unknown_format", _show(fmt))


def _unique(keys: Any) -> tuple[str, ...]:
    found = tuple(dict.fromkeys(keys))
    if len(found) > MAX_IDENTITIES:
        raise _invalid("subject.too_many_identifiers")
    return found


# ---------------------------------------------------------------------------
# Events: OpenID CAEP 1.0
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SecurityEvent:
    """One member of a SET's ``events``: its type URI, payload and the identities it names."""

    type: str
    payload: Mapping[str, Any]
    #: Empty for an event type this receiver ignores.
    identities: tuple[str, ...] = ()

    @property
    def acted_on(self) -> bool:
        return self.type in ACTED_ON

    @property
    def short_name(self) -> str:
        return self.type.removeprefix(CAEP_PREFIX)


def check_payload(event_type: str, payload: Mapping[str, Any]) -> None:
    """Refuse a CAEP event whose members this receiver acts on are missing or malformed.

    RFC 8935 §2.4 ``invalid_request``: "the Event Payload within the SET does
    not conform to the event's definition".  Members only recorded (``reason_admin``,
    ``credential_type``...) are not checked, so a transmitter's extension or a
    slightly different draft does not make us drop a security signal.
    """
    if "event_timestamp" in payload and numeric_date_value(payload["event_timestamp"]) is None:
        raise _invalid("event.malformed_event_timestamp", event_type)
    if event_type == DEVICE_COMPLIANCE_CHANGE:
        status = payload.get("current_status")
        # A list or object is no status (and cannot be looked up in a set: TypeError, a 503).
        if not isinstance(status, str) or status not in COMPLIANCE_STATUSES:
            raise _invalid(
                "event.device_compliance_change.current_status", _show(payload.get("current_status"))
            )
    elif event_type == RISK_LEVEL_CHANGE:
        level = payload.get("current_level")
        if not isinstance(level, str) or level.lower() not in RISK_LEVELS:
            raise _invalid("event.risk_level_change.current_level", _show(level))


def event_time(payload: Mapping[str, Any], now: float, *, leeway: int, toe: float | None = None) -> float:
    """When the event happened: ``event_timestamp`` (CAEP), else the SET's ``toe``, else ``now``.

    A time in the future beyond ``leeway`` is not believed (``now`` is used), and
    one within it is clamped to ``now``: a transmitter's clock must not make a
    step-up requirement reach into the future.
    """
    for candidate in (numeric_date_value(payload.get("event_timestamp")), toe):
        if candidate is not None:
            return min(candidate, now) if candidate <= now + leeway else now
    return now


def _later(current: float | None, new: float) -> float:
    return new if current is None else max(current, new)


def apply_event(
    state: SubjectState,
    event_type: str,
    payload: Mapping[str, Any],
    now: float,
    block_duration: int,
    *,
    leeway: int = 30,
    toe: float | None = None,
) -> SubjectState:
    """The subject's state after one CAEP event (a pure transition).

    ========================== ==========================================================
    ``session-revoked``        blocked until ``now + block_duration``; tokens issued
                               before ``now`` revoked
    ``credential-change``      step-up for attestation before the event; tokens
                               issued before ``now`` revoked
    ``token-claims-change``    as ``credential-change``
    ``assurance-level-change`` step-up for attestation before the event
    ``risk-level-change``      ``risk_level`` = ``current_level``; HIGH/critical also
                               step-up for attestation before the event
    ``device-compliance-change`` ``posture`` = ``current_status``
    ========================== ==========================================================

    Blocks, step-up and revocation only ever move later (an older event
    delivered late cannot lift a newer one); risk level and posture are the
    transmitter's latest statement.  Any other event type leaves the state
    unchanged.  Raises :class:`SetRefused` for a payload that does not
    conform (see :func:`check_payload`).
    """
    if event_type not in ACTED_ON:
        return state
    check_payload(event_type, payload)
    when = event_time(payload, now, leeway=leeway, toe=toe)
    name = event_type.removeprefix(CAEP_PREFIX)
    if event_type == SESSION_REVOKED:
        return state.with_event(
            name,
            now,
            blocked_until=_later(state.blocked_until, now + block_duration),
            revoked_before=_later(state.revoked_before, now),
        )
    if event_type in {CREDENTIAL_CHANGE, TOKEN_CLAIMS_CHANGE}:
        return state.with_event(
            name,
            now,
            reauth_after=_later(state.reauth_after, when),
            revoked_before=_later(state.revoked_before, now),
        )
    if event_type == ASSURANCE_LEVEL_CHANGE:
        return state.with_event(name, now, reauth_after=_later(state.reauth_after, when))
    if event_type == RISK_LEVEL_CHANGE:
        level = str(payload["current_level"]).lower()
        if level in STEP_UP_RISK_LEVELS:
            return state.with_event(
                name, now, risk_level=level, reauth_after=_later(state.reauth_after, when)
            )
        return state.with_event(name, now, risk_level=level)
    # DEVICE_COMPLIANCE_CHANGE
    return state.with_event(name, now, posture=str(payload["current_status"]))


def parse_events(claims: Mapping[str, Any], scope: SubjectScope) -> tuple[SecurityEvent, ...]:
    """The SET's ``events`` (RFC 8417 §2.2), each acted-on event with the identities it names.

    The subject is the SET's ``sub_id`` (SSF 1.0), or a ``subject`` member of
    the event payload (older CAEP drafts), which wins for its event.  Every
    acted-on event is checked here, before anything is stored, so a SET is
    applied whole or not at all.
    """
    events = claims.get("events")
    if not isinstance(events, dict) or not events:
        raise _invalid("set.events_missing")
    if len(events) > MAX_EVENTS:
        raise _invalid("set.too_many_events")
    parsed = []
    for event_type, payload in events.items():
        if not isinstance(payload, dict):
            raise _invalid("set.event_not_object", _show(event_type))
        if event_type not in ACTED_ON:
            parsed.append(SecurityEvent(event_type, payload))
            continue
        check_payload(event_type, payload)
        subject = payload["subject"] if "subject" in payload else claims.get("sub_id")
        parsed.append(SecurityEvent(event_type, payload, resolve_subject(subject, scope)))
    return tuple(parsed)


# ---------------------------------------------------------------------------
# The receiver: verify -> resolve -> replay check -> apply -> record
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


@dataclass(frozen=True)
class SetReceipt:
    """An accepted SET: which transmitter, which events, which identities changed."""

    transmitter: str
    jti: str
    events: tuple[SecurityEvent, ...]
    states: Mapping[str, SubjectState] = field(default_factory=dict)


def check_media_type(content_type: str | None) -> None:
    """RFC 8935 §2: ``Content-Type: application/secevent+jwt`` (parameters ignored, case-insensitive)."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != SET_MEDIA_TYPE:
        raise _invalid("request.content_type", _show(content_type or ""))


def decode_body(body: bytes) -> str:
    """The compact JWS: ASCII, surrounding whitespace (a trailing newline) tolerated."""
    try:
        token = body.decode("ascii").strip()
    except UnicodeDecodeError:
        raise _invalid("request.not_ascii") from None
    if not token:
        raise _invalid("request.empty_body")
    return token


class SignalReceiver:
    """RFC 8935 push receiver for the configured transmitters.

    ``receive`` returns a :class:`SetReceipt` (answer ``202``) or raises
    :class:`SetRefused` (``400``) / :class:`ReceiverUnavailable` (``503``).
    Every delivery, accepted or refused, leaves one audit record (endpoint
    ``ssf``) holding the SET's SHA-256, never the SET.
    """

    def __init__(
        self,
        transmitters: Sequence[Transmitter],
        *,
        issuers: IssuerDirectory,
        replay: ReplayCache,
        states: SubjectStateStore,
        audit: AuditSink,
        clock: Callable[[], float],
        leeway: int,
        limits: RateLimiter = NO_LIMITS,
    ) -> None:
        self.transmitters = {t.policy.issuer: t for t in transmitters}
        self.limits = limits
        self.issuers = issuers
        self.replay = replay
        self.states = states
        self.audit = audit
        self.clock = clock
        self.leeway = leeway
        # Read-modify-write of a subject's state: serialised within the process, so two SETs
        # about one subject arriving together cannot lose one's effect.

    def _record(self, delivery: SetDelivery, now: float) -> AuditRecord:
        return AuditRecord(
            event_id=str(uuid.uuid4()),
            time=now,
            request_id=delivery.request_id,
            endpoint="ssf",
            source_ip=delivery.source_ip,
            user_agent=(delivery.user_agent or "")[:200] or None,
            subject_token_type=SET_MEDIA_TYPE,
            details={"trace_id": delivery.trace_id} if delivery.trace_id else {},
        )

    def refuse_early(self, delivery: SetDelivery, exc: SetRefused) -> None:
        """Record a delivery refused before it could be read (body too large, unreadable)."""
        record = self._record(delivery, self.clock())
        record.refuse(exc.err, exc.reason, exc.detail)
        self._write_refusal(record)

    def receive(self, delivery: SetDelivery) -> SetReceipt:
        now = self.clock()
        record = self._record(delivery, now)
        consumed: tuple[str, str] | None = None
        try:
            receipt, consumed = self._receive(delivery, record, now)
        except SetRefused as exc:
            record.refuse(exc.err, exc.reason, exc.detail)
            self._write_refusal(record)
            raise
        except Exception as exc:
            # A bug must not look like an accepted SET: refuse with 503 so the transmitter retries.
            log.exception("SET receipt failed unexpectedly (request %s)", delivery.request_id)
            record.outcome = "error"
            record.error = "temporarily_unavailable"
            record.reasons.append(f"internal.{type(exc).__name__}")
            self._write_refusal(record)
            raise ReceiverUnavailable("internal.unexpected") from None
        try:
            self.audit.write(record)
        except AuditUnavailable as exc:
            # The state change stands (it only tightens), but the transmitter must retry so the
            # trail is complete: forget the jti so that the retry is not taken for a replay.
            log.error("audit write of an accepted SET failed (request %s): %s", delivery.request_id, exc)
            log_unaudited(log, record, str(exc), outcome="withheld")
            if consumed is not None:
                try:
                    self.replay.release(*consumed)
                except StoreUnavailable:
                    log.error("could not release a SET jti after an audit failure")
            raise ReceiverUnavailable("audit.unavailable", str(exc)) from None
        return receipt

    @staticmethod
    def _limit(check: Callable[[], None]) -> None:
        """Run a rate-limit check, with its refusal in this endpoint's terms (RFC 8935 ``err``)."""
        try:
            check()
        except RateLimited as exc:
            raise ReceiverRateLimited(exc.reason, exc.detail, retry_after=exc.retry_after) from None
        except TemporarilyUnavailable as exc:
            raise ReceiverUnavailable(exc.reason, exc.detail) from None

    def _receive(
        self, delivery: SetDelivery, record: AuditRecord, now: float
    ) -> tuple[SetReceipt, tuple[str, str]]:
        if delivery.body:
            record.subject_token_sha256 = hashlib.sha256(delivery.body).hexdigest()
        self._limit(lambda: self.limits.on_arrival("ssf", delivery.source_ip, now, record))
        check_media_type(delivery.content_type)
        token = decode_body(delivery.body)
        record.subject_token_sha256 = token_hash(token)
        policy, claims = authenticate_set(token, self.transmitters)
        record.issuer = policy.name
        # The transmitter, once its signature has authenticated it, is the "client" of this endpoint.
        self._limit(lambda: self.limits.for_client("ssf", policy.name, now, record))
        types = claims.get("events")
        if isinstance(types, dict):
            record.details["events"] = [str(t)[:_SHOWN_CHARS] for t in list(types)[:MAX_EVENTS]]
        jti, iat = check_set_claims(claims, policy, now=now, leeway=self.leeway)
        verified = VerifiedSET(transmitter=policy, claims=claims, jti=jti, iat=iat)
        record.subject_token_iat = verified.iat
        jti_hash = hashlib.sha256(verified.jti.encode("utf-8", "surrogatepass")).hexdigest()
        record.details["jti_sha256"] = jti_hash
        events = parse_events(verified.claims, SubjectScope(self.issuers, policy.subject_issuers))
        identities = _unique(key for event in events for key in event.identities)
        record.subject = " ".join(identities) or None
        record.details["identities"] = list(identities)
        record.details["ignored_events"] = [e.type[:_SHOWN_CHARS] for e in events if not e.acted_on]

        # Single use (RFC 8417 §2.2 jti), checked last so that a refused SET does not burn its jti.
        purpose = f"set:{policy.name}"
        try:
            first = self.replay.first_use(
                purpose,
                jti_hash,
                verified.iat + policy.max_age + self.leeway,
                now,
                valid_from=verified.iat - self.leeway,
            )
        except StoreUnavailable as exc:
            raise ReceiverUnavailable("store.unavailable", str(exc)) from None
        except ReplayWindowLost as exc:
            # The replay store lost its records after this SET could have been received: it may be
            # a replay.  The transmitter must send the event again as a new SET (new jti and iat).
            raise _invalid("set.replay_window_lost", str(exc)) from None
        if not first:
            raise _invalid("set.replayed")
        consumed = (purpose, jti_hash)
        try:
            states = self._apply(events, verified, now)
        except StoreUnavailable as exc:
            try:
                self.replay.release(*consumed)
            except StoreUnavailable:
                log.error("could not release a SET jti after a store failure")
            raise ReceiverUnavailable("store.unavailable", str(exc)) from None
        record.outcome = "accepted"
        record.reasons.extend(f"event.{e.short_name}" for e in events if e.acted_on)
        if not any(e.acted_on for e in events):
            record.reasons.append("set.no_known_event")
        return SetReceipt(policy.name, verified.jti, events, states), consumed

    def _apply(
        self, events: Sequence[SecurityEvent], verified: VerifiedSET, now: float
    ) -> dict[str, SubjectState]:
        acted = [e for e in events if e.acted_on]
        keys = _unique(key for event in acted for key in event.identities)
        if not keys:
            return {}
        toe = numeric_date_value(verified.claims.get("toe"))
        policy = verified.transmitter
        current: dict[str, SubjectState] = {}
        for key in keys:

            def change(state: SubjectState, key: str = key) -> SubjectState:
                for event in acted:
                    if key in event.identities:
                        state = apply_event(
                            state,
                            event.type,
                            event.payload,
                            now,
                            policy.block_duration,
                            leeway=self.leeway,
                            toe=toe,
                        )
                return state

            # Atomic read-modify-write in the store: concurrent SETs about one subject,
            # in any worker process or instance, can never overwrite each other.
            current[key] = self.states.update(key, change, STATE_TTL)
        return current

    def _write_refusal(self, record: AuditRecord) -> None:
        try:
            self.audit.write(record)
        except AuditUnavailable as exc:
            # The refusal stands either way; the decision goes to the log instead.
            log_unaudited(log, record, str(exc))
