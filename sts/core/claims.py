"""JWT claims validation, one set of rules for every kind of token this service reads.

Subject, actor and posture tokens (:mod:`.attest`), client assertions
(:mod:`.clients`), Security Event Tokens (:mod:`.signals.verify`), this
service's own access tokens (:mod:`.introspection`) and DPoP proofs
(:mod:`.dpop`) are all checked here, after their signature has verified.
Each caller states its rules as a :class:`ClaimRules`; :func:`check_claims`
applies them in a fixed order (``iss``, ``aud``, ``exp``, ``nbf``, ``iat``,
``sub``, ``jti``) and raises :class:`ClaimInvalid` with a reason tag that the
caller prefixes with the token's role (``subject_token.expired``,
``set.malformed_iat``...).

The rules (RFC 7519 §4.1, RFC 8725 §3.8-§3.9):

* A claim that is absent is absent; a claim that is present must have its
  type.  ``"nbf": null`` is a malformed ``nbf``, never a missing one.
* ``exp``, ``nbf``, ``iat`` (and ``toe``, ``event_timestamp``...) are
  NumericDates (RFC 7519 §2): a JSON number, finite, that a float can hold.
  JSON ``true``/``false`` and strings are not numbers, and an integer such as
  ``1`` followed by 400 zeros (valid JSON) is refused, not an overflow.
* ``leeway`` seconds of clock skew are allowed for ``exp``, ``nbf`` and an
  ``iat`` in the future.  ``max_age`` bounds ``now - iat`` exactly (a caller
  that allows skew there too adds it).
* ``aud`` is a string or a non-empty array of strings (RFC 7519 §4.1.3).
* ``iss``, ``sub``, ``jti`` are non-empty strings (StringOrURI, RFC 7519
  §4.1.1, §4.1.2, §4.1.7); ``iss`` is compared exactly, never normalised.
  A ``sub`` holding a control character (U+0000-U+001F, U+007F-U+009F), a
  line or paragraph separator or a bidirectional control is ``malformed_sub``:
  it would be copied into the token this service issues.
* ``typ`` (a header parameter, RFC 7515 §4.1.9) is a media type:
  :func:`normalise_typ` lower-cases it and drops ``application/``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

#: C0 controls, DEL and C1 controls (Unicode category Cc).  No issuer puts one in a ``sub``: GitHub,
#: GitLab, Kubernetes and SPIFFE subjects are printable.  A NUL or a line break in the subject of an
#: issued token is what a C-string or line-oriented reader downstream would cut or split.
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")
#: Unicode's line and paragraph separators (U+2028, U+2029: line breaks to JavaScript and many
#: log readers) and its bidirectional controls (marks, embeddings, overrides, isolates; Unicode
#: UAX #9): they reorder how a subject is displayed (the review page, a log line), so that one
#: subject reads as another ("Trojan Source", CVE-2021-42574).  No issuer puts one in a ``sub``.
_DISPLAY_CONTROL = re.compile("[\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class ClaimInvalid(Exception):
    """A claim is missing, malformed or out of bounds.

    ``reason`` is a machine-readable tag without the token's role
    (``expired``, ``malformed_nbf``, ``audience_mismatch``...); ``detail`` is
    operator text for the audit record, never shown to the caller.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def numeric_date_value(value: object) -> float | None:
    """``value`` as seconds since the epoch if it is a NumericDate (RFC 7519 §2), else None.

    A JSON number only: not ``true``/``false`` (a ``bool`` is an ``int`` in
    Python), not a string, not NaN or an infinity, and not an integer too
    large for a float.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """The NumericDate claim ``name``: None when absent; ``malformed_<name>`` when present but not one."""
    if name not in claims:
        return None
    number = numeric_date_value(claims[name])
    if number is None:
        raise ClaimInvalid(f"malformed_{name}", type(claims[name]).__name__)
    return number


def identifier_problem(value: str) -> str | None:
    """Why ``value`` may not name a party in a token this service issues (``sub``, and the ``sub``
    and ``iss`` of ``act`` and ``may_act``), or None: a control character, a line separator or a
    bidirectional control (see :data:`_CONTROL_CHARACTER`, :data:`_DISPLAY_CONTROL`)."""
    if _CONTROL_CHARACTER.search(value):
        return "control character"
    if _DISPLAY_CONTROL.search(value):
        return "line separator or bidirectional control"
    return None


def string_claim(
    claims: Mapping[str, Any],
    name: str,
    *,
    required: bool,
    min_length: int = 1,
    max_length: int | None = None,
) -> str | None:
    """A StringOrURI claim: ``missing_<name>``, ``malformed_<name>`` (not a string, or too short),
    ``<name>_too_long``."""
    if name not in claims:
        if required:
            raise ClaimInvalid(f"missing_{name}")
        return None
    value = claims[name]
    if not isinstance(value, str) or len(value) < min_length:
        raise ClaimInvalid(f"malformed_{name}", type(value).__name__)
    if max_length is not None and len(value) > max_length:
        raise ClaimInvalid(f"{name}_too_long", f"{len(value)} characters, at most {max_length}")
    return value


def audiences(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """RFC 7519 §4.1.3 ``aud``: a string or a non-empty array of strings; () when absent."""
    if "aud" not in claims:
        return ()
    aud = claims["aud"]
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        return tuple(aud)
    raise ClaimInvalid("malformed_aud", type(aud).__name__)


def normalise_typ(value: object) -> str | None:
    """RFC 7515 §4.1.9: ``typ`` is a media type; ``application/`` may be omitted; case-insensitive.

    A ``typ`` that is not a string normalises to a value no allow-list holds.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        return "\x00invalid"
    return value.lower().removeprefix("application/")


