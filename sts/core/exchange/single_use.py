"""Single use of a subject token, in two phases (see :class:`~sts.core.ports.SingleUseLedger`).

The ``mint`` stage reserves the token (:func:`reserve_subject_token`), last of all the
checks, so that a refusal does not burn it; a ledger may refuse a used one there, or
(the SQL and Redis ledgers, to save a round trip) only at the commit.  The use is
committed together with the grant's audit record, so of any exchanges of one token
exactly one succeeds; another's record, its token already minted, becomes a refusal
(:func:`withdraw_grant`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ...errors import InvalidRequest, TemporarilyUnavailable
from ..attest import VerifiedToken
from ..audit import AuditRecord, token_hash
from ..ports import AlreadyUsed, ReplayWindowLost, SingleUse, SingleUseLedger, StoreUnavailable

#: Said to a workload whose single-use token the replay store can no longer vouch for.
REPLAY_WINDOW_LOST = (
    "The subject token was issued before the replay store lost its records, so its single use cannot "
    "be checked; obtain a fresh subject token and exchange it."
)


def subject_token_use(subject: VerifiedToken, token: str, *, leeway: int) -> SingleUse:
    """The single use of the subject token ``token``: keyed by its ``jti``, else its signed part."""
    # Keys are prefixed by purpose and issuer, so replay caches never collide.
    return SingleUse(
        purpose=f"subject_token:{subject.issuer_name}",
        key=subject.jti if subject.jti is not None else signed_part_hash(token),
        expires_at=subject.expires_at + leeway,
        valid_from=earliest_acceptance(subject, leeway),
    )


@contextlib.contextmanager
def _ledger_refusals() -> Iterator[None]:
    """The ledger's failures as the OAuth errors a subject token's single use answers with."""
    try:
        yield
    except AlreadyUsed:
        raise InvalidRequest("subject_token.replayed") from None
    except ReplayWindowLost as exc:
        raise InvalidRequest(
            "subject_token.replay_window_lost", str(exc), description=REPLAY_WINDOW_LOST
        ) from None
    except StoreUnavailable as exc:
        raise TemporarilyUnavailable("store.unavailable", str(exc)) from None


def refuse_if_used(
    ledger: SingleUseLedger, subject: VerifiedToken, token: str, *, leeway: int, now: float
) -> None:
    """``invalid_request`` (``subject_token.replayed``) for a single-use token already used: one read,
    only where a rule's quota is to be counted next, so that a replayed token spends none of it
    (an outside red team drained a workload's quota with three replays of a spent token).  A use a
    request in flight holds is left to the commit, as ever."""
    with _ledger_refusals():
        used = ledger.used(subject_token_use(subject, token, leeway=leeway), now)
    if used:
        raise InvalidRequest("subject_token.replayed", "found used before the rule's quota")


def reserve_subject_token(
    ledger: SingleUseLedger, subject: VerifiedToken, token: str, *, leeway: int, now: float
) -> SingleUse:
    """Phase 1 of single use: the reservation to commit with the record, or ``invalid_request``."""
    with _ledger_refusals():
        return ledger.reserve(subject_token_use(subject, token, leeway=leeway), now)


def earliest_acceptance(token: VerifiedToken, leeway: float) -> float | None:
    """The earliest time (this service's clock) ``token`` could have been accepted: its ``iat``
    (else ``nbf``) less the leeway a clock ahead of ours is given (RFC 7519 §4.1.5-6); None when
    it has neither (any time)."""
    start = token.issued_at if token.issued_at is not None else token.not_before
    return None if start is None else start - leeway


def signed_part_hash(token: str) -> str:
    """SHA-256 of what the signature covers (RFC 7515 §5.1 signing input: header and payload).

    Not of the whole token: an ECDSA signature ``(r, s)`` has a twin ``(r, n - s)`` that
    verifies too, so one token has several encodings; its signed part has only one.
    """
    return token_hash(token.rpartition(".")[0])


def withdraw_grant(record: AuditRecord) -> None:
    """The record of a grant whose token was minted but will not leave: it becomes a refusal."""
    record.granted_audience, record.granted_scope, record.granted_lifetime = [], [], None
    record.issued_jti = record.issued_exp = None
    record.issued_kid = None
