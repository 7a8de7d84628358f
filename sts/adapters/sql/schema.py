"""The tables of the audit and state database: the model the migrations are checked against.

:data:`metadata` holds every table the adapters of this package read and write.
Deployed databases get them only through the migrations (:mod:`sts.migrations`,
whose Alembic environment compares this model with ``versions/``).  This module
imports nothing of this project, so the migrations can read it without importing
the adapters that use the tables.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
    type_coerce,
)

metadata = MetaData()

_STEP_UP = text("error = 'insufficient_user_authentication'")
_HAS_CLIENT = text("client_id IS NOT NULL")
_HAS_ERROR = text("error IS NOT NULL")
audit_events = Table(
    "audit_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    # The hash chain (sts/core/audit_chain.py): ``hash`` commits to ``prev_hash``, the chain, ``seq``
    # and the record.  NULL on records written before the trail was chained.
    Column("chain_id", String(32)),
    Column("seq", BigInteger),
    Column("prev_hash", String(64)),
    Column("hash", String(64)),
    # Indexes only where a query of the service looks things up: each index is paid for on every
    # decision (revision 0006 dropped those on the token hash, the issued jti and time alone).
    Column("event_id", String(36), nullable=False),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("endpoint", String(32), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("error", String(64)),
    Column("client_id", String(128)),
    Column("client_auth_method", String(32)),
    Column("issuer", String(64)),
    # No index of its own: a filter on the subject alone (``sts audit tail --subject``) reads the
    # identity index below, issuer by issuer (sts/adapters/sql/subject_lookup.py; revision 0007).
    Column("subject", String(512)),
    Column("subject_token_type", String(128)),
    Column("subject_token_sha256", String(64)),
    Column("subject_token_jti", String(256)),
    Column("actor_issuer", String(64)),
    Column("actor_subject", String(512)),
    Column("actor_token_sha256", String(64)),
    Column("rule", String(128)),
    Column("issued_jti", String(64)),
    Column("issued_exp", Float),
    Column("issued_kid", String(128)),
    Column("source_ip", String(64)),
    Column("record", JSON, nullable=False),
    # What `sts audit` and the review page filter and aggregate by (sts/adapters/audit_query.py):
    # keyset pages by id within an identity, client, outcome or rule; decisions over time by outcome.
    Index("ix_audit_events_identity", "issuer", "subject", "id"),
    # Partial: a decision without a client (a public client, or a refusal before the client was
    # known) is never found by a client filter, so it does not pay for the index either.
    Index(
        "ix_audit_events_by_client",
        "client_id",
        "id",
        sqlite_where=_HAS_CLIENT,
        postgresql_where=_HAS_CLIENT,
    ),
    # Partial: a grant has no error, so the exchanges that grant do not pay for it (0009).
    Index(
        "ix_audit_events_by_error",
        "error",
        "id",
        sqlite_where=_HAS_ERROR,
        postgresql_where=_HAS_ERROR,
    ),
    Index("ix_audit_events_outcome", "outcome", "id"),
    Index("ix_audit_events_rule", "rule", "id"),
    Index("ix_audit_events_time_outcome", "time", "outcome"),
    # Step-ups per identity: a partial index, so only those refusals pay for it.
    Index(
        "ix_audit_events_step_ups",
        "issuer",
        "subject",
        "id",
        sqlite_where=_STEP_UP,
        postgresql_where=_STEP_UP,
    ),
)

# Summaries of the audit trail for `sts audit` and the review page (sts/adapters/audit_query.py),
# filled after the records are written: what their JSON holds that reviewers filter and chart by.
#: The watermark: every record with ``id <= last_id`` is summarised.
audit_summary_state = Table(
    "audit_summary_state",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("last_id", BigInteger, nullable=False),
)

#: What a decision's JSON holds that reviewers filter by: ``signal`` (fired) and ``audience`` terms.
audit_terms = Table(
    "audit_terms",
    metadata,
    Column("kind", String(16), primary_key=True),
    Column("value", String(256), primary_key=True),
    Column("audit_id", BigInteger, primary_key=True),
    Column("time", Float, nullable=False),
    Index("ix_audit_terms_time", "kind", "time", "value"),
    Index("ix_audit_terms_audit_id", "audit_id"),
)

#: Subject-to-audience edges of granted decisions, keyed by a digest of (issuer, subject, audience).
audit_edges = Table(
    "audit_edges",
    metadata,
    Column("edge", String(64), primary_key=True),
    Column("issuer", String(64)),
    Column("subject", String(512)),
    Column("audience", String(512), nullable=False),
    Column("first_seen", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("decisions", BigInteger, nullable=False),
    Index("ix_audit_edges_last_seen", "last_seen"),
)

#: Decisions per hour (epoch seconds of its start, UTC) and outcome, for charts over long windows.
audit_counts = Table(
    "audit_counts",
    metadata,
    Column("hour", BigInteger, primary_key=True),
    Column("outcome", String(16), primary_key=True),
    Column("decisions", BigInteger, nullable=False),
)


#: Verification walks each chain in ``seq`` order; being unique, it also keeps two records off one link.
Index("ux_audit_events_chain_seq", audit_events.c.chain_id, audit_events.c.seq, unique=True)

audit_chains = Table(
    "audit_chains",
    metadata,
    # One row per hash chain of the audit trail, committed with the chain's first record.  Every
    # writer (an audit sink in one process) appends to chains of its own.
    Column("chain_id", String(32), primary_key=True),
    Column("started_at", Float, nullable=False),
    Column("writer", String(200), nullable=False),
    Column("genesis_hash", String(64), nullable=False),
    # Where verification starts: seq 0 and the genesis hash, or, once retention has removed the
    # chain's oldest records, the seq and hash of the last one removed.
    Column("anchor_seq", BigInteger, nullable=False),
    Column("anchor_hash", String(64), nullable=False),
    Column("pruned_at", Float),
)

#: What the trail says of itself, in one row (``name`` = ``"trail"``; revision 0011): how many
#: records were written before chaining began and the highest id among them (any other record
#: without a chain came later), and the newest prune's cutoff: every record with an id below
#: ``pruned_below`` was removed, and the counts of the hours before ``pruned_before`` (a time) with
#: them.  An outside audit found a forged record passed for a pre-chaining one, and a chain's
#: oldest records deleted by hand passed for a prune, while nothing recorded either.
audit_trail = Table(
    "audit_trail",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("prechain_records", BigInteger, nullable=False),
    Column("prechain_highest_id", BigInteger),
    Column("pruned_below", BigInteger),
    Column("pruned_before", Float),
)

replay_entries = Table(
    "replay_entries",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),
)


heartbeats = Table(
    "heartbeats",
    metadata,
    # One row per serving process (host:pid), rewritten by each readiness check: a commit
    # proves the audit database takes writes, which a SELECT does not.
    Column("instance", String(200), primary_key=True),
    Column("checked_at", Float, nullable=False),
)

subject_states = Table(
    "subject_states",
    metadata,
    Column("identity", String(600), primary_key=True),
    Column("state", String(4000), nullable=False),
    Column("expires_at", Float, nullable=False),
)

baselines = Table(
    "baselines",
    metadata,
    Column("identity", String(600), primary_key=True),
    Column("baseline", String(16000), nullable=False),
    Column("expires_at", Float, nullable=False),
    #: The identity's recent refusals (a JSON array of times), kept apart from ``baseline``, which a
    #: grant writes back whole (revision 0010); NULL: those of ``baseline``.
    Column("failures", String(2000)),
    #: The identity's drift state (confirmed facts, pending values with their probation, how each
    #: was confirmed, earlier keys: :func:`sts.core.drift.drift_to_json`), kept apart from
    #: ``baseline``, which a grant writes back whole (revision 0012); NULL: that of ``baseline``.
    Column("drift", String(16000)),
    #: The identity's counters (:mod:`sts.core.baseline_counts`: grants, the rate window's start
    #: and count, the usual rate), which a grant advances from the stored ones rather than writing
    #: back those it read, and the ``first_seen`` of the baseline they count (revision 0013);
    #: NULL: those of ``baseline``.
    Column("grants", BigInteger),
    Column("window_start", Float),
    Column("window_count", BigInteger),
    Column("usual_rate", Float),
    Column("counts_first_seen", Float),
)

revoked_tokens = Table(
    "revoked_tokens",
    metadata,
    Column("identity", String(600), primary_key=True),
    Column("revoked", String(16), nullable=False),
    Column("expires_at", Float, nullable=False),
)

ledger_epochs = Table(
    "ledger_epochs",
    metadata,
    Column("identity", String(600), primary_key=True),
    Column("epoch", String(600), nullable=False),
    Column("expires_at", Float, nullable=False),
)

#: Rate-limit state (:mod:`sts.adapters.sql.rate_limits`): one GCRA theoretical arrival time per key.
#: A row whose ``tat`` has passed means nothing any more and is purged now and then.
rate_limits = Table(
    "rate_limits",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("tat", Float, nullable=False),
    Column("tolerance", Float, nullable=False),
)

#: The oldest schema revision whose code may run on this schema (one row), written by each upgrade:
#: a version that finds a revision it does not know runs on it if it knows this one
#: (:mod:`sts.migrations`).
schema_readers = Table(
    "schema_readers",
    metadata,
    Column("oldest_reader", String(64), primary_key=True),
)

#: A record as stored, its JSON text (the driver's JSON reader would fail on one edited by hand
#: into something else; readers parse it with :func:`sts.core.audit_views.readable_record`).
STORED_RECORD = type_coerce(audit_events.c.record, Text)
