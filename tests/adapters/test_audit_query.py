"""Reading the audit trail (sts.adapters.audit_query) on SQLite and PostgreSQL, and ``sts audit``.

Records are written through the real sink (``SqlAuditSink``), shaped like the
exchange's own (risk details with fired and quiet signals, requested and granted
audiences).  Every filter is checked against the same filter applied in Python
to everything written, before summaries exist (the JSON of each record is read)
and after (the summary tables answer): both must give exactly the expected ids.
"""

from __future__ import annotations

import json
import os
import stat
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import Engine, event, func, select

from sts.adapters import audit_charts
from sts.adapters.audit_query import AuditQuery
from sts.adapters.audit_retention import PruneAborted
from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.group_commit import PendingRow
from sts.adapters.sql.retention import PruneWouldBreakChain
from sts.adapters.sql.schema import audit_edges, audit_events, audit_terms
from sts.cli import main
from sts.core.audit import AuditRecord
from sts.core.audit_filter import (
    EARLIEST,
    LATEST,
    MAX_RECORD_ID,
    AuditFilter,
    FilterError,
    filter_from_params,
    format_time,
    parse_record_id,
    parse_time,
)
from sts.core.audit_views import Bucket
from sts.migrations import upgrade
from tests.support.clock import Clock
from tests.support.postgres import PgSchema

NOW = 1_780_000_000.0
SIGNALS = ("unusual_network", "attestation_drift", "elevated_privilege", "unexpected_s2s")
DEPLOY, LEDGER, ODD = (
    "https://deploy.example.com",
    "https://ledger.example.com",
    "https://x.example/" + "a" * 300,
)


def make_record(
    i: int,
    *,
    when: float,
    issuer: str = "github",
    subject: str = "repo:acme/app:ref:refs/heads/main",
    outcome: str = "granted",
    error: str | None = None,
    client_id: str | None = "gateway",
    audience: str = DEPLOY,
    fired: tuple[str, ...] = (),
    rule: str | None = "deploy",
) -> AuditRecord:
    granted = outcome == "granted"
    return AuditRecord(
        event_id=str(uuid.uuid4()),
        time=when,
        request_id=f"req-{i}",
        endpoint="token",
        source_ip="10.0.0.1",
        outcome=outcome,
        error=error,
        client_id=client_id,
        issuer=issuer,
        subject=subject,
        subject_token_sha256=f"{i:064x}",
        requested_audience=[audience],
        granted_audience=[audience] if granted else [],
        granted_scope=["read"] if granted else [],
        rule=rule,
        reasons=["policy.rule_matched"],
        issued_jti=f"jti-{i}" if granted else None,
        issued_exp=when + 300 if granted else None,
        details={
            "risk": {
                "score": 30 * len(fired),
                "decision": {"action": "narrow" if fired else "grant", "fired": list(fired)},
                "signals": [
                    {
                        "name": name,
                        "fired": name in fired,
                        "weight": 30 if name in fired else 0,
                        "reason": "r",
                    }
                    for name in SIGNALS
                ],
            }
        },
    )


def workload() -> list[AuditRecord]:
    """Sixty decisions over an hour before NOW, of three identities, varied in every dimension."""
    records = []
    for i in range(60):
        who = i % 3
        records.append(
            make_record(
                i,
                # Written in order, but each record's time is its request's start: a few run long.
                when=NOW - 3600 + i * 60 - (45 if i % 7 == 3 else 0),
                issuer="github" if who < 2 else "kubernetes",
                subject=[
                    "repo:acme/app:ref:refs/heads/main",
                    "repo:acme/web:ref:refs/heads/main",
                    "system:serviceaccount:pay:api",
                ][who],
                outcome="refused" if i % 5 == 0 else "error" if i == 59 else "granted",
                error="insufficient_user_authentication"
                if i % 10 == 0
                else "invalid_target"
                if i % 5 == 0
                else "server_error"
                if i == 59
                else None,
                client_id=None if i % 4 == 0 else "gateway" if i % 4 < 3 else "signer",
                audience=LEDGER if who == 2 else ODD if i == 31 else DEPLOY,
                fired=tuple(SIGNALS[: (i % 3)]) if i % 2 else (),
                rule=None if i % 5 == 0 and i % 10 else "deploy" if who < 2 else "ledger",
            )
        )
    return records


