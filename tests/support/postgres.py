"""PostgreSQL for tests: a private database per test module, a fresh schema per test.

The server is the machine's shared one (127.0.0.1:5432, trust auth); nothing here touches what
these helpers did not create.  ``pg_database`` and ``pg`` are fixtures, registered for every test
by ``tests/conftest.py``; a module may still define its own of the same name.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"


def admin_engine(database: str = "postgres") -> Engine:
    return create_engine(f"{PG_SERVER}/{database}", isolation_level="AUTOCOMMIT", poolclass=NullPool)


@contextlib.contextmanager
def private_database() -> Iterator[str]:
    """A new, empty database only this test run knows, dropped (connections and all) afterwards."""
    name = f"sts_test_{secrets.token_hex(6)}"
    admin = admin_engine()
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass(frozen=True)
class PgSchema:
    database: str
    schema: str

    @property
    def url(self) -> str:
        # libpq ``options``: every connection of the app's pool starts in this schema.
        return f"{PG_SERVER}/{self.database}?options=-csearch_path%3D{self.schema}"

    def execute(self, statement: str) -> list[Any]:
        engine = admin_engine(self.database)
        try:
            with engine.connect() as conn:
                result = conn.execute(text(statement))
                return list(result) if result.returns_rows else []
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A private database for the test module."""
    with private_database() as name:
        yield name


@pytest.fixture
def pg(pg_database: str) -> Iterator[PgSchema]:
    """A fresh schema in the module's database, dropped after the test."""
    schema = PgSchema(pg_database, f"t_{secrets.token_hex(6)}")
    schema.execute(f'CREATE SCHEMA "{schema.schema}"')
    yield schema
    schema.execute(f'DROP SCHEMA IF EXISTS "{schema.schema}" CASCADE')
