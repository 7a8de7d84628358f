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
