"""Assurance levels for machines: RFC 9470's ``acr``, ordered, with what each one takes.

A person steps up with a second factor; a workload steps up with evidence it
can present again: a newer credential from its platform, a proof of
possession of the key it has always used, or posture evidence.  The levels
(``acr`` values, RFC 9470 §4 / OpenID Connect Core §2), lowest first:

``urn:workload-sts:acr:attested``
    The workload's platform credential was verified (a bearer request).
``urn:workload-sts:acr:pop``
    Attested, and the issued token is bound to a key (DPoP ``cnf.jkt``,
    RFC 9449; or a client certificate ``cnf.x5t#S256``, RFC 8705) that
    continues the identity's baseline key: the first key seen for an identity
    becomes its key; a different key is not continuity until it is confirmed
    (``sts baseline accept``, or probation: see :mod:`sts.core.drift`).
``urn:workload-sts:acr:posture``
    Proof of possession, plus verified posture evidence: a posture token about
    the same subject whose posture fact is good, or a live Kubernetes
    TokenReview of the subject token.

Issued tokens carry the level reached as ``acr`` and the attestation time as
``auth_time`` (RFC 9068 §2.2.1).  A rule can require a minimum level and a
maximum attestation age for some scopes or audiences (its ``assurance``
section), and a request can ask for a level with ``acr_values``; what is not
met is refused with ``insufficient_user_authentication`` naming ``acr_values``
and ``max_age`` (RFC 9470 §3), which the workload answers by renewing.

Everything here is a pure function of plain values.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ACR_ATTESTED = "urn:workload-sts:acr:attested"
ACR_POP = "urn:workload-sts:acr:pop"
ACR_POSTURE = "urn:workload-sts:acr:posture"
#: Every level, lowest first (metadata ``acr_values_supported`` lists them in this order).
LEVELS: tuple[str, ...] = (ACR_ATTESTED, ACR_POP, ACR_POSTURE)

#: The facts that hold the identity's proof-of-possession keys in its baseline.
KEY_FACTS: tuple[str, ...] = ("cnf_jkt", "cnf_x5t")

#: How a presented key relates to the identity's baseline key.
KEY_NONE = "none"  # no key presented (a bearer request)
KEY_FIRST = "first"  # the identity had no key of this kind: this one becomes its key
KEY_CONTINUES = "continues"  # the identity's confirmed key
KEY_CHANGED = "changed"  # another key than the confirmed one: not continuity


def rank(level: str | None) -> int:
    """The level's position (0 for ``attested``); -1 for None or a value we do not know."""
    return LEVELS.index(level) if level in LEVELS else -1


def at_least(minimum: str) -> tuple[str, ...]:
    """The levels that satisfy ``minimum``, lowest first (the ``acr_values`` of a step-up)."""
    return LEVELS[max(rank(minimum), 0) :]


def highest(levels: Iterable[str | None]) -> str | None:
    known = [lv for lv in levels if lv in LEVELS]
    return max(known, key=rank) if known else None


def lowest_known(values: Sequence[str]) -> str | None:
    """The least demanding of the ``acr_values`` we know (any of them satisfies the request)."""
    known = [v for v in values if v in LEVELS]
    return min(known, key=rank) if known else None


@dataclass(frozen=True)
class Requirement:
    """One entry of a rule's ``assurance`` section: a minimum level and/or attestation age.

    It applies to a request granted any of ``scopes`` or ``audiences``; with
    neither, to every request the rule grants.
    """

    acr: str | None = None
    max_attestation_age: int | None = None
    scopes: frozenset[str] = frozenset()
    audiences: frozenset[str] = frozenset()

    def applies(self, audiences: Iterable[str], scopes: Iterable[str]) -> bool:
        if not self.scopes and not self.audiences:
            return True
        return bool(self.scopes & set(scopes)) or bool(self.audiences & set(audiences))

    def because(self, audiences: Iterable[str], scopes: Iterable[str]) -> str:
        """Why it applies, for the audit record and ``sts policy explain``."""
        hit_scopes = sorted(self.scopes & set(scopes))
        hit_audiences = sorted(self.audiences & set(audiences))
        if hit_scopes:
            return "scope " + " ".join(hit_scopes)
        if hit_audiences:
            return "audience " + " ".join(hit_audiences)
        return "rule"