@dataclass(frozen=True)
class ClaimRules:
    """What one kind of token must carry.  The defaults are the strict ones."""

    #: Seconds of clock skew allowed for ``exp``, ``nbf`` and an ``iat`` in the future.
    leeway: int = 0
    #: The exact ``iss`` required; None: ``iss`` need not be present (it was used to route the token).
    issuer: str | None = None
    #: ``aud`` must name at least one of these; None: ``aud`` is checked for shape only.
    accepted_audiences: Collection[str] | None = None
    require_aud: bool = True
    require_exp: bool = True
    require_iat: bool = False
    #: Greatest ``now - iat`` accepted (no leeway added); requires ``iat``.
    max_age: float | None = None
    #: Greatest ``exp - iat`` (or ``exp - nbf`` without ``iat``); requires one of them.
    max_lifetime: float | None = None
    #: Greatest ``exp - now`` (+ leeway): how far ahead an expiry may be set.
    max_remaining: float | None = None
    require_sub: bool = True
    require_jti: bool = False
    min_jti_length: int = 1
    max_jti_length: int | None = None


@dataclass(frozen=True)
class CheckedClaims:
    """The registered claims of a token that passed :func:`check_claims`."""

    audiences: tuple[str, ...]
    exp: float | None
    nbf: float | None
    iat: float | None
    sub: str | None
    jti: str | None


def check_claims(claims: Mapping[str, Any], rules: ClaimRules, *, now: float) -> CheckedClaims:
    """Check the registered claims of a verified token against ``rules``; raise :class:`ClaimInvalid`.

    Reasons: ``missing_iss``/``malformed_iss``/``issuer_mismatch``;
    ``missing_aud``/``malformed_aud``/``audience_mismatch``;
    ``missing_exp``/``malformed_exp``/``expired``/``lifetime_too_long``;
    ``malformed_nbf``/``not_yet_valid``;
    ``missing_iat``/``malformed_iat``/``issued_in_future``/``too_old``;
    ``missing_sub``/``malformed_sub`` (also: a control character);
    ``missing_jti``/``malformed_jti``/``jti_too_long``.
    """
    iss = string_claim(claims, "iss", required=rules.issuer is not None)
    if rules.issuer is not None and iss != rules.issuer:
        raise ClaimInvalid("issuer_mismatch")

    auds = audiences(claims)
    if not auds and rules.require_aud:
        raise ClaimInvalid("missing_aud")
    if rules.accepted_audiences is not None and not set(auds).intersection(rules.accepted_audiences):
        raise ClaimInvalid("audience_mismatch")

    leeway = rules.leeway
    exp = numeric_date(claims, "exp")
    if exp is None and rules.require_exp:
        raise ClaimInvalid("missing_exp")
    if exp is not None and now >= exp + leeway:
        raise ClaimInvalid("expired")
    if exp is not None and rules.max_remaining is not None and exp - now > rules.max_remaining + leeway:
        raise ClaimInvalid("lifetime_too_long", f"expires {exp - now:.0f}s from now")
    nbf = numeric_date(claims, "nbf")
    if nbf is not None and now + leeway < nbf:
        raise ClaimInvalid("not_yet_valid")
    iat = numeric_date(claims, "iat")
    if iat is not None and now + leeway < iat:
        raise ClaimInvalid("issued_in_future", f"iat {iat:.0f}, now {now:.0f}")
    if iat is None and (rules.require_iat or rules.max_age is not None):
        raise ClaimInvalid("missing_iat")
    if iat is not None and rules.max_age is not None and now - iat > rules.max_age:
        raise ClaimInvalid("too_old", f"issued {now - iat:.0f}s ago, max age {rules.max_age:.0f}s")
    if rules.max_lifetime is not None:
        start = iat if iat is not None else nbf
        if exp is None or start is None or exp - start > rules.max_lifetime:
            raise ClaimInvalid("lifetime_too_long")

    sub = string_claim(claims, "sub", required=rules.require_sub)
    if sub is not None and (problem := identifier_problem(sub)) is not None:
        raise ClaimInvalid("malformed_sub", problem)
    jti = string_claim(
        claims,
        "jti",
        required=rules.require_jti,
        min_length=rules.min_jti_length,
        max_length=rules.max_jti_length,
    )
    return CheckedClaims(audiences=auds, exp=exp, nbf=nbf, iat=iat, sub=sub, jti=jti)
