"""What other systems said about a workload identity: blocks, re-attestation demands, risk, posture.

Filled in by Security Event Tokens (RFC 8417, OpenID CAEP) through
:mod:`sts.core.signals`; read on every exchange.  Identities are keyed
``<issuer name>|<subject>``; an event that names a subject without an issuer
(SSF ``opaque`` subject identifier) is stored under ``*|<subject>`` and
applies to that subject from every issuer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

#: How long a subject's state is kept after its last event (the store expires it).
STATE_TTL = 7 * 86400
ANY_ISSUER = "*"


def identity_key(issuer_name: str, subject: str) -> str:
    return f"{issuer_name}|{subject}"


def identity_keys(issuer_name: str, subject: str) -> tuple[str, str]:
    """The keys whose state applies to this identity: its own, and the any-issuer one."""
    return identity_key(issuer_name, subject), identity_key(ANY_ISSUER, subject)


@dataclass(frozen=True)
class SubjectState:
    #: Exchanges refused until then (session revoked).
    blocked_until: float | None = None
    #: Attestation issued before then is not enough: step up with fresh attestation.
    reauth_after: float | None = None
    #: Tokens we issued to the subject before then are revoked (introspection says inactive).
    revoked_before: float | None = None
    #: Risk level asserted by a transmitter (low, medium, high, critical).
    risk_level: str | None = None
    #: Device/workload compliance asserted by a transmitter (compliant, not-compliant).
    posture: str | None = None
    #: When the events that said ``risk_level`` and ``posture`` happened (their ``event_timestamp``):
    #: an older statement delivered later does not replace a newer one.
    risk_level_at: float | None = None
    posture_at: float | None = None
    #: Event types that shaped this state, newest last (bounded), for the audit record.
    events: tuple[str, ...] = ()
    updated_at: float | None = None

    @property
    def empty(self) -> bool:
        return self == _NO_STATE

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["events"] = list(self.events)
        return data

    @classmethod
    def from_json_dict(cls, data: Any) -> SubjectState:
        if not isinstance(data, dict):
            return cls()

        def number(name: str) -> float | None:
            value = data.get(name)
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

        def text(name: str) -> str | None:
            value = data.get(name)
            return value if isinstance(value, str) else None

        events = data.get("events")
        return cls(
            blocked_until=number("blocked_until"),
            reauth_after=number("reauth_after"),
            revoked_before=number("revoked_before"),
            risk_level=text("risk_level"),
            posture=text("posture"),
            risk_level_at=number("risk_level_at"),
            posture_at=number("posture_at"),
            events=tuple(e for e in events if isinstance(e, str))[-16:] if isinstance(events, list) else (),
            updated_at=number("updated_at"),
        )

    def with_event(self, event: str, now: float, **changes: Any) -> SubjectState:
        return replace(self, events=(*self.events, event)[-16:], updated_at=now, **changes)


#: The state of a subject no event has named (compared with on every exchange: built once).
_NO_STATE = SubjectState()


def _latest(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


_LEVELS = {"low": 0, "medium": 1, "high": 2, "critical": 3}


def merge(states: Iterable[SubjectState]) -> SubjectState:
    """The most restrictive combination (an identity's own state and the any-issuer one)."""
    states = [s for s in states if not s.empty]
    if not states:
        return SubjectState()
    if len(states) == 1:
        return states[0]
    levels = [s.risk_level for s in states if s.risk_level]
    postures = [s.posture for s in states if s.posture]
    return SubjectState(
        blocked_until=_latest(s.blocked_until for s in states),
        reauth_after=_latest(s.reauth_after for s in states),
        revoked_before=_latest(s.revoked_before for s in states),
        risk_level=max(levels, key=lambda lv: _LEVELS.get(lv.lower(), 0)) if levels else None,
        posture=next((p for p in postures if p != "compliant"), postures[0] if postures else None),
        risk_level_at=_latest(s.risk_level_at for s in states),
        posture_at=_latest(s.posture_at for s in states),
        events=tuple(e for s in states for e in s.events)[-16:],
        updated_at=_latest(s.updated_at for s in states),
    )


def is_revoked(state: SubjectState, issued_at: float | None) -> bool:
    """A token we issued at ``issued_at`` to a subject in ``state`` is revoked."""
    return state.revoked_before is not None and (issued_at is None or issued_at < state.revoked_before)
