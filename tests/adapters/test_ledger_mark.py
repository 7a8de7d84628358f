"""SQLite: a database that lost commits (its -wal deleted, an older copy restored) does not re-open
the single uses they spent (an outside fault-injection audit exchanged such tokens twice)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.ledger_mark import LOSS_HORIZON, ledger_mark
from sts.adapters.sql.replay import SqlReplayCache
from sts.adapters.sql.single_use import SqlSingleUseLedger
from sts.core.audit import AuditRecord
from sts.core.ports import AuditUnavailable, ReplayWindowLost, SingleUse, StoreUnavailable
from sts.migrations import upgrade
from tests.support.postgres import PgSchema


def _grant(ledger: SqlSingleUseLedger, use: SingleUse, now: float) -> None:
    record = AuditRecord(event_id=str(uuid.uuid4()), time=now, request_id="r", endpoint="token")
    ledger.reserve(use, now)
    ledger.commit(record, [use], now)


def _open(path: Path) -> tuple[SqlAuditSink, SqlSingleUseLedger]:
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    sink = SqlAuditSink(engine)
    return sink, SqlSingleUseLedger(sink)


def _an_older_copy_restored(tmp_path: Path) -> tuple[Path, SingleUse, float]:
    """A database whose backup was taken after one grant, then one more grant (``spent``), then
    the service stopped and the older copy restored (without the old -wal and -shm)."""
    database = tmp_path / "sts.sqlite"
    sink, ledger = _open(database)
    now = time.time()
    _grant(ledger, SingleUse("subject_token:github", "warm-up", now + 300, now - 60), now)
    sink.engine.dispose()
    shutil.copy(database, tmp_path / "backup.sqlite")  # the backup: one grant
    sink, ledger = _open(database)
    spent = SingleUse("subject_token:github", "spent", now + 300, now - 30)
    _grant(ledger, spent, now + 1)
    sink.engine.dispose()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.sqlite", database)
    return database, spent, now


def test_an_older_copy_restored_refuses_the_credentials_it_may_have_forgotten(tmp_path: Path) -> None:
    database, spent, now = _an_older_copy_restored(tmp_path)

    sink, ledger = _open(database)  # a new process: it checks the database against the mark
    later = time.time() + 2
    with pytest.raises(ReplayWindowLost):
        ledger.reserve(spent, later)
    # A DPoP proof or client assertion of before the loss too (the replay cache).
    with pytest.raises(ReplayWindowLost):
        SqlReplayCache(sink.engine).first_use("dpop", "jti-1", later + 60, later, valid_from=now)
    # A credential without a known start could predate it as well; one issued since is taken.
    with pytest.raises(ReplayWindowLost):
        ledger.reserve(SingleUse("subject_token:github", "no-iat", now + 300, None), later)
    fresh = SingleUse("subject_token:github", "fresh", later + 300, later)
    _grant(ledger, fresh, later)
    # Remembered by every process from now on (the mark is a file), until the horizon.
    sink.engine.dispose()
    sink, ledger = _open(database)
    with pytest.raises(ReplayWindowLost):
        ledger.reserve(spent, later + 10)
    ledger.reserve(spent, later + LOSS_HORIZON + 1)


def test_the_same_database_reopened_has_lost_nothing(tmp_path: Path) -> None:
    database = tmp_path / "sts.sqlite"
    sink, ledger = _open(database)
    now = time.time()
    use = SingleUse("subject_token:github", "k", now + 300, now - 30)
    _grant(ledger, use, now)
    sink.engine.dispose()
    sink, ledger = _open(database)
    ledger.reserve(SingleUse("subject_token:github", "other", now + 300, now - 30), now + 1)
    mark = ledger_mark(sink.engine)
    assert mark is not None and mark._read()[1] == 0.0


def test_a_wal_deleted_under_the_process_marks_its_commits_lost(tmp_path: Path) -> None:
    database = tmp_path / "sts.sqlite"
    sink, ledger = _open(database)
    now = time.time()
    _grant(ledger, SingleUse("subject_token:github", "k", now + 300, now - 30), now)
    os.unlink(f"{database}-wal")
    time.sleep(1.1)  # the file is looked at once a second
    with pytest.raises(StoreUnavailable, match="restart"):
        _grant(ledger, SingleUse("subject_token:github", "k2", now + 300, now - 30), time.time())
    # The audit sink refuses to commit into those files too (a grant that took no single use).
    record = AuditRecord(event_id=str(uuid.uuid4()), time=time.time(), request_id="r", endpoint="token")
    with pytest.raises(AuditUnavailable, match="restart"):
        ledger.commit(record, [], time.time())
    mark = ledger_mark(sink.engine)
    assert mark is not None and mark._read()[1] > 0
    # This process commits nothing more: every credential, old or new, is a 503 (StoreUnavailable),
    # not a 400 asking for a fresh one (an outside audit had fresh ones refused so for a minute).
    later = time.time()
    for use in (
        SingleUse("subject_token:github", "k", now + 300, now - 30),
        SingleUse("subject_token:github", "new", later + 300, later),
    ):
        with pytest.raises(StoreUnavailable, match="restart"):
            ledger.reserve(use, later)
    with pytest.raises(StoreUnavailable, match="restart"):
        SqlReplayCache(sink.engine).first_use("dpop", "jti-new", later + 60, later, valid_from=later)
    # Restarted (a new process: new connections, a new -wal): the credentials the lost commits may
    # have spent are refused as such, new ones are taken.
    restarted = f"""
import time
from sts.core.ports import ReplayWindowLost, SingleUse
from tests.adapters.test_ledger_mark import _grant, _open
_, ledger = _open({str(database)!r})
try:
    ledger.reserve(SingleUse("subject_token:github", "k", {now} + 300, {now} - 30), time.time())
