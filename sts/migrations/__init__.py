"""Schema migrations of the audit and state database (Alembic), run from the package itself.

The revisions are in ``versions/``; the first one is the schema of the first
release (0.1.0), each later one a change since.  Alembic runs them
programmatically (:func:`upgrade`), in one transaction that holds the schema lock
(:func:`sts.adapters.sql.engines.schema_transaction`: a PostgreSQL advisory lock, SQLite's
write lock), so that any number of workers and instances may upgrade at once:
the first one migrates, the others find the schema current.  PostgreSQL and
SQLite both run DDL in a transaction: a failed upgrade leaves nothing half done.

A database created before migrations existed has the 0.1.0 tables and no
``alembic_version`` table: :func:`upgrade` recognises it, stamps it at the first
revision (its schema is exactly that revision's) and upgrades it from there.

No ``alembic.ini`` is needed: :func:`config` builds Alembic's configuration.

A revision read from the database (``alembic_version``, ``schema_readers``) is written into a
message only escaped (:func:`~sts.core.terminal_text.printable`): whoever can write the database
chooses it, and ``sts db current`` printed a terminal control sequence in it raw (an outside audit).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, delete, insert, inspect, select

from ..adapters.sql.engines import schema_transaction, where
from ..adapters.sql.schema import metadata, schema_readers
from ..core.terminal_text import printable

log = logging.getLogger(__name__)
# Alembic narrates every step at INFO ("Context impl SQLiteImpl."); this module logs what changed.
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)

SCRIPT_LOCATION = Path(__file__).resolve().parent
#: The revision whose schema is that of release 0.1.0, the first release.
FIRST_REVISION = "0001_v0_1_0"
#: The tables 0.1.0 created (with ``metadata.create_all``, before migrations existed).
RELEASE_0_1_0_TABLES = frozenset(
    {"audit_events", "replay_entries", "subject_states", "baselines", "revoked_tokens"}
)

#: Alembic's ``context`` and ``op`` are process-wide proxies: one migration at a time per process
#: (the schema lock orders processes; this orders the threads of one).
_PROCESS_LOCK = threading.Lock()


class SchemaError(Exception):
    """The database's schema cannot be used or migrated as it is; the message says why and what to do."""


class SchemaBehind(SchemaError):
    """The schema is older than this version's, and migrating at start is off."""


@dataclass(frozen=True)
class Upgrade:
    """What :func:`upgrade` did: the revision before (None: no ``alembic_version``) and after."""

    before: str | None
    after: str | None
    stamped: bool = False


def config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, without a file; ``connection`` is the one the migrations run on."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION).replace("%", "%%"))
    # A new revision's file is named by its id alone (``0003_rate_limits.py``).
    cfg.set_main_option("file_template", "%%(rev)s")
    cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(config())


def head() -> str:
    """This version's newest revision (one head: the revisions form a line)."""
    current_head = scripts().get_current_head()
    assert current_head is not None
    return current_head


def current(conn: Connection) -> str | None:
    """The revision recorded in ``alembic_version``; None when the table is absent or empty.
    Raises :class:`SchemaError` when it holds more than one (not a schema this service wrote)."""
    try:
        return MigrationContext.configure(conn).get_current_revision()
    except CommandError as exc:
        raise SchemaError(f"alembic_version is not one revision ({printable(exc)})") from None


def known_revisions() -> frozenset[str]:
    return frozenset(s.revision for s in scripts().walk_revisions())


def oldest_reader(revision: str) -> str:
    """The oldest revision whose code runs on the schema ``revision`` leaves: the revision's
    ``oldest_reader`` (see ``versions/0008_schema_readers.py``), else the revision itself."""
    script = scripts().get_revision(revision)
    declared = getattr(script.module, "oldest_reader", None) if script is not None else None
    return declared if isinstance(declared, str) else revision


def recorded_reader(conn: Connection) -> str | None:
    """The ``oldest_reader`` the schema records (``schema_readers``), None without one."""
    if not inspect(conn).has_table(schema_readers.name):
        return None
    rows = conn.execute(select(schema_readers.c.oldest_reader).limit(2)).scalars().all()
    # Exactly one: two (a hand edit) would leave the answer to the order they are read in.
    return rows[0] if len(rows) == 1 and isinstance(rows[0], str) else None


def _newer_but_readable(conn: Connection, revision: str | None) -> str | None:
    """None for a revision this version knows (or none at all); for a newer one, the oldest reader
    it records, when this version is one of those (it runs on the schema as it is).  Raises
    :class:`SchemaError` for a newer schema this version may not run on."""
    if revision is None or revision in known_revisions():
        return None
    reader = recorded_reader(conn)
    if reader is not None and reader in known_revisions():
        return reader
    raise SchemaError(
        f"schema at revision {printable(revision)}, which this version does not know (a newer version "
        "migrated it?) and which does not record that this version may run on it: run a version that "
        "knows it; downgrades are not supported"
    )


def _newer(revision: str, reader: str) -> str:
    return (
        f"schema at revision {printable(revision)}, newer than this version's {head()}; it records that "
        f"versions from {printable(reader)} on run on it"
    )


