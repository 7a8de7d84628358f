"""The decision log: one structured line per decision, once its audit record is committed.

Every audit record committed (an exchange, an introspection, a revocation, a
Security Event Token) also becomes one line on the logger ``sts.decision``::

    INFO sts.decision: token refused invalid_target policy.target_not_allowed rule=- client=gateway
        subject=github-actions|repo:acme/app:ref:refs/heads/main request_id=deploy-4711
        trace_id=4bf92f3577b34da6a3ce929d0e0e4736

with the summary attached to the log record as ``decision`` (``outcome``,
``error``, ``reason``, ``rule``, ``request_id``, ``trace_id``...) for the JSON
format: the same name and shape as the line written for a decision whose
record could *not* be committed (:func:`sts.core.audit.log_unaudited`, at
``ERROR``), so that every decision is in the log exactly once.  Like the audit
record it holds token hashes and identifiers, never a token or a secret.  The
decision also goes on the request's trace span, as attributes.

:class:`LoggedSqlAuditSink` does it, for a record committed alone and for one
committed together with the use of a single-use subject token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..core.audit import AuditRecord
from ..core.ports import BaselineUpdate, SingleUse
from .sql.audit_sink import SqlAuditSink
from .tracing import annotate

decision_log = logging.getLogger("sts.decision")


def decision_summary(record: AuditRecord) -> dict[str, Any]:
    """What was asked, by whom, what was decided and why (no value that is None)."""
    limited = record.details.get("rate_limit")
    summary = {
        "event_id": record.event_id,
        "endpoint": record.endpoint,
        "outcome": record.outcome,
        "error": record.error,
        "reason": record.reasons[-1] if record.reasons else None,
        "reasons": list(record.reasons),
        "rule": record.rule,
        "client_id": record.client_id,
        "issuer": record.issuer,
        "subject": record.subject,
        "actor_issuer": record.actor_issuer,
        "actor_subject": record.actor_subject,
        "source_ip": record.source_ip,
        "request_id": record.request_id,
        "trace_id": record.details.get("trace_id"),
        "granted_audience": list(record.granted_audience) or None,
        "granted_scope": list(record.granted_scope) or None,
        "granted_lifetime": record.granted_lifetime,
        "issued_jti": record.issued_jti,
        "subject_token_sha256": record.subject_token_sha256,
        "rate_limit": dict(limited) if isinstance(limited, dict) else None,
    }
    return {name: value for name, value in summary.items() if value is not None}


def log_decision(record: AuditRecord, logger: logging.Logger = decision_log) -> None:
    """Write the committed ``record`` to the decision log and onto the request's span."""
    annotate(
        {
            "sts.decision": record.outcome,
            "sts.error": record.error,
            "sts.rule": record.rule,
            "sts.reason": record.reasons[-1] if record.reasons else None,
        }
    )
    level = logging.WARNING if record.outcome == "error" else logging.INFO
    if not logger.isEnabledFor(level):
        return  # Nothing to build the summary for.
    summary = decision_summary(record)
    subject = f"{record.issuer}|{record.subject}" if record.issuer and record.subject else record.subject
    logger.log(
        level,
        "%s %s %s %s rule=%s client=%s subject=%s request_id=%s trace_id=%s",
        record.endpoint,
        record.outcome,
        record.error or "-",
        summary.get("reason", "-"),
        _shown(record.rule),
        _shown(record.client_id),
        _shown(subject),
        _shown(record.request_id),
        summary.get("trace_id", "-"),
        extra={"decision": summary},
    )


def _shown(value: str | None) -> str:
    """A value for the text line: bounded, and one line whatever it holds (a refused request's
    ``client_id`` is the caller's own text, and must not forge a log line)."""
    if not value:
        return "-"
    value = value[:300]
    if value.isprintable() and " " not in value:
        return value
    return repr(value)


class LoggedSqlAuditSink(SqlAuditSink):
    """The audit sink, logging each decision once its record is committed.

    Both ways a record is committed are covered: alone (:meth:`write`) and together
    with the uses of single-use credentials (:meth:`write_with_uses`, the
    single-use ledger's commit).  A record that cannot be committed raises as
    before and is not logged here: the pipeline logs it with
    :func:`~sts.core.audit.log_unaudited`.
    """

    def write(self, record: AuditRecord) -> None:
        super().write(record)
        log_decision(record)

    def write_with_uses(
        self,
        record: AuditRecord,
        uses: Sequence[SingleUse],
        now: float,
        baseline: BaselineUpdate | None = None,
    ) -> None:
        super().write_with_uses(record, uses, now, baseline)
        log_decision(record)
