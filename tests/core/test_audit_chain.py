"""Tamper evidence of the audit trail: hash chains, ``sts audit verify`` and signed checkpoints.

* The canonical form is RFC 8785 (JCS): the fast path agrees with the
  ``rfc8785`` library on tricky values, and RFC 8785's own example.
* Two writer processes (each several threads, through both write paths)
  write to one database, SQLite and a private PostgreSQL database; the trail
  verifies; then an edited record, an edited column, a deleted record and
  two reordered records are each reported at the right link, and undoing
  each makes the trail verify again.
* Truncation (the newest records, a whole chain) and a rewritten history
  pass the chain walk alone and are caught with a signed checkpoint.
* Retention: a pruned oldest prefix still verifies from its anchors; a
  prefix deleted without them does not.
* A failed commit leaves no gap; a commit whose outcome is unknown is
  settled without a gap either way.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import os
import random
import secrets
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.synchronize import Barrier
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import rfc8785
import yaml
from click.testing import CliRunner
from sqlalchemy import JSON, Engine, Text, cast, delete, func, insert, select, text, type_coerce, update

from sts.adapters import audit_integrity
from sts.adapters.keyring import KeyRing
from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.chain_heads import ChainHeads
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.group_commit import audit_row
from sts.adapters.sql.retention import PruneWouldBreakChain, record_prune_anchors
from sts.adapters.sql.schema import audit_chains, audit_events
from sts.adapters.sql.statements import CommitOutcomeUnknown
from sts.cli import main
from sts.core.audit import AuditRecord
from sts.core.audit_chain import (
    AuditTrailBroken,
    BrokenLink,
    TrailReport,
    genesis_hash,
    link_hash,
)
from sts.core.canonical_json import canonical_json, canonical_record
from sts.core.ports import AlreadyUsed, AuditUnavailable, SingleUse
from sts.migrations import upgrade
from tests.support.postgres import PgSchema

NOW = 1_700_000_000.0
ISSUER = "https://sts.example.com"
MALLORY = "repo:mallory/app:ref:refs/heads/main"
events, chains = audit_events, audit_chains
CheckpointInvalid = audit_integrity.CheckpointInvalid


# -- the canonical form and the link ----------------------------------------------------------

#: RFC 8785 §3.2.2 and §3.2.3: the example input and its canonical form.
RFC8785_EXAMPLE = (
    '{"numbers":[333333333.33333329,1E30,4.50,2e-3,0.000000000000000000000000001],'
    '"string":"\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/","literals":[null,true,false]}'
)
RFC8785_CANONICAL = (
    '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
    '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
)

TRICKY: list[Any] = [
    {"t": 1_700_000_000.0, "exp": 1_700_000_300.25, "zero": 0.0, "neg": -0.0, "one": 1.0},
    {"small": [1e-4, 9.9e-5, 1e-6, 1e-7, 1.5e-10], "big": [1e15 + 0.5, 1e16, 1e21, 1e22, 2.0**53]},
    {"ints": [0, -1, 2**53 - 1, -(2**53 - 1)], "bools": [True, False, None]},
    {"s": "\x00\x01\x1f\x7f \u2028\u2029 \"'\\/ \t\n\r\b\f é 😀 \ufeff"},
    {"\ue000": 1, "\U0001f600": 2, "a": 3, "é": 4, "B": 5},  # UTF-16 order differs from code points
    {"nested": {"z": [{"y": 0.125, "x": [1.5, "2"]}], "a": {}}, "empty": [], "tuple": (1, 2.5)},
    [0.1, 0.2, 0.30000000000000004, 123456789.123, 5e-324, 1.7976931348623157e308],
    {"looks like numbers": ":1.0,", "more": "[1e-05]", "digits": ",1234567890123456789}"},
    1.0,
    -0.0,
]


@pytest.mark.parametrize("value", TRICKY)
def test_canonical_json_is_rfc8785(value: Any) -> None:
    assert canonical_json(value) == rfc8785.dumps(value).decode("utf-8")


def test_canonical_json_is_rfc8785_on_random_values() -> None:
    """Seeded random JSON, weighted toward what the fast path must recognise: integral, tiny and
    huge floats, long integers, number-like strings, and characters from U+E000 up."""
    rng = random.Random(8785)
    alphabet = 'aZ09:,[]{}.e-+"\\/\x00\x1f\x7f é€\u2028\ue000\uffff😀'
    specials = [0.0, -0.0, 1e-4, 9.999e-5, 1e-6, 1e-7, 1e15, 1e16, 1e21, 2.0**52 + 0.5, 5e-324]

    def number() -> float:
        kind = rng.random()
        if kind < 0.25:
            return float(rng.randint(-(10**6), 10**6))
        if kind < 0.5:
            return rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30)
        if kind < 0.6:
            return rng.choice(specials)
        return rng.random() * 10 ** rng.randint(-6, 17)

    def string() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))

    def value(depth: int = 0) -> Any:
        kind = rng.random()
        if depth > 3 or kind < 0.5:
            scalars = [None, True, rng.randint(-(2**53) + 1, 2**53 - 1), number(), number(), string()]
            return rng.choice(scalars)
        if kind < 0.75:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {string(): value(depth + 1) for _ in range(rng.randint(0, 4))}

    for _ in range(3000):
        v = value()
        assert canonical_json(v) == rfc8785.dumps(v).decode("utf-8"), v


def _audit_shaped(rng: random.Random, *, unicode_names: bool = True) -> dict[str, Any]:
    """A decision record as the pipeline builds one (``AuditRecord.as_dict``), with random values:
    integral and fractional times, unicode subjects and user agents, nested risk evidence; with
    ``unicode_names``, member names from U+E000 up too (which the fast path leaves to rfc8785)."""
    text = 'aZ09:/|@.-_ é€ü中文 😀\u2028"\\\x01'

    def string(limit: int = 24) -> str:
        return "".join(rng.choice(text) for _ in range(rng.randint(0, limit)))

    def when() -> float:
        return rng.choice([float(rng.randint(1_600_000_000, 1_900_000_000)), rng.uniform(1.6e9, 1.9e9)])

    signals = [
        {
            "name": rng.choice(["unusual_network", "attestation_drift", "recent_failures", "shared_signal"]),
            "fired": rng.random() < 0.3,
            "weight": rng.choice([0, 30, 60, 12.5, 100.0]),
            "reason": string(40),
            "evidence": {
                "network": "10.0.0.0/24",
                "count": rng.randint(0, 40),
                "age": rng.choice([0, 0.0, 12.75, when()]),
                "changed": {
                    string(8) if unicode_names else rng.choice(["repository_id", "cnf_jkt", "ref"]): {
                        "was": string(),
                        "now": string(),
                    }
                },
                "clears": [{"by": "probation", "exchanges_left": rng.randint(0, 3), "max_age": 60}],
            },
        }
        for _ in range(rng.randint(0, 7))
    ]
    return {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "time": when(),
        "request_id": string(),
        "endpoint": rng.choice(["token", "introspect", "revoke", "ssf"]),
        "source_ip": rng.choice(["127.0.0.1", "2001:db8::1", None]),
        "user_agent": rng.choice([None, string(60)]),
        "outcome": rng.choice(["granted", "refused", "error"]),
        "error": rng.choice([None, "invalid_request", "invalid_target"]),
        "client_id": rng.choice([None, string()]),
        "subject": string(80),
        "subject_token_iat": rng.choice([None, when(), float(rng.randint(0, 2**53 - 1))]),
        "requested_audience": [string() for _ in range(rng.randint(0, 3))],
        "requested_scope": rng.choice([None, [string(10) for _ in range(rng.randint(0, 3))]]),
        "granted_lifetime": rng.choice([None, rng.randint(1, 86400)]),
        "reasons": [string(30) for _ in range(rng.randint(0, 4))],
        "issued_exp": rng.choice([None, rng.randint(1_600_000_000, 1_900_000_000), when()]),
        "details": {
            "trace_id": secrets.token_hex(16) if rng.random() < 0.5 else None,
            "delegation_depth": rng.randint(0, 3),
            "risk": {
                "mode": "enforce",
                "score": rng.choice([0, 30, 90.0, 42.5]),
                "decision": {"action": "allow", "lifetime_factor": rng.choice([1.0, 0.5, 0.2, 1])},
                "signals": signals,
                "learning": rng.random() < 0.5,
                "baseline": {"count": rng.randint(0, 9), "since": when()},
            },
            "assurance": {"presented": string(), "max_age": rng.choice([None, 300, 300.0])},
        },
    }


def test_canonical_json_is_rfc8785_on_generated_audit_records() -> None:
    rng = random.Random(1208)
    for _ in range(2000):
        record = _audit_shaped(rng)
        assert canonical_json(record) == rfc8785.dumps(record).decode("utf-8"), record


def test_audit_records_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The records the pipeline writes (integral float times among them) never need the
    pure-Python ``rfc8785`` library, which costs several times the rest of the audit write."""
    rng = random.Random(12)
    records = [_audit_shaped(rng, unicode_names=False) for _ in range(200)]
    expected = [rfc8785.dumps(record).decode("utf-8") for record in records]

    def refuse(value: Any) -> bytes:
        raise AssertionError("fell back to the rfc8785 library")

    monkeypatch.setattr(rfc8785, "dumps", refuse)
    for record, canonical in zip(records, expected, strict=True):
        before = json.dumps(record, sort_keys=True)
        assert canonical_record(record) == (canonical, record)
        assert json.dumps(record, sort_keys=True) == before  # the record itself is not changed