@dataclass(frozen=True)
class Need:
    """What a request must reach: the highest level and the smallest age that apply, and why."""

    acr: str | None = None
    max_age: int | None = None
    because: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"acr": self.acr, "max_age": self.max_age, "because": list(self.because)}


def needed(
    requirements: Sequence[Requirement],
    audiences: Sequence[str],
    scopes: Sequence[str],
    requested: Sequence[str] = (),
) -> Need:
    """Combine the rule's requirements that apply with the level the request asked for (``acr_values``)."""
    acr: str | None = None
    max_age: int | None = None
    because: list[str] = []
    for requirement in requirements:
        if not requirement.applies(audiences, scopes):
            continue
        why = requirement.because(audiences, scopes)
        if requirement.acr is not None and rank(requirement.acr) > rank(acr):
            acr = requirement.acr
        if requirement.max_attestation_age is not None and (
            max_age is None or requirement.max_attestation_age < max_age
        ):
            max_age = requirement.max_attestation_age
        because.append(why)
    asked = lowest_known(requested)
    if asked is not None:
        if rank(asked) > rank(acr):
            acr = asked
        because.append("request acr_values")
    return Need(acr, max_age, tuple(because))


@dataclass(frozen=True)
class Evidence:
    """What this request shows beyond its verified attestation."""

    key: str = KEY_NONE
    #: A verified posture token about the subject whose posture fact is good.
    posture_token: bool = False
    #: The subject token passed a live Kubernetes TokenReview.
    live_review: bool = False
    #: The ``acr`` of a token of ours presented again: re-exchange never raises the level.
    carried: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "posture_token": self.posture_token,
            "live_review": self.live_review,
            "carried": self.carried,
        }


def key_state(presented: Mapping[str, str], confirmed: Mapping[str, Collection[Any]]) -> str:
    """How the presented keys (``cnf_jkt`` / ``cnf_x5t`` values) relate to the identity's confirmed
    keys of each kind (an identity may have several: one per replica)."""
    if not presented:
        return KEY_NONE
    any_confirmed = any(confirmed.get(fact) for fact in KEY_FACTS)
    states = []
    for fact, value in presented.items():
        known = confirmed.get(fact) or ()
        if known:
            states.append(KEY_CONTINUES if value in known else KEY_CHANGED)
        else:
            # A first key of this kind is a first key only for an identity with no confirmed key
            # at all: beside a confirmed key of the other kind it is a new key, unless that key is
            # proven too (an outside audit had a copied token with a new DPoP key reach pop where
            # the workload's key was its client certificate).
            states.append(KEY_FIRST if not any_confirmed else _NEW_KIND)
    if KEY_CHANGED in states:
        return KEY_CHANGED
    if KEY_CONTINUES in states:
        return KEY_CONTINUES
    return KEY_CHANGED if _NEW_KIND in states else KEY_FIRST


#: :func:`key_state`'s mark for a first key of one kind beside a confirmed key of the other.
_NEW_KIND = "new_kind"


def reached(evidence: Evidence) -> str:
    """The level a request reaches with ``evidence`` (see the module docstring)."""
    level = ACR_ATTESTED
    if evidence.key in (KEY_FIRST, KEY_CONTINUES):
        level = ACR_POP
        if evidence.posture_token or evidence.live_review:
            level = ACR_POSTURE
    if evidence.carried is not None and rank(evidence.carried) < rank(level):
        # A token of ours with an unknown or lower acr caps the level of its re-exchange.
        level = evidence.carried if evidence.carried in LEVELS else ACR_ATTESTED
    return level


