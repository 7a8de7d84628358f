"""Proof of possession: the key a request proves, and the key a token stays bound to.

* The ``dpop`` stage verifies the request's DPoP proof (RFC 9449 §4.3):
  :func:`verify_request_proof`; its ``jti`` is spent through the single-use ledger
  (:class:`ProofUses`), at once or with the grant's record, as the ledger decides.
* The ``policy`` stage keeps a bound token of ours bound on re-exchange:
  :func:`check_binding` (DPoP, RFC 9449 §7) and :func:`check_certificate_binding`
  (a client certificate, RFC 8705 §3).
* The ``risk`` stage treats the presented keys as facts, so a workload whose key
  changes has drifted: :func:`presented_keys`.
* The ``mint`` stage binds the new token to them: :func:`confirmation` (``cnf``, RFC 7800).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from ...errors import InvalidDPoPProof, InvalidRequest
from ...protocol.wire import WireRequest
from ..assurance import ACR_POP, rank
from ..attest import VerifiedToken
from ..audit import AuditRecord
from ..delegation import SELF_ISSUER
from ..dpop import DPoPConfig, VerifiedProof, verify_proof
from ..policy.rules import Grant
from ..ports import AlreadyUsed, ReplayCache, ReplayWindowLost, SingleUse, SingleUseLedger, StoreUnavailable

log = logging.getLogger(__name__)


class ProofUses:
    """The replay cache the DPoP check sees: the ledger spends a proof's ``jti``
    (:meth:`~sts.core.ports.SingleUseLedger.spend`), at once or, found unused, with the
    grant's audit record (SQL: one write transaction per exchange; Redis: one claim).  A deferred use is
    kept in :attr:`pending`; should the request be refused, :meth:`spend_now` records it
    all the same, so a verified proof is spent whatever the outcome."""

    def __init__(self, ledger: SingleUseLedger, replay: ReplayCache) -> None:
        self.ledger = ledger
        self.replay = replay
        self.pending: list[SingleUse] = []

    def first_use(
        self, purpose: str, key: str, expires_at: float, now: float, *, valid_from: float | None = None
    ) -> bool:
        try:
            use = self.ledger.spend(SingleUse(purpose, key, expires_at, valid_from), now)
        except AlreadyUsed:
            return False
        if use is not None:
            self.pending.append(use)
        return True

    def release(self, purpose: str, key: str) -> None:
        self.pending = [u for u in self.pending if (u.purpose, u.key) != (purpose, key)]

    def spend_now(self, now: float) -> None:
        """Record the deferred uses now (a refused request): best effort, the refusal stands."""
        pending, self.pending = self.pending, []
        for use in pending:
            try:
                self.replay.first_use(use.purpose, use.key, use.expires_at, now, valid_from=use.valid_from)
            except (StoreUnavailable, ReplayWindowLost) as exc:
                log.warning("the DPoP proof of a refused request not recorded as used: %s", exc)


def verify_request_proof(
    wire: WireRequest,
    config: DPoPConfig | None,
    *,
    url: str,
    replay: ReplayCache,
    record: AuditRecord,
    now: float,
) -> VerifiedProof | None:
    """The request's DPoP proof (RFC 9449 §4.3), verified, its key's thumbprint in ``record``;
    None when there is none.  The key is the one the issued token will be bound to."""
    if not wire.dpop:
        return None
    if config is None:
        raise InvalidDPoPProof("dpop.not_supported")
    proof = verify_proof(wire.dpop, method="POST", url=url, config=config, replay=replay, now=now)
    record.details["dpop_jkt"] = proof.jkt
    return proof


def check_binding(
    subject: VerifiedToken, actor: VerifiedToken | None, grant: Grant, proof: VerifiedProof | None
) -> None:
    """DPoP required by the rule; a bound token of ours stays bound to its key on re-exchange.

    A bound token of ours presented as the actor token is a credential too: whoever
    presents it proves its key (RFC 9449 §7), else a stolen bound token would act as a
    bearer token.  The one proof then binds the new token to the actor's key, so the
    subject's own binding yields only where the rule lets the actor bind its key.
    """
    if grant.require_dpop and proof is None:
        raise InvalidDPoPProof("dpop.required")
    for token, role in ((subject, "subject_token"), (actor, "actor_token")):
        problem = None if token is None else _confirmation_problem(token.claims.get("cnf", _NONE))
        if problem is not None:
            # RFC 7800: ``cnf`` says the presenter must prove a key.  One this service cannot check
            # (``jwk``, ``kid``, ``jku``, anything else, or a method whose value is no thumbprint)
            # is refused, never taken as a bearer token.
            raise InvalidRequest(f"{role}.{problem}")
    actor_bound = bound_key(actor) if actor is not None else None
    if actor_bound is not None:
        if proof is None:
            raise InvalidDPoPProof("dpop.bound_actor_token_needs_proof")
        if proof.jkt != actor_bound:
            raise InvalidDPoPProof("dpop.key_differs_from_bound_actor_token")
    bound = bound_key(subject)
    if bound is None:
        return
    if proof is None:
        raise InvalidDPoPProof("dpop.bound_token_needs_proof")
    if proof.jkt != bound and not (actor is not None and grant.actor_may_bind_key):
        raise InvalidDPoPProof("dpop.key_differs_from_bound_token")


def check_certificate_binding(
    subject: VerifiedToken, actor: VerifiedToken | None, thumbprint: str | None
) -> None:
    """RFC 8705 §3: a certificate-bound token (``cnf.x5t#S256``), ours or an upstream one, is
    exchanged over the same certificate, in the subject's seat and in the actor's (whose token
    is a credential too: an outside audit had a certificate-bound actor token act without it)."""
    for token, role in ((subject, "subject_token"), (actor, "actor_token")):
        if token is None:
            continue
        cnf = token.claims.get("cnf")
        bound = cnf.get("x5t#S256") if isinstance(cnf, Mapping) else None
        if bound is not None and bound != thumbprint:
            raise InvalidRequest(f"{role}.certificate_binding_mismatch")


#: The confirmation methods checked here: DPoP (RFC 9449 §6) and the client certificate (RFC 8705 §3).
CHECKED_CONFIRMATIONS = frozenset({"jkt", "x5t#S256"})
_NONE = object()


#: A base64url SHA-256 digest without padding: ``jkt`` (RFC 9449 §6.1, the RFC 7638 thumbprint of
#: the key) and ``x5t#S256`` (RFC 8705 §3.1, of the certificate's DER) are both one.
_THUMBPRINT = re.compile(r"[A-Za-z0-9_-]{43}")


def _confirmation_problem(cnf: object) -> str | None:
    """Why a token's ``cnf`` cannot be checked here, or None: no ``cnf`` at all, or one whose every
    member is a method :data:`CHECKED_CONFIRMATIONS` names, holding a thumbprint.  Any other
    value (``null``, a number, an empty or padded string) is malformed: a token that says it is
    bound but names no key it could be held to (an outside audit had ``{"jkt": null}`` exchanged
    as a bearer token).  A ``cnf`` that is present is checked: ``null`` is malformed too."""
    if cnf is _NONE:
        return None
    if not isinstance(cnf, Mapping) or not cnf or not set(cnf) <= CHECKED_CONFIRMATIONS:
        return "unsupported_confirmation"
    for value in cnf.values():
        if type(value) is not str or not _THUMBPRINT.fullmatch(value):
            return "malformed_confirmation"
    return None


def bound_key(token: VerifiedToken) -> str | None:
    """``cnf.jkt`` of a DPoP-bound token (RFC 9449 §6.1), ours or an upstream one (a peer STS's, say:
    whoever presents it must prove the key, else a stolen bound token would pass as a bearer
    token, RFC 9449 §7); None for a token without one."""
    cnf = token.claims.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, Mapping) else None
    return None if jkt is None else str(jkt)


def presented_keys(proof: VerifiedProof | None, thumbprint: str | None) -> dict[str, str]:
    """The proof-of-possession keys this request proves, as baseline facts (``cnf_jkt``, ``cnf_x5t``)."""
    keys: dict[str, str] = {}
    if proof is not None:
        keys["cnf_jkt"] = proof.jkt
    if thumbprint is not None:
        keys["cnf_x5t"] = thumbprint
    return keys


def carried_level(subject: VerifiedToken) -> str | None:
    """The ``acr`` a token of ours carries into its re-exchange ("" when it has none: the lowest);
    None for any other token."""
    if subject.issuer_name != SELF_ISSUER:
        return None
    acr = subject.claims.get("acr")
    return acr if isinstance(acr, str) else ""


def subject_keys(
    keys: Mapping[str, str], subject: VerifiedToken, *, actor: bool, carried: str | None
) -> dict[str, str]:
    """Which of the request's ``keys`` are evidence of the subject's key (its continuity, its
    ``pop`` level, its baseline's first key): all of them for an upstream token presented by its
    subject; with an actor token, only the key the subject token is bound to
    (:func:`keys_of_the_subject`); with a token of ours (``carried``: its ``acr``), only the key it
    is bound to, and only when its issuance reached ``pop``, i.e. judged that key the identity's.
    A key shown with a bearer token of ours, or with one whose key was not the identity's, is
    no evidence: it binds the new token, but is not learned as the identity's key.  An outside
    audit had the holder of a bearer token of ours re-exchange it once with a key of its own,
    which became the first key of the re-exchanges' identity, so that the workload's own
    ``pop`` tokens were re-exchanged at ``attested`` from then on, for the baseline's lifetime.

    With an actor, or a token of ours, a request that also proves a key the subject token is not
    bound to shows none: the new token is bound to every key the request proves, so a key judged
    nowhere (a new client certificate, the actor's own DPoP key) would ride on the bound one into
    a ``pop`` token, and then pass as judged at its issuance (two reviews had such keys confirmed
    for the re-exchanges' identity).
    """
    if carried is not None and rank(carried) < rank(ACR_POP):
        return {}
    if not actor and carried is None:
        return dict(keys)
    bound = keys_of_the_subject(keys, subject)
    return bound if len(bound) == len(keys) else {}


def keys_of_the_subject(keys: Mapping[str, str], subject: VerifiedToken) -> dict[str, str]:
    """Which of the request's ``keys`` the subject token itself is bound to (``cnf``): with an actor
    token the proof is the presenter's, the actor's, and on re-exchange of a token of ours its
    issuance judged only those (see :func:`subject_keys`; an outside audit had the actor's DPoP key
    raise the subject's level, and become the subject's key)."""
    cnf = subject.claims.get("cnf")
    if not isinstance(cnf, Mapping):
        return {}
    bound = {"cnf_jkt": cnf.get("jkt"), "cnf_x5t": cnf.get("x5t#S256")}
    return {fact: value for fact, value in keys.items() if bound.get(fact) == value}


def confirmation(proof: VerifiedProof | None, thumbprint: str | None) -> dict[str, Any]:
    """``cnf`` (RFC 7800): the DPoP key (RFC 9449 §6) and/or the client certificate (RFC 8705 §3.1)."""
    cnf: dict[str, str] = {}
    if proof is not None:
        cnf["jkt"] = proof.jkt
    if thumbprint is not None:
        cnf["x5t#S256"] = thumbprint
    return {"cnf": cnf} if cnf else {}