def test_canonical_json_of_the_rfc8785_example() -> None:
    assert canonical_json(json.loads(RFC8785_EXAMPLE)) == RFC8785_CANONICAL


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2**53, "lone \ud800 surrogate"])
def test_canonical_json_refuses_what_jcs_cannot_represent(value: Any) -> None:
    with pytest.raises(rfc8785.CanonicalizationError):
        canonical_json({"v": value})


def test_a_record_jcs_cannot_represent_is_stored_representable() -> None:
    record = {"subject": "a\ud800b", "details": {"score": float("nan"), "n": 2**60, "when": object}}
    stored_text, stored = canonical_record(record)
    assert stored["subject"] == "a\ufffdb" and stored["details"]["score"] == "nan"
    assert stored["details"]["n"] == str(2**60)
    # What is stored reads back as the value it stands for, and canonicalizes to itself.
    assert json.loads(stored_text) == stored
    assert canonical_json(json.loads(stored_text)) == stored_text


def test_link_hash_is_sha256_of_the_previous_hash_and_the_jcs_of_the_link() -> None:
    chain_id, record = secrets.token_hex(16), {"b": [1.5, None], "a": "x"}
    prev = genesis_hash(chain_id)
    assert prev == hashlib.sha256(b"sts.audit.chain.v1:" + chain_id.encode()).hexdigest()
    link = rfc8785.dumps({"seq": 7, "record": record, "chain_id": chain_id})
    expected = hashlib.sha256(bytes.fromhex(prev) + link).hexdigest()
    assert link_hash(prev, chain_id, 7, canonical_json(record)) == expected


# -- databases and writers --------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.sqlite'}"
        return
    schema = PgSchema(request.getfixturevalue("pg_database"), f"t_{uuid.uuid4().hex[:12]}")
    schema.execute(f'CREATE SCHEMA "{schema.schema}"')
    try:
        yield schema.url
    finally:
        schema.execute(f'DROP SCHEMA IF EXISTS "{schema.schema}" CASCADE')


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def decision(n: int, now: float = NOW) -> AuditRecord:
    outcome = "granted" if n % 3 else "refused"
    return AuditRecord(
        event_id=str(uuid.uuid4()),
        time=now + n * 0.001,
        request_id=f"req-{n}",
        endpoint="token",
        outcome=outcome,
        error=None if outcome == "granted" else "invalid_target",
        client_id="ci",
        issuer="upstream",
        subject=f"repo:acme/app-{n % 5}:ref:refs/heads/main",
        subject_token_sha256=hashlib.sha256(str(n).encode()).hexdigest(),
        granted_audience=["https://deploy.example.com"] if outcome == "granted" else [],
        rule="deploy" if outcome == "granted" else None,
        reasons=["policy.rule_matched" if outcome == "granted" else "policy.no_rule"],
        issued_jti=secrets.token_urlsafe(16) if outcome == "granted" else None,
        issued_exp=now + 300.5 if outcome == "granted" else None,
        details={"risk": {"score": 0.25, "signals": ["new_audience"]}, "n": n},
    )


