"""The audit record: a value filled in along the pipeline, written whatever the outcome.

It holds hashes and claim summaries, never a token or a secret.  The
adapter in :mod:`sts.adapters.sql` commits it; a token is only returned to the
caller once its record is committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, fields
from typing import Any


def token_hash(token: str) -> str:
    """SHA-256 of a token, hex: lets a reviewer match a token they hold to a decision."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class AuditRecord:
    """What was asked, who asked, what was decided and why.

    ``outcome`` is ``granted`` or ``refused`` (``error`` for server faults).
    ``reasons`` lists machine-readable tags, e.g. ``policy.rule_matched`` or
    ``subject_token.expired``; ``details`` holds free-form evidence.
    """

    event_id: str
    time: float
    request_id: str
    endpoint: str
    source_ip: str | None = None
    user_agent: str | None = None
    outcome: str = "refused"
    error: str | None = None
    client_id: str | None = None
    client_auth_method: str | None = None
    issuer: str | None = None
    subject: str | None = None
    subject_token_type: str | None = None
    subject_token_sha256: str | None = None
    subject_token_jti: str | None = None
    subject_token_iat: float | None = None
    actor_issuer: str | None = None
    actor_subject: str | None = None
    actor_token_sha256: str | None = None
    requested_audience: list[str] = field(default_factory=list)
    requested_resource: list[str] = field(default_factory=list)
    requested_scope: list[str] | None = None
    requested_lifetime: int | None = None
    requested_token_type: str | None = None
    granted_audience: list[str] = field(default_factory=list)
    granted_scope: list[str] = field(default_factory=list)
    granted_lifetime: int | None = None
    rule: str | None = None
    reasons: list[str] = field(default_factory=list)
    issued_jti: str | None = None
    issued_exp: float | None = None
    issued_kid: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def refuse(self, error: str, reason: str, detail: str = "") -> None:
        self.outcome = "refused"
        self.error = error
        self.reasons.append(reason)
        if detail:
            self.details.setdefault("detail", detail)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy.  Shallow on purpose: it is built on every decision, and
        ``dataclasses.asdict``'s recursive deep copy cost more than the rest of the record."""
        out = {name: getattr(self, name) for name in _FIELD_NAMES}
        for name in (
            "requested_audience",
            "requested_resource",
            "granted_audience",
            "granted_scope",
            "reasons",
        ):
            out[name] = list(out[name])
        if self.requested_scope is not None:
            out["requested_scope"] = list(self.requested_scope)
        out["details"] = dict(self.details)
        return out


_FIELD_NAMES = tuple(f.name for f in fields(AuditRecord))


#: The fields of a decision written to the log when its audit record cannot be committed: who
#: asked, what was decided and why.  Hashes and identifiers only; no token, secret or evidence.
_LOGGED_FIELDS = (
    "event_id",
    "time",
    "request_id",
    "endpoint",
    "outcome",
    "error",
    "reasons",
    "client_id",
    "issuer",
    "subject",
    "actor_issuer",
    "actor_subject",
    "subject_token_sha256",
    "rule",
    "issued_jti",
    "source_ip",
)


def log_unaudited(
    logger: logging.Logger, record: AuditRecord, failure: str, *, outcome: str | None = None
) -> None:
    """Write a decision whose audit record could not be committed to the log, so that none is lost.

    One line, ``decision not audited (<failure>): {json}``; the same summary is attached
    to the log record as ``decision`` for structured handlers.  ``outcome`` overrides the
    record's (``withheld`` for a grant whose token was never sent).
    """
    summary = {name: getattr(record, name) for name in _LOGGED_FIELDS}
    summary["reasons"] = list(record.reasons)
    if outcome is not None:
        summary["outcome"] = outcome
    summary["audit_failure"] = failure
    logger.error(
        "decision not audited (%s): %s",
        failure,
        json.dumps(summary, default=str, sort_keys=True),
        extra={"decision": summary},
    )
