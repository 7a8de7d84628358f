"""Ports: the small storage and key interfaces the decision core needs.

Adapters in :mod:`sts.adapters` implement them (SQLite/SQLAlchemy, Redis,
HTTP JWKS, key files).  The core only ever sees these protocols.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from joserfc.jwk import Key

from .audit import AuditRecord
from .baseline import Baseline
from .subject_state import SubjectState


class StoreUnavailable(Exception):
    """The store could not be reached; callers fail closed."""


class KeysUnavailable(Exception):
    """An issuer's keys cannot be had (unreachable and no usable cache)."""


class UnknownKeyId(Exception):
    """The issuer publishes no key with this ``kid`` (after one refetch)."""


class AuditUnavailable(Exception):
    """The audit record could not be committed."""


class AuditOutcomeUnknown(AuditUnavailable):
    """The audit record's commit was sent and no answer came (its connection was cut): it may yet
    be committed, when the database resumes.  The token is withheld all the same; what the grant
    would have used must stay used, so that the trail never holds two grants of one token."""


class ReplayWindowLost(Exception):
    """The replay store forgot what it remembered (it restarted empty) at ``lost_at``.

    A credential that could have been accepted before then may have been used
    already, and the store can no longer tell: it is refused until it expires.
    ``lost_at`` is on this service's clock.
    """

    def __init__(self, lost_at: float, use: SingleUse | None = None) -> None:
        super().__init__(f"replay records lost at {lost_at:.0f}")
        self.lost_at = lost_at
        #: The use found to predate the loss, when the ledger knows which (a claim at commit).
        self.use = use


class AlreadyUsed(Exception):
    """A single-use credential whose use is already recorded (earlier, or by a concurrent request).

    ``use`` names it when a commit of several uses found it taken (:meth:`SingleUseLedger.commit`).
    """

    def __init__(self, use: SingleUse | None = None) -> None:
        super().__init__()
        self.use = use


