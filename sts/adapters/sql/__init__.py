"""SQLAlchemy adapters: the audit trail and the embedded store (SQLite or PostgreSQL).

One module per concern; this package imports none of them, so that the schema
migrations can read :mod:`.schema` alone:

* :mod:`.engines`: engines, pools, SQLite files and pragmas, lock retries, the schema lock;
* :mod:`.statements`: :class:`~.statements.RawStatement`, the per-request writes;
* :mod:`.sqlite_local`: on SQLite, one connection per process for the requests, WAL checkpoints in a thread;
* :mod:`.schema`: the tables (:data:`~.schema.metadata`), what the migrations are checked against;
* :mod:`.audit_sink`, :mod:`.chain_heads`, :mod:`.retention`: the hash-chained audit trail;
* :mod:`.replay`, :mod:`.single_use`: the replay store and single-use subject tokens;
* :mod:`.subject_state`, :mod:`.key_value`: subject state, baselines, revocations, ledger epochs;
* :mod:`.rate_limits`: rate-limit state.
"""
