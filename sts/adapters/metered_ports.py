"""The pipeline's ports, counted: each decision as its audit record is committed, and the failures
of the stores, the audit trail and upstream services where the pipeline meets them.

The decision core never imports this module (nor ``prometheus_client``); :func:`sts.app.create_app`
wraps the ports it gives the pipeline:

* the audit sink and the single-use ledger (:class:`MeteredAuditSink`, :class:`MeteredLedger`):
  one count per audit record committed, by endpoint, outcome, OAuth error and policy rule, and the
  risk signals that fired in it (:meth:`sts.adapters.metrics.Metrics.decided`);
* the stores (:func:`count_store_errors`): each :class:`~sts.core.ports.StoreUnavailable` by store
  and operation;
* upstream key sets and TokenReview (:class:`CountedIssuerKeys`, :class:`CountedTokenReviewer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..core.audit import AuditRecord
from ..core.ports import (
    AlreadyUsed,
    AuditSink,
    AuditUnavailable,
    BaselineUpdate,
    IssuerKeys,
    KeysUnavailable,
    SingleUse,
    SingleUseLedger,
    StoreUnavailable,
    TokenReviewer,
    TokenReviewUnavailable,
    UsesNotClaimed,
)
from .metrics import Metrics

if TYPE_CHECKING:
    from joserfc.jwk import Key

T = TypeVar("T")


class MeteredAuditSink:
    """An :class:`~sts.core.ports.AuditSink` that counts each decision written through it."""

    def __init__(self, inner: AuditSink, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def write(self, record: AuditRecord) -> None:
        try:
            self.inner.write(record)
        except AuditUnavailable:
            self.metrics.audit_failed(record)
            self.metrics.decided(record, delivered=False)
            raise
        self.metrics.decided(record)


class MeteredLedger:
    """A :class:`~sts.core.ports.SingleUseLedger` that counts the decisions it commits and its failures.

    A grant whose commit is refused as a concurrent use (:class:`AlreadyUsed`) is not counted
    here: the pipeline records it again, as a refusal, through the audit sink.
    """

    def __init__(self, inner: SingleUseLedger, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def reserve(self, use: SingleUse, now: float) -> SingleUse:
        try:
            return self.inner.reserve(use, now)
        except StoreUnavailable:
            self.metrics.store_failed("ledger", "reserve")
            raise

    def used(self, use: SingleUse, now: float) -> bool:
        try:
            return self.inner.used(use, now)
        except StoreUnavailable:
            self.metrics.store_failed("ledger", "used")
            raise

    def spend(self, use: SingleUse, now: float) -> SingleUse | None:
        try:
            return self.inner.spend(use, now)
        except StoreUnavailable:
            self.metrics.store_failed("replay", "first_use")
            raise

    def commit(
        self,
        record: AuditRecord,
        uses: Sequence[SingleUse],
        now: float,
        baseline: BaselineUpdate | None = None,
    ) -> None:
        try:
            self.inner.commit(record, uses, now, baseline)
        except AlreadyUsed:
            raise
        except AuditUnavailable:
            self.metrics.audit_failed(record)
            self.metrics.decided(record, delivered=False)
            raise
        except UsesNotClaimed:
            # Nothing committed: the pipeline records the refusal through the audit sink.
            self.metrics.store_failed("ledger", "commit")
            raise
        except StoreUnavailable:
            # The record is committed, but the use could not be confirmed: the token is withheld.
            self.metrics.store_failed("ledger", "commit")
            self.metrics.decided(record, delivered=False)
            raise
        self.metrics.decided(record)

    def cancel(self, uses: Sequence[SingleUse]) -> None:
        self.inner.cancel(uses)


class _StoreErrorCounter:
    """Passes every attribute through to ``inner``; the named operations count StoreUnavailable."""

    def __init__(self, inner: Any, store: str, operations: Iterable[str], metrics: Metrics) -> None:
        self._inner = inner
        for name in operations:
            setattr(self, name, self._counted(getattr(inner, name), store, name, metrics))

    @staticmethod
    def _counted(
        operation: Callable[..., Any], store: str, name: str, metrics: Metrics
    ) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return operation(*args, **kwargs)
            except StoreUnavailable:
                metrics.store_failed(store, name)
                raise

        return counted

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


#: The operations of each store port (sts.core.ports) whose failures are counted.
STORE_OPERATIONS: Mapping[str, tuple[str, ...]] = {
    "replay": ("first_use", "release"),
    "subject_state": ("get", "put", "update"),
    "baseline": ("load", "save", "save_failures", "add_failure", "update_drift"),
    "revocation": ("revoke", "revoked"),
    "rate_limit": ("acquire",),
}


def count_store_errors(inner: T, store: str, metrics: Metrics) -> T:
    """``inner`` (a store port) with its :class:`StoreUnavailable` failures counted as ``store``."""
    counted: T = _StoreErrorCounter(inner, store, STORE_OPERATIONS[store], metrics)  # type: ignore[assignment]
    return counted


class CountedIssuerKeys:
    """An :class:`~sts.core.ports.IssuerKeys` whose :class:`KeysUnavailable` failures are counted."""

    def __init__(self, inner: IssuerKeys, metrics: Metrics, kind: str, source: str) -> None:
        self.inner = inner
        self.metrics = metrics
        self.kind = kind
        self.source = source

    def key_for(self, kid: str | None, alg: str) -> Key:
        try:
            return self.inner.key_for(kid, alg)
        except KeysUnavailable:
            self.metrics.upstream_failed(self.kind, self.source)
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class CountedTokenReviewer:
    """A :class:`~sts.core.ports.TokenReviewer` whose failures to reach the cluster are counted."""

    def __init__(self, inner: TokenReviewer, metrics: Metrics, source: str) -> None:
        self.inner = inner
        self.metrics = metrics
        self.source = source

    def review(self, token: str, audiences: tuple[str, ...]) -> str | None:
        try:
            return self.inner.review(token, audiences)
        except TokenReviewUnavailable:
            self.metrics.upstream_failed("token_review", self.source)
            raise