def expected(records: list[AuditRecord], f: AuditFilter) -> list[int]:
    """Ids (1-based, in write order) of the records ``f`` matches, newest first."""
    ids = []
    for audit_id, r in enumerate(records, start=1):
        fired = [s["name"] for s in r.details["risk"]["signals"] if s["fired"]]
        checks = [
            f.issuer is None or r.issuer == f.issuer,
            f.subject is None or r.subject == f.subject,
            f.client_id is None or r.client_id == f.client_id,
            f.audience is None or f.audience in r.requested_audience + r.granted_audience,
            f.outcome is None or r.outcome == f.outcome,
            f.signal is None or f.signal in fired,
            f.rule is None or r.rule == f.rule,
            f.error is None or r.error == f.error,
            f.since is None or r.time >= f.since,
            f.until is None or r.time < f.until,
        ]
        if all(checks):
            ids.append(audit_id)
    return ids[::-1]


FILTERS = [
    AuditFilter(),
    AuditFilter(issuer="github", subject="repo:acme/web:ref:refs/heads/main"),
    AuditFilter(issuer="kubernetes"),
    AuditFilter(client_id="signer"),
    AuditFilter(audience=LEDGER),
    AuditFilter(audience=ODD),
    AuditFilter(outcome="refused"),
    AuditFilter(signal="attestation_drift"),
    AuditFilter(signal="unusual_network", outcome="granted", client_id="gateway"),
    AuditFilter(signal="shared_signal"),
    AuditFilter(rule="ledger"),
    AuditFilter(error="insufficient_user_authentication"),
    # Time bounds cut through the records written out of order (every seventh started 45 s early).
    AuditFilter(since=NOW - 3600 + 10 * 60 - 45, until=NOW - 3600 + 24 * 60 - 45),
    AuditFilter(since=NOW - 1800, signal="unusual_network", audience=DEPLOY),
    AuditFilter(until=NOW - 3000),
    AuditFilter(since=NOW + 10),
]


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    else:
        schema: PgSchema = request.getfixturevalue("pg")
        url = schema.url
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


def write(engine: Engine, records: list[AuditRecord]) -> None:
    """Through the sink's own path (one statement per 100 records, as its group commit writes)."""
    sink = SqlAuditSink(engine)
    for start in range(0, len(records), 100):
        batch = [PendingRow(sink._stored_row(r)) for r in records[start : start + 100]]
        sink._commit(batch)
        assert all(item.done and item.error is None for item in batch)


def all_pages(query: AuditQuery, f: AuditFilter, limit: int) -> list[int]:
    ids: list[int] = []
    before = None
    for _ in range(100):
        page = query.page(f, limit=limit, before=before)
        ids += [row["id"] for row in page.rows]
        if page.older is None:
            return ids
        before = page.older
    raise AssertionError("pages never ended")


@dataclass
class Trails:
    """The same workload in two databases of one backend: never summarised, and summarised."""

    raw: AuditQuery
    summarised: AuditQuery
    records: list[AuditRecord]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def trails(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trails]:
    records = workload()
    schemas: list[PgSchema] = []
    queries = []
    for summarised in (False, True):
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('trail') / 'audit.sqlite'}"
        else:
            schema = PgSchema(request.getfixturevalue("pg_database"), f"t_{uuid.uuid4().hex[:12]}")
            schema.execute(f'CREATE SCHEMA "{schema.schema}"')
            schemas.append(schema)
            url = schema.url
        engine = make_engine(url)
        upgrade(engine)
        write(engine, records)
        query = AuditQuery(engine, clock=Clock(NOW + 600), settle=60)
        if summarised:
            assert query.refresh(budget=None, batch=16).last_id == 60
        else:
            assert query.status().last_id == 0
        queries.append(query)
    yield Trails(queries[0], queries[1], records)
    for query in queries:
        query.engine.dispose()
    for schema in schemas:
        schema.execute(f'DROP SCHEMA IF EXISTS "{schema.schema}" CASCADE')


@pytest.mark.parametrize("f", FILTERS, ids=lambda f: ",".join(f.as_params()) or "all")
def test_filters_match_exactly_with_and_without_summaries(trails: Trails, f: AuditFilter) -> None:
    want = expected(trails.records, f)
    for query in (trails.raw, trails.summarised):
        assert all_pages(query, f, limit=7) == want
        assert [row["id"] for row in query.export(f, batch=5)] == want[::-1]


