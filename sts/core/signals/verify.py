"""Verify a pushed SET: the transmitter that signed it (RFC 8417 §2.3, RFC 8725) and its claims
(RFC 8417 §2.2), checked by :mod:`sts.core.claims` like every other token."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...protocol.security_events import (
    MAX_JTI_CHARS,
    SET_TYP,
    ReceiverUnavailable,
    SetRefused,
    invalid_set,
    shown,
)
from ..claims import ClaimInvalid, ClaimRules, check_claims, normalise_typ, numeric_date
from ..jose import JWSInvalid, peek, verify_signature
from ..ports import IssuerKeys, KeysUnavailable, UnknownKeyId


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


@dataclass(frozen=True)
class VerifiedSET:
    transmitter: TransmitterPolicy
    claims: Mapping[str, Any]
    jti: str
    iat: float


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
        raise invalid_set(f"set.{exc.reason}", exc.detail) from None
    if normalise_typ(peeked.header.get("typ")) != SET_TYP:
        raise invalid_set("set.typ", shown(peeked.header.get("typ")))
    iss = peeked.claims.get("iss")
    transmitter = transmitters.get(iss) if isinstance(iss, str) else None
    if transmitter is None:
        raise SetRefused("invalid_issuer", "set.unknown_issuer", shown(iss))
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
            raise SetRefused("invalid_audience", f"set.{exc.reason}", shown(claims.get("aud"))) from None
        raise invalid_set(f"set.{exc.reason}", exc.detail) from None
    if checked.jti is None or checked.iat is None:  # Required by the rules; this keeps the types honest.
        raise invalid_set("set.missing_jti" if checked.jti is None else "set.missing_iat")
    return checked.jti, checked.iat
