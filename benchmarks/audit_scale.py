"""Benchmark: the audit queries of ``sts audit`` and the review page over a million records.

    .venv/bin/python benchmarks/audit_scale.py [--rows 1000000] [--days 30] [--backend sqlite|postgresql|both]
                                               [--keep DIR | --reuse DIR]

Builds the audit table in a private SQLite file (in a temporary directory) and in a private
PostgreSQL database (``sts_bench_<random>`` on 127.0.0.1:5432, dropped afterwards unless
``--keep``; ``--reuse`` measures kept data again), bulk-inserts
``--rows`` synthetic decisions spread over the last ``--days`` days (records shaped like the
exchange's own: risk details with seven signals, granted and requested audiences, token hashes),
then times each query the CLI and the review page run, through the same code
(:mod:`sts.adapters.audit_query`): the timeline's first page and a page deep into it, a filtered
timeline (outcome + client, signal, audience, rule, an old day), the busiest identity's page,
the charts (decisions by outcome and signals that fire most, over 24 hours, 7 days and the
whole range), the service graph (7 days, new edges over the last day), and an hour's export.
Then whole review pages, signed in and rendered (Flask's test client).  Each figure
is the best of three runs after one warm-up; the target is under a second.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import Engine, create_engine, text  # noqa: E402

from sts.adapters import audit_query  # noqa: E402
from sts.adapters.sql.engines import make_engine  # noqa: E402
from sts.adapters.sql.group_commit import audit_row  # noqa: E402
from sts.adapters.sql.schema import audit_events  # noqa: E402
from sts.core.audit_filter import AuditFilter  # noqa: E402
from sts.migrations import upgrade  # noqa: E402

PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
SIGNALS = (
    "unusual_network",
    "attestation_drift",
    "stale_posture",
    "recent_failures",
    "elevated_privilege",
    "unexpected_s2s",
    "shared_signal",
)
ISSUERS = ("github", "gitlab", "kubernetes-prod", "spiffe")
COLUMNS = [c.name for c in audit_events.columns if c.name != "id"]


class World:
    """The synthetic fleet: identities, their clients, audiences and rules."""

    def __init__(self, rng: random.Random, identities: int = 2000) -> None:
        self.rng = rng
        self.audiences = [f"https://svc{i}.internal.example.com" for i in range(200)]
        self.clients = [f"client-{i}" for i in range(50)]
        self.identities = []
        for i in range(identities):
            issuer = ISSUERS[i % len(ISSUERS)]
            subject = (
                f"repo:acme/app{i}:ref:refs/heads/main"
                if issuer in ("github", "gitlab")
                else f"system:serviceaccount:ns{i % 40}:svc{i}"
                if issuer == "kubernetes-prod"
                else f"spiffe://example.org/ns/{i % 40}/sa/svc{i}"
            )
            usual = rng.sample(self.audiences, 3)
            self.identities.append((issuer, subject, rng.choice(self.clients), usual, f"rule-{i % 100}"))

    def record(self, when: float) -> dict[str, Any]:
        rng = self.rng
        issuer, subject, client, usual, rule = self.identities[int(rng.paretovariate(1.2) * 7) % 2000]
        audience = usual[0] if rng.random() < 0.97 else rng.choice(self.audiences)
        roll = rng.random()
        fired: list[str] = []
        if roll < 0.12:
            fired = rng.sample(SIGNALS[:6], 1 if roll < 0.09 else 2)
        if roll < 0.002:
            fired.append("shared_signal")
        outcome, error, reasons = "granted", None, ["policy.rule_matched"]
        if roll > 0.86:
            outcome, error, reasons = (
                "refused",
                rng.choice(["invalid_target", "invalid_request"]),
                ["policy.no_rule"],
            )
        elif roll > 0.995 - 0.985:
            pass
        if 0.03 < roll < 0.045:
            outcome, error, reasons = "refused", "insufficient_user_authentication", ["risk.step_up"]
        if roll > 0.998:
            outcome, error, reasons = "error", "server_error", ["internal.RuntimeError"]
        granted = outcome == "granted"
        signals = [
            {
                "name": name,
                "fired": name in fired,
                "weight": 30 if name in fired else 0,
                "reason": "fired: evidence recorded" if name in fired else "nothing unusual",
                "evidence": {"network": "10.1.2.0/24"} if name == "unusual_network" else {},
            }
            for name in SIGNALS
        ]
        score = 30 * len(fired)
        jti = secrets.token_urlsafe(16) if granted else None
        return {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "time": when,
            "request_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "endpoint": "token",
            "source_ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
            "user_agent": "sts-client/0.1",
            "outcome": outcome,
            "error": error,
            "client_id": client,
            "client_auth_method": "private_key_jwt",
            "issuer": issuer,
            "subject": subject,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "subject_token_sha256": secrets.token_hex(32),
            "subject_token_jti": str(uuid.UUID(int=rng.getrandbits(128))),
            "subject_token_iat": when - 5,
            "actor_issuer": None,
            "actor_subject": None,
            "actor_token_sha256": None,
            "requested_audience": [audience],
            "requested_resource": [],
            "requested_scope": ["read"],
            "requested_lifetime": None,
            "requested_token_type": None,
            "granted_audience": [audience] if granted else [],
            "granted_scope": ["read"] if granted else [],
            "granted_lifetime": 300 if granted else None,
            "rule": rule if outcome != "refused" or error != "invalid_target" else None,
            "reasons": reasons,
            "issued_jti": jti,
            "issued_exp": when + 300 if granted else None,
            "issued_kid": "kid-2025-01" if granted else None,
            "details": {
                "delegation_depth": 0,
                "risk": {
                    "mode": "enforce",
                    "score": score,
                    "decision": {
                        "action": "grant" if not fired else "narrow",
                        "score": score,
                        "enforced": True,
                        "lifetime_factor": 1.0,
                        "fired": fired,
                    },
                    "signals": signals,
                    "learning": False,
                },
            },
        }


def rows(count: int, days: float, now: float, seed: int = 14) -> Iterator[dict[str, Any]]:
    """``count`` records in time order, evenly spread over ``days`` days before ``now``."""
    world = World(random.Random(seed))  # noqa: S311 - synthetic data
    start = now - days * 86400
    step = days * 86400 / count
    for i in range(count):
        yield world.record(start + i * step)


def _row_values(record: dict[str, Any]) -> dict[str, Any]:
    from sts.core.audit import AuditRecord

    fields = {k: v for k, v in record.items()}
    row = audit_row(AuditRecord(**fields))
    return row


def bulk_insert(engine: Engine, count: int, days: float, now: float, batch: int = 20_000) -> float:
    """Insert the synthetic rows (SQLite: executemany; PostgreSQL: COPY). Returns seconds taken."""
    started = time.perf_counter()
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if engine.dialect.name == "sqlite":
            placeholders = ", ".join("?" for _ in COLUMNS)
            statement = f"INSERT INTO audit_events ({', '.join(COLUMNS)}) VALUES ({placeholders})"
            buffer: list[tuple[Any, ...]] = []
            cur.execute("BEGIN")
            for record in rows(count, days, now):
                row = _row_values(record)
                row["record"] = json.dumps(row["record"])
                buffer.append(tuple(row.get(c) for c in COLUMNS))
                if len(buffer) >= batch:
                    cur.executemany(statement, buffer)
                    buffer.clear()
            if buffer:
                cur.executemany(statement, buffer)
            cur.execute("COMMIT")
        else:
            with cur.copy(f"COPY audit_events ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for record in rows(count, days, now):
                    row = _row_values(record)
                    row["record"] = json.dumps(row["record"])
                    copy.write_row(tuple(row.get(c) for c in COLUMNS))
            raw.commit()
        cur.execute("ANALYZE")
        if engine.dialect.name != "sqlite":
            raw.commit()
    finally:
        raw.close()
    return time.perf_counter() - started


def best_of(work: Callable[[], Any], runs: int = 3) -> tuple[float, Any]:
    work()
    best, result = float("inf"), None
    for _ in range(runs):
        started = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - started)
    return best, result


def measure(engine: Engine, now: float, days: float) -> list[tuple[str, float, str]]:
    """Time each query of ``sts audit`` and the review page (best of three after a warm-up)."""
    query = audit_query.AuditQuery(engine, clock=lambda: now, settle=0)
    day, week = now - 86400, now - 7 * 86400
    world = World(random.Random(14))  # noqa: S311 - synthetic data
    # Identity 7 is the busiest of the synthetic fleet (about 15% of all decisions).
    issuer, subject, client, usual, _ = world.identities[7]
    results: list[tuple[str, float, str]] = []

    def timed(name: str, work: Callable[[], Any], describe: Callable[[Any], str], runs: int = 3) -> None:
        seconds, result = best_of(work, runs)
        results.append((name, seconds, describe(result)))
        print(f"  {name:<46} {seconds * 1000:8.1f} ms  {describe(result)}", flush=True)

    started = time.perf_counter()
    status = query.refresh(budget=None)
    seconds = time.perf_counter() - started
    print(f"  summaries built once: {status.last_id:,} records in {seconds:.0f} s", flush=True)

    def page(f: AuditFilter, before: int | None = None) -> Callable[[], Any]:
        return lambda: query.page(f, limit=50, before=before)

    def n(result: Any) -> str:
        return f"{len(result.rows)} rows"

    newest = query.status().newest_id
    timed("timeline: first page (50)", page(AuditFilter()), n)
    timed("timeline: a page halfway back (by id)", page(AuditFilter(), newest // 2), n)
    timed("timeline: outcome=refused, client", page(AuditFilter(outcome="refused", client_id=client)), n)
    timed("timeline: rule, since 24 h", page(AuditFilter(rule="rule-42", since=day)), n)
    old_day = AuditFilter(since=now - 21 * 86400, until=now - 20 * 86400)
    timed("timeline: 24 h ending 20 days ago", page(old_day), n)
    timed("timeline: signal=shared_signal (all time)", page(AuditFilter(signal="shared_signal")), n)
    timed("timeline: signal + outcome=granted, 7 d",
          page(AuditFilter(signal="attestation_drift", outcome="granted", since=week)), n)  # fmt: skip
    timed("timeline: audience (all time)", page(AuditFilter(audience=usual[0])), n)
    timed("identity: decisions page (50)", page(AuditFilter(issuer=issuer, subject=subject)), n)
    timed("identity: signals, step-ups, tokens", lambda: query.identity_summary(issuer, subject),
          lambda r: f"{r.decisions:,} decisions; {len(r.signals)} signals, {len(r.step_ups)} step-ups, "
                    f"{len(r.tokens)} tokens")  # fmt: skip
    for label, since, step in (("24 h, hourly", day, 3600.0), ("7 d, 6-hourly", week, 6 * 3600.0),
                               (f"{days:g} d, daily", now - days * 86400, 86400.0)):  # fmt: skip
        timed(f"chart: decisions by outcome, {label}",
              functools.partial(query.decisions_over_time, since, now, step),
              lambda r: f"{len(r)} buckets, {sum(b.total for b in r):,} decisions")  # fmt: skip
    for label, since in (("24 h", day), ("7 d", week), (f"{days:g} d", now - days * 86400)):
        timed(f"chart: signals that fire most, {label}", functools.partial(query.top_signals, since, now),
              lambda r: ", ".join(f"{k}={v:,}" for k, v in r[:2]))  # fmt: skip
    timed("graph: edges seen in 7 d, new in 1 d", lambda: query.edges(since=week, new_since=day),
          lambda r: f"{len(r[0])} of {r[1]:,} edges drawn, {sum(e.new for e in r[0])} new")  # fmt: skip
    timed("export: 1 h as JSON lines",
          lambda: sum(1 for _ in query.export(AuditFilter(since=now - 3600, until=now))),
          lambda r: f"{r:,} lines")  # fmt: skip
    timed("refresh with nothing new", lambda: query.refresh(), lambda r: f"watermark {r.last_id:,}")
    web = review_client(engine, now)
    pages = ["/review/", "/review/?window=30d", "/review/timeline", "/review/timeline?signal=shared_signal",
             f"/review/identity?issuer={issuer}&subject={subject}", "/review/graph"]  # fmt: skip
    for path in pages:
        timed(f"page GET {path[:40]}", functools.partial(web.get, path),
              lambda r: f"{r.status_code}, {len(r.data):,} bytes")  # fmt: skip
    return results


def review_client(engine: Engine, now: float) -> Any:
    """The review page over ``engine`` (Flask's test client, signed in): whole pages, rendered."""
    from flask import Flask

    from sts.core.client_secrets import hash_secret
    from sts.http import review

    config = review.ReviewConfig(
        users={"bench": hash_secret("bench")}, session_secret=b"b" * 32, secure_cookie=False
    )
    app = Flask("bench")
    query = audit_query.AuditQuery(engine, clock=lambda: now, settle=0)
    app.register_blueprint(review.blueprint(config, query=query, baselines=None, clock=lambda: now))
    web = app.test_client()
    form = web.get("/review/login").get_data(as_text=True)
    csrf = form.split('name="csrf" value="')[1].split('"')[0]
    assert (
        web.post("/review/login", data={"username": "bench", "password": "bench", "csrf": csrf}).status_code
        == 303
    )
    return web


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument(
        "--keep", type=Path, default=None,
        help="Keep the data: the SQLite file and the PostgreSQL database's name go in this directory.",
    )  # fmt: skip
    parser.add_argument(
        "--reuse", type=Path, default=None, help="Measure again the data kept in this directory."
    )
    args = parser.parse_args()
    now = time.time()
    summary: dict[str, list[tuple[str, float, str]]] = {}
    if args.reuse is not None:
        now = float((args.reuse / "now").read_text())
        if (args.reuse / "audit.sqlite").exists() and args.backend != "postgresql":
            print("sqlite (kept):", flush=True)
            summary["sqlite"] = measure(
                make_engine(f"sqlite:///{args.reuse / 'audit.sqlite'}"), now, args.days
            )
        if (args.reuse / "pg-database").exists() and args.backend != "sqlite":
            print("postgresql (kept):", flush=True)
            name = (args.reuse / "pg-database").read_text().strip()
            summary["postgresql"] = measure(make_engine(f"{PG_SERVER}/{name}"), now, args.days)
        report(summary)
        return
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        (args.keep / "now").write_text(repr(now))
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory(prefix="sts-audit-scale-") as tmp:
            directory = args.keep or Path(tmp)
            engine = make_engine(f"sqlite:///{directory / 'audit.sqlite'}")
            upgrade(engine)
            print(f"sqlite: inserting {args.rows:,} rows ...", flush=True)
            print(f"  inserted in {bulk_insert(engine, args.rows, args.days, now):.0f} s", flush=True)
            summary["sqlite"] = measure(engine, now, args.days)
            engine.dispose()
    if args.backend in ("postgresql", "both"):
        name = f"sts_bench_{secrets.token_hex(4)}"
        admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            engine = make_engine(f"{PG_SERVER}/{name}")
            upgrade(engine)
            print(f"postgresql: inserting {args.rows:,} rows ...", flush=True)
            print(f"  inserted in {bulk_insert(engine, args.rows, args.days, now):.0f} s", flush=True)
            summary["postgresql"] = measure(engine, now, args.days)
            engine.dispose()
        finally:
            if args.keep is not None:
                (args.keep / "pg-database").write_text(name)
                print(f"kept PostgreSQL database {name} (drop it when done)")
            else:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    report(summary)


def report(summary: dict[str, list[tuple[str, float, str]]]) -> None:
    slow = [(b, q, round(s, 3)) for b, results in summary.items() for q, s, _ in results if s >= 1.0]
    print("all queries under a second" if not slow else f"SLOWER THAN A SECOND: {slow}")


if __name__ == "__main__":
    main()
