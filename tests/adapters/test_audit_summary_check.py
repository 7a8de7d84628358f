"""The summary tables against the records they were read from (sts.adapters.audit_summary_check).

Each test writes the same trail (shaped like the exchange's records, through the real sink),
summarises it, changes one summary the way someone with write access to the database could,
and expects the check to name what no record says; the records and their chains stay intact.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import Engine, delete, func, insert, select, update

from sts.adapters import audit_integrity
from sts.adapters.audit_query import AuditQuery
from sts.adapters.audit_summary_check import SummaryCheck
from sts.adapters.audit_tables import SLACK
from sts.adapters.jwks import StaticJWKS
from sts.adapters.keyring import KeyRing
from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.schema import (
    audit_counts,
    audit_edges,
    audit_events,
    audit_summary_state,
    audit_terms,
    audit_trail,
)
from sts.cli import main
from sts.core.audit_filter import format_time
from sts.migrations import upgrade
from tests.adapters.test_audit_query import DEPLOY, LEDGER, NOW, engine, make_record, workload, write
from tests.support.clock import Clock

__all__ = ["engine"]  # the fixture, on SQLite and PostgreSQL


def summarised(engine: Engine) -> AuditQuery:
    write(engine, workload())
    query = AuditQuery(engine, clock=Clock(NOW + 600), settle=60)
    query.refresh(budget=None)
    assert query.status().behind == 0
    return query


def change(engine: Engine, statement: Any) -> None:
    with engine.begin() as conn:
        assert conn.execute(statement).rowcount in (1, -1)  # (psycopg does not count an INSERT)


def test_summaries_made_by_refresh_agree_with_the_records(engine: Engine) -> None:
    query = summarised(engine)
    assert SummaryCheck(engine).check() == []
    assert SummaryCheck(engine).check(20) == []
    # Records after the watermark are not summarised yet: nothing is expected of them.
    write(engine, [make_record(70, when=NOW + 5, fired=("unusual_network",))])
    assert SummaryCheck(engine).check() == [] and SummaryCheck(engine).check(20) == []
    query.refresh(budget=None)
    assert SummaryCheck(engine).check() == []


def test_a_watermark_moved_past_the_newest_record_is_found(engine: Engine) -> None:
    """The outside audit's change: every later decision would leave the charts, graph and filters."""
    summarised(engine)
    change(engine, update(audit_summary_state).values(last_id=1_000_060))
    for problems in (SummaryCheck(engine).check(), SummaryCheck(engine).check(2000)):
        assert problems == [
            "summaries claim records up to id 1000060, the newest record is 60 "
            "(the records after it would never be summarised)"
        ]


@pytest.mark.parametrize("newest", [None, 2000])
def test_a_term_removed_or_added_is_found(engine: Engine, newest: int | None) -> None:
    summarised(engine)
    t = audit_terms.c
    with engine.connect() as conn:
        kind, value, audit_id = conn.execute(
            select(t.kind, t.value, t.audit_id).where(t.kind == "signal").order_by(t.audit_id.desc()).limit(1)
        ).one()
    change(engine, delete(audit_terms).where(t.kind == kind, t.value == value, t.audit_id == audit_id))
    assert SummaryCheck(engine).check(newest) == [
        f"record {audit_id}: its {kind} {value!r} is not in the summaries"
    ]
    change(engine, insert(audit_terms).values(kind=kind, value=value, audit_id=audit_id, time=NOW))
    problems = SummaryCheck(engine).check(newest)
    assert problems == [f"record {audit_id}: its {kind} {value!r} is summarised at another time"]
    same = (t.audit_id == audit_id, t.kind == kind, t.value == value)
    change(engine, update(audit_terms).where(*same).values(value="elsewhere"))
    assert f"record {audit_id}: the summaries give it the {kind} 'elsewhere', not on record" in (
        SummaryCheck(engine).check(newest)
    )


@pytest.mark.parametrize("newest", [None, 2000])
def test_an_edge_removed_or_made_new_again_is_found(engine: Engine, newest: int | None) -> None:
    summarised(engine)
    e = audit_edges.c
    change(engine, delete(audit_edges).where(e.audience == LEDGER))
    problems = SummaryCheck(engine).check(newest)
    assert len(problems) == 1 and "to 'https://ledger.example.com'" in problems[0]
    assert "is not in the summaries" in problems[0]


