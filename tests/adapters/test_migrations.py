"""Schema migrations (issue 13): a database made by the first release is upgraded with nothing lost.

``V0_1_0`` below is a frozen copy of the table definitions of release 0.1.0
(``git show 1d6e29a:sts/adapters/sql.py``), which created its schema with
``metadata.create_all``.  The tests make databases the way 0.1.0 did, fill every
table, upgrade them, and compare row by row, on SQLite and on PostgreSQL (a
private database, or a private schema through ``search_path``).  The drift test
compares the migrated database with ``sts.adapters.sql.schema.metadata``: a table,
column or index added to the model without a migration fails it (see
docs/migrations.md for how to add one).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import itertools
import json
import logging
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner, Result
from flask import Flask
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    inspect,
    select,
    text,
)

from sts import migrations
from sts.adapters.readiness import DatabaseSchema
from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.engines import make_engine, schema_transaction
from sts.adapters.sql.key_value import SqlLedgerEpochMemory, SqlRevokedTokens
from sts.adapters.sql.replay import SqlReplayCache
from sts.adapters.sql.schema import metadata
from sts.app import create_app, prepare
from sts.cli import main
from sts.dev.issuer import RunningServer
from sts.errors import ConfigurationError
from sts.settings import Settings
from sts.settings.load import load_settings
from tests.adapters.test_stores import gateway_exchange, ledger_token
from tests.support.postgres import PG_SERVER, PgSchema, private_database

NOW = 1_700_000_000.0
#: This version's newest revision (each new migration moves it; the drift test keeps it honest).
HEAD = migrations.head()

# -- the schema of release 0.1.0, frozen (do not edit: it is what deployed databases have) ------------

V0_1_0 = MetaData()
V0_1_0_AUDIT = Table(
    "audit_events",
    V0_1_0,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False),
    Column("time", DateTime(timezone=True), nullable=False, index=True),
    Column("request_id", String(128), nullable=False),
    Column("endpoint", String(32), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("error", String(64)),
    Column("client_id", String(128)),
    Column("client_auth_method", String(32)),
    Column("issuer", String(64)),
    Column("subject", String(512), index=True),
    Column("subject_token_type", String(128)),
    Column("subject_token_sha256", String(64), index=True),
    Column("subject_token_jti", String(256)),
    Column("actor_issuer", String(64)),
    Column("actor_subject", String(512)),
    Column("actor_token_sha256", String(64)),
    Column("rule", String(128)),
    Column("issued_jti", String(64), index=True),
    Column("issued_exp", Float),
    Column("issued_kid", String(128)),
    Column("source_ip", String(64)),
    Column("record", JSON, nullable=False),
)
Table(
    "replay_entries",
    V0_1_0,
    Column("key", String(200), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),
)
Table(
    "subject_states",
    V0_1_0,
    Column("identity", String(600), primary_key=True),
    Column("state", String(4000), nullable=False),
    Column("expires_at", Float, nullable=False),
)
Table(
    "baselines",
    V0_1_0,
    Column("identity", String(600), primary_key=True),
    Column("baseline", String(16000), nullable=False),
    Column("expires_at", Float, nullable=False),
)
Table(
    "revoked_tokens",
    V0_1_0,
    Column("identity", String(600), primary_key=True),
    Column("revoked", String(16), nullable=False),
    Column("expires_at", Float, nullable=False),
)


def audit_row(i: int) -> dict[str, Any]:
    granted = i % 3 != 0
    subject = f"repo:octo/app-{i}:ref:refs/heads/main" if i % 5 else "système/ünïcode-" + "x" * 490
    record = {
        "event_id": f"00000000-0000-4000-8000-{i:012d}",
        "time": NOW + i,
        "outcome": "granted" if granted else "refused",
        "subject": subject,
        "reasons": ["rule:deploy"] if granted else ["audience.not_granted"],
        "granted": {"audience": ["https://deploy.example.com"], "scope": "deploy:write"} if granted else None,
    }
    return {
        "event_id": record["event_id"],
        "time": dt.datetime.fromtimestamp(NOW + i, tz=dt.UTC),
        "request_id": f"req-{i}",
        "endpoint": "token" if i % 7 else "introspect",
        "outcome": record["outcome"],
        "error": None if granted else "invalid_target",
        "client_id": "gateway" if i % 2 else None,
        "client_auth_method": "client_secret_basic" if i % 2 else None,
        "issuer": "github-actions",
        "subject": subject,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "subject_token_sha256": f"{i:064x}",
        "subject_token_jti": f"jti-{i}" if i % 4 else None,
        "actor_issuer": "kubernetes" if i % 6 == 0 else None,
        "actor_subject": "system:serviceaccount:ci:agent" if i % 6 == 0 else None,
        "actor_token_sha256": f"{i + 1:064x}" if i % 6 == 0 else None,
        "rule": "deploy" if granted else None,
        "issued_jti": f"{i:032x}" if granted else None,
        "issued_exp": NOW + i + 300.25 if granted else None,
        "issued_kid": "kid-1" if granted else None,
        "source_ip": "2001:db8::7" if i % 2 else "10.0.0.7",
        "record": record,
    }


#: Rows in every table of 0.1.0 (the audit trail and the embedded store).
V0_1_0_ROWS: dict[str, list[dict[str, Any]]] = {
    "audit_events": [audit_row(i) for i in range(1, 41)],
    "replay_entries": [
        {"key": "subject_token:abc", "expires_at": NOW + 600},
        {"key": "client_assertion:gateway:jti-1", "expires_at": NOW + 60.5},
        {"key": "dpop:" + "k" * 190, "expires_at": NOW - 1},
    ],
    "subject_states": [
        {
            "identity": "github-actions|repo:octo/app",
            "state": json.dumps({"blocked_until": NOW + 3600}),
            "expires_at": NOW + 86400,
        },
        {"identity": "sha256:" + "e" * 64, "state": "{}", "expires_at": NOW + 1},
    ],
    "baselines": [
        {
            "identity": "github-actions|repo:octo/app",
            "baseline": json.dumps({"ips": ["10.0.0.7"] * 100}),
            "expires_at": NOW + 7 * 86400,
        },
    ],
    "revoked_tokens": [
        {"identity": "0123456789abcdef0123456789abcdef", "revoked": "1", "expires_at": NOW + 300},
        {"identity": "ffffffffffffffffffffffffffffffff", "revoked": "1", "expires_at": NOW + 1},
    ],
}


def make_0_1_0_database(engine: Engine) -> None:
    """What 0.1.0 left behind: its tables (``create_all``, no ``alembic_version``), with records."""
    V0_1_0.create_all(engine)
    with engine.begin() as conn:
        for name, rows in V0_1_0_ROWS.items():
            conn.execute(V0_1_0.tables[name].insert(), rows)


def all_rows(engine: Engine, tables: MetaData = V0_1_0) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {
            name: [tuple(row) for row in conn.execute(select(table).order_by(*table.primary_key.columns))]
            for name, table in tables.tables.items()
        }


def schema_of(engine: Engine) -> dict[str, Any]:
    """Every table's columns (type, nullability, default), primary key and indexes, as reflected."""
    found = inspect(engine)
    return {
        name: {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], c.get("default"), c.get("autoincrement"))
                for c in found.get_columns(name)
            ],
            "primary_key": found.get_pk_constraint(name)["constrained_columns"],
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), i["unique"]) for i in found.get_indexes(name)
            ),
            "unique": found.get_unique_constraints(name),
        }
        for name in sorted(found.get_table_names())
        if name != "alembic_version"
    }


