"""A second engine on a SQLite file this process has open must not release the process's locks.

POSIX ``fcntl`` locks belong to the process, and closing *any* descriptor of the file drops them
all.  Creating an engine used to open and close the database file (to create it ``0600``), which
dropped the shared lock of the connections already open: another process closing its connection
then took itself for the last one, checkpointed and deleted the ``-wal`` and ``-shm`` files under
them, and this process's connections failed (``DatabaseError``) until it restarted.  Seen with the
rate-limit file, which the endpoints' limits and the review page's sign-in limits both opened.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from flask import Flask
from sqlalchemy import Engine

from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.rate_limits import rate_limit_engine


def test_a_second_engine_leaves_the_open_connections_their_locks(tmp_path: Path) -> None:
    path = tmp_path / "locks.sqlite"
    first = make_engine(f"sqlite:///{path}")
    conn = first.raw_connection()
    try:
        conn.cursor().execute("CREATE TABLE t (x)")
        conn.commit()
        make_engine(f"sqlite:///{path}")  # the review page's rate limits did this, say
        other = (
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
            "c.execute('SELECT count(*) FROM t').fetchall(); c.close()"
        )
        subprocess.run([sys.executable, "-c", other, str(path)], check=True, timeout=30)
        assert Path(f"{path}-shm").exists() and Path(f"{path}-wal").exists()
        conn.cursor().execute("INSERT INTO t VALUES (1)")
        conn.commit()
    finally:
        conn.close()
        first.dispose()


def test_one_rate_limit_engine_per_file_and_process(tmp_path: Path) -> None:
    main: Engine = make_engine(f"sqlite:///{tmp_path / 'sts.sqlite'}")
    assert rate_limit_engine(main) is rate_limit_engine(main)
    main.dispose()


def open_paths() -> set[str]:
    """The files this process has open (Linux: /proc/self/fd)."""
    found = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            found.add(os.readlink(fd))
        except OSError:
            continue
    return found


def test_serve_releases_every_sqlite_file_before_the_workers_fork(make_app: Callable[..., Flask]) -> None:
    """``sts serve`` builds the app in the parent to check it, then forks the workers: no connection
    to the database or the rate-limit file may stay open there (a child inheriting one takes no
    lock of its own, as SQLite believes it holds its parent's)."""
    from sts.cli.serve import release_before_fork

    app = make_app()
    runtime = app.extensions["sts"]
    database = str(runtime.engine.url.database)
    assert app.test_client().get("/readyz").status_code == 200  # every store touched once
    assert any(p.startswith(f"{database}.rate-limits") for p in open_paths())
    release_before_fork(runtime)
    sqlite_files = {database, f"{database}.rate-limits"}
    still = {p for p in open_paths() if p.removesuffix("-wal").removesuffix("-shm") in sqlite_files}
    assert still == set(), still
