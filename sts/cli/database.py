"""The database and the shared state as the commands open them: only a database that exists.

``sts serve`` and ``sts db upgrade`` create the database (README, Command line); every
other command reads or repairs one that is there.  Pointed at a SQLite path that does not
exist (a typo, the wrong ``--config``), ``sts audit verify`` created the directories and a new,
migrated database, then reported it intact ("ok: 0 record(s)"), and ``sts revoke subject``
"revoked" into it and made a fresh signing key ring on the way (an outside audit): they now
end with one line instead, and create nothing.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click

from ..errors import ConfigurationError
from ..settings import Settings

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from ..wiring.stores import Stores


def open_database(settings: Settings) -> Engine:
    """An engine on the configured database; a SQLite file that does not exist ends the command."""
    from ..adapters.sql.engines import DatabaseMissing, make_engine

    try:
        return make_engine(settings.database_url, existing=True)
    except DatabaseMissing as exc:
        raise click.ClickException(
            f"setting database_url: {exc} (`sts db upgrade` or `sts serve` creates it)"
        ) from None
    except ConfigurationError as exc:  # a SQLite file refused (see sts.adapters.sql.sqlite_files)
        raise click.ClickException(f"setting database_url: {exc}") from None


def open_shared_state(settings: Settings) -> Stores:
    """The stores ``sts revoke`` and ``sts baseline`` change (Redis or the database), on the
    configured database with its schema current, without the rest of the application: no key
    ring is opened (nor created), no policy read."""
    from sqlalchemy.exc import SQLAlchemyError

    from ..migrations import SchemaError, ensure
    from ..wiring.stores import open_stores

    engine = open_database(settings)
    try:
        ensure(engine, migrate=settings.database_migrate_on_start)
        return open_stores(settings, engine, time.time)
    except SchemaError as exc:
        raise click.ClickException(f"setting database_url: {exc}") from None
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"setting database_url: the database is unavailable ({type(exc).__name__})"
        ) from None
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