def drift(engine: Engine, target: MetaData = metadata) -> list[Any]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, target))


def revision_of(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return migrations.current(conn)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Engine]]:
    """Engines on one fresh database: a SQLite file, or a private PostgreSQL schema (``search_path``)."""
    engines: list[Engine] = []
    url = f"sqlite:///{tmp_path / 'sts.sqlite'}"
    if request.param == "postgresql":
        url = request.getfixturevalue("pg").url

    def engine() -> Engine:
        engines.append(make_engine(url))
        return engines[-1]

    yield engine
    for each in engines:
        each.dispose()


# -- the first release's schema, and upgrading it --------------------------------------------------


def test_the_first_revision_is_exactly_the_schema_of_0_1_0(
    database: Callable[[], Engine], tmp_path: Path
) -> None:
    migrated = database()
    migrations.upgrade(migrated, migrations.FIRST_REVISION)
    assert revision_of(migrated) == migrations.FIRST_REVISION == "0001_v0_1_0"
    assert drift(migrated, V0_1_0) == []

    # Reflected side by side with a database made as 0.1.0 made it: the same, index names and all.
    if migrated.dialect.name == "sqlite":
        made = make_engine(f"sqlite:///{tmp_path / 'made-by-0.1.0.sqlite'}")
        V0_1_0.create_all(made)
        assert schema_of(migrated) == schema_of(made)
        made.dispose()
    else:
        schema = PgSchema(str(migrated.url.database), "made_by_0_1_0")
        schema.execute('CREATE SCHEMA "made_by_0_1_0"')
        made = make_engine(schema.url)
        V0_1_0.create_all(made)
        assert schema_of(migrated) == schema_of(made)
        made.dispose()


