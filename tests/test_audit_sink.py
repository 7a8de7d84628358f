"""Group commit in the SQL audit sink: every writer returns only after its own record is committed."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import event, func, select

from sts.adapters import sql
from sts.core.audit import AuditRecord
from sts.core.ports import AuditUnavailable


def _record(event_id: str | None = None) -> AuditRecord:
    return AuditRecord(
        event_id=event_id or str(uuid.uuid4()), time=time.time(), request_id="r", endpoint="token"
    )


def _count(engine: sql.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(sql.audit_events)).scalar_one())


@pytest.fixture
def engine(tmp_path: Path) -> sql.Engine:
    engine = sql.make_engine(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    sql.create_schema(engine)
    return engine


def test_concurrent_writers_share_commits_and_each_sees_its_own(engine: sql.Engine) -> None:
    commits = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    sink = sql.SqlAuditSink(engine)
    seen_after_write: list[bool] = []
    lock = threading.Lock()

    def writer() -> None:
        for _ in range(20):
            rec = _record()
            sink.write(rec)
            # Once write() returns, the record must be readable by anyone.
            with engine.connect() as conn:
                found = conn.execute(
                    select(sql.audit_events.c.id).where(sql.audit_events.c.event_id == rec.event_id)
                ).first()
            with lock:
                seen_after_write.append(found is not None)

    threads = [threading.Thread(target=writer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _count(engine) == 320
    assert all(seen_after_write) and len(seen_after_write) == 320
    # Commits were shared: fewer transactions than records (each writer waits for a commit).
    assert len(commits) < 320


def test_one_bad_row_fails_only_its_writer(engine: sql.Engine) -> None:
    sink = sql.SqlAuditSink(engine)
    sink.write(_record())
    bad = _record()
    bad.request_id = None  # type: ignore[assignment]  # NOT NULL: the insert fails for real
    with pytest.raises(AuditUnavailable):
        sink.write(bad)
    sink.write(_record())
    assert _count(engine) == 2


def test_unreachable_database_raises(tmp_path: Path) -> None:
    engine = sql.make_engine(f"sqlite:///{tmp_path / 'gone.sqlite'}")
    sink = sql.SqlAuditSink(engine)  # schema never created: the insert fails for real
    with pytest.raises(AuditUnavailable):
        sink.write(_record())