def test_an_edge_made_to_look_old_or_busier_is_found_over_the_whole_trail(engine: Engine) -> None:
    """Its first sighting moved back loses its *new* mark; nothing was pruned, so the records
    account for every edge exactly."""
    summarised(engine)
    e = audit_edges.c
    change(engine, update(audit_edges).where(e.audience == DEPLOY, e.subject.like("%acme/app%")).values(
        first_seen=NOW - 400 * 86400
    ))  # fmt: skip
    problems = SummaryCheck(engine).check()
    assert len(problems) == 1 and "first seen at another time than its first grant" in problems[0]
    change(engine, update(audit_edges).where(e.audience == LEDGER).values(decisions=e.decisions + 5))
    assert any("grant(s), the records hold" in p for p in SummaryCheck(engine).check())
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(audit_events)).scalar() == 60


def test_a_count_changed_is_found(engine: Engine) -> None:
    summarised(engine)
    n = audit_counts.c
    with engine.connect() as conn:
        hour, outcome = conn.execute(select(n.hour, n.outcome).order_by(n.hour.desc()).limit(1)).one()
    change(engine, update(audit_counts).where(n.hour == hour, n.outcome == outcome).values(decisions=0))
    assert any(
        p.startswith(f"the hour from {hour} (epoch seconds): 0 {outcome}")
        for p in SummaryCheck(engine).check()
    )


def test_after_pruning_edges_may_be_older_than_the_records_left(engine: Engine) -> None:
    """Retention keeps what pruned records added to an edge: no problem then."""
    day = 86400.0
    write(engine, [make_record(i, when=NOW - (40 - i) * day) for i in range(40)])
    query = AuditQuery(engine, clock=Clock(NOW), settle=0)
    query.refresh(budget=None)
    assert query.prune(cutoff=NOW - 30 * day).records == 10
    assert SummaryCheck(engine).check() == []


def test_rebuilt_summaries_agree_again(engine: Engine) -> None:
    query = summarised(engine)
    change(engine, update(audit_summary_state).values(last_id=1_000_060))
    change(engine, delete(audit_edges).where(audit_edges.c.audience == LEDGER))
    assert SummaryCheck(engine).check()
    query.forget_summaries()
    query.refresh(budget=None)
    assert SummaryCheck(engine).check() == []


@pytest.fixture
def configured(tmp_path: Path) -> Callable[..., Any]:
    database = tmp_path / "sts.sqlite"
    engine = make_engine(f"sqlite:///{database}")
    upgrade(engine)
    write(engine, workload())
    AuditQuery(engine, clock=Clock(NOW + 600), settle=0).refresh(budget=None)
    config = tmp_path / "sts.yaml"
    config.write_text(
        yaml.safe_dump({"database_url": f"sqlite:///{database}", "keys_dir": str(tmp_path / "k")})
    )

    def run(*args: str) -> Any:
        return CliRunner().invoke(main, ["--config", str(config), "audit", *args])

    run.engine = engine  # type: ignore[attr-defined]
    return run


def test_sts_audit_verify_fails_on_summaries_that_disagree_and_summarize_rebuild_mends_them(
    configured: Callable[..., Any],
) -> None:
    assert configured("verify").exit_code == 0
    change(configured.engine, update(audit_summary_state).values(last_id=1_000_060))  # type: ignore[attr-defined]
    verified = configured("verify")
    assert verified.exit_code == 1, verified.output
    assert "ok: 60 record(s)" in verified.output  # the records themselves are intact
    assert "BROKEN summaries: summaries claim records up to id 1000060" in verified.output
    rebuilt = configured("summarize", "--rebuild")
    assert rebuilt.exit_code == 0 and "summaries up to record 60" in rebuilt.output
    assert configured("verify").exit_code == 0


def test_names_of_an_edge_rewritten_are_found(engine: Engine) -> None:
    """The service graph shows an edge's subject and audience: its key is their digest, so the
    names cannot change while the edge stays the same (an outside review rewrote them unseen)."""
    summarised(engine)
    e = audit_edges.c
    change(engine, update(audit_edges).where(e.audience == LEDGER).values(subject="repo:evil/other"))
    for newest in (None, 2000):
        problems = SummaryCheck(engine).check(newest)
        assert len(problems) == 1 and "summarised under other names ('repo:evil/other'" in problems[0]


