"""Delegation and impersonation (RFC 8693 §1.1, §4.1, §4.4), and re-exchange of our own tokens.

* **Delegation**: an ``actor_token`` is presented; the issued token says so in
  ``act`` (the current actor), with the earlier actors nested inside it::

      {"sub": "system:serviceaccount:payments:api",
       "act": {"sub": "spiffe://example.org/agent", "iss": "...",
               "act": {"sub": "repo:acme/app:ref:refs/heads/main", "iss": "..."}}}

  Only the top-level ``act`` is the current actor; nested ones are history
  (§4.1) and never feed a decision here except the chain's depth.
* **Impersonation**: no actor token; the issued token is indistinguishable
  from one issued to the subject, *except* that an ``act`` chain already
  in the subject token is carried over: a chain is never dropped.
* **Whose word a chain is.**  In a token of ours, ``act`` is our statement:
  we verified every actor we put there.  In an upstream token it is that
  issuer's assertion, which we cannot check, and a resource server would read
  it as ours once copied.  So a subject token from an upstream issuer that
  carries ``act`` is refused (``subject_token.unverified_act``) unless the
  issuer is configured ``trusted_delegation`` (another STS); then its chain is
  carried with every entry marked ``"asserted_by": <that issuer's iss>``, so a
  resource server sees who vouched for those actors.  An entry's own ``iss``
  names the actor's issuer (§4.1) and is kept, with its ``sub``; nothing else
  of an upstream entry is carried.  Entries without
  ``asserted_by`` are vouched for by the issuer of the token that carries them.
* An actor token that itself carries ``act`` (someone acting as the actor)
  is refused (``actor_token.carries_act``), from any issuer: one linear chain
  cannot hold both the subject's earlier actors and the actor's, and dropping
  either would hide who acts.
* ``may_act`` (§4.4) in the subject token, when present, must name the actor.
  It is carried into the issued token from any issuer: it only restricts who
  may act for the subject in a later exchange, it never lets anyone act.
* A token of ours presented again only narrows: audience, scope and expiry
  of the result are within those of the token presented.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import InvalidRequest, InvalidScope, InvalidTarget
from .attest import VerifiedToken
from .claims import identifier_problem, numeric_date_value

SELF_ISSUER = "self"
#: The claim of our tokens naming the configured upstream issuer whose token began the chain
#: (``issuers[].name``); also in the ``act`` entry of an actor that was a token of ours.
UPSTREAM_ISSUER_CLAIM = "upstream_issuer"
#: Structural ceiling on nested ``act`` claims we accept or produce.
MAX_CHAIN = 8


def workload_issuer(subject: VerifiedToken) -> str:
    """The issuer part of the identity (``<issuer>|<sub>``) a subject's behaviour baseline, refusals
    and rate limit are kept under: its issuer's name; for a token of ours, ``self:<upstream>``, with
    the issuer the token first came from (``self`` for one that names none).  The same ``sub`` under
    two issuers is two workloads: one ``self|<sub>`` for both let one workload's re-exchanges teach
    the other's baseline (its chains deeper, then usual for both) and confirm the key the other was
    then judged by (an outside audit).  Issuer names hold no ``:`` or ``|``."""
    if subject.issuer_name != SELF_ISSUER:
        return subject.issuer_name
    upstream = subject.claims.get(UPSTREAM_ISSUER_CLAIM)
    if isinstance(upstream, str) and upstream and upstream != SELF_ISSUER and "|" not in upstream:
        return f"{SELF_ISSUER}:{upstream}"
    return SELF_ISSUER


def chain_depth(act: Any) -> int:
    """Number of actors in an ``act`` chain; raises ``invalid_request`` on a malformed one."""
    depth = 0
    while act is not None:
        if not isinstance(act, Mapping) or not _names_a_party(act, "sub", required=True):
            raise InvalidRequest("subject_token.malformed_act")
        if not _names_a_party(act, "iss", required=False):
            raise InvalidRequest("subject_token.malformed_act")
        depth += 1
        if depth > MAX_CHAIN:
            raise InvalidRequest("subject_token.act_chain_too_long")
        act = act.get("act")
    return depth


def _actor_entry(actor: VerifiedToken) -> dict[str, Any]:
    """The actor as ``act`` names it (RFC 8693 §4.1): ``sub`` and ``iss``; for a token of ours also
    the issuer it first came from (its ``upstream_issuer``), so that the same ``sub`` from two
    issuers stays two actors: for policies, for readers of the token, and for revocation."""
    entry: dict[str, Any] = {"sub": actor.subject, "iss": actor.issuer}
    upstream = actor.claims.get(UPSTREAM_ISSUER_CLAIM) if actor.issuer_name == SELF_ISSUER else None
    if isinstance(upstream, str):
        entry[UPSTREAM_ISSUER_CLAIM] = upstream
    return entry


def may_act_of(subject: VerifiedToken) -> Mapping[str, Any] | None:
    """The subject token's ``may_act`` (RFC 8693 §4.4), or None; a malformed one (not an object,
    or naming neither ``sub`` nor ``iss``) is refused whether or not an actor is presented: it is
    a restriction, and dropped from the issued token it would let a later exchange act freely."""
    may_act = subject.claims.get("may_act")
    if may_act is None:
        return None
    if (
        not isinstance(may_act, Mapping)
        or ("sub" not in may_act and "iss" not in may_act)
        or not all(_names_a_party(may_act, claim, required=False) for claim in ("sub", "iss"))
    ):
        raise InvalidRequest("subject_token.malformed_may_act")
    return may_act


def _names_a_party(entry: Mapping[str, Any], claim: str, *, required: bool) -> bool:
    """Whether ``entry[claim]`` is a non-empty string this service may copy into a token it issues
    (:func:`~sts.core.claims.identifier_problem`: the rule for ``sub``); absent is fine unless
    ``required``."""
    if claim not in entry:
        return not required
    value = entry[claim]
    return isinstance(value, str) and bool(value) and identifier_problem(value) is None


def check_may_act(subject: VerifiedToken, actor: VerifiedToken) -> None:
    """RFC 8693 §4.4: when the subject token says who may act for it, the actor must be one."""
    may_act = may_act_of(subject)
    if may_act is None:
        return
    for claim, value in (("sub", actor.subject), ("iss", actor.issuer)):
        if claim in may_act and may_act[claim] != value:
            raise InvalidRequest("actor_token.not_in_may_act")


#: The members of an upstream ``act`` entry this service carries: who the actor is (RFC 8693 §4.1:
#: "claims that identify the actor"; other claims are not meaningful inside ``act``).
ACTOR_IDENTITY_CLAIMS = ("sub", "iss")


def _asserted_by(act: Mapping[str, Any], issuer: str) -> dict[str, Any]:
    """An upstream chain as we carry it: every entry names the actor (``sub``, ``iss``) and the issuer
    that asserted it.  Whatever else the upstream put in an entry (a ``scope``, a ``cnf``, our own
    ``upstream_issuer``, which revocation reads to find an actor's issuer) is not this service's to
    sign for, and is dropped, as with ``may_act`` (an outside audit found it all copied)."""
    entry = {claim: act[claim] for claim in ACTOR_IDENTITY_CLAIMS if claim in act}
    entry["asserted_by"] = issuer
    inner = act.get("act")
    if isinstance(inner, Mapping):
        entry["act"] = _asserted_by(inner, issuer)
    return entry


def act_chain(
    subject: VerifiedToken, actor: VerifiedToken | None, *, trusted_delegation: bool = False
) -> tuple[dict[str, Any] | None, int]:
    """The ``act`` claim of the token to issue, and the number of actors in it.

    ``trusted_delegation``: the subject token's issuer may assert delegation (see the module
    docstring); without it an upstream ``act`` is ``invalid_request`` (RFC 8693 §2.2.2).
    """
    prior = subject.claims.get("act")
    upstream = prior is not None and subject.issuer_name != SELF_ISSUER
    if upstream and not trusted_delegation:
        raise InvalidRequest("subject_token.unverified_act", subject.issuer_name)
    if actor is not None and actor.claims.get("act") is not None:
        raise InvalidRequest("actor_token.carries_act")
    depth = chain_depth(prior)
    prior_act = dict(prior) if isinstance(prior, Mapping) else None
    if upstream and prior_act is not None:
        prior_act = _asserted_by(prior_act, subject.issuer)
    if actor is None:
        return prior_act, depth
    entry = _actor_entry(actor)
    if prior_act is not None:
        entry["act"] = prior_act
    return entry, depth + 1


def attestation_time(subject: VerifiedToken) -> float | None:
    """When the workload last proved itself: ``auth_time`` of our own token, else ``iat`` (or
    ``nbf``), or the token's own ``auth_time`` when that is earlier: another STS's token carries
    the attestation it was issued on there (RFC 9068 §2.2.1), and its ``iat`` is only when it was
    re-issued (an outside audit had a peer's re-exchange keep stale attestation fresh here)."""
    if subject.issuer_name == SELF_ISSUER:
        auth_time = subject.claims.get("auth_time")
        if isinstance(auth_time, int | float) and not isinstance(auth_time, bool):
            return float(auth_time)
        return None
    issued = subject.issued_at if subject.issued_at is not None else subject.not_before
    carried = numeric_date_value(subject.claims.get("auth_time"))
    if carried is None:
        return issued
    return carried if issued is None else min(issued, carried)


def narrow_reexchange(
    subject: VerifiedToken,
    audiences: tuple[str, ...],
    scopes: tuple[str, ...],
) -> tuple[str, ...]:
    """For a token of ours presented again: the result must be within it; returns the scopes to grant."""
    if subject.issuer_name != SELF_ISSUER:
        return scopes
    if not set(audiences) <= set(subject.audiences):
        raise InvalidTarget("reexchange.audience_not_within_presented_token")
    held_raw = subject.claims.get("scope")
    held = set(held_raw.split()) if isinstance(held_raw, str) else set()
    narrowed = tuple(s for s in scopes if s in held)
    if scopes and not narrowed:
        # Asked for, or the rule's defaults: a token of no scope must not come of one with scopes
        # to grant (docs/policies.md, re-exchange: none left is invalid_scope).
        raise InvalidScope("reexchange.scope_not_within_presented_token")
    return narrowed