def test_a_summary_left_behind_still_answers_exactly(engine: Engine) -> None:
    """Half summarised: the filter reads the terms below the watermark and the JSON above it."""
    records = workload()
    write(engine, records[:30])
    query = AuditQuery(engine, clock=Clock(NOW + 600), settle=60)
    query.refresh(budget=None)
    write(engine, records[30:])
    f = AuditFilter(signal="unusual_network")
    assert query.status().last_id == 30
    assert all_pages(query, f, limit=4) == expected(records, f)
    assert [r["id"] for r in query.export(f, batch=3)] == expected(records, f)[::-1]


def test_records_younger_than_the_settle_time_wait_for_the_next_refresh(engine: Engine) -> None:
    """PostgreSQL ids can commit out of order: the youngest records are left for later."""
    records = workload()
    write(engine, records)
    clock = Clock(records[39].time + 60)
    query = AuditQuery(engine, clock=clock, settle=60)
    query.refresh(budget=None)
    summarised = query.status().last_id
    assert 30 <= summarised < 41
    assert all(r.time <= clock.now - 60 for r in records[:summarised])
    clock.now = NOW + 3600
    assert query.refresh(budget=None).last_id == 60


def test_summaries_count_each_record_once_when_processes_race(engine: Engine) -> None:
    records = workload()
    write(engine, records)
    first, second = (AuditQuery(engine, clock=Clock(NOW + 600), settle=0) for _ in range(2))
    with engine.connect() as conn:
        stale = first._facts(conn, [audit_events.c.id > 0], newest_first=False, limit=100)
    second.refresh(budget=None)
    # The first process summarises the same batch from the watermark it read: refused.
    assert first._summarise(0, stale) is False
    with engine.connect() as conn:
        grants = conn.execute(select(func.sum(audit_edges.c.decisions))).scalar()
        terms = conn.execute(select(func.count()).select_from(audit_terms)).scalar()
    assert grants == sum(1 for r in records if r.outcome == "granted")
    fired = sum(len(r.details["risk"]["decision"]["fired"]) for r in records)
    assert terms == fired + sum(len(set(r.requested_audience + r.granted_audience)) for r in records)


def test_charts_and_graph(engine: Engine) -> None:
    records = workload()
    # An edge seen long ago, and one seen for the first time in the last day.
    records += [make_record(100, when=NOW - 20 * 86400, audience="https://old.example.com"),
                make_record(101, when=NOW - 120, subject="repo:acme/new:ref:refs/heads/main",
                            audience="https://reports.example.com")]  # fmt: skip
    write(engine, records)
    query = AuditQuery(engine, clock=Clock(NOW + 600), settle=60)
    query.refresh(budget=None)
    buckets = query.decisions_over_time(NOW - 3600, NOW, 600)
    start = NOW - 3600 - (NOW - 3600) % 600
    assert [(b.start, b.end) for b in buckets] == [(start + i * 600, start + (i + 1) * 600) for i in range(7)]
    assert_counts(buckets, records)
    # Whole hours come from the hourly summary (plus unsummarised records), over any window.
    hourly = query.decisions_over_time(NOW - 30 * 86400, NOW, 6 * 3600)
    assert len(hourly) == 121 and sum(b.total for b in hourly) == len(records)
    assert_counts(hourly, records)
    top = query.top_signals(NOW - 3600, NOW)
    assert [name for name, _ in top] == ["unusual_network", "attestation_drift"]
    in_hour = {s: expected(records, AuditFilter(signal=s, since=NOW - 3600, until=NOW)) for s in SIGNALS}
    assert dict(top) == {s: len(ids) for s, ids in in_hour.items() if ids}
    edges, count = query.edges(since=NOW - 30 * 86400, new_since=NOW - 600)
    by_audience = {e.audience: e for e in edges}
    assert count == len(edges) == 6
    assert by_audience["https://reports.example.com"].new
    assert not by_audience["https://old.example.com"].new and not by_audience[LEDGER].new
    deploy_grants = [r for r in records if r.outcome == "granted" and r.granted_audience == [DEPLOY]]
    assert sum(e.decisions for e in edges if e.audience == DEPLOY) == len(deploy_grants)
    # Only edges used within the window are drawn; new ones come first.
    recent, recent_count = query.edges(since=NOW - 86400, new_since=NOW - 600)
    assert recent_count == 5 and recent[0].audience == "https://reports.example.com"
    assert {e.audience for e in recent} == {DEPLOY, LEDGER, ODD, "https://reports.example.com"}