def test_upgrading_a_0_1_0_database_with_records_loses_none(database: Callable[[], Engine]) -> None:
    engine = database()
    make_0_1_0_database(engine)
    before = all_rows(engine)
    assert sum(len(rows) for rows in before.values()) == sum(len(rows) for rows in V0_1_0_ROWS.values())
    assert revision_of(engine) is None

    done = migrations.upgrade(engine)

    assert done == migrations.Upgrade(before=None, after=HEAD, stamped=True)
    assert revision_of(engine) == HEAD
    assert all_rows(engine) == before  # Row by row, every table of 0.1.0.
    assert drift(engine) == []
    # Today's code reads what 0.1.0 wrote, and the new tables take writes.
    audit = SqlAuditSink(engine)
    assert [r["event_id"] for r in audit.iter_all()] == [r["event_id"] for r in V0_1_0_ROWS["audit_events"]]
    assert list(audit.iter_all()) == [r["record"] for r in V0_1_0_ROWS["audit_events"]]
    assert SqlRevokedTokens(engine, clock=lambda: NOW).revoked("0123456789abcdef0123456789abcdef")
    assert not SqlReplayCache(engine).first_use("subject_token", "abc", NOW + 600, NOW)
    assert SqlReplayCache(engine).first_use("dpop", "k" * 190, NOW + 600, NOW)  # That one had expired.
    audit.check_commit("host:1", NOW)
    epochs = SqlLedgerEpochMemory(engine, clock=lambda: NOW)
    epochs.save("sts", "epoch-1")
    assert epochs.load("sts") == "epoch-1"


def test_upgrading_twice_is_a_no_op(database: Callable[[], Engine]) -> None:
    engine = database()
    make_0_1_0_database(engine)
    migrations.upgrade(engine)
    schema, rows = schema_of(engine), all_rows(engine, metadata)

    assert migrations.upgrade(engine) == migrations.Upgrade(before=HEAD, after=HEAD, stamped=False)
    migrations.ensure(engine, migrate=True)
    migrations.ensure(engine, migrate=False)
    assert schema_of(engine) == schema and all_rows(engine, metadata) == rows
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]


def test_a_fresh_database_is_migrated_from_the_first_revision(database: Callable[[], Engine]) -> None:
    engine = database()
    done = migrations.upgrade(engine)
    assert done == migrations.Upgrade(before=None, after=HEAD, stamped=False)
    assert set(inspect(engine).get_table_names()) == set(metadata.tables) | {"alembic_version"}


def test_the_migrated_schema_matches_the_model(database: Callable[[], Engine]) -> None:
    """No drift between the migrations and ``sts.adapters.sql.schema.metadata``.

    Failing?  A table, column or index was added to (or changed in) the model without
    a migration: add one in sts/migrations/versions/, as docs/migrations.md describes.
    """
    engine = database()
    migrations.upgrade(engine)
    assert drift(engine) == [], "the model changed without a migration: see docs/migrations.md"


