"""Benchmark: microseconds per audit write (``SqlAuditSink.write`` and ``write_with_uses``).

    .venv/bin/python benchmarks/audit_write.py [--records 3000] [--threads 1 8] [--postgres URL] [--verify]

Writes ``--records`` realistic decision records through the sink, from one
thread and then from several, to a fresh SQLite file and (with ``--postgres``,
a server URL such as ``postgresql+psycopg://postgres@127.0.0.1:5432``) to a
private database created for the run and dropped after it.  Prints wall-clock
microseconds per record (lower is better): with several threads, group commit
shares a commit between the records that queue behind it.  The CPU time this
process spent per record is printed too: on a busy machine it varies far less
than the wall clock.  With ``--verify``, each database is then verified
(``sts audit verify``'s walk of every hash chain), and its cost per record printed.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sts.adapters.sql.audit_sink import SqlAuditSink  # noqa: E402
from sts.adapters.sql.engines import make_engine  # noqa: E402
from sts.migrations import upgrade  # noqa: E402

try:
    from sts.adapters import audit_integrity
except ImportError:  # A version from before the audit trail was chained.
    audit_integrity = None  # type: ignore[assignment]
from sts.core.audit import AuditRecord  # noqa: E402
from sts.core.ports import SingleUse  # noqa: E402


def record(now: float) -> AuditRecord:
    return AuditRecord(
        event_id=str(uuid.uuid4()),
        time=now,
        request_id=secrets.token_hex(8),
        endpoint="token",
        source_ip="127.0.0.1",
        outcome="granted",
        client_id="ci-runner",
        client_auth_method="private_key_jwt",
        issuer="github",
        subject="repo:example/payments:ref:refs/heads/main",
        subject_token_type="urn:ietf:params:oauth:token-type:jwt",
        subject_token_sha256=secrets.token_hex(32),
        subject_token_jti=secrets.token_hex(8),
        requested_audience=["https://ledger.example.com/api"],
        granted_audience=["https://ledger.example.com/api"],
        granted_scope=["ledger.read", "ledger.write"],
        granted_lifetime=300,
        rule="deploy-from-main",
        reasons=["policy.rule_matched"],
        issued_jti=secrets.token_urlsafe(16),
        issued_exp=now + 300.25,
        issued_kid="k" * 43,
        details={"risk": {"score": 0.125, "signals": ["new_audience"]}, "dpop": False},
    )


def run(engine: Engine, records: int, threads: int, with_uses: bool) -> tuple[float, float]:
    sink = SqlAuditSink(engine)
    sink.write(record(time.time()))  # warm up: statements, connections, the chain's first record
    per_thread = records // threads

    def work() -> None:
        for _ in range(per_thread):
            now = time.time()
            if with_uses:
                use = SingleUse("subject_token", secrets.token_hex(16), now + 60, None)
                sink.write_with_uses(record(now), [use], now)
            else:
                sink.write(record(now))

    pool = [threading.Thread(target=work) for _ in range(threads)]
    start, cpu = time.perf_counter(), time.process_time()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    done = per_thread * threads
    return (time.perf_counter() - start) / done * 1e6, (time.process_time() - cpu) / done * 1e6


def measure(name: str, make: Callable[[], Engine], args: argparse.Namespace) -> None:
    for with_uses in (False, True):
        for threads in args.threads:
            engine = make()
            upgrade(engine)
            try:
                us, cpu = run(engine, args.records, threads, with_uses)
                label = "write_with_uses" if with_uses else "write"
                print(
                    f"{name:10} {label:16} threads={threads:<3} {us:8.1f} us/record  (this process's CPU: "
                    f"{cpu:6.1f} us/record)",
                    flush=True,
                )
                if args.verify and audit_integrity is not None:
                    start, cpu_start = time.perf_counter(), time.process_time()
                    report, _ = audit_integrity.verify_trail(engine)
                    n = report.records
                    wall, spent = time.perf_counter() - start, time.process_time() - cpu_start
                    print(
                        f"{name:10} {'  verify':16} {n} records in {len(report.heads)} chain(s): "
                        f"{wall / n * 1e6:6.1f} us/record (CPU {spent / n * 1e6:6.1f})",
                        flush=True,
                    )
            finally:
                engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--postgres", default=None, help="PostgreSQL server URL (a database is created)")
    parser.add_argument("--verify", action="store_true", help="Then verify each database's hash chains")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(1_000_000))
        measure("sqlite", lambda: make_engine(f"sqlite:///{tmp}/audit-{next(counter)}.sqlite"), args)
    if args.postgres:
        name = f"sts_bench_{secrets.token_hex(6)}"
        admin = create_engine(f"{args.postgres}/postgres", isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            schemas = iter(range(1_000_000))

            def make_pg() -> Engine:
                schema = f"b{next(schemas)}"
                with create_engine(f"{args.postgres}/{name}", poolclass=NullPool).begin() as conn:
                    conn.execute(text(f'CREATE SCHEMA "{schema}"'))
                return make_engine(f"{args.postgres}/{name}?options=-csearch_path%3D{schema}")

            measure("postgresql", make_pg, args)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


if __name__ == "__main__":
    main()
