"""The decision log: one structured line per decision, next to the audit record it summarises.

:class:`LoggedAuditSink` wraps the audit sink: every record written (an
exchange, an introspection, a revocation, a Security Event Token) also
becomes one line on the logger ``sts.decision``, after the commit was tried::

    INFO sts.decision: token refused invalid_target policy.target_not_allowed rule=- client=gateway
        subject=github-actions|repo:acme/app:ref:refs/heads/main request_id=deploy-4711
        trace_id=4bf92f3577b34da6a3ce929d0e0e4736

with the same values as fields (``decision``, ``error``, ``reason``, ``rule``,
``request_id``, ``trace_id``...) for the JSON format.  Like the audit record
it holds token hashes and identifiers, never a token or a secret.  The line is
written whether or not the commit succeeded (``audit_committed``), so an audit
outage still leaves a trace of what was decided.  The decision also goes on the
request's trace span as attributes.
"""

from __future__ import annotations

import logging
from typing import Any

from ..core.audit import AuditRecord
from ..core.ports import AuditSink, AuditUnavailable
from .tracing import annotate

decision_log = logging.getLogger("sts.decision")


def decision_fields(record: AuditRecord, committed: bool) -> dict[str, Any]:
    """The summary logged for ``record``: what was asked, by whom, what was decided and why."""
    limited = record.details.get("rate_limit")
    return {
        "event_id": record.event_id,
        "endpoint": record.endpoint,
        "decision": record.outcome,
        "error": record.error,
        "reason": record.reasons[-1] if record.reasons else None,
        "reasons": list(record.reasons),
        "rule": record.rule,
        "client_id": record.client_id,
        "issuer": record.issuer,
        "subject": record.subject,
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
        "audit_committed": committed,
    }


class LoggedAuditSink:
    """An :class:`~sts.core.ports.AuditSink` that writes through ``inner``, then logs the decision."""

    def __init__(self, inner: AuditSink, logger: logging.Logger = decision_log) -> None:
        self.inner = inner
        self.logger = logger

    def write(self, record: AuditRecord) -> None:
        try:
            self.inner.write(record)
        except AuditUnavailable:
            self._log(record, committed=False)
            raise
        self._log(record, committed=True)

    def _log(self, record: AuditRecord, *, committed: bool) -> None:
        fields = decision_fields(record, committed)
        annotate(
            {
                "sts.decision": record.outcome,
                "sts.error": record.error,
                "sts.rule": record.rule,
                "sts.reason": fields["reason"],
            }
        )
        level = logging.WARNING if record.outcome == "error" or not committed else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        subject = f"{record.issuer}|{record.subject}" if record.issuer and record.subject else record.subject
        self.logger.log(
            level,
            "%s %s %s %s rule=%s client=%s subject=%s request_id=%s trace_id=%s%s",
            record.endpoint,
            record.outcome,
            record.error or "-",
            fields["reason"] or "-",
            _shown(record.rule),
            _shown(record.client_id),
            _shown(subject),
            _shown(record.request_id),
            fields["trace_id"] or "-",
            "" if committed else " (audit write failed)",
            extra={k: v for k, v in fields.items() if v is not None},
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
