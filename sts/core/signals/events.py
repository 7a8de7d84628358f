"""Events of a SET: OpenID CAEP 1.0 events, checked, and their effect on a subject's state.

:func:`parse_events` reads a verified SET's ``events`` (RFC 8417 §2.2) and checks every
event this receiver acts on before anything is stored, so a SET is applied whole or not
at all; :func:`apply_event` is the pure transition of a :class:`SubjectState`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ...protocol.security_events import (
    ASSURANCE_LEVEL_CHANGE,
    CAEP_PREFIX,
    COMPLIANCE_STATUSES,
    CREDENTIAL_CHANGE,
    DEVICE_COMPLIANCE_CHANGE,
    MAX_EVENTS,
    RISK_LEVEL_CHANGE,
    RISK_LEVELS,
    SESSION_REVOKED,
    TOKEN_CLAIMS_CHANGE,
    invalid_set,
    shown,
)
from ..claims import numeric_date_value
from ..subject_state import SubjectState
from .subjects import SubjectScope, resolve_subject

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
#: ``risk-level-change`` levels that also ask for fresh attestation.
STEP_UP_RISK_LEVELS: Final = frozenset({"high", "critical"})


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
        raise invalid_set("event.malformed_event_timestamp", event_type)
    if event_type == DEVICE_COMPLIANCE_CHANGE:
        status = payload.get("current_status")
        # A list or object is no status (and cannot be looked up in a set: TypeError, a 503).
        if not isinstance(status, str) or status not in COMPLIANCE_STATUSES:
            raise invalid_set(
                "event.device_compliance_change.current_status", shown(payload.get("current_status"))
            )
    elif event_type == RISK_LEVEL_CHANGE:
        level = payload.get("current_level")
        if not isinstance(level, str) or level.lower() not in RISK_LEVELS:
            raise invalid_set("event.risk_level_change.current_level", shown(level))


def event_time(
    payload: Mapping[str, Any],
    now: float,
    *,
    leeway: int,
    toe: float | None = None,
    issued: float | None = None,
) -> float:
    """When the event happened: ``event_timestamp`` (CAEP), else the SET's ``toe``, else the SET's
    ``iat`` (``issued``: the event cannot have happened after its SET was issued, RFC 8417 §2.2),
    else ``now``.

    A time in the future beyond ``leeway`` is not believed (``now`` is used), and
    one within it is clamped to ``now``: a transmitter's clock must not make a
    step-up requirement reach into the future.  (Dating an event with neither
    time at its receipt let an older SET delivered late, a retry, pass for the
    newest statement: an outside audit had a LOW issued ten minutes before a
    critical, delivered after it, lift it.)
    """
    for candidate in (numeric_date_value(payload.get("event_timestamp")), toe, issued):
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
    issued: float | None = None,
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
    statement of the latest event (by its time, :func:`event_time`), so an
    older one delivered later (a retry, a reordered push) leaves them as they
    are (an outside audit had a late LOW lift a newer critical).  Any other event type leaves the state
    unchanged.  Raises :class:`SetRefused` for a payload that does not
    conform (see :func:`check_payload`).
    """
    if event_type not in ACTED_ON:
        return state
    check_payload(event_type, payload)
    when = event_time(payload, now, leeway=leeway, toe=toe, issued=issued)
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
        changes: dict[str, Any] = {}
        if state.risk_level_at is None or when >= state.risk_level_at:
            changes.update(risk_level=level, risk_level_at=when)
        if level in STEP_UP_RISK_LEVELS:
            changes["reauth_after"] = _later(state.reauth_after, when)
        return state.with_event(name, now, **changes)
    # DEVICE_COMPLIANCE_CHANGE
    if state.posture_at is not None and when < state.posture_at:
        return state.with_event(name, now)
    return state.with_event(name, now, posture=str(payload["current_status"]), posture_at=when)


def parse_events(claims: Mapping[str, Any], scope: SubjectScope) -> tuple[SecurityEvent, ...]:
    """The SET's ``events`` (RFC 8417 §2.2), each acted-on event with the identities it names.

    The subject is the SET's ``sub_id`` (SSF 1.0), or a ``subject`` member of
    the event payload (older CAEP drafts), which wins for its event.  Every
    acted-on event is checked here, before anything is stored, so a SET is
    applied whole or not at all.
    """
    events = claims.get("events")
    if not isinstance(events, dict) or not events:
        raise invalid_set("set.events_missing")
    if len(events) > MAX_EVENTS:
        raise invalid_set("set.too_many_events")
    parsed = []
    for event_type, payload in events.items():
        if not isinstance(payload, dict):
            raise invalid_set("set.event_not_object", shown(event_type))
        if event_type not in ACTED_ON:
            parsed.append(SecurityEvent(event_type, payload))
            continue
        check_payload(event_type, payload)
        subject = payload["subject"] if "subject" in payload else claims.get("sub_id")
        parsed.append(SecurityEvent(event_type, payload, resolve_subject(subject, scope)))
    return tuple(parsed)