def _record_reader(conn: Connection, revision: str | None) -> None:
    """Write the oldest reader of ``revision`` (the schema's revision after an upgrade), once the
    schema has the table for it."""
    if revision is None or not inspect(conn).has_table(schema_readers.name):
        return
    reader = oldest_reader(revision)
    if recorded_reader(conn) != reader:
        conn.execute(delete(schema_readers))
        conn.execute(insert(schema_readers).values(oldest_reader=reader))


def _our_tables(conn: Connection) -> set[str]:
    names = set(metadata.tables) | RELEASE_0_1_0_TABLES
    return set(inspect(conn).get_table_names()) & names


def _unversioned(conn: Connection) -> bool:
    """True for a database made before migrations (stamp it); False for an empty one (create all).

    Raises :class:`SchemaError` for one with only some of the 0.1.0 tables: not something
    this service made, or damaged; nothing is changed then."""
    present = _our_tables(conn)
    if not present:
        return False
    missing = RELEASE_0_1_0_TABLES - present
    if missing:
        raise SchemaError(
            "no alembic_version table, and only some of the tables of 0.1.0 (missing: "
            f"{', '.join(sorted(missing))}): not a schema this service created; refusing to migrate it"
        )
    return True


def upgrade(engine: Engine, revision: str = "head") -> Upgrade:
    """Bring the schema to ``revision`` (default: this version's newest), under the schema lock.

    A database without ``alembic_version`` but with the tables of 0.1.0 is stamped at
    :data:`FIRST_REVISION` first.  Raises :class:`SchemaError` for a schema this
    version cannot migrate, SQLAlchemy's errors when the database fails.
    """

    if revision != "head" and revision not in known_revisions():
        # Checked here: alembic meets some malformed targets ('', 'head+99') with an assertion.
        raise SchemaError(f"unknown revision {revision[:80]!r}: head, or one of `sts db history`")

    def work(conn: Connection) -> Upgrade:
        before = current(conn)
        if _newer_but_readable(conn, before) is not None:
            return Upgrade(before, before)  # newer than this version's, and it runs on it
        stamped = False
        cfg = config(conn)
        try:
            if before is None and _unversioned(conn):
                command.stamp(cfg, FIRST_REVISION)
                stamped = True
            command.upgrade(cfg, revision)
        except CommandError as exc:  # An unknown or older target revision, say.
            raise SchemaError(printable(exc)) from None
        after = current(conn)
        _record_reader(conn, after)
        return Upgrade(before, after, stamped)

    with _PROCESS_LOCK:
        done = schema_transaction(engine, work)
    if done.stamped:
        log.info(
            "database %s: the schema of 0.1.0, made before migrations, recognised and stamped at %s",
            where(engine),
            FIRST_REVISION,
        )
    if done.after != done.before:
        log.info(
            "database %s: schema upgraded from %s to %s",
            where(engine),
            done.before or ("0.1.0" if done.stamped else "nothing"),
            done.after,
        )
    return done


def _behind(conn: Connection, revision: str | None) -> str:
    """Why a schema that this version knows is not current."""
    want = head()
    if revision is not None:
        return f"schema at revision {printable(revision)}, this version needs {want}"
    if _unversioned(conn):
        return f"the schema of 0.1.0, made before migrations (no alembic_version); this version needs {want}"
    return f"no schema yet; this version needs {want}"


def state(engine: Engine) -> tuple[bool, str]:
    """Whether the schema is current, and a line that says where it stands (``sts db current``)."""
    with engine.connect() as conn:
        revision = current(conn)
        if revision == head():
            return True, f"schema at {revision} (head)"
        try:
            reader = _newer_but_readable(conn, revision)
        except SchemaError as exc:
            return False, str(exc)
        if reader is not None and revision is not None:
            return True, _newer(revision, reader)
        return False, _behind(conn, revision)


def ensure(engine: Engine, *, migrate: bool) -> None:
    """Make sure the schema is this version's: upgrade it if ``migrate``, else refuse.

    When the schema is current this is one short read, no lock.  Raises
    :class:`SchemaBehind` when it is not and ``migrate`` is off, :class:`SchemaError`
    when it cannot be migrated, SQLAlchemy's errors when the database fails.
    """
    with engine.connect() as conn:
        revision = current(conn)
        if revision == head():
            return
        reader = _newer_but_readable(conn, revision)
        if reader is not None and revision is not None:
            log.info("database %s: %s", where(engine), _newer(revision, reader))
            return
        if not migrate:
            raise SchemaBehind(
                f"{_behind(conn, revision)}: run `sts db upgrade`, or set database_migrate_on_start: true"
            )
    upgrade(engine)


def history() -> list[tuple[str, str | None, str]]:
    """Every revision, oldest first: (revision, the one it follows, the first line of its description)."""
    revisions = []
    for script in scripts().walk_revisions():
        down = script.down_revision
        assert down is None or isinstance(down, str), "the revisions must form a line"
        revisions.append((script.revision, down, (script.doc or "").strip().splitlines()[0]))
    return list(reversed(revisions))