def test_a_record_older_than_the_cutoff_that_stays_keeps_its_edge(engine: Engine) -> None:
    """Prune removes a contiguous oldest prefix by id: a record older than the cutoff written after a
    newer one stays, and its edge (its only grant) stays with it."""
    day = 86400.0
    records = [make_record(i, when=NOW - (40 - i) * day) for i in range(40)]
    records.insert(
        35,
        make_record(99, when=NOW - 31 * day, subject="repo:acme/rare:ref:refs/heads/main", audience=LEDGER),
    )
    write(engine, records)
    query = AuditQuery(engine, clock=Clock(NOW), settle=0)
    query.refresh(budget=None)
    assert query.prune(cutoff=NOW - 30 * day).records == 10
    assert SummaryCheck(engine).check() == [] and SummaryCheck(engine).check(2000) == []
    edges, _ = query.edges(since=NOW - 60 * day, new_since=NOW)
    assert "repo:acme/rare:ref:refs/heads/main" in {edge.subject for edge in edges}


def test_a_prune_of_every_record_keeps_the_newest_on_sqlite_so_ids_never_start_again(tmp_path: Path) -> None:
    """SQLite numbers the records of an empty table from 1 again (no AUTOINCREMENT), below the ids a
    checkpoint saw: a later prune then looked hand-made to ``sts audit verify`` (an outside
    re-check).  A prune whose cutoff is past every record keeps the newest; the records after it go
    on from its id, and summaries, checks and checkpoints hold."""
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    upgrade(engine)
    day = 86400.0
    write(engine, [make_record(i, when=NOW - (40 - i) * day) for i in range(5)])
    query = AuditQuery(engine, clock=Clock(NOW), settle=0)
    query.refresh(budget=None)
    ring = KeyRing.open(tmp_path / "keys", now=NOW)
    token, _ = audit_integrity.sign_checkpoint(engine, ring.signer(), "https://sts.example.com", NOW)
    jwks = StaticJWKS(ring.public_jwks(), algorithms=["ES256"])
    seen = audit_integrity.read_checkpoint(token, jwks.key_for, "https://sts.example.com")
    assert query.prune(cutoff=NOW - day).records == 4
    write(engine, [make_record(i, when=NOW - 60, fired=("unusual_network",)) for i in range(3)])
    with engine.connect() as conn:
        assert [r[0] for r in conn.execute(select(audit_events.c.id).order_by(audit_events.c.id))] == [
            5,
            6,
            7,
            8,
        ]
    status = query.refresh(budget=None)
    assert (status.last_id, status.newest_id) == (8, 8)
    assert SummaryCheck(engine).check() == [] and SummaryCheck(engine).check(2000) == []
    assert query.top_signals(NOW - 3600, NOW) == [("unusual_network", 3)]
    # A later prune of some of the new records, verified against the checkpoint from before.
    assert query.prune(cutoff=NOW - 30).records == 3
    audit_integrity.verify_trail(engine, [seen])
    engine.dispose()


def test_postgresql_leaves_a_slow_requests_record_until_every_lower_id_is_committed(pg: Any) -> None:
    """A record's time is its request's start, up to SLACK before its write: settled by that time
    alone, a slow request's record moved the watermark past a lower id another instance was still
    committing, which was then never summarised (an outside review)."""
    engine = make_engine(pg.url)
    upgrade(engine)
    now = time.time()
    write(engine, [make_record(i, when=now - 900 + i) for i in range(10)])
    AuditQuery(engine).refresh(budget=None)
    with engine.connect() as inflight:
        committing = inflight.begin()  # another instance's grant: its id drawn, not yet committed
        sink = SqlAuditSink(engine)
        row = sink._stored_row(make_record(50, when=now - 1))
        row.update(chain_id=None, seq=None, prev_hash=None, hash=None)
        inflight.execute(insert(audit_events).values(**{k: v for k, v in row.items() if k != "record"},
                                                     record=json.loads(row["record"])))  # fmt: skip
        write(engine, [make_record(99, when=now - 120, subject="repo:acme/slow:ref:refs/heads/main")])
        assert AuditQuery(engine).refresh(budget=None).last_id == 10  # the slow one waits too
        committing.commit()
    later = AuditQuery(engine, clock=lambda: time.time() + SLACK + 61)
    assert later.refresh(budget=None).behind == 0
    assert SummaryCheck(engine).check() == [] and SummaryCheck(engine).check(2000) == []
    engine.dispose()