def write_decisions(url: str, start: int, count: int, threads: int, barrier: Barrier | None) -> None:
    """One writer: its own engine and sink, ``threads`` threads, both write paths (every third
    record commits a single use with it)."""
    engine = make_engine(url)
    sink = SqlAuditSink(engine)
    failures: list[BaseException] = []

    def work(first: int) -> None:
        try:
            for n in range(first, start + count, threads):
                record = decision(n)
                if n % 3 == 1:
                    use = SingleUse("subject_token", f"{url}:{n}", NOW + 600, None)
                    sink.write_with_uses(record, [use], NOW)
                else:
                    sink.write(record)
        except BaseException as exc:
            failures.append(exc)

    if barrier is not None:
        barrier.wait(timeout=60)
    pool = [threading.Thread(target=work, args=(start + i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    engine.dispose()
    if failures:
        raise failures[0]


def two_writer_processes(url: str, per_writer: int) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    writers = [
        context.Process(target=write_decisions, args=(url, i * per_writer, per_writer, 4, barrier))
        for i in range(2)
    ]
    for p in writers:
        p.start()
    for p in writers:
        p.join(timeout=120)
    assert [p.exitcode for p in writers] == [0, 0]


def verify(engine: Engine, *checkpoints: dict[str, tuple[int, str]]) -> TrailReport:
    report, _ = audit_integrity.verify_trail(engine, checkpoints)
    return report


def broken(engine: Engine, *checkpoints: dict[str, tuple[int, str]]) -> list[BrokenLink]:
    with pytest.raises(AuditTrailBroken) as caught:
        audit_integrity.verify_trail(engine, checkpoints)
    return caught.value.report.broken


def chain_rows(engine: Engine, chain_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        query = select(events).where(events.c.chain_id == chain_id).order_by(events.c.seq)
        return [dict(r._mapping) for r in conn.execute(query)]


def longest_chain(engine: Engine) -> str:
    with engine.connect() as conn:
        query = (
            select(events.c.chain_id)
            .where(events.c.chain_id.is_not(None))
            .group_by(events.c.chain_id)
            .order_by(func.count().desc())
            .limit(1)
        )
        return str(conn.execute(query).scalar_one())


# -- tampering: detected, on both databases, with two writers at once -------------------------


def test_two_writer_processes_verify_and_every_kind_of_tampering_is_detected(
    database_url: str, engine: Engine
) -> None:
    two_writer_processes(database_url, per_writer=60)
    report = verify(engine)
    assert report.records == 120
    assert len(report.heads) >= 2  # at least one chain per writer process
    with engine.connect() as conn:
        writers = conn.execute(select(func.count(func.distinct(chains.c.writer)))).scalar()
    assert writers == 2

    chain_id = longest_chain(engine)
    rows = chain_rows(engine, chain_id)
    assert len(rows) >= 6 and [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    victim, after = rows[2], rows[3]

    def tampered(change: Callable[[Any], None], undo: Callable[[Any], None]) -> Any:
        with engine.begin() as conn:
            change(conn)
        try:
            found = broken(engine)
        finally:
            with engine.begin() as conn:
                undo(conn)
        assert verify(engine).records == 120  # undone: intact again
        assert len(found) == 1 and found[0].chain_id == chain_id
        return found[0]

    def restore(row: dict[str, Any]) -> Callable[[Any], None]:
        return lambda conn: conn.execute(update(events).where(events.c.id == row["id"]).values(**row))

    # An edited record: who was granted what, changed in the record and its column alike.
    edited = {**victim["record"], "subject": MALLORY}
    link = tampered(
        lambda conn: conn.execute(
            update(events).where(events.c.id == victim["id"]).values(record=edited, subject=edited["subject"])
        ),
        restore(victim),
    )
    assert (link.seq, link.record_id) == (3, victim["id"])
    assert "hash does not match the record" in link.problem

    # An edited column alone: queries by outcome would find a refusal among grants.
    flipped = "refused" if victim["outcome"] == "granted" else "granted"
    link = tampered(
        lambda conn: conn.execute(update(events).where(events.c.id == victim["id"]).values(outcome=flipped)),
        restore(victim),
    )
    assert (link.seq, link.record_id) == (3, victim["id"])
    assert "column outcome differs from the record" in link.problem

    # The same values in another text (an escaped member name): the hash, over the canonical text,
    # still matches, but the database's JSON functions read another record (an outside audit).
    escaped = canonical_json(victim["record"]).replace('"outcome"', '"outc\\u006fme"', 1)
    assert escaped != canonical_json(victim["record"]) and json.loads(escaped) == victim["record"]
    as_text = type_coerce(escaped, Text)
    written = as_text if engine.dialect.name == "sqlite" else cast(as_text, JSON)
    link = tampered(
        lambda conn: conn.execute(update(events).where(events.c.id == victim["id"]).values(record=written)),
        restore(victim),
    )
    assert (link.seq, link.record_id) == (3, victim["id"])
    assert "text is not its canonical JSON" in link.problem

    # A deleted record: a gap, reported at the record after it.
    link = tampered(
        lambda conn: conn.execute(delete(events).where(events.c.id == victim["id"])),
        lambda conn: conn.execute(insert(events).values(**victim)),
    )
    assert (link.seq, link.record_id) == (4, after["id"])
    assert "seq 3 missing" in link.problem

    # Two records reordered (their places in the chain swapped).
    def swap(conn: Any, first: dict[str, Any], second: dict[str, Any]) -> None:
        conn.execute(update(events).where(events.c.id == first["id"]).values(seq=-1))
        conn.execute(update(events).where(events.c.id == second["id"]).values(seq=first["seq"]))
        conn.execute(update(events).where(events.c.id == first["id"]).values(seq=second["seq"]))

    def unswap(conn: Any) -> None:
        conn.execute(update(events).where(events.c.id == after["id"]).values(seq=-1))
        restore(victim)(conn)
        restore(after)(conn)

    link = tampered(lambda conn: swap(conn, victim, after), unswap)
    assert (link.seq, link.record_id) == (3, after["id"])
    assert "prev_hash is not the hash of the record before it" in link.problem

    # Reordered by moving the records' contents instead (hashes and all): the links stay, the
    # seq inside each hash does not.
    def move(conn: Any, first: dict[str, Any], second: dict[str, Any]) -> None:
        keep = {"id", "seq"}
        conn.execute(
            update(events)
            .where(events.c.id == first["id"])
            .values(**{k: v for k, v in second.items() if k not in keep})
        )
        conn.execute(
            update(events)
            .where(events.c.id == second["id"])
            .values(**{k: v for k, v in first.items() if k not in keep})
        )

    link = tampered(
        lambda conn: move(conn, victim, after), lambda conn: [restore(r)(conn) for r in (victim, after)]
    )
    assert (link.seq, link.record_id) == (3, victim["id"])
    assert "prev_hash is not the hash of the record before it" in link.problem

    # A record's id changed (the hash does not cover it): a query by time window (its ids) or the
    # timeline would no longer find it there, nor would pruning, which takes the lowest ids.
    def renumber(conn: Any, row: dict[str, Any], new_id: int) -> None:
        conn.execute(update(events).where(events.c.id == row["id"]).values(id=new_id))

    link = tampered(
        lambda conn: renumber(conn, victim, 10**9),
        lambda conn: conn.execute(update(events).where(events.c.id == 10**9).values(id=victim["id"])),
    )
    assert (link.seq, link.record_id) == (4, after["id"])
    assert f"is not after the id of seq 3 ({10**9}): moved" in link.problem

    # Two records' ids swapped: each keeps its place in the chain, the timeline shows them reordered.
    def swap_ids(conn: Any) -> None:
        renumber(conn, victim, -7)
        renumber(conn, after, victim["id"])
        conn.execute(update(events).where(events.c.id == -7).values(id=after["id"]))

    link = tampered(swap_ids, swap_ids)
    assert (link.seq, link.record_id) == (4, victim["id"])
    assert "moved" in link.problem


def test_a_chain_whose_records_are_all_deleted_or_never_registered_is_detected(engine: Engine) -> None:
    sink_a, sink_b = SqlAuditSink(engine), SqlAuditSink(engine)
    for n in range(4):
        (sink_a if n % 2 else sink_b).write(decision(n))
    heads = verify(engine).heads
    first, second = sorted(heads)
    with engine.begin() as conn:
        conn.execute(delete(events).where(events.c.chain_id == first))
    [link] = broken(engine)
    assert link.chain_id == first and "every record was deleted" in link.problem
    with engine.begin() as conn:
        conn.execute(delete(chains).where(chains.c.chain_id.in_([first, second])))
    [link] = broken(engine)
    assert link.chain_id == second and "not registered" in link.problem


def test_records_without_a_chain_after_chaining_began_are_reported(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    upgrade(engine, "0010_baseline_failures")
    legacy = SqlLegacyRow(engine)
    legacy.insert(decision(0))  # as written before chaining (an older version)
    upgrade(engine)  # 0011 counts it
    SqlAuditSink(engine).write(decision(1))
    report, unchained = audit_integrity.verify_trail(engine)
    assert report.records == 1 and (unchained.before, unchained.after) == (1, 0)
    legacy.insert(decision(2))  # inserted past the service: no chain
    _, unchained = audit_integrity.verify_trail(engine)
    assert (unchained.before, unchained.after) == (1, 1) and unchained.first_after == 3
    # A record made up with a low id (below the first chained one, as a prune frees) but a time
    # after chaining began is not taken for one written before it.
    with engine.begin() as conn:
        row = {k: v for k, v in conn.execute(select(events).where(events.c.id == 2)).one()._mapping.items()}
        conn.execute(
            insert(events).values(
                **{
                    **row,
                    "id": -5,
                    "chain_id": None,
                    "seq": None,
                    "event_id": "x",
                    "time": dt.datetime.now(dt.UTC),
                }
            )
        )
    _, unchained = audit_integrity.verify_trail(engine)
    assert (unchained.before, unchained.after) == (1, 2) and unchained.first_after == -5
    engine.dispose()


def test_a_database_upgraded_from_0_1_0_chains_new_records_and_counts_the_old(database_url: str) -> None:
    from tests.adapters.test_migrations import V0_1_0_ROWS, make_0_1_0_database

    engine = make_engine(database_url)
    try:
        make_0_1_0_database(engine)
        upgrade(engine)  # the migrations, 0004_audit_chains among them
        sink = SqlAuditSink(engine)
        for n in range(5):
            sink.write(decision(n))
        report, unchained = audit_integrity.verify_trail(engine)
        assert report.records == 5 and len(report.heads) == 1
        assert (unchained.before, unchained.after) == (len(V0_1_0_ROWS["audit_events"]), 0)
    finally:
        engine.dispose()


class SqlLegacyRow:
    """Inserts a decision the way the service did before the trail was chained."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def insert(self, record: AuditRecord) -> None:
        row = audit_row(record)
        with self.engine.begin() as conn:
            conn.execute(insert(events).values(**row))


# -- checkpoints: truncation and rewritten history --------------------------------------------


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing.open(tmp_path / "keys", now=NOW)


def checkpoint(engine: Engine, ring: KeyRing) -> dict[str, tuple[int, str]]:
    token, _ = audit_integrity.sign_checkpoint(engine, ring.signer(), ISSUER, NOW)
    return audit_integrity.read_checkpoint(token, key_for(ring), ISSUER).heads


def key_for(ring: KeyRing) -> Callable[[str | None, str], Any]:
    from sts.adapters.jwks import StaticJWKS

    return StaticJWKS(ring.public_jwks(), algorithms=["ES256"]).key_for


def test_truncation_and_rewritten_history_are_detected_with_a_checkpoint(
    engine: Engine, ring: KeyRing
) -> None:
    sinks = [SqlAuditSink(engine), SqlAuditSink(engine)]
    for n in range(12):
        sinks[n % 2].write(decision(n))
    seen = checkpoint(engine, ring)
    assert sorted(seen.values()) == sorted((h.seq, h.hash) for h in verify(engine).heads.values())
    for n in range(12, 16):  # the trail goes on after the checkpoint
        sinks[n % 2].write(decision(n))
    assert verify(engine, seen).records == 16
    first, second = sorted(seen)

    # The newest records deleted, back past the checkpoint's head: the chain alone still verifies.
    rows = chain_rows(engine, first)
    newest = [r for r in rows if r["seq"] >= seen[first][0]]
    with engine.begin() as conn:
        conn.execute(delete(events).where(events.c.id.in_([r["id"] for r in newest])))
    assert verify(engine).records == 16 - len(newest)
    [link] = broken(engine, seen)
    assert link.chain_id == first and link.seq == seen[first][0]
    assert "the newest records were deleted" in link.problem
    with engine.begin() as conn:
        conn.execute(insert(events), newest)
    verify(engine, seen)

    # A whole chain deleted, registration and all.
    kept = chain_rows(engine, second)
    with engine.connect() as conn:
        registration = dict(conn.execute(select(chains).where(chains.c.chain_id == second)).one()._mapping)
    with engine.begin() as conn:
        conn.execute(delete(events).where(events.c.chain_id == second))
        conn.execute(delete(chains).where(chains.c.chain_id == second))
    verify(engine)
    [link] = broken(engine, seen)
    assert link.chain_id == second and "gone" in link.problem
    with engine.begin() as conn:
        conn.execute(insert(chains).values(**registration))
        conn.execute(insert(events), kept)

    # History rewritten: a record edited and every hash after it recomputed.  Only the
    # checkpoint, signed before, knows the old hashes.
    rows = chain_rows(engine, first)
    prev = genesis_hash(first)
    with engine.begin() as conn:
        for row in rows:
            record = {**row["record"], "subject": MALLORY} if row["seq"] == 2 else row["record"]
            digest = link_hash(prev, first, row["seq"], canonical_json(record))
            conn.execute(
                update(events)
                .where(events.c.id == row["id"])
                .values(record=record, subject=record["subject"], prev_hash=prev, hash=digest)
            )
            prev = digest
    verify(engine)
    [link] = broken(engine, seen)
    assert link.chain_id == first and "history rewritten" in link.problem


def test_an_anchor_moved_by_hand_and_a_made_up_chain_do_not_hide_rewritten_history(
    engine: Engine, ring: KeyRing
) -> None:
    """Write access to the database, no signing key: register a new chain, move a checkpointed
    chain's records into it (one edited, the newest deleted, every hash recomputed from the new
    genesis), and set the old chain's unsigned anchor to the head the checkpoint saw, as if
    pruned there.  Pruning cuts an oldest prefix by record id, so records at or below the
    checkpointed head's id cannot remain; and a chain a later checkpoint did not name cannot hold
    records from before it."""
    sinks = [SqlAuditSink(engine), SqlAuditSink(engine)]
    for n in range(12):
        sinks[n % 2].write(decision(n))
    token, _ = audit_integrity.sign_checkpoint(engine, ring.signer(), ISSUER, NOW + 3600)
    seen = audit_integrity.read_checkpoint(token, key_for(ring), ISSUER)
    assert set(seen.ids) == set(seen.heads)
    verify(engine, seen)  # type: ignore[arg-type]
    victim = sorted(seen.heads)[0]
    forged = uuid.uuid4().hex
    rows = [r for r in chain_rows(engine, victim) if r["seq"] < seen.heads[victim][0] - 1]
    with engine.begin() as conn:
        registration = dict(conn.execute(select(chains).where(chains.c.chain_id == victim)).one()._mapping)
        conn.execute(
            insert(chains).values(
                **{
                    **registration,
                    "chain_id": forged,
                    "genesis_hash": genesis_hash(forged),
                    "anchor_hash": genesis_hash(forged),
                }
            )
        )
        conn.execute(delete(events).where(events.c.chain_id == victim))
        prev = genesis_hash(forged)
        for seq, row in enumerate(rows, start=1):
            record = {**row["record"], "subject": MALLORY} if seq == 2 else row["record"]
            digest = link_hash(prev, forged, seq, canonical_json(record))
            conn.execute(
                insert(events).values(
                    **{
                        **row,
                        "record": record,
                        "subject": record["subject"],
                        "chain_id": forged,
                        "seq": seq,
                        "prev_hash": prev,
                        "hash": digest,
                    }
                )
            )
            prev = digest
        pin_seq, pin_hash = seen.heads[victim]
        conn.execute(
            update(chains).where(chains.c.chain_id == victim).values(anchor_seq=pin_seq, anchor_hash=pin_hash)
        )
    verify(engine)  # Every chain alone verifies: only the checkpoint can tell.
    verify(engine, seen.heads)  # Nor can its heads alone (the anchor sits exactly on the pin).
    problems = {(b.chain_id, b.problem) for b in broken(engine, seen)}  # type: ignore[arg-type]
    assert any(chain == victim and "not what pruning does" in p for chain, p in problems), problems
    assert any(chain == forged and "does not name" in p for chain, p in problems), problems


def test_renumbered_records_do_not_make_a_hand_made_prune_look_real(engine: Engine, ring: KeyRing) -> None:
    """Record ids are not hashed: delete the newest chain, move its anchor to the checkpointed head,
    and renumber the other chain above it, so that no older record seems to remain.  The head the
    checkpoint saw of that other chain still has to carry the id the checkpoint saw."""
    sinks = [SqlAuditSink(engine), SqlAuditSink(engine)]
    for n in range(8):
        sinks[0].write(decision(n))
    for n in range(8, 12):
        sinks[1].write(decision(n))
    token, _ = audit_integrity.sign_checkpoint(engine, ring.signer(), ISSUER, NOW + 60)
    seen = audit_integrity.read_checkpoint(token, key_for(ring), ISSUER)
    older, newer = sorted(seen.heads, key=lambda chain: seen.ids[chain])
    with engine.begin() as conn:
        conn.execute(delete(events).where(events.c.chain_id == newer))
        seq, digest = seen.heads[newer]
        conn.execute(
            update(chains).where(chains.c.chain_id == newer).values(anchor_seq=seq, anchor_hash=digest)
        )
        conn.execute(update(events).where(events.c.chain_id == older).values(id=events.c.id + 1000))
    verify(engine)  # Alone, every chain verifies.
    [link] = broken(engine, seen)  # type: ignore[arg-type]
    assert link.chain_id == older and "renumbered" in link.problem


def test_a_checkpoint_with_record_ids_accepts_real_pruning_and_new_chains(
    engine: Engine, ring: KeyRing
) -> None:
    sinks = [SqlAuditSink(engine), SqlAuditSink(engine)]
    for n in range(10):
        sinks[n % 2].write(decision(n))
    token, _ = audit_integrity.sign_checkpoint(engine, ring.signer(), ISSUER, NOW + 60)
    seen = audit_integrity.read_checkpoint(token, key_for(ring), ISSUER)
    later = SqlAuditSink(engine)  # a new process after the checkpoint: a chain it does not name
    for n in range(10, 14):
        later.write(decision(n, now=NOW + 120))
    verify(engine, seen)  # type: ignore[arg-type]
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(select(events.c.id).order_by(events.c.id))]
    prune(engine, ids[10])  # every record the checkpoint saw, and none after
    assert verify(engine, seen).records == 4  # type: ignore[arg-type]


def _interleaved(engine: Engine) -> tuple[str, str]:
    """Two writers, their records interleaved by id: ``(older, other)``, the chain holding the
    trail's first record and the other one."""
    sinks = [SqlAuditSink(engine), SqlAuditSink(engine)]
    for n in range(12):
        sinks[n % 2].write(decision(n))
    with engine.connect() as conn:
        rows = conn.execute(select(events.c.id, events.c.chain_id).order_by(events.c.id)).all()
    return rows[0].chain_id, rows[1].chain_id


def _hide_oldest(engine: Engine, chain_id: str, count: int) -> None:
    """Delete a chain's ``count`` oldest records and move its anchor past them, as a prune would
    for that chain alone (an outside audit's ``anchor_hide.py``)."""
    rows = chain_rows(engine, chain_id)[:count]
    with engine.begin() as conn:
        conn.execute(delete(events).where(events.c.id.in_([r["id"] for r in rows])))
        conn.execute(
            update(chains)
            .where(chains.c.chain_id == chain_id)
            .values(anchor_seq=rows[-1]["seq"], anchor_hash=rows[-1]["hash"], pruned_at=NOW)
        )


def test_a_chains_oldest_records_deleted_while_older_ones_stay_are_found_with_a_checkpoint(
    engine: Engine, ring: KeyRing
) -> None:
    """An outside audit: deleting one chain's two oldest records (not the oldest of the trail: an
    older record of the other chain stays) and moving its anchor passed a checkpoint taken before,
    since only the checkpoint's heads were compared with anchors.  A prune removes every record
    below one id: the checkpoint now signs each chain's anchor and the id of the record after it,
    and whatever the database says of prunes, the record still there gives the deletion away."""
    older, victim = _interleaved(engine)
    token, _ = audit_integrity.sign_checkpoint(engine, ring.signer(), ISSUER, NOW + 60)
    seen = audit_integrity.read_checkpoint(token, key_for(ring), ISSUER)
    _hide_oldest(engine, victim, 2)
    verify(engine)  # Alone, every chain verifies (anchors are not signed).
    for cutoff in (None, 1):  # Whatever the database says the last prune's cutoff was.
        with engine.begin() as conn:
            conn.execute(text("UPDATE audit_trail SET pruned_below = :cutoff"), {"cutoff": cutoff})
        [link] = broken(engine, seen)  # type: ignore[arg-type]
        assert link.chain_id == victim and link.seq == 1, link
        assert "yet record id 1 is still there: not what pruning does" in link.problem
    assert older != victim


def test_a_chain_pruned_by_hand_past_a_checkpoints_head_is_found(engine: Engine, ring: KeyRing) -> None:
    """An outside re-check: with the anchor moved a few records past the head a checkpoint saw,
    every chain it names looked pruned past it, and then the ids left were not compared with it at
    all, on PostgreSQL too (only SQLite, numbering from 1 again after a prune of every record, needs
    that).  One chain writes five records and a checkpoint names it alone; a second chain starts
    and the two write in turn; the first chain's ten oldest records are deleted and its anchor moved
    to the tenth, while five older records of the second chain stay."""
    first = SqlAuditSink(engine)
    for n in range(5):
        first.write(decision(n))
    token, _ = audit_integrity.sign_checkpoint(engine, ring.signer(), ISSUER, NOW + 60)
    seen = audit_integrity.read_checkpoint(token, key_for(ring), ISSUER)
    [victim] = seen.heads
    second = SqlAuditSink(engine)
    for n in range(5, 25):
        (first if n % 2 else second).write(decision(n))
    _hide_oldest(engine, victim, 10)
    with engine.connect() as conn:
        left = [tuple(r) for r in conn.execute(select(events.c.id, events.c.chain_id).order_by(events.c.id))]
    # The second chain's five oldest records, older than the first's record at its new anchor (14).
    assert [record_id for record_id, _ in left[:5]] == [7, 9, 11, 13, 15]
    assert all(chain_id != victim for _, chain_id in left[:5])
    verify(engine)  # Alone, every chain verifies (anchors are not signed).
    [link] = broken(engine, seen)  # type: ignore[arg-type]
    assert link.chain_id == victim and link.seq == 5, link
    assert "behind the chain's anchor (seq 10), yet record id 7 is still there" in link.problem


def test_a_record_left_below_the_last_prunes_cutoff_is_found(engine: Engine) -> None:
    """Each prune records its cutoff id: a record of any chain left below it was not pruned, so the
    records around it were deleted by hand (or the cutoff set by hand to make them look pruned)."""
    _, victim = _interleaved(engine)
    _hide_oldest(engine, victim, 2)
    with engine.connect() as conn:
        first_left = conn.execute(
            select(func.min(events.c.id)).where(events.c.chain_id == victim)
        ).scalar_one()
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_trail SET pruned_below = :cutoff"), {"cutoff": first_left})
    [link] = broken(engine)
    assert (
        link.record_id == 1 and f"below the cutoff (recorded in audit_trail: id {first_left})" in link.problem
    )


def test_real_pruning_after_a_checkpoint_that_signs_anchors_still_verifies(
    engine: Engine, ring: KeyRing
) -> None:
    _interleaved(engine)
    token, _ = audit_integrity.sign_checkpoint(engine, ring.signer(), ISSUER, NOW + 60)
    seen = audit_integrity.read_checkpoint(token, key_for(ring), ISSUER)
    assert len(seen.firsts) == 2 and seen.trail is not None
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(select(events.c.id).order_by(events.c.id))]
    for below in (ids[3], ids[8]):  # twice, each a prefix of the whole trail
        prune(engine, below)
        assert verify(engine, seen).records == len(ids) - ids.index(below)  # type: ignore[arg-type]
        token, _ = audit_integrity.sign_checkpoint(engine, ring.signer(), ISSUER, NOW + 120)
        later = audit_integrity.read_checkpoint(token, key_for(ring), ISSUER)
        assert later.trail is not None and later.trail.pruned_below == below
        verify(engine, seen, later)  # type: ignore[arg-type]


def test_a_made_up_record_without_a_chain_does_not_pass_for_one_written_before_chaining(
    engine: Engine, ring: KeyRing
) -> None:
    """An outside audit: on a trail written entirely with chains, a grant inserted without a chain,
    with id 0 and dated before the first chain, was taken for one written before chaining began
    (a ``note:``), even with a checkpoint.  How many such records there were, and their highest
    id, is recorded once (revision 0011), and signed by checkpoints."""
    _interleaved(engine)
    token, _ = audit_integrity.sign_checkpoint(engine, ring.signer(), ISSUER, NOW + 60)
    seen = audit_integrity.read_checkpoint(token, key_for(ring), ISSUER)
    with engine.connect() as conn:
        first_started = conn.execute(select(func.min(chains.c.started_at))).scalar_one()
    forged = audit_row(decision(99, now=first_started - 86400))
    with engine.begin() as conn:
        conn.execute(insert(events).values(**{**forged, "id": 0, "subject": MALLORY}))
    _, found = audit_integrity.verify_trail(engine)
    assert (found.before, found.after, found.first_after) == (0, 1, 0)
    # Someone who also rewrites what audit_trail says passes without a checkpoint, not with one.
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_trail SET prechain_records = 1, prechain_highest_id = 0"))
    assert audit_integrity.verify_trail(engine)[1].before == 1
    [link] = broken(engine, seen)  # type: ignore[arg-type]
    assert link.chain_id == "(trail)" and "a checkpoint signed 0 (highest id None)" in link.problem


def test_records_written_before_chaining_are_counted_and_none_can_be_added(database_url: str) -> None:
    from tests.adapters.test_migrations import V0_1_0_ROWS, make_0_1_0_database

    engine = make_engine(database_url)
    try:
        make_0_1_0_database(engine)
        upgrade(engine)
        SqlAuditSink(engine).write(decision(0))
        legacy = len(V0_1_0_ROWS["audit_events"])
        assert audit_integrity.verify_trail(engine)[1] == audit_integrity.Unchained(legacy, 0, None)
        with engine.connect() as conn:
            oldest = dict(conn.execute(select(events).order_by(events.c.id).limit(1)).one()._mapping)
        with engine.begin() as conn:  # a copy of the oldest, with a lower id: one too many
            conn.execute(insert(events).values(**{**oldest, "id": -1, "event_id": str(uuid.uuid4())}))
        _, found = audit_integrity.verify_trail(engine)
        assert (found.before, found.after) == (legacy, 1)
    finally:
        engine.dispose()


def test_a_checkpoint_must_be_signed_by_the_service(engine: Engine, ring: KeyRing, tmp_path: Path) -> None:
    SqlAuditSink(engine).write(decision(0))
    token, _ = audit_integrity.sign_checkpoint(engine, ring.signer(), ISSUER, NOW)
    header, payload, signature = token.split(".")
    claims = json.loads(rfc8785_b64decode(payload))
    claims["chains"] = {}
    forged = ".".join([header, rfc8785_b64encode(json.dumps(claims).encode()), signature])
    with pytest.raises(CheckpointInvalid, match="bad signature"):
        audit_integrity.read_checkpoint(forged, key_for(ring), ISSUER)
    other = KeyRing.open(tmp_path / "other-keys", now=NOW)
    with pytest.raises(CheckpointInvalid, match="not in the key set"):
        audit_integrity.read_checkpoint(token, key_for(other), ISSUER)
    with pytest.raises(CheckpointInvalid, match="not by"):
        audit_integrity.read_checkpoint(token, key_for(ring), "https://other.example.com")
    access_token = ring.signer().sign({"typ": "at+jwt"}, {"iss": ISSUER, "chains": {}})
    with pytest.raises(CheckpointInvalid, match="typ"):
        audit_integrity.read_checkpoint(access_token, key_for(ring), ISSUER)


def rfc8785_b64decode(segment: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def rfc8785_b64encode(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- retention ---------------------------------------------------------------------------------


def prune(engine: Engine, below_id: int, *, anchors: bool = True) -> None:
    """What ``sts audit prune`` does: delete an oldest prefix by id, anchors first."""
    with engine.begin() as conn:
        if anchors:
            record_prune_anchors(conn, below_id, NOW)
        conn.execute(delete(events).where(events.c.id < below_id))


def test_a_pruned_prefix_still_verifies(engine: Engine, ring: KeyRing) -> None:
    sinks = [SqlAuditSink(engine), SqlAuditSink(engine)]
    for n in range(20):
        sinks[0 if n < 4 else n % 2].write(decision(n))  # the first chain's oldest records come first
    seen = checkpoint(engine, ring)
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(select(events.c.id).order_by(events.c.id))]
    prune(engine, ids[6])
    report = verify(engine, seen)
    assert report.records == 14
    assert {h.seq for h in report.heads.values()} == {seq for seq, _ in seen.values()}
    with engine.connect() as conn:
        anchors = sorted(r.anchor_seq for r in conn.execute(select(chains.c.anchor_seq)))
    assert anchors == [1, 5]  # 6 records removed: 5 of the first chain, 1 of the second

    # Pruned again, past every record of both chains: the anchors carry the heads.
    prune(engine, ids[-1] + 1)
    report = verify(engine, seen)
    assert report.records == 0 and len(report.heads) == 2

    # A prefix deleted without anchors does not verify.
    for n in range(20, 26):
        sinks[n % 2].write(decision(n))
    with engine.connect() as conn:
        oldest = conn.execute(select(func.min(events.c.id))).scalar_one()
    prune(engine, oldest + 1, anchors=False)
    [link] = broken(engine)
    assert "missing" in link.problem


def test_sqlite_numbering_again_after_a_prune_of_every_record_is_not_taken_for_tampering(
    tmp_path: Path, ring: KeyRing
) -> None:
    """SQLite numbers the records of an empty table from 1 again: below the ids a checkpoint saw and
    the cutoff of the prune.  Nothing the checkpoint saw is left, so its ids are not compared."""
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    upgrade(engine)
    _interleaved(engine)
    token, _ = audit_integrity.sign_checkpoint(engine, ring.signer(), ISSUER, NOW + 60)
    seen = audit_integrity.read_checkpoint(token, key_for(ring), ISSUER)
    prune(engine, 13)
    sink = SqlAuditSink(engine)
    for n in range(3):
        sink.write(decision(20 + n))
    with engine.connect() as conn:
        assert conn.execute(select(func.min(events.c.id))).scalar_one() == 1
    assert verify(engine, seen).records == 3  # type: ignore[arg-type]
    engine.dispose()


@pytest.mark.parametrize(
    ("statement", "problem"),
    [
        ("UPDATE audit_events SET record = '{\"event_id\": ' WHERE seq = 2", "record (not JSON"),
        (
            "UPDATE audit_events SET record = replace(record, '{\"actor_issuer\"', "
            '\'{"outcome":"granted","actor_issuer"\') WHERE seq = 2',
            "duplicate member name",
        ),
        ("UPDATE audit_events SET record = '[1, 2]' WHERE seq = 2", "hash does not match"),
        ("UPDATE audit_events SET seq = NULL WHERE seq = 2", "seq 0 is at or before"),
        ("UPDATE audit_events SET hash = 'zz' WHERE seq = 2", "hash does not match"),
        ("UPDATE audit_chains SET anchor_seq = 1, anchor_hash = 'not hex'", "anchor hash is malformed"),
        # The same instant in other words: equal as a time, but time-bounded queries compare text.
        ("UPDATE audit_events SET time = replace(time, ' ', 'T') WHERE seq = 2", "column time differs"),
        (
            "UPDATE audit_events SET time = substr(time, 1, 10) || ' 23:59:59.999999-23:59' WHERE seq = 2",
            "column time differs",
        ),
    ],
)
def test_malformed_stored_values_are_reported_as_broken_links(
    tmp_path: Path, statement: str, problem: str
) -> None:
    """Whatever was written into the columns, verification reports it; it never fails itself."""
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    upgrade(engine)
    sink = SqlAuditSink(engine)
    for n in range(4):
        sink.write(decision(n))
    with engine.begin() as conn:
        conn.exec_driver_sql(statement)
    [link] = broken(engine)
    assert problem in link.problem
    engine.dispose()


def test_pruning_refuses_to_cut_a_chain_that_is_broken_already(engine: Engine) -> None:
    sink = SqlAuditSink(engine)
    for n in range(6):
        sink.write(decision(n))
    rows = chain_rows(engine, longest_chain(engine))
    with engine.begin() as conn:
        conn.execute(delete(events).where(events.c.id == rows[1]["id"]))
    with pytest.raises(PruneWouldBreakChain), engine.begin() as conn:
        record_prune_anchors(conn, rows[4]["id"], NOW)


# -- failed commits leave no gap --------------------------------------------------------------


def test_a_failed_commit_does_not_advance_the_chain(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    upgrade(engine)
    sink = SqlAuditSink(engine)
    sink.write(decision(0))
    sink.write_with_uses(decision(1), [SingleUse("subject_token", "a", NOW + 60, None)], NOW)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE audit_events RENAME TO audit_events_away")
    with pytest.raises(AuditUnavailable):
        sink.write(decision(2))
    with pytest.raises(AuditUnavailable):
        sink.write_with_uses(decision(3), [SingleUse("subject_token", "b", NOW + 60, None)], NOW)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE audit_events_away RENAME TO audit_events")
    sink.write(decision(4))
    sink.write_with_uses(decision(5), [SingleUse("subject_token", "c", NOW + 60, None)], NOW)
    report = verify(engine)
    # One chain, four records, seq 1 to 4 without a gap.
    assert [(h.seq, h.records) for h in report.heads.values()] == [(4, 4)]
    engine.dispose()


@pytest.mark.parametrize("committed", [True, False])
def test_a_commit_whose_answer_was_lost_is_settled_without_a_gap(
    pg_database: str, committed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: the connection breaks during COMMIT (injected after the real commit, or with
    nothing committed).  The sink asks the database which it was, and the chain has no gap."""
    schema = PgSchema(pg_database, f"t_{uuid.uuid4().hex[:12]}")
    schema.execute(f'CREATE SCHEMA "{schema.schema}"')
    engine = make_engine(schema.url)
    try:
        upgrade(engine)
        sink = SqlAuditSink(engine)
        sink.write(decision(0))
        # On PostgreSQL a write with uses goes through RawStatement.pipelined.
        real = sink._raw.pipelined
        lost = [True]

        def answer_lost(work: Callable[[Any], Any], **options: Any) -> Any:
            if not lost:
                return real(work, **options)
            lost.clear()
            if committed:
                real(work, **options)
            else:
                # Its statements built, none sent: a grant's one statement commits as it runs.
                unsent = SimpleNamespace(execute=lambda *_args: None)
                with pytest.raises(RuntimeError):
                    real(lambda _conn: (work(unsent), _raise(RuntimeError("not committed")))[0], **options)
            raise CommitOutcomeUnknown("OperationalError")

        monkeypatch.setattr(sink._raw, "pipelined", answer_lost)
        use = SingleUse("subject_token", secrets.token_hex(8), NOW + 60, None)
        if committed:
            sink.write_with_uses(decision(1), [use], NOW)  # confirmed: the token may leave
        else:
            with pytest.raises(AuditUnavailable):
                sink.write_with_uses(decision(1), [use], NOW)
        sink.write(decision(2))
        report = verify(engine)
        assert report.records == (3 if committed else 2)
        # Confirmed: one chain goes on.  Not there: the chain is left for a new one, no gap either way.
        assert sorted(h.records for h in report.heads.values()) == ([3] if committed else [1, 1])
    finally:
        engine.dispose()
        schema.execute(f'DROP SCHEMA IF EXISTS "{schema.schema}" CASCADE')


def _raise(exc: BaseException) -> None:
    raise exc


def test_a_group_commit_with_uses_refuses_only_the_replayed_items_and_chains_the_rest(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent writes with uses share one transaction, each item in a savepoint: a use that is
    taken (committed earlier, or by an item ahead of it in the batch) fails only its own item, and
    the chain links the others in commit order, without a gap."""
    sink = SqlAuditSink(engine)
    taken = SingleUse("subject_token", "taken", NOW + 60, None)
    first = decision(0)
    sink.write_with_uses(first, [taken], NOW)
    twice = SingleUse("dpop:jkt", "twice", NOW + 60, None)
    uses = [
        [SingleUse("subject_token", f"fresh-{n}", NOW + 60, None), *([twice] if n in (2, 5) else [])]
        for n in range(1, 8)
    ]
    uses[3].append(taken)
    transactions = []
    real = sink._raw.transaction

    def counted(work: Callable[[Any], Any]) -> Any:
        transactions.append(work)
        return real(work)

    monkeypatch.setattr(sink._raw, "transaction", counted)
    group = sink._writes_with_uses
    records = [decision(n) for n in range(1, 8)]
    outcomes: dict[int, str] = {}

    def write(n: int) -> None:
        try:
            sink.write_with_uses(records[n - 1], uses[n - 1], NOW)
            outcomes[n] = "committed"
        except AlreadyUsed as exc:
            assert exc.use is not None
            outcomes[n] = exc.use.key

    # Hold the group as a commit in flight would, so that all seven queue behind it.
    with group._cond:
        group._committing = True
    threads = [threading.Thread(target=write, args=(n,)) for n in range(1, 8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(group._pending) < 7 and time.monotonic() < deadline:
        time.sleep(0.005)
    number = {r.event_id: n for n, r in enumerate(records, 1)}
    queued = [number[item.row["event_id"]] for item in group._pending]
    with group._cond:
        group._committing = False
        group._cond.notify_all()
    for thread in threads:
        thread.join(10)
    assert len(transactions) == 1  # One transaction for the seven.
    # The item with the committed use, and the later of the two sharing a use, are refused.
    second = [n for n in queued if n in (2, 5)][1]
    assert outcomes == {
        n: "taken" if n == 4 else "twice" if n == second else "committed" for n in range(1, 8)
    }
    report = verify(engine)
    assert [(h.seq, h.records) for h in report.heads.values()] == [(6, 6)]
    committed = {r.event_id for n, r in enumerate(records, 1) if outcomes[n] == "committed"}
    assert {r["event_id"] for r in sink.iter_all()} == committed | {first.event_id}


def test_concurrent_commits_borrow_different_chains_up_to_the_limit() -> None:
    """PostgreSQL commits side by side, each on a chain of its own; SQLite's single writer has one."""
    heads = ChainHeads(2)
    with heads.borrow(1) as first, heads.borrow(1) as second:
        assert first.chain_id != second.chain_id
        with pytest.raises(AuditUnavailable), heads.borrow(0.01):
            pass
    with heads.borrow(1) as again:
        assert again.chain_id in (first.chain_id, second.chain_id)  # free chains are reused
    single = ChainHeads(1)
    with single.borrow(1), pytest.raises(AuditUnavailable), single.borrow(0.01):
        pass


# -- the commands -----------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "policies").mkdir()
    path = tmp_path / "sts.yaml"
    settings = {
        "issuer": ISSUER,
        "database_url": f"sqlite:///{tmp_path / 'sts.sqlite'}",
        "keys_dir": str(tmp_path / "keys"),
        "policies_dir": str(tmp_path / "policies"),
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def sts(config: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["--config", str(config), *args])


def test_sts_audit_verify_and_checkpoint(config: Path, tmp_path: Path) -> None:
    KeyRing.open(tmp_path / "keys", now=time.time())
    engine = make_engine(f"sqlite:///{tmp_path / 'sts.sqlite'}")
    upgrade(engine)
    sink = SqlAuditSink(engine)
    for n in range(5):
        sink.write(decision(n))

    intact = sts(config, "audit", "verify")
    assert intact.exit_code == 0, intact.output
    assert "ok: 5 record(s) in 1 chain(s) verify" in intact.output

    made = sts(config, "audit", "checkpoint", "-o", str(tmp_path / "cp.jws"))
    assert made.exit_code == 0, made.output
    again = sts(config, "audit", "checkpoint", "-o", str(tmp_path / "cp.jws"))
    assert again.exit_code != 0 and "exists" in again.output  # never overwritten
    jwks = tmp_path / "jwks.json"
    jwks.write_text(sts(config, "keys", "jwks").output)
    checked = sts(config, "audit", "verify", "--checkpoint", str(tmp_path / "cp.jws"), "--jwks", str(jwks))
    assert checked.exit_code == 0, checked.output
    assert "every chain reaches the head checkpoint" in checked.output

    with engine.begin() as conn:
        newest = conn.execute(select(func.max(events.c.id))).scalar_one()
        conn.execute(delete(events).where(events.c.id == newest))
    truncated = sts(config, "audit", "verify", "--checkpoint", str(tmp_path / "cp.jws"))
    assert truncated.exit_code == 1
    assert "BROKEN chain" in truncated.output and "seq 5" in truncated.output
    assert "the newest records were deleted" in truncated.output

    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET subject = 'someone else' WHERE seq = 2"))
    edited = sts(config, "audit", "verify")
    assert edited.exit_code == 1
    assert "seq 2 (record id 2): column subject differs from the record" in edited.output

    (tmp_path / "bad.jws").write_text("not.a.checkpoint")
    bad = sts(config, "audit", "verify", "--checkpoint", str(tmp_path / "bad.jws"))
    assert bad.exit_code == 1 and "not a valid checkpoint" in bad.output

    # SQLite takes text in a number column: a verification that fails, not a traceback.
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET seq = 'x' WHERE seq = 3"))
    unreadable = sts(config, "audit", "verify")
    assert unreadable.exit_code == 1 and not isinstance(unreadable.exception, ValueError)
    assert "BROKEN" in unreadable.output and "Traceback" not in unreadable.output
    engine.dispose()


def test_an_intact_record_with_a_huge_whole_float_verifies(engine: Engine) -> None:
    """A float of 2**53 or more with no fraction is written as digits (JCS): read back, it is that
    float again, not an integer JCS cannot write (an intact record reported as edited)."""
    sink = SqlAuditSink(engine)
    for value in (-1e16, 1e20, 2.0**53):
        record = decision(int(abs(value)) % 7)
        record.subject_token_iat = value
        sink.write(record)
    assert verify(engine).records == 3


def test_sts_audit_verify_fails_on_unchained_records_unless_allowed(config: Path, tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sts.sqlite'}")
    upgrade(engine)
    SqlAuditSink(engine).write(decision(0))
    SqlLegacyRow(engine).insert(decision(1))
    engine.dispose()
    refused = sts(config, "audit", "verify")
    assert refused.exit_code == 1 and "BROKEN: 1 record(s) without a chain" in refused.output
    allowed = sts(config, "audit", "verify", "--allow-unchained")
    assert allowed.exit_code == 0 and "note: 1 record(s) without a chain" in allowed.output


def test_sts_audit_verify_reports_a_hidden_oldest_run_and_a_made_up_old_record(
    config: Path, tmp_path: Path
) -> None:
    """The outside audit's two cases through the command: a checkpoint taken before each."""
    KeyRing.open(tmp_path / "keys", now=time.time())
    engine = make_engine(f"sqlite:///{tmp_path / 'sts.sqlite'}")
    upgrade(engine)
    _, victim = _interleaved(engine)
    assert sts(config, "audit", "checkpoint", "-o", str(tmp_path / "cp.jws")).exit_code == 0
    _hide_oldest(engine, victim, 2)
    assert sts(config, "audit", "verify").exit_code == 0  # anchors are not signed
    hidden = sts(config, "audit", "verify", "--checkpoint", str(tmp_path / "cp.jws"))
    assert hidden.exit_code == 1, hidden.output
    assert f"BROKEN chain {victim} seq 1: the checkpoint's record after its anchor" in hidden.output

    engine = make_engine(f"sqlite:///{tmp_path / 'other.sqlite'}")
    upgrade(engine)
    _interleaved(engine)
    with engine.connect() as conn:
        first_started = conn.execute(select(func.min(chains.c.started_at))).scalar_one()
    made_up = decision(99, now=first_started - 86400)
    made_up.details = {"risk": {"score": 0.0, "signals": []}}  # as `sts audit verify` summarises it
    with engine.begin() as conn:
        conn.execute(insert(events).values(**{**audit_row(made_up), "id": 0}))
    engine.dispose()
    config.write_text(config.read_text().replace("sts.sqlite", "other.sqlite"))
    forged = sts(config, "audit", "verify")
    assert forged.exit_code == 1, forged.output
    assert (
        "BROKEN: 1 record(s) without a chain written after chaining began (first: record id 0)"
        in forged.output
    )


def test_sts_audit_verify_prints_a_stored_chain_id_escaped(config: Path, tmp_path: Path) -> None:
    """Whoever can write the trail chooses its columns: a terminal sequence appended to a
    ``chain_id`` erased the BROKEN lines, printed a fake verdict and concealed the rest
    (an outside audit).  It is printed escaped, on one line, and the command still fails."""
    engine = make_engine(f"sqlite:///{tmp_path / 'sts.sqlite'}")
    upgrade(engine)
    SqlAuditSink(engine).write(decision(0))
    fake = "\r\x1b[2K\x1b[1A\x1b[2Kok: 1 record(s) in 1 chain(s) verify\x1b[8m"
    with engine.begin() as conn:
        conn.execute(update(events).values(chain_id=events.c.chain_id + fake))
    engine.dispose()
    result = sts(config, "audit", "verify")
    assert result.exit_code == 1, result.output
    assert "\x1b" not in result.output and "\r" not in result.output
    assert "\\x0d\\x1b[2K\\x1b[1A\\x1b[2Kok: 1 record(s) in 1 chain(s) verify\\x1b[8m seq 1" in result.output
    assert result.output.splitlines()[-1] == "audit trail does NOT verify: 2 broken chain(s)"


def test_sts_audit_checkpoint_file_is_not_writable_by_others_whatever_the_umask(
    config: Path, tmp_path: Path
) -> None:
    """Under umask 000 the checkpoint was 0666: another local user could put an older checkpoint,
    still validly signed, in its place, hiding a truncation from ``verify`` (an outside audit)."""
    KeyRing.open(tmp_path / "keys", now=time.time())
    engine = make_engine(f"sqlite:///{tmp_path / 'sts.sqlite'}")
    upgrade(engine)
    SqlAuditSink(engine).write(decision(0))
    engine.dispose()
    (tmp_path / "elsewhere").write_text("not to be written through a link\n")
    (tmp_path / "link.jws").symlink_to(tmp_path / "elsewhere")
    previous = os.umask(0)
    try:
        made = sts(config, "audit", "checkpoint", "-o", str(tmp_path / "cp.jws"))
        through_link = sts(config, "audit", "checkpoint", "-o", str(tmp_path / "link.jws"))
    finally:
        os.umask(previous)
    assert made.exit_code == 0, made.output
    assert stat.S_IMODE((tmp_path / "cp.jws").stat().st_mode) == 0o644
    assert through_link.exit_code == 1 and "already exists" in through_link.output
    assert (tmp_path / "elsewhere").read_text() == "not to be written through a link\n"