def test_the_revisions_form_one_line_from_the_first_release() -> None:
    """Two branches that each added a migration after the same one must be put in a line when merged."""
    assert migrations.scripts().get_heads() == [migrations.head()]
    history = migrations.history()
    assert history[0][:2] == (migrations.FIRST_REVISION, None)
    for (previous, _, _), (_, down, title) in itertools.pairwise(history):
        assert down == previous and title
    assert history[-1][0] == HEAD
    # Revisions are never edited or removed once written: later ones only follow them.
    assert [revision for revision, _, _ in history[:2]] == ["0001_v0_1_0", "0002_heartbeats_ledger_epochs"]
    files = sorted(p.name for p in (migrations.SCRIPT_LOCATION / "versions").glob("*.py"))
    assert files == [f"{revision}.py" for revision, _, _ in history]


def test_the_migrations_ship_in_the_package() -> None:
    """Alembic reads env.py, the template and versions/*.py as files: each must be package data."""
    pyproject = tomllib.loads((migrations.SCRIPT_LOCATION.parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["sts"]
    package = migrations.SCRIPT_LOCATION.parent
    files = [p for p in migrations.SCRIPT_LOCATION.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert {p.name for p in files} >= {"env.py", "script.py.mako", "0001_v0_1_0.py"}
    for path in files:
        if path.suffix == ".py" and (path.parent / "__init__.py").exists():
            continue  # A module of the sts.migrations package itself.
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


def test_downgrade_and_upgrade_again(database: Callable[[], Engine]) -> None:
    engine = database()
    migrations.upgrade(engine)

    def down(conn: Any) -> None:
        command.downgrade(migrations.config(conn), "base")

    schema_transaction(engine, down)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrations.upgrade(engine)
    assert drift(engine) == []


def test_audit_events_keeps_no_index_that_no_query_reads(database: Callable[[], Engine]) -> None:
    """Revision 0006 drops the indexes no query of the service reads (each is written on every
    decision, two of them at random places) and makes the client's partial; 0007 drops the one
    on subject alone (found on the identity index instead); the ones the queries use stay, and
    the downgrades bring the old ones back."""
    engine = database()
    migrations.upgrade(engine)
    dropped = {
        "ix_audit_events_time",
        "ix_audit_events_subject_token_sha256",
        "ix_audit_events_issued_jti",
        "ix_audit_events_client",
    }
    kept = {
        "ix_audit_events_subject",
        "ix_audit_events_identity",
        "ix_audit_events_outcome",
        "ix_audit_events_rule",
        "ix_audit_events_time_outcome",
        "ix_audit_events_step_ups",
        "ux_audit_events_chain_seq",
    }
    names = {index["name"] for index in inspect(engine).get_indexes("audit_events")}
    assert names == (kept - {"ix_audit_events_subject"}) | {
        "ix_audit_events_by_client",
        "ix_audit_events_by_error",
    }
    (by_error,) = [
        i for i in inspect(engine).get_indexes("audit_events") if i["name"] == "ix_audit_events_by_error"
    ]
    assert "error IS NOT NULL" in str(next(iter(by_error["dialect_options"].values())))
    (client,) = [
        i for i in inspect(engine).get_indexes("audit_events") if i["name"] == "ix_audit_events_by_client"
    ]
    assert "client_id IS NOT NULL" in str(next(iter(client["dialect_options"].values())))

    def down_to(revision: str) -> Callable[[Any], None]:
        return lambda conn: command.downgrade(migrations.config(conn), revision)

    schema_transaction(engine, down_to("0008_schema_readers"))
    names = {index["name"] for index in inspect(engine).get_indexes("audit_events")}
    assert names == (kept - {"ix_audit_events_subject"}) | {"ix_audit_events_by_client"}
    schema_transaction(engine, down_to("0006_audit_write_indexes"))
    names = {index["name"] for index in inspect(engine).get_indexes("audit_events")}
    assert names == kept | {"ix_audit_events_by_client"}
    schema_transaction(engine, down_to("0005_audit_queries"))
    names = {index["name"] for index in inspect(engine).get_indexes("audit_events")}
    assert names == kept | dropped
    migrations.upgrade(engine)
    assert drift(engine) == []


def test_an_invalid_error_index_left_by_a_failed_concurrent_build_is_built_again(pg: PgSchema) -> None:
    """0009 advises building its index beforehand with ``CREATE INDEX CONCURRENTLY``; one that
    failed or was cancelled leaves an INVALID index of the name, which the revision skipped (its
    queries then scanned the trail; an outside re-check).  PostgreSQL only: SQLite has no such
    state (it builds an index whole or not at all)."""
    engine = make_engine(pg.url)
    migrations.upgrade(engine, "0008_schema_readers")
    valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('ix_audit_events_by_error')"
    with engine.begin() as conn:
        conn.execute(
            text("CREATE INDEX ix_audit_events_by_error ON audit_events (error, id) WHERE error IS NOT NULL")
        )
        # What a cancelled CREATE INDEX CONCURRENTLY leaves behind.
        invalidate = "UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass('{}')"
        conn.execute(text(invalidate.format("ix_audit_events_by_error")))
        assert conn.execute(text(valid)).scalar() is False
    migrations.upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(text(valid)).scalar() is True
    assert drift(engine) == []
    engine.dispose()


def test_a_database_between_0_1_0_and_migrations_is_upgraded(database: Callable[[], Engine]) -> None:
    """Versions after 0.1.0 made heartbeats with create_all, before migrations existed."""
    engine = database()
    make_0_1_0_database(engine)
    metadata.tables["heartbeats"].create(engine)
    with engine.begin() as conn:
        conn.execute(metadata.tables["heartbeats"].insert(), [{"instance": "old:1", "checked_at": NOW}])
    before = all_rows(engine)

    assert migrations.upgrade(engine).stamped
    assert all_rows(engine) == before and drift(engine) == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT instance FROM heartbeats")).scalars().all() == ["old:1"]


def test_a_database_with_only_some_of_the_tables_is_left_alone(database: Callable[[], Engine]) -> None:
    engine = database()
    V0_1_0.tables["audit_events"].create(engine)
    with pytest.raises(migrations.SchemaError, match="missing: baselines, replay_entries"):
        migrations.upgrade(engine)
    assert set(inspect(engine).get_table_names()) == {"audit_events"}


def test_a_schema_from_a_newer_version_is_refused(database: Callable[[], Engine]) -> None:
    engine = database()
    migrations.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
        # A later revision that removed something this version uses names itself the oldest reader.
        conn.execute(text("UPDATE schema_readers SET oldest_reader = '0099_from_the_future'"))
    for migrate in (True, False):
        with pytest.raises(
            migrations.SchemaError, match="0099_from_the_future, which this version does not know"
        ):
            migrations.ensure(engine, migrate=migrate)
    assert migrations.state(engine)[0] is False
    with engine.begin() as conn:  # a schema that records no reader at all: refused too
        conn.execute(text("DELETE FROM schema_readers"))
    with pytest.raises(migrations.SchemaError, match="does not record that this version may run on it"):
        migrations.ensure(engine, migrate=True)


def test_a_schema_record_edited_by_hand_fails_closed(database: Callable[[], Engine]) -> None:
    """Two ``schema_readers`` rows left the verdict to the order they were read in, and two
    ``alembic_version`` rows ended ``sts db current`` in a traceback (an outside audit)."""
    engine = database()
    migrations.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
        conn.execute(text("INSERT INTO schema_readers (oldest_reader) VALUES ('0090_unknown')"))
    with pytest.raises(migrations.SchemaError, match="does not record that this version may run on it"):
        migrations.ensure(engine, migrate=True)
    assert migrations.state(engine)[0] is False
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM schema_readers WHERE oldest_reader = '0090_unknown'"))
        conn.execute(text("INSERT INTO alembic_version (version_num) VALUES ('0008_schema_readers')"))
    with pytest.raises(migrations.SchemaError, match="not one revision"):
        migrations.state(engine)
    with pytest.raises(migrations.SchemaError, match="not one revision"):
        migrations.ensure(engine, migrate=True)


def test_each_upgrade_records_the_oldest_version_that_may_run_on_the_schema(
    database: Callable[[], Engine],
) -> None:
    engine = database()
    migrations.upgrade(engine)
    with engine.connect() as conn:
        assert migrations.recorded_reader(conn) == migrations.oldest_reader(HEAD) == "0005_audit_queries"
    # A revision that declares nothing is read only by the versions that know it.
    assert migrations.oldest_reader("0004_audit_chains") == "0004_audit_chains"


def test_a_newer_schema_that_this_version_may_run_on_is_current(database: Callable[[], Engine]) -> None:
    """A rolling deploy: a process of this version started after a later version's upgrade (a
    restart, a rollback) runs, when the later schema records this version among its readers (an
    outside audit restarted an older worker after the upgrade: every request was a 503)."""
    engine = database()
    migrations.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
        conn.execute(text("UPDATE schema_readers SET oldest_reader = :head"), {"head": HEAD})
    for migrate in (True, False):
        migrations.ensure(engine, migrate=migrate)  # no error: current enough
    ready, line = migrations.state(engine)
    assert ready and "newer than this version's" in line and HEAD in line
    done = migrations.upgrade(engine)  # nothing to do, nothing changed
    assert done.before == done.after == "0099_from_the_future"
    with engine.connect() as conn:
        assert migrations.current(conn) == "0099_from_the_future"
        assert migrations.recorded_reader(conn) == HEAD


# -- several processes at once -----------------------------------------------------------------------

#: A process that upgrades ``argv[1]`` once told to go (a line on stdin), after its imports are done.
UPGRADER = """
import sys
import tomllib
from sts import migrations
from sts.adapters.sql.engines import make_engine

engine = make_engine(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
done = migrations.upgrade(engine)
print(done.before, done.after, done.stamped, flush=True)
"""


def upgrade_concurrently(url: str, count: int) -> list[str]:
    """``count`` processes upgrade ``url`` at the same moment; what each did (or its error)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", UPGRADER, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    for proc in procs:  # Go: all of them at once.
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(out.strip() if proc.returncode == 0 else f"exit {proc.returncode}: {err[-2000:]}")
    return results


@pytest.mark.parametrize("start", ["fresh", "0.1.0"])
def test_concurrent_upgrades_from_several_processes_on_postgresql(start: str) -> None:
    with private_database() as name:
        url = f"{PG_SERVER}/{name}"
        engine = make_engine(url)
        try:
            if start == "0.1.0":
                make_0_1_0_database(engine)
            before = all_rows(engine) if start == "0.1.0" else {name: [] for name in V0_1_0.tables}
            results = upgrade_concurrently(url, 4)
            # One migrated (stamping the 0.1.0 schema first); the others waited and found it current.
            migrated = f"None {HEAD} {start == '0.1.0'}"
            assert sorted(results) == sorted([migrated] + [f"{HEAD} {HEAD} False"] * 3)
            assert revision_of(engine) == HEAD and drift(engine) == []
            assert all_rows(engine) == before
        finally:
            engine.dispose()


def test_concurrent_upgrades_from_several_processes_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sts.sqlite'}"
    results = upgrade_concurrently(url, 3)
    assert sorted(results) == sorted([f"None {HEAD} False"] + [f"{HEAD} {HEAD} False"] * 2)


# -- sts db ------------------------------------------------------------------------------------------


def sts_db(*args: str, url: str, tmp_path: Path) -> Result:
    config = tmp_path / "sts.yaml"
    config.write_text(json.dumps({"database_url": url}))
    return CliRunner().invoke(main, ["--config", str(config), "db", *args], env={"STS_DATABASE_URL": None})


def test_sts_db_current_upgrade_history(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    make_0_1_0_database(engine)
    before = all_rows(engine)

    def db(*args: str, url: str = url) -> Result:
        return sts_db(*args, url=url, tmp_path=tmp_path)

    current = db("current")
    assert current.exit_code == 1
    assert current.output == (
        f"database {path}: the schema of 0.1.0, made before migrations (no alembic_version); "
        f"this version needs {HEAD}\n"
    )
    upgraded = db("upgrade")
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.output == (
        f"database {path}: schema upgraded from the schema of 0.1.0, made before migrations, to {HEAD}\n"
    )
    assert all_rows(engine) == before
    assert db("current").output == f"database {path}: schema at {HEAD} (head)\n"
    assert db("current").exit_code == 0
    assert db("upgrade").output == f"database {path}: schema already at {HEAD}\n"
    unknown = db("upgrade", "no-such-revision")
    assert unknown.exit_code == 1
    assert (
        unknown.output
        == f"Error: database {path}: unknown revision 'no-such-revision': head, or one of `sts db history`\n"
    )

    history = db("history").output.splitlines()
    assert [line.split()[0] for line in history] == [revision for revision, _, _ in migrations.history()]
    assert history[0].startswith("0001_v0_1_0  The schema of the first release, 0.1.0")
    down = db("current", url="postgresql+psycopg://postgres@127.0.0.1:1/none?connect_timeout=2")
    assert down.exit_code == 1 and down.output.startswith(
        "Error: database 127.0.0.1:1/none: OperationalError"
    )
    assert down.exception is None or isinstance(down.exception, SystemExit)
    engine.dispose()


def test_sts_db_prints_a_stored_revision_escaped(tmp_path: Path) -> None:
    """``alembic_version`` holds what whoever can write the database put there: ``sts db current``
    printed a terminal control sequence in it raw, which can erase the line and print another
    (an outside audit).  ``current`` and ``upgrade``, on a newer schema this version may run on
    and on one it may not, print it escaped."""
    path = tmp_path / "sts.sqlite"
    url = f"sqlite:///{path}"
    engine = make_engine(url)
    migrations.upgrade(engine)
    forged = "9999_future\r\x1b[2K\x1b[1A\u202eschema at head\x1b[8m"
    escaped = "9999_future\\x0d\\x1b[2K\\x1b[1A\\u202eschema at head\\x1b[8m"
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :forged"), {"forged": forged})
    readable = [sts_db("current", url=url, tmp_path=tmp_path), sts_db("upgrade", url=url, tmp_path=tmp_path)]
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM schema_readers"))  # now a newer schema this version may not run on
    refused = [sts_db("current", url=url, tmp_path=tmp_path), sts_db("upgrade", url=url, tmp_path=tmp_path)]
    engine.dispose()
    assert [r.exit_code for r in readable + refused] == [0, 0, 1, 1], [r.output for r in readable + refused]
    for result in readable + refused:
        assert f"schema at revision {escaped}" in result.output or f"schema at {escaped}" in result.output
        assert "\x1b" not in result.output and "\r" not in result.output and "\u202e" not in result.output


# -- the service: migrating at start, or refusing to be ready ---------------------------------------


@pytest.fixture
def make_app(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Flask]]:
    apps: list[Flask] = []

    def build(**overrides: Any) -> Flask:
        app = create_app(make_settings(**overrides))
        runtime = app.extensions["sts"]
        runtime.readiness.cache_seconds = 0
        runtime.schema.retry_interval = 0
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["sts"].engine.dispose()


def test_the_service_upgrades_a_0_1_0_database_at_start_and_keeps_its_records(
    make_app: Callable[..., Flask], upstream: RunningServer, tmp_path: Path
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sts.sqlite'}")  # make_settings' database
    make_0_1_0_database(engine)
    app = make_app()
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    assert gateway_exchange(client, ledger_token(upstream)).status_code == 200

    records = list(SqlAuditSink(engine).iter_all())
    assert records[:40] == [r["record"] for r in V0_1_0_ROWS["audit_events"]]
    assert [r["outcome"] for r in records[40:]] == ["granted"]
    with engine.connect() as conn:
        assert conn.execute(select(V0_1_0_AUDIT.c.id)).scalars().all() == list(range(1, 42))
    engine.dispose()


@pytest.mark.parametrize("start", ["fresh", "0.1.0"])
def test_without_migrating_at_start_a_schema_behind_keeps_the_service_not_ready(
    start: str,
    make_app: Callable[..., Flask],
    upstream: RunningServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sts.sqlite'}")
    if start == "0.1.0":
        make_0_1_0_database(engine)
    with caplog.at_level(logging.WARNING, logger="sts"):
        app = make_app(database_migrate_on_start=False)
        client = app.test_client()
        not_ready = client.get("/readyz")
        refused = gateway_exchange(client, ledger_token(upstream))
    assert not_ready.status_code == 503 and not_ready.get_json()["problems"] == ["database"]
    assert refused.status_code == 503 and refused.get_json()["error"] == "temporarily_unavailable"
    assert "access_token" not in refused.get_json()
    lines = [r.getMessage() for r in caplog.records if r.name == "sts.adapters.readiness"]
    behind = [line for line in lines if "run `sts db upgrade`" in line]
    assert len(behind) == 1, lines  # Once, however often it is checked.
    assert behind[0].startswith(f"database {tmp_path / 'sts.sqlite'}: ")
    assert ("0.1.0, made before migrations" if start == "0.1.0" else "no schema yet") in behind[0]
    assert revision_of(engine) is None  # Nothing was changed.

    migrations.upgrade(engine)  # What `sts db upgrade` does; the service needs no restart.
    assert client.get("/readyz").status_code == 200
    assert gateway_exchange(client, ledger_token(upstream)).status_code == 200
    engine.dispose()


def test_prepare_migrates_only_when_told_to(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(database_migrate_on_start=False)
    assert prepare(settings, sleep=lambda _: None) is False
    engine = make_engine(settings.database_url)
    assert revision_of(engine) is None
    assert prepare(make_settings(), sleep=lambda _: None) is True
    assert revision_of(engine) == HEAD
    engine.dispose()


def test_schema_checks_after_start_see_an_upgrade(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sts.sqlite'}")
    now = [0.0]
    schema = DatabaseSchema(engine, migrate=False, retry_interval=1.0, monotonic=lambda: now[0])
    assert schema.ensure() is False and "no schema yet" in str(schema.last_failure)
    migrations.upgrade(engine)
    assert schema.ensure() is False  # Checked again only after retry_interval.
    now[0] = 1.0
    assert schema.ensure() is True
    engine.dispose()


def test_migrate_on_start_is_a_boolean_setting(tmp_path: Path) -> None:
    config = tmp_path / "sts.yaml"
    config.write_text("database_migrate_on_start: false\n")
    assert Settings().database_migrate_on_start is True
    assert load_settings(config, environ={}).database_migrate_on_start is False
    on = load_settings(config, environ={"STS_DATABASE_MIGRATE_ON_START": "true"})
    assert on.database_migrate_on_start is True
    with pytest.raises(ConfigurationError, match="STS_DATABASE_MIGRATE_ON_START"):
        load_settings(config, environ={"STS_DATABASE_MIGRATE_ON_START": "sometimes"})
    config.write_text("database_migrate_on_start: 'no'\n")
    with pytest.raises(ConfigurationError, match="database_migrate_on_start"):
        load_settings(config, environ={})


def test_every_revision_since_the_readers_declares_its_oldest_reader() -> None:
    """docs/migrations.md: each revision names the oldest code that reads its schema; a draft of
    scripts/new-migration leaves ``...`` there, which this refuses until it is set."""
    names = sorted(p.stem for p in (migrations.SCRIPT_LOCATION / "versions").glob("[0-9]*.py"))
    assert names, "no revisions found"
    for name in names:
        if name < "0008":
            continue  # older than schema_readers: read only by versions that know them
        script = migrations.scripts().get_revision(name)
        declared = getattr(script.module, "oldest_reader", None)
        assert isinstance(declared, str) and declared <= name, (name, declared)
        assert migrations.scripts().get_revision(declared) is not None, (name, declared)