def _oldest_hour(engine: Engine) -> tuple[int, str, int]:
    n = audit_counts.c
    with engine.connect() as conn:
        hour, outcome, decisions = conn.execute(
            select(n.hour, n.outcome, n.decisions).order_by(n.hour, n.outcome.desc()).limit(1)
        ).one()
    return int(hour), str(outcome), int(decisions)


@pytest.mark.parametrize("edit", ["oldest hour zeroed", "every count deleted", "hours made up before"])
def test_counts_of_the_oldest_hours_are_checked_while_nothing_was_pruned(engine: Engine, edit: str) -> None:
    """An outside audit: the hour of the oldest record, and every hour before it, were never read,
    so their counts (the review page's decisions-over-time chart) could be zeroed or made up."""
    summarised(engine)
    hour, outcome, decisions = _oldest_hour(engine)
    assert decisions > 0
    n = audit_counts.c
    if edit == "oldest hour zeroed":
        change(engine, update(audit_counts).where(n.hour == hour, n.outcome == outcome).values(decisions=0))
        expected = f"the hour from {hour} (epoch seconds): 0 {outcome} decision(s) summarised, {decisions} on"
    elif edit == "every count deleted":
        with engine.begin() as conn:
            conn.execute(delete(audit_counts))
        expected = f"the hour from {hour} (epoch seconds): 0 {outcome} decision(s) summarised, {decisions} on"
    else:
        change(engine, insert(audit_counts).values(hour=hour - 7200, outcome="refused", decisions=5000))
        change(engine, insert(audit_counts).values(hour=hour - 86400, outcome="granted", decisions=900))
        expected = f"the hour from {hour - 86400} (epoch seconds): 900 granted decision(s) summarised, 0 on"
    problems = SummaryCheck(engine).check()
    assert any(p.startswith(expected) for p in problems), problems


def test_after_a_prune_counts_of_pruned_hours_cannot_exceed_the_records_left_nor_later_ones_fall_short(
    engine: Engine,
) -> None:
    """After a prune the oldest hours may count pruned records: an hour whose count retention
    removed holds no more than the records left in it, and a later one no fewer."""
    day = 86400.0
    write(engine, [make_record(i, when=NOW - (40 - i) * day + 0.5 * (i % 2) * 3600) for i in range(40)])
    query = AuditQuery(engine, clock=Clock(NOW), settle=0)
    query.refresh(budget=None)
    cutoff = NOW - 30 * day
    assert query.prune(cutoff=cutoff).records == 10
    assert SummaryCheck(engine).check() == []
    n = audit_counts.c
    made_up = int(cutoff - 2 * day) // 3600 * 3600
    change(engine, insert(audit_counts).values(hour=made_up, outcome="refused", decisions=5000))
    problems = SummaryCheck(engine).check()
    assert problems == [
        f"the hour from {made_up} (epoch seconds): 5000 refused decision(s) summarised, 0 on record"
    ]
    change(engine, delete(audit_counts).where(n.hour == made_up))
    hour, outcome, decisions = _oldest_hour(engine)
    change(engine, update(audit_counts).where(n.hour == hour, n.outcome == outcome).values(decisions=0))
    problems = SummaryCheck(engine).check()
    assert problems == [
        f"the hour from {hour} (epoch seconds): 0 {outcome} decision(s) summarised, {decisions} on record"
    ]