def assert_counts(buckets: list[Bucket], records: list[AuditRecord]) -> None:
    for b in buckets:
        inside = [r for r in records if b.start <= r.time < b.end]
        outcomes = ("granted", "refused", "error")
        assert b.counts == {o: n for o in outcomes if (n := sum(1 for r in inside if r.outcome == o))}


def test_hourly_charts_count_records_past_the_watermark(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = workload()
    write(engine, records[:25])
    query = AuditQuery(engine, clock=Clock(NOW + 600), settle=60)
    query.refresh(budget=None)
    write(engine, records[25:])
    assert query.status().last_id == 25
    assert_counts(query.decisions_over_time(NOW - 7200, NOW, 3600), records)
    # A long unsummarised tail is not read record by record: the index counts instead.
    monkeypatch.setattr(audit_charts, "_TAIL_LIMIT", 5)
    assert_counts(query.decisions_over_time(NOW - 7200, NOW, 3600), records)


def test_identity_summary(engine: Engine) -> None:
    records = workload()
    write(engine, records)
    query = AuditQuery(engine, clock=Clock(NOW + 600), settle=60)
    subject = "repo:acme/app:ref:refs/heads/main"
    ident = AuditFilter(issuer="github", subject=subject)
    for summarised in (False, True):
        if summarised:
            query.refresh(budget=None)
        summary = query.identity_summary("github", subject, limit=5)
        mine = expected(records, ident)
        assert summary.decisions == len(mine)
        signalled = [i for i in mine if records[i - 1].details["risk"]["decision"]["fired"]]
        step_ups = [i for i in mine if records[i - 1].error == "insufficient_user_authentication"]
        tokens = [f"jti-{i - 1}" for i in mine if records[i - 1].outcome == "granted"]
        assert [r["id"] for r in summary.signals] == signalled[:5]
        assert [r["id"] for r in summary.step_ups] == step_ups[:5]
        assert [r["issued_jti"] for r in summary.tokens] == tokens[:5]


def test_export_streams_in_constant_memory(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    upgrade(engine)
    write(engine, [make_record(i, when=NOW + i, fired=("unusual_network",)) for i in range(3000)])
    query = AuditQuery(engine, settle=0)
    tracemalloc.start()
    try:
        count = sum(1 for _ in query.export(AuditFilter(), batch=100))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 3000
    # 3,000 parsed records take over 10 MB; a batch of 100 a few hundred kB.
    assert peak < 3_000_000, peak


def test_prune_archives_then_deletes_an_oldest_prefix(engine: Engine, tmp_path: Path) -> None:
    day = 86400.0
    records = [make_record(i, when=NOW - (40 - i) * day, fired=("unusual_network",)) for i in range(40)]
    # Written after a newer record although it is older than the cutoff: it stays (ids stay contiguous).
    records.insert(35, make_record(99, when=NOW - 31 * day))
    write(engine, records)
    query = AuditQuery(engine, clock=Clock(NOW), settle=0)
    query.refresh(budget=None)
    cutoff = NOW - 30 * day
    assert query.prune(cutoff=cutoff, dry_run=True).records == 10
    assert len(list(query.export(AuditFilter()))) == 41
    archive = tmp_path / "archive.jsonl"
    result = query.prune(cutoff=cutoff, archive=archive, batch=3)
    assert result.records == 10 and result.boundary_id == 11
    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    assert [line["id"] for line in lines] == list(range(1, 11))
    assert [line["request_id"] for line in lines] == [f"req-{i}" for i in range(10)]
    assert stat.S_IMODE(os.stat(archive).st_mode) == 0o600
    remaining = [row["id"] for row in query.export(AuditFilter())]
    assert remaining == list(range(11, 42))
    with engine.connect() as conn:
        assert conn.execute(select(func.min(audit_terms.c.audit_id))).scalar() == 11
    # Nothing is overwritten, and nothing is deleted when the archive cannot be written.
    with pytest.raises(FileExistsError):
        query.prune(cutoff=NOW - 5 * day, archive=archive)
    assert [row["id"] for row in query.export(AuditFilter())] == remaining


# -- the filter itself ----------------------------------------------------------------------------


def test_times_are_iso_8601_or_an_age() -> None:
    assert parse_time("24h", NOW) == NOW - 86400
    assert parse_time("90m", NOW) == NOW - 5400
    assert parse_time("2w", NOW) == NOW - 14 * 86400
    assert parse_time("2026-06-01T00:00:00Z", NOW) == 1780272000.0
    assert parse_time("2026-06-01", NOW) == 1780272000.0
    assert parse_time("2026-06-01T02:00:00+02:00", NOW) == 1780272000.0
    for bad in ("yesterday", "24 hours", "-1h", "1y"):
        with pytest.raises(FilterError, match="neither an ISO-8601 time nor an age"):
            parse_time(bad, NOW)


def test_times_beyond_what_the_database_compares_are_taken_as_the_bounds() -> None:
    """A time before 1970 (or an age reaching there) or from the year 9000 on is the bound itself:
    no record lies beyond it, and the database can compare it (a datetime of the year 0 or 10000,
    which the query's slack would make of 0001-01-01 or 9999-12-31, cannot even be built)."""
    assert parse_time("0001-01-01", NOW) == EARLIEST == 0.0
    assert parse_time("0001-01-01T00:00:00+05:00", NOW) == EARLIEST
    assert parse_time("1969-12-31T23:59:59Z", NOW) == EARLIEST
    assert parse_time("999999w", NOW) == EARLIEST
    assert parse_time("9999-12-31T23:59:59", NOW) == LATEST
    assert parse_time("9999-12-31T23:59:59-05:00", NOW) == LATEST
    assert format_time(LATEST) == "9000-01-01T00:00:00Z"
    f = filter_from_params({"since": "0001-01-01", "until": "9999-12-31"}, NOW)
    assert (f.since, f.until) == (EARLIEST, LATEST)
    assert f.as_params() == {"since": "1970-01-01T00:00:00Z", "until": "9000-01-01T00:00:00Z"}
    # Built by hand, a filter still holds only comparable times.
    for bad in (-1.0, LATEST + 1, float("nan"), float("inf")):
        with pytest.raises(FilterError, match="since: must be between 1970-01-01T00:00:00Z and 9000"):
            AuditFilter(since=bad)


def test_record_ids_are_signed_64_bit() -> None:
    assert parse_record_id("1") == 1
    assert parse_record_id(" 9223372036854775807 ") == MAX_RECORD_ID == 2**63 - 1
    for bad in ("0", "-1", "9223372036854775808", "99999999999999999999999", "1e3", "", "0x10", "\u0661"):
        with pytest.raises(FilterError, match=r"before: must be a record id \(1 to 9223372036854775807\)"):
            parse_record_id(bad)


def test_filter_values_are_checked() -> None:
    with pytest.raises(FilterError, match="outcome: must be one of granted, refused, error"):
        AuditFilter(outcome="maybe")
    with pytest.raises(FilterError, match="signal: must be one of"):
        AuditFilter(signal="gut_feeling")
    with pytest.raises(FilterError, match="since: must not be later than until"):
        filter_from_params({"since": "1h", "until": "2h"}, NOW)
    with pytest.raises(FilterError, match="subject: must be 1 to 600 characters"):
        AuditFilter(subject="x" * 601)
    f = filter_from_params(
        {"outcome": "refused", "since": "2026-06-01T00:00:00Z", "client_id": " ", "x": "y"}, NOW
    )
    assert f == AuditFilter(outcome="refused", since=1780272000.0)
    assert f.as_params() == {"outcome": "refused", "since": "2026-06-01T00:00:00Z"}


# -- sts audit ------------------------------------------------------------------------------------


@pytest.fixture
def cli_config(tmp_path: Path) -> Callable[..., Any]:
    config = tmp_path / "sts.yaml"
    database = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    config.write_text(yaml.safe_dump({"database_url": database, "keys_dir": str(tmp_path / "keys")}))
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    upgrade(engine)
    import time

    now = time.time()
    # One a day for ten days, an hour inside each day boundary; odd ones fired a signal, the last refused.
    records = [
        make_record(i, when=now - (10 - i) * 86400 + 3600, fired=("attestation_drift",) if i % 2 else (),
                    outcome="refused" if i == 9 else "granted")
        for i in range(10)
    ]  # fmt: skip
    write(engine, records)
    engine.dispose()

    def run(*args: str) -> Any:
        return CliRunner().invoke(main, ["--config", str(config), "audit", *args])

    return run


def test_cli_query_pages_newest_first(cli_config: Callable[..., Any]) -> None:
    result = cli_config("query", "--signal", "attestation_drift", "-n", "3")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["id"] for line in lines] == [10, 8, 6]
    assert "more: add --before 6" in result.stderr
    result = cli_config("query", "--signal", "attestation_drift", "--before", "6")
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [4, 2]
    result = cli_config("query", "--outcome", "refused", "--since", "2d")
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [10]


def test_cli_refuses_a_bad_filter(cli_config: Callable[..., Any]) -> None:
    result = cli_config("query", "--since", "last tuesday")
    assert result.exit_code == 2
    assert "since: 'last tuesday' is neither an ISO-8601 time nor an age" in result.output
    result = cli_config("export", "--signal", "nope")
    assert result.exit_code == 2 and "signal: must be one of" in result.output


def test_cli_takes_times_beyond_the_calendar_and_refuses_ids_beyond_64_bits(
    cli_config: Callable[..., Any],
) -> None:
    every = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    for args in (("--since", "0001-01-01"), ("--until", "9999-12-31T23:59:59"), ("--since", "999999w")):
        result = cli_config("query", *args)
        assert result.exit_code == 0, result.output
        assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == every, args
    assert cli_config("query", "--until", "0001-01-01").stdout == ""
    for args in (("query", "--before", "9223372036854775808"), ("query", "--before", "0"),
                 ("tail", "-n", "99999999999999999999"), ("tail", "-n", "-5"),
                 ("prune", "--older-than", "999999999", "--dry-run")):  # fmt: skip
        result = cli_config(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "is not in the range" in result.output and "Traceback" not in result.output
    result = cli_config("query", "--before", "9223372036854775807")
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == every


def test_cli_export_to_a_new_file(cli_config: Callable[..., Any], tmp_path: Path) -> None:
    out = tmp_path / "siem.jsonl"
    result = cli_config("export", "--since", "5d", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [6, 7, 8, 9, 10]
    assert "exported 5 record(s)" in result.stderr
    again = cli_config("export", "--output", str(out))
    assert again.exit_code == 1 and "already exists" in again.output
    stdout = cli_config("export", "--until", "8d")
    assert [json.loads(line)["id"] for line in stdout.stdout.splitlines()] == [1, 2]


def test_cli_prune(cli_config: Callable[..., Any], tmp_path: Path) -> None:
    assert cli_config("prune", "--older-than", "5").exit_code == 2  # neither --archive nor --delete
    both = cli_config("prune", "--older-than", "5", "--delete", "--archive", str(tmp_path / "a.jsonl"))
    assert both.exit_code == 2
    assert cli_config("prune", "--older-than", "0", "--delete").exit_code == 2
    dry = cli_config("prune", "--older-than", "5", "--dry-run")
    assert dry.exit_code == 0 and "would remove 5 record(s)" in dry.output
    archive = tmp_path / "old.jsonl"
    done = cli_config("prune", "--older-than", "5", "--archive", str(archive))
    assert done.exit_code == 0, done.output
    assert "archived 5 record(s)" in done.output
    assert [json.loads(line)["id"] for line in archive.read_text().splitlines()] == [1, 2, 3, 4, 5]
    left = cli_config("query")
    assert [json.loads(line)["id"] for line in left.stdout.splitlines()] == [10, 9, 8, 7, 6]
    deleted = cli_config("prune", "--older-than", "3", "--delete")
    assert deleted.exit_code == 0 and "deleted 2 record(s)" in deleted.output
    summarized = cli_config("summarize")
    assert summarized.exit_code == 0 and "summaries up to record 10" in summarized.output


def test_prune_deletes_nothing_when_the_trail_changes_while_archiving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    upgrade(engine)
    write(engine, [make_record(i, when=NOW - (10 - i) * 86400) for i in range(10)])
    query = AuditQuery(engine, clock=Clock(NOW), settle=0)
    archive_all = AuditQuery._archive

    def archive_then_change(self: AuditQuery, path: Path, boundary: int) -> int:
        written = archive_all(self, path, boundary)
        # Another process changes what lies below the boundary meanwhile.
        with engine.begin() as conn:
            conn.execute(audit_events.delete().where(audit_events.c.id == 3))
        return written

    monkeypatch.setattr(AuditQuery, "_archive", archive_then_change)
    with pytest.raises(PruneAborted):
        query.prune(cutoff=NOW - 5 * 86400 + 1, archive=tmp_path / "a.jsonl")
    assert [row["id"] for row in query.export(AuditFilter())] == [1, 2, 4, 5, 6, 7, 8, 9, 10]


def test_cli_prune_deletes_nothing_when_the_archive_cannot_be_written(
    cli_config: Callable[..., Any], tmp_path: Path
) -> None:
    result = cli_config("prune", "--older-than", "5", "--archive", str(tmp_path / "missing" / "a.jsonl"))
    assert result.exit_code == 1
    assert "not written (No such file or directory); nothing deleted" in result.output
    assert len(cli_config("query").stdout.splitlines()) == 10


def test_prune_keeps_the_hash_chains_verifiable(engine: Engine, tmp_path: Path) -> None:
    """Two writers (two chains), interleaved: the pruned prefix takes each chain's oldest records,
    moves their anchors, and what remains verifies; the archive carries each record's link."""
    from sts.adapters.audit_integrity import verify_trail
    from sts.core.audit_chain import AuditTrailBroken

    sinks = [SqlAuditSink(engine), SqlAuditSink(engine)]
    for i in range(12):
        sinks[i % 2].write(make_record(i, when=NOW - (12 - i) * 86400))
    query = AuditQuery(engine, clock=Clock(NOW), settle=0)
    archive = tmp_path / "old.jsonl"
    assert query.prune(cutoff=NOW - 6 * 86400 - 1, archive=archive).records == 6
    report, _ = verify_trail(engine)
    assert report.records == 6
    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    assert {line["chain_id"] for line in lines} == {h for h in report.heads}
    assert sorted(line["seq"] for line in lines) == [1, 1, 2, 2, 3, 3]
    assert all(len(line["hash"]) == 64 and len(line["prev_hash"]) == 64 for line in lines)

    # A trail damaged inside the range to prune: refused before anything is deleted.
    with engine.begin() as conn:
        conn.execute(audit_events.delete().where(audit_events.c.id == 9))
    with pytest.raises(PruneWouldBreakChain):
        query.prune(cutoff=NOW, archive=None)
    assert [row["id"] for row in query.export(AuditFilter())] == [7, 8, 10, 11, 12]
    with pytest.raises(AuditTrailBroken):
        verify_trail(engine)


# -- a subject without its issuer: found on the identity index (no index on subject alone) -------

SHARED = "repo:acme/shared:ref:refs/heads/main"


def shared_subject_records() -> list[AuditRecord]:
    """One subject under two issuers and under none (a refusal before the issuer was known),
    among records of other subjects."""
    records = []
    for i in range(40):
        issuer: str | None = ("github", "gitlab", None, "kubernetes")[i % 4]
        subject = SHARED if i % 3 != 2 else f"system:serviceaccount:ns:sa{i}"
        if issuer == "kubernetes":
            subject = "system:serviceaccount:pay:api"
        records.append(make_record(i, when=NOW - 600 + i, issuer=issuer, subject=subject))  # type: ignore[arg-type]
    return records


def test_a_subject_alone_is_found_under_every_issuer(engine: Engine) -> None:
    records = shared_subject_records()
    write(engine, records)
    query = AuditQuery(engine, clock=Clock(NOW + 600), settle=60)
    for f in (
        AuditFilter(subject=SHARED),
        AuditFilter(subject=SHARED, outcome="granted", client_id="gateway"),
        AuditFilter(subject="system:serviceaccount:pay:api"),
        AuditFilter(subject="repo:nobody/nothing:ref:refs/heads/main"),
        AuditFilter(subject=SHARED, since=NOW - 590, until=NOW - 570),
    ):
        want = expected(records, f)
        assert all_pages(query, f, limit=4) == want
        assert [row["id"] for row in query.export(f, batch=3)] == want[::-1]
    # The subject's records are under two issuers and under none.
    assert {records[i - 1].issuer for i in expected(records, AuditFilter(subject=SHARED))} == {
        "github",
        "gitlab",
        None,
    }
    recent = SqlAuditSink(engine).recent(100, subject=SHARED)
    assert [r["request_id"] for r in recent] == [
        f"req-{i - 1}" for i in expected(records, AuditFilter(subject=SHARED))
    ]
    assert SqlAuditSink(engine).recent(5, subject="repo:nobody/nothing:ref:refs/heads/main") == []


def page_plan(engine: Engine, query: AuditQuery, f: AuditFilter) -> str:
    """The plan of the page query for ``f`` (which must find records): SQLite's ``EXPLAIN QUERY
    PLAN``; PostgreSQL's ``EXPLAIN``, told not to scan the table where an index could serve."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "FROM audit_events" in statement and "ORDER BY audit_events.id DESC" in statement:
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        assert query.page(f, limit=5).rows
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    statement, parameters = seen[-1]
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            return " ".join(str(row[-1]) for row in cursor.fetchall())
        cursor.execute("SET enable_seqscan = off")
        cursor.execute("EXPLAIN " + statement, parameters)
        return " ".join(str(row[0]) for row in cursor.fetchall())
    finally:
        raw.close()


def test_a_subject_alone_is_read_on_the_identity_index(engine: Engine) -> None:
    """The page query of a subject filter can be answered from ``ix_audit_events_identity``:
    SQLite's plan searches it; PostgreSQL, told not to scan the table, uses it.  With the
    subject compared alone, neither could (no index on subject alone since revision 0007)."""
    write(engine, shared_subject_records())
    query = AuditQuery(engine, clock=Clock(NOW + 600), settle=60)
    plan = page_plan(engine, query, AuditFilter(subject="system:serviceaccount:pay:api"))
    if engine.dialect.name == "sqlite":
        searched = "SEARCH audit_events USING INDEX ix_audit_events_identity (issuer=? AND subject=?)"
        assert searched in plan, plan
        assert "SCAN audit_events" not in plan and "TEMP B-TREE" not in plan, plan
    else:
        # Searched by issuer and subject, already in id order: not a whole-index scan, no sort.
        assert "ix_audit_events_identity" in plan, plan
        assert "Index Cond: (((issuer)::text = " in plan, plan
        assert "Sort Key" not in plan and "Seq Scan on audit_events" not in plan, plan


def test_an_error_is_read_on_its_partial_index(engine: Engine) -> None:
    """``--error CODE`` scanned the whole trail (no index held ``error``: about a second on a
    million records, an outside audit); revision 0009's partial index serves it, in id order."""
    sink = SqlAuditSink(engine)
    for i in range(6):
        record = make_record(i, when=NOW - 60 + i)
        if i % 2:
            record.outcome, record.error = "refused", "invalid_target"
        sink.write(record)
    query = AuditQuery(engine, clock=Clock(NOW + 600), settle=60)
    assert [row["id"] for row in query.page(AuditFilter(error="invalid_target")).rows] == [6, 4, 2]
    plan = page_plan(engine, query, AuditFilter(error="invalid_target"))
    if engine.dialect.name == "sqlite":
        assert "SEARCH audit_events USING INDEX ix_audit_events_by_error (error=?)" in plan, plan
        assert "SCAN audit_events" not in plan and "TEMP B-TREE" not in plan, plan
    else:
        assert "ix_audit_events_by_error" in plan and "Sort Key" not in plan, plan


def test_prune_refuses_to_remove_an_edited_record(engine: Engine, tmp_path: Path) -> None:
    """What a prune removes must verify: an edited record below the cutoff (a grant rewritten as a
    refusal) is reported, nothing is deleted, and ``sts audit verify`` still sees the edit (an
    outside audit had the prune carry it out of the trail, after which verify said all was well)."""
    from sts.adapters.audit_integrity import verify_trail
    from sts.core.audit_chain import AuditTrailBroken

    sink = SqlAuditSink(engine)
    for i in range(8):
        sink.write(make_record(i, when=NOW - (8 - i) * 86400))
    with engine.begin() as conn:
        conn.execute(
            audit_events.update()
            .where(audit_events.c.id == 2)
            .values(outcome="refused", error="invalid_target")
        )
    query = AuditQuery(engine, clock=Clock(NOW), settle=0)
    with pytest.raises(PruneWouldBreakChain, match="do not verify"):
        query.prune(cutoff=NOW - 4 * 86400 - 1, archive=tmp_path / "old.jsonl")
    assert len(list(query.export(AuditFilter()))) == 8
    with pytest.raises(AuditTrailBroken):
        verify_trail(engine)