def shortfall(need: Need, level: str, attested_at: float | None, now: float) -> tuple[bool, bool]:
    """``(level too low, attestation too old)`` for this request against ``need``."""
    low = need.acr is not None and rank(level) < rank(need.acr)
    old = need.max_age is not None and (attested_at is None or now - attested_at > need.max_age)
    return low, old


def posture_is_good(claims: Mapping[str, Any] | None, fact: str | None, good: Iterable[str]) -> bool:
    """A posture token's ``fact`` holds one of the ``good`` values (a boolean counts as true/false)."""
    if claims is None or fact is None or fact not in claims:
        return False
    value = claims[fact]
    if isinstance(value, bool):
        value = "true" if value else "false"
    return isinstance(value, str) and value in set(good)


def posture_describes(posture: Mapping[str, Any], subject: Mapping[str, Any], names: Iterable[str]) -> bool:
    """Whether a posture token is about this workload as the subject token describes it: each of
    ``names`` (the rule's stable facts) that the posture token names, the subject token shows with
    the same value (``posture`` and ``subject``: the tokens' profile facts over their claims of the
    same name), compared as JSON values (``"7"``, ``7`` and ``7.0`` alike, a member order aside).
    A posture token is bearer evidence about a ``sub`` that replicas share (a Kubernetes service
    account): one minted for another pod, on another node, is no evidence of this one's posture,
    nor does it confirm a change of those facts (an outside red team replayed a pod's posture
    token from another pod on another node, and confirmed that node as the identity's at once).
    One that names a fact the subject token does not show cannot be tied to this instance either
    (a token of ours, re-exchanged, shows none of the upstream facts: a review had another
    runner's posture token pass there)."""
    for name in names:
        theirs = posture.get(name)
        if theirs is None:
            continue  # Not named (a JSON null names no value either).
        mine = subject.get(name)
        if mine is None or _plain(mine) != _plain(theirs):
            return False
    return True


def _plain(value: Any) -> str:
    """A fact's value as one text whatever JSON type carries it: a string as it is, anything else
    as its canonical JSON with integral numbers as integers (so ``7``, ``7.0`` and ``"7"`` alike,
    and a boolean as ``true``/``false``)."""
    if isinstance(value, str):
        return value
    return json.dumps(_integral(value), sort_keys=True, separators=(",", ":"), default=str)


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_integral(item) for item in value]
    return value


def explain(
    requirements: Sequence[Requirement],
    audiences: Sequence[str],
    scopes: Sequence[str],
    requested: Sequence[str],
    evidence: Evidence,
    *,
    posture_fact: str | None = None,
) -> list[str]:
    """``sts policy explain``: the level each kind of request reaches, what this grant needs, and
    whether the request described by ``evidence`` (attestation assumed fresh) would meet it."""
    posture_by = "a live TokenReview" + (f" or a good posture token ({posture_fact})" if posture_fact else "")
    lines = [
        f"level {ACR_ATTESTED}: a bearer request (verified attestation)",
        f"level {ACR_POP}: a DPoP proof or client certificate whose key continues the identity's key",
        f"level {ACR_POSTURE}: that, plus {posture_by}",
    ]
    need = needed(requirements, audiences, scopes, requested)
    if need.acr is None and need.max_age is None:
        lines.append("required: nothing beyond attestation")
    else:
        parts = [f"at least {need.acr}"] if need.acr else []
        if need.max_age is not None:
            parts.append(f"attestation at most {need.max_age} s old")
        lines.append(f"required: {', '.join(parts)} (because: {', '.join(need.because)})")
    level = reached(evidence)
    low, _ = shortfall(need, level, None, 0)
    wanted = " ".join(at_least(need.acr or ACR_ATTESTED))
    verdict = f"step-up: insufficient_user_authentication, acr_values={wanted}" if low else "met"
    lines.append(f"this request reaches {level}: {verdict}")
    return lines