def test_a_prune_made_up_in_audit_trail_does_not_turn_the_exact_checks_off(engine: Engine) -> None:
    """An outside re-check: on a trail never pruned, a cutoff id and time written into
    ``audit_trail`` (nothing deleted, no anchor moved) had the check take the trail for pruned, so
    hours made up before the first record and an edge made to look old passed.  Whether records
    were removed is read from what a removal leaves: a chain's anchor moved, or fewer records
    written before chaining than were counted; ``sts audit prune`` of nothing changes neither."""
    query = summarised(engine)
    assert query.prune(cutoff=NOW - 86400).records == 0  # before every record: nothing goes
    hour, _, _ = _oldest_hour(engine)
    with engine.connect() as conn:
        lowest = conn.execute(select(func.min(audit_events.c.id))).scalar_one()
    change(engine, update(audit_trail).values(pruned_below=lowest, pruned_before=hour - 86400))
    change(engine, insert(audit_counts).values(hour=hour - 7200, outcome="refused", decisions=5000))
    e = audit_edges.c
    change(engine, update(audit_edges).where(e.audience == LEDGER).values(first_seen=NOW - 400 * 86400))
    problems = SummaryCheck(engine).check()
    made_up = f"the hour from {hour - 7200} (epoch seconds): 5000 refused decision(s) summarised, 0 on record"
    assert made_up in problems, problems
    assert any("first seen at another time than its first grant" in p for p in problems), problems


def test_a_prunes_cutoff_time_moved_past_the_oldest_record_left_is_found(engine: Engine) -> None:
    """A prune leaves the first record at or after its cutoff time, so the oldest record left is
    never older than the cutoff ``audit_trail`` records.  An outside re-check moved it on to now:
    every hour up to the oldest record's was then held only to no more than its records, and its
    refusals could be zeroed unseen."""
    day = 86400.0
    write(engine, [make_record(i, when=NOW - (40 - i) * day + 0.5 * (i % 2) * 3600) for i in range(40)])
    query = AuditQuery(engine, clock=Clock(NOW), settle=0)
    query.refresh(budget=None)
    assert query.prune(cutoff=NOW - 30 * day).records == 10
    assert SummaryCheck(engine).check() == []
    hour, outcome, decisions = _oldest_hour(engine)
    n = audit_counts.c
    change(engine, update(audit_counts).where(n.hour == hour, n.outcome == outcome).values(decisions=0))
    zeroed = f"the hour from {hour} (epoch seconds): 0 {outcome} decision(s) summarised"
    zeroed += f", {decisions} on record"
    assert SummaryCheck(engine).check() == [zeroed]
    change(engine, update(audit_trail).values(pruned_before=NOW))
    problems = SummaryCheck(engine).check()
    assert problems == [
        f"audit_trail says the newest prune cut at {format_time(NOW)}, yet the oldest record left "
        f"(id 11) is from {format_time(NOW - 30 * day)}, before it: not what a prune does (edited)",
        zeroed,
    ]


def test_sts_audit_verify_with_a_checkpoint_sees_through_a_made_up_prune(
    configured: Callable[..., Any], tmp_path: Path
) -> None:
    """The outside re-check's case through the command: a checkpoint that signed no prune, the
    oldest hour's refusals zeroed, then a prune made up in ``audit_trail``: its cutoff id and time,
    or records written before chaining that never were (a checkpoint signs how many there were)."""
    KeyRing.open(tmp_path / "k", now=time.time())
    assert configured("checkpoint", "-o", str(tmp_path / "cp.jws")).exit_code == 0
    engine = configured.engine  # type: ignore[attr-defined]
    hour, outcome, decisions = _oldest_hour(engine)
    n = audit_counts.c
    change(engine, update(audit_counts).where(n.hour == hour, n.outcome == outcome).values(decisions=0))
    zeroed = f"the hour from {hour} (epoch seconds): 0 {outcome} decision(s) summarised"
    zeroed += f", {decisions} on record"
    with engine.connect() as conn:
        lowest = conn.execute(select(func.min(audit_events.c.id))).scalar_one()
    change(engine, update(audit_trail).values(pruned_below=lowest, pruned_before=time.time()))
    verified = configured("verify", "--checkpoint", str(tmp_path / "cp.jws"))
    assert verified.exit_code == 1 and f"BROKEN summaries: {zeroed}" in verified.output, verified.output
    change(engine, update(audit_trail).values(pruned_before=None, prechain_records=1, prechain_highest_id=0))
    verified = configured("verify", "--checkpoint", str(tmp_path / "cp.jws"))
    assert verified.exit_code == 1, verified.output
    assert "a checkpoint signed 0 (highest id None): counted once, so edited" in verified.output
