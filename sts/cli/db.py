"""``sts db``: schema migrations of the audit and state database."""

from __future__ import annotations

from typing import Any

import click

from ..core.terminal_text import printable
from ..errors import ConfigurationError
from .context import settings_from
from .database import open_database


@click.group()
def db() -> None:
    """The audit and state database: schema migrations (Alembic, shipped in the package)."""


def _database(ctx: click.Context) -> Any:
    """The database ``sts db upgrade`` creates when it is not there yet."""
    from ..adapters.sql.engines import make_engine

    try:
        return make_engine(settings_from(ctx).database_url)
    except ConfigurationError as exc:  # a SQLite file refused (see sts.adapters.sql.sqlite_files)
        raise click.ClickException(f"setting database_url: {exc}") from None


@db.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Upgrade the schema to REVISION (default: head, this version's newest).

    Safe while the service runs and when several instances upgrade at once: the
    upgrade holds a database lock and commits whole or not at all.  A database made
    by 0.1.0 (no alembic_version table) is recognised and stamped first.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from ..adapters.readiness import describe
    from ..adapters.sql.engines import where
    from ..migrations import SchemaError, known_revisions, upgrade

    engine = _database(ctx)
    try:
        done = upgrade(engine, revision)
    except SchemaError as exc:
        raise click.ClickException(f"database {where(engine)}: {exc}") from None
    except SQLAlchemyError as exc:
        raise click.ClickException(f"database {where(engine)}: {describe(exc)}") from None
    finally:
        engine.dispose()
    # The revisions are read from the database: escaped (sts.core.terminal_text).
    after = printable(done.after)
    if done.after == done.before and done.after is not None and done.after not in known_revisions():
        newer = f"schema at {after}, newer than this version's; it may run on it"
        click.echo(f"database {where(engine)}: {newer}")
    elif done.after == done.before:
        click.echo(f"database {where(engine)}: schema already at {after}")
    else:
        before = printable(done.before) if done.before else None
        start = before or ("the schema of 0.1.0, made before migrations," if done.stamped else "empty")
        click.echo(f"database {where(engine)}: schema upgraded from {start} to {after}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the schema's revision; exit 1 unless it is this version's newest (head).

    A SQLite database that does not exist is said so (exit 1), not created."""
    from sqlalchemy.exc import SQLAlchemyError

    from ..adapters.readiness import describe
    from ..adapters.sql.engines import where
    from ..migrations import SchemaError, state

    engine = open_database(settings_from(ctx))
    try:
        is_current, text = state(engine)
    except SchemaError as exc:
        raise click.ClickException(f"database {where(engine)}: {exc}") from None
    except SQLAlchemyError as exc:
        raise click.ClickException(f"database {where(engine)}: {describe(exc)}") from None
    finally:
        engine.dispose()
    click.echo(f"database {where(engine)}: {text}")
    if not is_current:
        ctx.exit(1)


@db.command("history")
def db_history() -> None:
    """List the schema revisions this version knows, oldest first."""
    from ..migrations import history

    for revision, _down, title in history():
        click.echo(f"{revision}  {title}")


@db.command("restored")
@click.pass_context
def db_restored(ctx: click.Context) -> None:
    """Declare that the database was restored from a backup (run it right after the restore).

    A restored database has forgotten the single uses spent since the backup: for 24 hours from
    now, the embedded store refuses every credential whose reuse matters (a single-use subject
    token, a DPoP proof, a client assertion) issued before now, as after a Redis that lost its
    records.  PostgreSQL: recorded in the database, read by every instance within 30 seconds.
    SQLite notices a restored file by itself (its ledger mark, which must not be restored with
    it); this marks the loss there too, for a mark that was.
    """
    import datetime as dt
    import time

    from sqlalchemy.exc import SQLAlchemyError

    from ..adapters.readiness import describe
    from ..adapters.sql.declared_loss import declared_loss
    from ..adapters.sql.engines import where
    from ..adapters.sql.ledger_mark import LOSS_HORIZON, ledger_mark
    from ..core.ports import StoreUnavailable

    engine = open_database(settings_from(ctx))
    now = time.time()
    try:
        loss, mark = declared_loss(engine), ledger_mark(engine)
        if loss is not None:
            loss.declare(now)
        elif mark is not None and mark.problem is None:
            mark.lost(now)
        else:
            raise click.ClickException(f"database {where(engine)}: no ledger mark to record the restore in")
    except (StoreUnavailable, SQLAlchemyError) as exc:
        shown = describe(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
        raise click.ClickException(f"database {where(engine)}: {shown}") from None
    finally:
        engine.dispose()
    until = dt.datetime.fromtimestamp(now + LOSS_HORIZON, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    click.echo(
        f"database {where(engine)}: restore declared; credentials whose reuse matters that were issued "
        f"before now are refused until {until} (fresh ones are accepted)"
    )
