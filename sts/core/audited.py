"""One decision, one audit record: the skeleton of every endpoint that decides.

::

    decide -> refused:  the refusal goes into the record, the record is written,
                        and the refusal is raised again for the endpoint to answer
           -> failed:   an unexpected exception (a bug) is logged with its stack,
                        recorded as an error and written; the answer is the
                        endpoint's own "unexpected" error, which says nothing of
                        the cause
           -> decided:  the endpoint commits the record, and only then is the
                        result returned: nothing leaves before it is audited

The token exchange (:class:`sts.core.exchange.TokenExchange`) and the Shared
Signals receiver (:class:`sts.core.signals.receiver.SignalReceiver`) are built
on it.  A refusal whose record cannot be written still stands: the decision goes
to the log instead (:func:`~sts.core.audit.log_unaudited`).  The commit is each
endpoint's own, because what an unwritable record means differs: a grant is
withheld, an accepted SET is delivered again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from .audit import AuditRecord, log_unaudited
from .ports import AuditSink, AuditUnavailable

T = TypeVar("T")
#: The exception an endpoint's decisions refuse with (OAuthError, SetRefused).
R = TypeVar("R", bound=Exception)


def _nothing() -> None:
    return None


class AuditedEndpoint(Generic[R]):
    """Base of an endpoint whose every decision, whatever its outcome, leaves one audit record.

    A subclass names its refusal type, its logger and what a log line calls its
    decision, and says how a refusal reads in the record (:meth:`refusal_fields`) and
    what an unexpected failure is answered with (:meth:`unexpected_failure`).  The
    sink is read at each write, so a replaced ``audit`` takes effect at once.
    """

    audit: AuditSink
    #: What a decision raises to refuse; anything else it raises is a bug.
    refusal: type[R]
    #: Unexpected failures and decisions that could not be audited are logged here.
    logger: logging.Logger
    #: A decision, as a log line names it ("token exchange").
    decision_name: str

    def refusal_fields(self, exc: R) -> tuple[str, str, str]:
        """The refusal as the record holds it: error code, reason tag, operator detail."""
        raise NotImplementedError

    def unexpected_failure(self, reason: str) -> R:
        """The answer to a decision that failed unexpectedly (it says nothing of the cause)."""
        raise NotImplementedError

    def entering_audit(self) -> None:
        """Called before each write of a record (the exchange starts its ``audit`` stage)."""
        return None

    def decide_and_record(
        self,
        record: AuditRecord,
        decide: Callable[[], T],
        commit: Callable[[T], None],
        *,
        abandon: Callable[[], None] = _nothing,
        refused: Callable[[R], None] | None = None,
    ) -> T:
        """``decide()``, record its outcome, and return its result once ``commit(result)`` returned.

        ``abandon`` gives back what an unfinished decision set aside (reserved single uses);
        ``refused`` runs after a refusal's record is written.  ``commit`` raises when the
        record cannot be committed, and the result is then never returned.
        """
        try:
            result = decide()
        except self.refusal as exc:
            abandon()
            self.record_refusal(record, exc)
            if refused is not None:
                refused(exc)
            raise
        except Exception as exc:
            # A bug must never become a grant: refuse, record, and say nothing of the cause.
            abandon()
            self.logger.exception(
                "%s failed unexpectedly (request %s)", self.decision_name, record.request_id
            )
            answer = self.unexpected_failure("internal.unexpected")
            record.outcome = "error"
            record.error = self.refusal_fields(answer)[0]
            record.reasons.append(f"internal.{type(exc).__name__}")
            self.write_refusal(record)
            raise answer from None
        self.entering_audit()
        commit(result)
        return result

    def record_refusal(self, record: AuditRecord, exc: R) -> None:
        """Fill the refusal into ``record`` and write it."""
        record.refuse(*self.refusal_fields(exc))
        self.write_refusal(record)

    def write_refusal(self, record: AuditRecord) -> None:
        self.entering_audit()
        try:
            self.audit.write(record)
        except AuditUnavailable as exc:
            # The refusal stands either way; the decision goes to the log instead.
            log_unaudited(self.logger, record, str(exc))
