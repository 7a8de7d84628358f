"""Expired baselines, subject states and revocations are removed (sts/adapters/sql/expired_rows.py).

Every read leaves an expired row out, and nothing removed one: a workload that stopped
exchanging, a token revoked long ago kept their rows for good on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.expired_rows import EXPIRING_TABLES, ExpiredRows
from sts.adapters.sql.key_value import SqlBaselineStore, SqlRevokedTokens
from sts.adapters.sql.single_use import SqlSingleUseLedger
from sts.adapters.sql.subject_state import SqlSubjectStateStore
from sts.core.audit import AuditRecord
from sts.core.baseline import Baseline
from sts.core.ports import CLOCK_MARGIN, BaselineUpdate
from sts.core.subject_state import SubjectState
from sts.migrations import upgrade
from tests.support.postgres import PgSchema

NOW = time.time()
VALUES = {
    "baselines": ("baseline", "{}"),
    "subject_states": ("state", "{}"),
    "revoked_tokens": ("revoked", "1"),
}


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgresql":
        pg: PgSchema = request.getfixturevalue("pg")
        made = make_engine(pg.url)
    else:
        made = make_engine(f"sqlite:///{tmp_path / 'expired.sqlite'}")
    upgrade(made)
    yield made
    made.dispose()


def _fill(engine: Engine, table: str, rows: int) -> tuple[set[str], set[str]]:
    """``rows`` rows of ``table``, every third expired an hour ago; (the live ones, the expired ones)."""
    column, value = VALUES[table]
    live: set[str] = set()
    expired: set[str] = set()
    with engine.begin() as conn:
        for n in range(rows):
            identity = f"issuer|subject-{n:05d}"
            gone = n % 3 == 0
            (expired if gone else live).add(identity)
            conn.execute(
                text(f"INSERT INTO {table} (identity, {column}, expires_at) VALUES (:i, :v, :e)"),  # noqa: S608
                {"i": identity, "v": value, "e": NOW - 3600 if gone else NOW + 3600},
            )
    return live, expired


def _identities(engine: Engine, table: str) -> set[str]:
    with engine.connect() as conn:
        return {str(r[0]) for r in conn.execute(text(f"SELECT identity FROM {table}"))}  # noqa: S608


def test_each_call_removes_the_expired_rows_of_one_slice_and_the_walk_starts_again(engine: Engine) -> None:
    filled = {table: _fill(engine, table, 250) for table in EXPIRING_TABLES}
    expired_rows = ExpiredRows(engine, size=100)
    # Slices of 100 identities: the first call removes the expired among the first 100 of each table.
    assert expired_rows.remove(NOW) == 34 * len(EXPIRING_TABLES)
    for table, (live, expired) in filled.items():
        assert _identities(engine, table) == live | set(sorted(expired)[34:])
    assert expired_rows.remove(NOW) == 33 * len(EXPIRING_TABLES)
    # The last slice is the rest of the table (50 identities), and the walk then starts again.
    assert expired_rows.remove(NOW) == 17 * len(EXPIRING_TABLES)
    for table, (live, _) in filled.items():
        assert _identities(engine, table) == live
    # Rows that expired since are found on the next walk, from the start.
    with engine.begin() as conn:
        conn.execute(text("UPDATE baselines SET expires_at = :e WHERE identity = :i"),
                     {"e": NOW - 1, "i": "issuer|subject-00001"})  # fmt: skip
    assert expired_rows.remove(NOW) == 1
    assert "issuer|subject-00001" not in _identities(engine, "baselines")


def test_only_rows_expired_by_the_cutoff_go(engine: Engine) -> None:
    _fill(engine, "baselines", 9)
    with engine.begin() as conn:
        conn.execute(text("UPDATE baselines SET expires_at = :e WHERE identity = 'issuer|subject-00001'"),
                     {"e": NOW - 10})  # fmt: skip
    # A row expired 10 s ago stays while the cutoff is CLOCK_MARGIN before now (a clock behind ours
    # still reads it as live); the rows expired an hour ago go.
    assert ExpiredRows(engine).remove(NOW - CLOCK_MARGIN) == 3
    assert "issuer|subject-00001" in _identities(engine, "baselines")


def test_the_stores_answer_as_before_once_the_rows_are_gone(engine: Engine) -> None:
    clock = [NOW]
    baselines = SqlBaselineStore(engine, clock=lambda: clock[0])
    states = SqlSubjectStateStore(engine, clock=lambda: clock[0])
    revoked = SqlRevokedTokens(engine, clock=lambda: clock[0])
    baselines.save("iss|kept", Baseline(first_seen=NOW), 3600)
    baselines.save("iss|gone", Baseline(first_seen=NOW), 60)
    states.put("iss|gone", SubjectState(risk_level="high"), 60)
    revoked.revoke("jti-gone", NOW + 60)
    revoked.revoke("jti-kept", NOW + 3600)
    clock[0] = NOW + 60 + CLOCK_MARGIN + 1
    assert ExpiredRows(engine).remove(clock[0] - CLOCK_MARGIN) == 3
    assert baselines.load("iss|gone") == Baseline()
    assert baselines.load("iss|kept").first_seen == NOW
    assert states.get(["iss|gone"]) == [SubjectState()]
    assert (revoked.revoked("jti-gone"), revoked.revoked("jti-kept")) == (False, True)
    # A removed identity starts afresh as if it had expired: its next grant writes a new row.
    baselines.save("iss|gone", Baseline(first_seen=clock[0]), 60)
    assert baselines.load("iss|gone").first_seen == clock[0]


def test_a_grant_removes_expired_rows_at_the_ledgers_housekeeping_turn(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'grants.sqlite'}")
    upgrade(engine)
    live, _ = _fill(engine, "baselines", 30)
    _fill(engine, "revoked_tokens", 30)
    ledger = SqlSingleUseLedger(SqlAuditSink(engine), purge_probability=1.0)
    record = AuditRecord(event_id=str(uuid.uuid4()), time=NOW, request_id="r", endpoint="token")
    ledger.commit(record, [], NOW)
    assert _identities(engine, "baselines") == live
    assert len(_identities(engine, "revoked_tokens")) == 20
    engine.dispose()


def test_the_rare_writes_remove_expired_rows_of_their_own_table(tmp_path: Path) -> None:
    """With ``store: redis`` the grants remove nothing from the database: a revocation and a subject
    state's write do, now and then (here every time)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'rare.sqlite'}")
    upgrade(engine)
    _fill(engine, "revoked_tokens", 30)
    _fill(engine, "subject_states", 30)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sts.adapters.sql.key_value.REMOVAL_EVERY", 1)
        patch.setattr("sts.adapters.sql.subject_state.REMOVAL_EVERY", 1)
        SqlRevokedTokens(engine).revoke("fresh", time.time() + 60)
        SqlSubjectStateStore(engine).put("iss|fresh", SubjectState(risk_level="high"), 60)
    assert len(_identities(engine, "revoked_tokens")) == 21
    assert len(_identities(engine, "subject_states")) == 21
    engine.dispose()


