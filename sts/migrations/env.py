"""Alembic's environment for the audit and state schema (see :mod:`sts.migrations`).

Run only through :mod:`sts.migrations` (``sts db upgrade``, and at start): the caller
passes the connection, already inside a transaction that holds the schema lock, as
``config.attributes["connection"]``; the migrations run in that transaction, so an
upgrade is committed whole or not at all.  No ``alembic.ini`` is needed.
"""

from __future__ import annotations

from alembic import context

from sts.adapters.sql.schema import metadata

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the migrations through sts.migrations (`sts db upgrade`), not alembic's command")

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things: autogenerate writes batch operations (a table copy) there.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    compare_server_default=True,
)
with context.begin_transaction():
    context.run_migrations()
