"""Evaluation: which rule applies to a request, and what it grants, or which refusal.

A pure function of the compiled policy (:mod:`.index`), the request, the facts
and the client.

Selection: rules are tried in order.  A rule applies when it matches the
identity (issuer, subject, claims, condition), the client, and every
requested audience and resource.  The first such rule decides scope and
lifetime.  No applicable rule means deny.  Refusals follow RFC 8693 §2.2.2
and RFC 6749 §5.2:

* no rule for this identity: ``invalid_request`` (RFC 8693 §2.2.2, a subject
  token "unacceptable based on policy"); rules for it, but none for the
  requested target: ``invalid_target``;
* rules for this identity exist but only for authenticated clients and none
  authenticated: ``invalid_client`` (401); so too when the rules open to an
  unauthenticated request do not cover the target and one that needs client
  authentication does;
* the authenticated client is not one the rules allow (or not one that the
  rules covering the target allow): ``unauthorized_client``;
* an actor token is missing where every rule for the identity, or every rule
  covering the target, needs one (``require_actor``): ``invalid_request``;
* none of the requested scopes may be granted: ``invalid_scope``; some may:
  the token is narrowed to those and the response says so (RFC 6749 §5.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import InvalidClient, InvalidRequest, InvalidScope, InvalidTarget, UnauthorizedClient
from ..attest import VerifiedToken
from .index import PolicySet
from .rules import MAX_DELEGATION_DEPTH, Grant, PolicyRequest, Rule, RuleTrace


def _token_view(token: VerifiedToken | None) -> dict[str, Any] | None:
    if token is None:
        return None
    return {
        "issuer": token.issuer_name,
        "subject": token.subject,
        "claims": dict(token.claims),
        "facts": dict(token.facts),
    }


#: The most members a claim's array or object may hold for a ``condition`` to be evaluated on it.
MAX_CONDITION_ITEMS = 256


def _too_many_items(value: Any, depth: int = 0) -> bool:
    """Whether an array or object in ``value`` holds more than :data:`MAX_CONDITION_ITEMS` members
    (nesting is bounded already: a token's JSON is refused beyond a depth)."""
    if isinstance(value, Mapping):
        return len(value) > MAX_CONDITION_ITEMS or (
            depth < 64 and any(_too_many_items(v, depth + 1) for v in value.values())
        )
    if isinstance(value, list | tuple):
        return len(value) > MAX_CONDITION_ITEMS or (
            depth < 64 and any(_too_many_items(v, depth + 1) for v in value)
        )
    return False


def _identity_mismatch(rule: Rule, facts: VerifiedToken, request: PolicyRequest) -> str | None:
    """None when the rule matches the identity; else why not."""
    mismatch = rule.identity.mismatch(facts)
    if mismatch is not None:
        return mismatch
    if rule.condition is not None:
        actor = request.actor
        if _too_many_items(facts.claims) or (actor is not None and _too_many_items(actor.claims)):
            # CEL's filter/map/exists over a claim list cost the square of its length, and hold the
            # worker meanwhile (an outside audit: 5,500 items in a 16 KB token, a second a request).
            return f"condition not evaluated (a claim holds more than {MAX_CONDITION_ITEMS} items)"
        variables = {
            "claims": dict(facts.claims),
            "facts": dict(facts.facts),
            "subject": facts.subject,
            "issuer": facts.issuer_name,
            "client_id": request.client_id or "",
            "request": {
                "audiences": list(request.audiences),
                "resources": list(request.resources),
                "scopes": list(request.scopes or ()),
            },
            "actor": _token_view(actor),
        }
        try:
            result = rule.condition.execute(variables)
        except Exception as exc:  # noqa: BLE001 - a failing condition is a non-match, never a grant
            return f"condition could not be evaluated ({type(exc).__name__})"
        if result is not True:
            return "condition is false"
    return None


def _actor_mismatch(rule: Rule, request: PolicyRequest) -> str | None:
    """RFC 8693 §1.1: delegation (an actor) or impersonation (none), as the rule allows."""
    if request.delegation_depth > MAX_DELEGATION_DEPTH:
        # The hard ceiling holds for every token issued, also for a presented chain carried over.
        return "delegation chain too deep"
    if request.actor is None:
        if rule.require_actor:
            return "an actor token is required (delegation only)"
        # The chain the subject token carries goes into the issued token as it is: the rule's
        # limit counts those earlier actors too (docs/policies.md, ``delegation.max_depth``).
        return "delegation chain too deep" if request.delegation_depth > rule.max_delegation_depth else None
    if not rule.actors:
        return "rule allows no actor"
    if all(m.mismatch(request.actor) is not None for m in rule.actors):
        return "actor not allowed"
    if request.delegation_depth > rule.max_delegation_depth:
        return "delegation chain too deep"
    return None


def _client_mismatch(rule: Rule, client_id: str | None) -> str | None:
    if client_id is None:
        return "client authentication required" if rule.require_client_authentication else None
    if rule.clients and client_id not in rule.clients:
        return f"client {client_id!r} not allowed"
    return None


def _targets(rule: Rule, request: PolicyRequest) -> tuple[str, ...] | None:
    """The audiences to grant, or None when the rule does not cover what was asked."""
    if not request.audiences and not request.resources:
        # Nothing asked: a rule with exactly one target implies it; otherwise the caller must say.
        return rule.targets if len(rule.targets) == 1 else None
    if set(request.audiences) <= rule.audiences and set(request.resources) <= rule.resources:
        return tuple(dict.fromkeys(request.resources + request.audiences))
    return None


def trace(policy: PolicySet, facts: VerifiedToken, request: PolicyRequest) -> list[RuleTrace]:
    """Every rule with whether it applies and why (for ``sts policy explain`` and the audit record)."""
    traces = []
    for rule in policy.rules:
        reason = (
            _identity_mismatch(rule, facts, request)
            or _client_mismatch(rule, request.client_id)
            or _actor_mismatch(rule, request)
            or (None if _targets(rule, request) is not None else "requested audience/resource not granted")
        )
        traces.append(RuleTrace(rule.name, rule.source, reason is None, reason or "applies"))
    return traces


def evaluate(policy: PolicySet, facts: VerifiedToken, request: PolicyRequest) -> Grant:
    """Decide what may be granted, or raise the OAuth error (see the module docstring)."""
    identity = [r for r in policy.candidates(facts) if _identity_mismatch(r, facts, request) is None]
    if not identity:
        # RFC 8693 §2.2.2: a subject token "unacceptable based on policy" is invalid_request.
        raise InvalidRequest("policy.no_rule_for_identity")
    clients_ok = [r for r in identity if _client_mismatch(r, request.client_id) is None]
    if not clients_ok:
        if request.client_id is None:
            raise InvalidClient("policy.client_authentication_required")
        raise UnauthorizedClient("policy.client_not_allowed", request.client_id)
    actors_ok = [r for r in clients_ok if _actor_mismatch(r, request) is None]
    if not actors_ok:
        mismatches = {_actor_mismatch(r, request) for r in clients_ok}
        if mismatches == {"delegation chain too deep"}:
            raise InvalidRequest("policy.delegation_too_deep", str(request.delegation_depth))
        if request.actor is None:
            raise InvalidRequest("policy.actor_required")
        raise InvalidRequest("policy.actor_not_allowed", request.actor.subject[:200])
    for rule in actors_ok:
        targets = _targets(rule, request)
        if targets is None:
            continue
        if request.scopes is None:
            scopes, narrowed = rule.default_scopes, False
        else:
            scopes = tuple(s for s in request.scopes if s in rule.scopes)
            if not scopes:
                raise InvalidScope("policy.scope_not_allowed", rule.name)
            narrowed = len(scopes) != len(request.scopes)
        return rule.grant(targets, scopes, narrowed)
    # No rule open to this client covers the target.  If one that needs another client (or an
    # authenticated one) does, the client is what to change, not the target.
    for rule in identity:
        if (
            _client_mismatch(rule, request.client_id) is not None
            and _actor_mismatch(rule, request) is None
            and _targets(rule, request) is not None
        ):
            if request.client_id is None:
                raise InvalidClient("policy.client_authentication_required")
            raise UnauthorizedClient("policy.client_not_allowed", request.client_id)
    # Nor one that needs an actor token, which the request lacks: the actor token is what is
    # missing (RFC 8693 §2.2.2, invalid_request), not the target.
    if request.actor is None and any(
        _actor_mismatch(rule, request) is not None and _targets(rule, request) is not None
        for rule in clients_ok
    ):
        raise InvalidRequest("policy.actor_required")
    raise InvalidTarget("policy.target_not_allowed")