class UsesNotClaimed(StoreUnavailable):
    """:meth:`SingleUseLedger.commit` could not claim the uses before the record: nothing is committed.

    ``retry_after``: seconds until a use held by another request (perhaps one that died) lapses,
    when that is why; the refusal's ``Retry-After``."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ReplayCache(Protocol):
    """One-time-use registry (client assertion ``jti``, DPoP ``jti``, SET ``jti``)."""

    def first_use(
        self, purpose: str, key: str, expires_at: float, now: float, *, valid_from: float | None = None
    ) -> bool:
        """Atomically record ``key`` under ``purpose`` until ``expires_at``.

        Returns True when the key was not already recorded (first use), False
        on a replay.  Raises :class:`StoreUnavailable` when the store cannot
        be reached, so the caller fails closed.

        ``valid_from`` is the earliest time (this service's clock) at which the
        credential could have been accepted, leeway included; None when that is
        unknown (any time).  A store that lost its records after ``valid_from``
        raises :class:`ReplayWindowLost`: the credential may have been used
        before the loss, and nothing remembers it.
        """
        ...

    def release(self, purpose: str, key: str) -> None:
        """Forget a first use whose result was never delivered (the audit write failed)."""
        ...


#: Seconds past its expiry a store keeps a spent use (a single-use token, a DPoP proof's ``jti``...).
#: Instances judge a token's expiry by their own clocks, while a store drops (Redis) or purges
#: (the database, by whichever instance purges) the record by another: an instance whose clock is
#: behind would still take a token whose record is gone (an outside fault campaign: a 60 s skew
#: had a single-use token granted twice).
CLOCK_MARGIN = 300.0


@dataclass(frozen=True)
class SingleUse:
    """One use of a single-use credential, recorded under ``purpose:key`` until ``expires_at``.

    ``valid_from`` is as for :meth:`ReplayCache.first_use`; ``holder`` is set by
    :meth:`SingleUseLedger.reserve` and names the reservation.
    """

    purpose: str
    key: str
    expires_at: float
    valid_from: float | None
    holder: str = ""


@dataclass(frozen=True)
class BaselineUpdate:
    """A behaviour baseline to save with the record of the grant that taught it."""

    identity: str
    baseline: Baseline
    ttl: int
    #: Whether the grant changed the drift state (:data:`sts.core.drift.DRIFT_FIELDS`) from what it
    #: read.  If not, the store leaves the drift state it holds, which another request may have
    #: changed since this grant read it (a probation step, a confirmation).
    drift_changed: bool = True


class SingleUseLedger(Protocol):
    """Two-phase single use: reserve before the token is minted, commit with its audit record.

    A token is used up only when its grant's audit record is committed, so a
    failure (the audit store, the ledger, the process) never consumes it: the
    retry of a 503 still works.  Where the ledger and the audit trail share a
    database, the use and the record are one transaction; elsewhere the
    reservation lapses after a short hold unless it is confirmed once the record
    is committed.
    """

    def reserve(self, use: SingleUse, now: float) -> SingleUse:
        """Phase 1: claim (or only check) ``use``; returns the reservation to pass to :meth:`commit`.

        Raises :class:`AlreadyUsed` (a committed use, or a concurrent one that
        committed while this waited), :class:`ReplayWindowLost` and
        :class:`StoreUnavailable`.
        """
        ...

    def used(self, use: SingleUse, now: float) -> bool:
        """Whether ``use`` is committed as used (one read; a reservation a request in flight holds
        is not a use: the commit decides those).  Raises :class:`ReplayWindowLost` and
        :class:`StoreUnavailable`."""
        ...

    def spend(self, use: SingleUse, now: float) -> SingleUse | None:
        """A one-time credential (a DPoP proof's ``jti``), checked when it is verified.

        Returns None when its use is recorded now, in one atomic write; else ``use``, not
        found used, to pass to :meth:`commit` with the grant's record, which records it with
        the record (SQL: in its transaction; Redis: just before it) and raises
        :class:`AlreadyUsed` naming it should a concurrent request have recorded it first.  Raises
        :class:`AlreadyUsed` (a replay), :class:`ReplayWindowLost` and :class:`StoreUnavailable`.
        """
        ...

    def commit(
        self,
        record: AuditRecord,
        uses: Sequence[SingleUse],
        now: float,
        baseline: BaselineUpdate | None = None,
    ) -> None:
        """Phase 2: commit ``record`` and record ``uses`` as used; save ``baseline`` with them
        (in the same transaction where the store allows, else after the record, best effort).

        Raises :class:`AuditUnavailable` (nothing committed, no use recorded),
        :class:`AlreadyUsed` (a concurrent request committed one of the uses
        first, named by the exception; ``record`` is not written),
        :class:`UsesNotClaimed` (a ledger that claims the uses before the record could
        not: ``record`` is not written), :class:`ReplayWindowLost` naming a use the
        store's records, lost since it was checked, may have seen (``record`` is not
        written) or :class:`StoreUnavailable` (the record is
        committed but a use could not be confirmed: the token is withheld).
        """
        ...

    def cancel(self, uses: Sequence[SingleUse]) -> None:
        """Drop reservations whose request failed (best effort: they lapse on their own)."""
        ...


class IssuerKeys(Protocol):
    """Verification keys of one trusted issuer (a JWKS URL or file)."""

    def key_for(self, kid: str | None, alg: str) -> Key:
        """Return the key with this ``kid`` usable for ``alg``.

        Raises :class:`UnknownKeyId` when no such key exists even after a
        refetch, :class:`KeysUnavailable` when the keys cannot be had.
        """
        ...


class Signer(Protocol):
    """The current signing key of this service."""

    @property
    def alg(self) -> str: ...

    @property
    def kid(self) -> str: ...

    def sign(self, header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
        """Return a compact JWS of ``claims`` with ``header`` (``alg``/``kid`` added)."""
        ...


class AuditSink(Protocol):
    def write(self, record: AuditRecord) -> None:
        """Commit the record durably; raise :class:`AuditUnavailable` if it cannot."""
        ...


class TokenReviewUnavailable(Exception):
    """The cluster's TokenReview API could not answer."""


class TokenReviewer(Protocol):
    """Asks a Kubernetes cluster whether a service-account token is still live (pod exists)."""

    def review(self, token: str, audiences: tuple[str, ...]) -> str | None:
        """The authenticated username (``system:serviceaccount:NS:SA``), or None when the
        cluster says the token is not authenticated (pod deleted, token revoked).

        Raises :class:`TokenReviewUnavailable` when the API cannot be reached.
        """
        ...


class SubjectStateStore(Protocol):
    """Per-identity state set by security events (blocks, re-attestation, revocation, risk)."""

    def get(self, identities: Sequence[str]) -> list[SubjectState]:
        """The states stored under these identity keys (empty states for unknown ones).

        Raises :class:`StoreUnavailable`; callers fail closed.
        """
        ...

    def put(self, identity: str, state: SubjectState, ttl: int) -> None:
        """Store ``state`` under ``identity`` for ``ttl`` seconds.  Raises :class:`StoreUnavailable`."""
        ...

    def update(self, identity: str, change: Callable[[SubjectState], SubjectState], ttl: int) -> SubjectState:
        """Atomically replace the state with ``change(state)``; return the new state.

        ``change`` may run more than once (on a conflicting concurrent update) and must be pure.
        Raises :class:`StoreUnavailable`.
        """
        ...


class BaselineStore(Protocol):
    """Behaviour baselines, bounded and expiring (see :mod:`sts.core.baseline`)."""

    def load(self, identity: str) -> Baseline:
        """The identity's baseline, or a new (learning) one.  Raises :class:`StoreUnavailable`."""
        ...

    def save(
        self, identity: str, baseline: Baseline, ttl: int, *, drift: bool = True, grant: bool = False
    ) -> None:
        """Save the baseline but not its ``failures``, which only :meth:`add_failure` and
        :meth:`save_failures` write; its drift state (:data:`sts.core.drift.DRIFT_FIELDS`) only
        with ``drift`` (else the stored one is left as it is: a grant that did not change it).
        ``grant``: a grant's update (:func:`sts.core.baseline.observe` of what it read), whose
        counters are advanced from the stored ones by one grant
        (:func:`sts.core.baseline_counts.advanced`), atomically: grants decided at once each
        count.  Raises :class:`StoreUnavailable`."""
        ...

    def update_drift(self, identity: str, change: Callable[[Baseline], Baseline], ttl: int) -> None:
        """Atomically replace the identity's drift state with that of ``change(baseline)``, where
        ``baseline`` is the one stored now (compare and swap, ``change`` run again if another
        request changed it first): two refused exchanges each count for the probation, and no
        grant undoes either (an outside audit).  Nothing is written if ``change`` leaves the drift
        state as it was.  ``change`` must be pure.  Raises :class:`StoreUnavailable`."""
        ...

    def add_failure(self, identity: str, at: float, ttl: int) -> None:
        """Append a refusal at ``at`` to the identity's recent refusals (keeping the newest
        :data:`~sts.core.baseline.MAX_FAILURES`), atomically: refusals at the same instant each
        count.  Only for an identity with a live baseline (granted under a rule that keeps one,
        within its lifetime): anyone with a valid token of a public issuer can be refused, and a
        stranger's refusals left a row or key each that nothing reads (an outside audit; choosing
        by the policy's rules instead left holes that three reviews found).  Raises
        :class:`StoreUnavailable`."""
        ...

    def save_failures(self, identity: str, failures: tuple[float, ...], ttl: int) -> None:
        """Save the identity's recent refusals alone, kept apart from the rest of its baseline: a
        grant saves the baseline it read before it was decided, and would otherwise undo a refusal
        recorded meanwhile.  :meth:`load` gives them as the baseline's ``failures``.  Raises
        :class:`StoreUnavailable`."""
        ...


class RevokedTokens(Protocol):
    """Individually revoked tokens of ours (RFC 7009), by ``jti``, remembered until they expire."""

    def revoke(self, jti: str, expires_at: float) -> None:
        """Raises :class:`StoreUnavailable`."""
        ...

    def revoked(self, jti: str) -> bool:
        """Raises :class:`StoreUnavailable`; callers treat that as inactive (fail closed)."""
        ...


@dataclass(frozen=True)
class LimitedKey:
    """One limit on one key, as the store sees it (GCRA, see :mod:`sts.core.rate_limit`)."""

    key: str
    interval: float
    tolerance: float


class RateLimitStore(Protocol):
    """Shared rate-limit state (GCRA, see :mod:`sts.core.rate_limit`): one TAT per key."""

    def acquire(self, keys: Sequence[LimitedKey], now: float) -> Sequence[float]:
        """Admit one request against every key at once, or against none.

        Returns each key's wait in seconds: all ``<= 0`` when the request was admitted
        (and every key's TAT advanced by its interval, atomically); otherwise at least
        one is positive and no key was charged (a TAT left further ahead than the key's
        tolerance by an earlier, stricter limit may be lowered to ``now + tolerance``, and
        no wait is longer than the key's interval).  Keys are distinct.  Raises
        :class:`StoreUnavailable`; callers fail closed.
        """
        ...


class PipelineStages(Protocol):
    """Where a request is in its pipeline: for per-stage latencies and trace spans.

    ``enter("attest")`` ends the stage the request was in (if any) and starts the
    next; the last stage ends with the request.  The pipeline only names its
    stages; an adapter times them (spans, histograms) or does nothing.
    """

    def enter(self, stage: str) -> None: ...