def test_postgresql_passes_over_a_row_a_grant_holds_and_never_waits(pg: PgSchema) -> None:
    """A baseline row that a grant's transaction holds (an expired one it is writing again) is left
    for a later walk: the removal neither waits for the grant nor can deadlock with a batch."""
    engine = make_engine(pg.url)
    upgrade(engine)
    _, expired = _fill(engine, "baselines", 9)
    held = sorted(expired)[0]
    holder = engine.connect()
    transaction = holder.begin()
    holder.execute(text("SELECT 1 FROM baselines WHERE identity = :i FOR UPDATE"), {"i": held})
    result: list[int] = []
    remover = threading.Thread(target=lambda: result.append(ExpiredRows(engine).remove(NOW)))
    remover.start()
    remover.join(timeout=10)
    try:
        assert not remover.is_alive(), "the removal waited for the grant's row lock"
        assert result == [2]
        assert held in _identities(engine, "baselines")
    finally:
        transaction.rollback()
        holder.close()
    assert ExpiredRows(engine).remove(NOW) == 1
    engine.dispose()


@pytest.mark.parametrize("through", ["store", "ledger"])
def test_a_grant_over_an_expired_row_brings_back_none_of_its_refusals(engine: Engine, through: str) -> None:
    """The grant's write left the ``failures`` of an expired row in place, so a re-granted identity
    found its old refusals again, unless the row had been removed first: a removal changed an answer
    (an outside review).  The baseline store's write and the grant's (the ledger's commit: SQLite's
    trigger, PostgreSQL's statement) both drop them now."""
    clock = [NOW]
    baselines = SqlBaselineStore(engine, clock=lambda: clock[0])
    identity = "iss|regranted"
    baselines.save(identity, Baseline(first_seen=NOW, count=1), 100, grant=True)
    clock[0] = NOW + 40
    baselines.add_failure(identity, clock[0], 100)
    assert len(baselines.load(identity).failures) == 1
    clock[0] = NOW + 100 + CLOCK_MARGIN + 10  # expired, not removed
    assert baselines.load(identity).failures == ()
    fresh = Baseline(first_seen=clock[0], last_seen=clock[0], count=1)
    if through == "store":
        baselines.save(identity, fresh, 100, grant=True)
    else:
        ledger = SqlSingleUseLedger(SqlAuditSink(engine, clock=lambda: clock[0]), purge_probability=0.0)
        record = AuditRecord(event_id=str(uuid.uuid4()), time=clock[0], request_id="r", endpoint="token")
        ledger.commit(record, [], clock[0], BaselineUpdate(identity, fresh, 100))
    assert baselines.load(identity).failures == ()