except ReplayWindowLost:
    fresh = time.time() + 1
    _grant(ledger, SingleUse("subject_token:github", "fresh", fresh + 300, fresh), fresh)
    print("refused old, granted new")
"""
    sink.engine.dispose()  # this process ends: its connections close
    done = subprocess.run([sys.executable, "-c", restarted], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "refused old, granted new", done.stderr


def test_a_trail_pruned_of_grants_older_than_a_day_is_no_loss(tmp_path: Path) -> None:
    """``sts audit prune`` removes only records older than a day: the newest grant gone that way is
    no loss (its credentials expired long ago)."""
    database = tmp_path / "sts.sqlite"
    sink, ledger = _open(database)
    then = time.time() - LOSS_HORIZON - 60
    _grant(ledger, SingleUse("subject_token:github", "old", then + 300, then - 30), then)
    with sink.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM audit_events")
    sink.engine.dispose()
    sink, ledger = _open(database)
    now = time.time()
    ledger.reserve(SingleUse("subject_token:github", "k", now + 300, now - 30), now)


def test_readiness_stays_honest_after_a_loss(tmp_path: Path) -> None:
    """The store's readiness write is a key of this moment: a loss refuses old credentials, it does
    not make the instance unready for a day (a review of this change found it did)."""
    from sts.adapters.readiness import sql_store_check

    database = tmp_path / "sts.sqlite"
    sink, _ = _open(database)
    mark = ledger_mark(sink.engine)
    assert mark is not None
    mark.lost(time.time())
    sql_store_check(SqlReplayCache(sink.engine), "host:1")(time.time() + 1)


def test_a_mark_that_opens_late_refuses_until_the_restore_check_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older copy of the database restored while its mark could not be opened: once the mark
    opens, the database is checked against it before anything is accepted.  An outside re-check
    had a concurrent request accepted while the late check's query ran."""
    import threading

    from sts.adapters.sql import ledger_mark as module

    database, spent, now = _an_older_copy_restored(tmp_path)
    mark_file = Path(f"{database}.ledger-mark")
    kept = mark_file.read_bytes()
    mark_file.unlink()
    mark_file.mkdir()  # the mark cannot be opened at start

    sink, ledger = _open(database)
    later = time.time() + 2
    with pytest.raises(StoreUnavailable, match="ledger mark cannot be opened"):
        ledger.reserve(spent, later)
    mark_file.rmdir()
    mark_file.write_bytes(kept)  # back, saying a grant the restored database does not hold
    mark = ledger_mark(sink.engine)
    assert mark is not None
    checking, go_on = threading.Event(), threading.Event()
    check = module._check

    def slow_check(*args: object) -> None:
        checking.set()
        assert go_on.wait(10)
        check(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "_check", slow_check)
    mark._next_try = 0.0
    opener = threading.Thread(target=lambda: mark.reopen(later))
    opener.start()
    assert checking.wait(10)
    # Meanwhile another request: refused, never accepted.
    with pytest.raises(StoreUnavailable):
        ledger.reserve(SingleUse("subject_token:github", "spent", now + 300, now - 30), later)
    go_on.set()
    opener.join(10)
    with pytest.raises(ReplayWindowLost):
        ledger.reserve(spent, later)
    fresh = SingleUse("subject_token:github", "fresh", later + 300, later + 1)
    _grant(ledger, fresh, later + 1)


def test_a_restore_declared_on_postgresql_refuses_what_it_may_have_forgotten(
    pg: PgSchema, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL cannot notice a restored database (an outside audit restored a dump and exchanged
    a spent single-use token again); ``sts db restored`` says so, for every instance."""
    from click.testing import CliRunner

    import sts.adapters.sql.declared_loss as declared
    from sts.cli import main

    engine = make_engine(pg.url)
    upgrade(engine)
    sink = SqlAuditSink(engine)
    ledger, replay = SqlSingleUseLedger(sink), SqlReplayCache(engine)
    now = time.time()
    spent = SingleUse("subject_token:github", "spent", now + 300, now - 30)
    _grant(ledger, spent, now)
    # What restoring the backup of before the grant does:
    pg.execute(f'DELETE FROM "{pg.schema}".replay_entries')  # noqa: S608 - the test's own schema
    ledger.reserve(spent, now + 1)  # the gap: taken again, nothing can tell
    monkeypatch.setattr(declared, "REREAD", 0.0)  # a running instance reads it within REREAD s
    result = CliRunner().invoke(main, ["db", "restored"], env={"STS_DATABASE_URL": pg.url}, prog_name="sts")
    assert result.exit_code == 0, result.output
    assert "restore declared" in result.output
    later = time.time() + 1
    with pytest.raises(ReplayWindowLost):
        ledger.reserve(spent, later)
    with pytest.raises(ReplayWindowLost):
        replay.first_use("dpop", "jti-1", later + 60, later, valid_from=now)
    with pytest.raises(ReplayWindowLost):
        ledger.used(SingleUse("subject_token:github", "no-iat", now + 300, None), later)
    _grant(ledger, SingleUse("subject_token:github", "fresh", later + 300, later), later)
    # A process started after it reads it too; past the horizon it is over.
    engine.dispose()
    engine = make_engine(pg.url)
    fresh_ledger = SqlSingleUseLedger(SqlAuditSink(engine))
    with pytest.raises(ReplayWindowLost):
        fresh_ledger.reserve(spent, later + 10)
    fresh_ledger.reserve(spent, later + LOSS_HORIZON + 1)
    engine.dispose()
