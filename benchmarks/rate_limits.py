"""What a rate-limit check costs on the hot path, per store, and per token exchange.

    .venv/bin/python benchmarks/rate_limits.py [--checks 5000] [--exchanges 1000]
                                               [--postgres postgresql+psycopg://postgres@127.0.0.1:5432]

1. One check (``RateLimitStore.acquire``, one key, and the two keys checked on
   arrival) against SQLite (a WAL file), PostgreSQL (a private database, created
   and dropped) and Redis (a private ``redis-server`` on a free loopback port),
   single-threaded, in microseconds per call; the limiter's two checks of an
   exchange with the default scopes (network, identity), keys and all; and a
   flood from one network, refused (from memory, once the store has refused).
2. A whole ``POST /token`` through the Flask test client (SQLite), with the limits
   off, with the default scopes (a network and an identity check, two writes) and
   with global, network, identity and a rule limit (three writes), in microseconds
   per exchange: the difference is what the limits cost.

Both report the median and the best of several batches: on a shared machine the
median carries the others' load, and the best batch is near the idle cost.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from sts.adapters.redis.client import connect as connect_redis  # noqa: E402
from sts.adapters.redis.rate_limits import RedisRateLimits  # noqa: E402
from sts.adapters.sql.engines import make_engine  # noqa: E402
from sts.adapters.sql.rate_limits import SqlRateLimits  # noqa: E402
from sts.app import create_app  # noqa: E402
from sts.core.audit import AuditRecord  # noqa: E402
from sts.core.ports import LimitedKey, RateLimitStore  # noqa: E402
from sts.core.rate_limit import Check, Limit, RateLimiter, RateLimitPolicy  # noqa: E402
from sts.dev.issuer import DevIssuer  # noqa: E402
from sts.errors import RateLimited  # noqa: E402
from sts.migrations import upgrade  # noqa: E402
from sts.settings.load import load_settings  # noqa: E402

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT = "urn:ietf:params:oauth:token-type:jwt"
#: Never refuses in a benchmark: every check runs and writes, none is refused.
WIDE = Limit(requests=1_000_000, period=1, burst=1_000_000)


def keys(prefix: str, count: int) -> list[LimitedKey]:
    return [Check("bench", f"{prefix}:{i}", WIDE, "").cell() for i in range(count)]


def per_call_us(call: Callable[[int], Any], count: int, batch: int = 100) -> tuple[float, float, float]:
    """Microseconds per call: the median and the best of batches of ``batch`` calls (wall
    clock), and this process's CPU time per call.

    On a shared machine the median carries everyone else's load; the best batch is
    close to what a call costs on an idle one; CPU time is what the check costs this
    process (for SQLite, the whole statement; for Redis and PostgreSQL, the client side).
    """
    for i in range(min(200, count)):  # warm-up: connections, prepared statements, the Lua script
        call(count + i)  # (on keys of its own)
    batches = []
    cpu_started = time.process_time()
    for start in range(0, count, batch):
        started = time.perf_counter()
        for i in range(start, start + batch):
            call(i)
        batches.append((time.perf_counter() - started) / batch * 1e6)
    cpu = (time.process_time() - cpu_started) / (len(batches) * batch) * 1e6
    return statistics.median(batches), min(batches), cpu


def measure_store(name: str, store: RateLimitStore, checks: int) -> None:
    now = time.time()
    hot = keys(f"{name}-hot", 1)
    many = keys(f"{name}-many", 1000)
    pair = keys(f"{name}-pair", 2)
    results = {
        "one key, the same every time": per_call_us(lambda i: store.acquire(hot, now), checks),
        "one key of 1000": per_call_us(lambda i: store.acquire([many[i % 1000]], now), checks),
        "two keys at once (arrival)": per_call_us(lambda i: store.acquire(pair, now), checks),
    }
    for what, (median, best, cpu) in results.items():
        print(f"  {name:10} {what:34} {median:7.1f} us/check (best batch {best:6.1f}, CPU {cpu:6.1f})")


@contextmanager
def sqlite_store(work: Path) -> Iterator[RateLimitStore]:
    engine = make_engine(f"sqlite:///{work / 'bench.sqlite'}")
    upgrade(engine)
    yield SqlRateLimits(engine)
    engine.dispose()


@contextmanager
def postgres_store(server: str) -> Iterator[RateLimitStore]:
    name = f"sts_bench_{secrets.token_hex(6)}"
    admin = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(f"{server}/{name}")
    try:
        upgrade(engine)
        yield SqlRateLimits(engine)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def redis_rate_store(work: Path) -> Iterator[RateLimitStore]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(work)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = connect_redis(f"redis://127.0.0.1:{port}/0")
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.RedisError:
                time.sleep(0.02)
        yield RedisRateLimits(client)
        client.close()
    finally:
        process.terminate()
        process.wait(10)


def measure_limiter(name: str, store: RateLimitStore, checks: int) -> None:
    """The two checks an exchange makes with the default scopes, as the pipeline makes them:
    well under the limits (every check a store round trip), then a flood from one network
    (refused from memory once the store has refused it)."""
    defaults = {"network": Limit(200, 1, 2000), "identity": Limit(100, 1, 2000)}
    limiter = RateLimiter(RateLimitPolicy({"token": defaults}), store)
    record = AuditRecord("event", time.time(), "request", "token")

    def exchange(i: int) -> None:
        # A new network and identity each time: far under their limits, nothing from memory.
        now = time.time()
        limiter.on_arrival("token", f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}", now, record)
        limiter.for_identity("token", "github-actions", f"repo:acme/app-{i}:ref:refs/heads/main", now, record)

    now = time.time()  # the flood below comes at one instant

    median, best, cpu = per_call_us(exchange, checks)
    what = "network + identity, per exchange"
    print(f"  {name:10} {what:34} {median:7.1f} us (best batch {best:6.1f}, CPU {cpu:6.1f})")
    flooded = RateLimiter(RateLimitPolicy({"token": {"network": Limit(1, 60, 1)}}), store)

    def flood(i: int) -> None:
        with suppress(RateLimited):
            flooded.on_arrival("token", "203.0.113.7", now, record)

    median, best, cpu = per_call_us(flood, checks)
    what = "a flood, refused"
    print(f"  {name:10} {what:34} {median:7.1f} us (best batch {best:6.1f}, CPU {cpu:6.1f})")


def measure_exchanges(work: Path, exchanges: int) -> None:
    issuer = DevIssuer.serve_ephemeral(alg="RS256")
    wide = {"requests": 1_000_000, "period": 1}
    rule: dict[str, Any] = {
        "name": "bench", "issuer": "upstream", "subject": "repo:acme/app:ref:refs/heads/main",
        "claims": {"repository_id": "123456"}, "require_client_authentication": False,
        "grant": {"audiences": ["https://deploy.example.com"], "scopes": ["deploy:read"]},
    }  # fmt: skip
    for directory, extra in (("policies", {}), ("policies-rule-limit", {"rate_limit": wide})):
        (work / directory).mkdir(exist_ok=True)
        (work / directory / "bench.yaml").write_text(
            yaml.safe_dump({"version": 1, "rules": [{**rule, **extra}]})
        )
    token = issuer.issuer.github_actions_token(audience="https://sts.bench", lifetime=3600)
    form = {"grant_type": GRANT, "subject_token": token, "subject_token_type": JWT,
            "audience": "https://deploy.example.com"}  # fmt: skip
    variants: dict[str, tuple[dict[str, Any], str]] = {
        "limits off": ({"enabled": False}, "policies"),
        "default scopes (network, identity)": ({"token": {"network": wide, "identity": wide}}, "policies"),
        "global+network, identity, rule": (
            {"token": {"global": wide, "network": wide, "identity": wide}},
            "policies-rule-limit",
        ),
    }
    timings: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, float] = dict.fromkeys(variants, 0.0)
    apps = {}
    for n, (name, (limits, policies)) in enumerate(variants.items()):
        settings = load_settings(None, {}, overrides={
            "issuer": "https://sts.bench", "database_url": f"sqlite:///{work / f'exchange-{n}.sqlite'}",
            "keys_dir": str(work / "keys"), "policies_dir": str(work / policies), "log_level": "WARNING",
            "rate_limits": limits,
            "issuers": [{"name": "upstream", "issuer": issuer.issuer.issuer_url, "jwks_uri": issuer.jwks_uri,
                         "algorithms": ["RS256"], "audiences": ["https://sts.bench"]}],
        })  # fmt: skip
        apps[name] = create_app(settings).test_client()
    for client in apps.values():
        for _ in range(20):  # warm-up
            client.post("/token", data=form)
    # Short interleaved rounds, so that the machine's other load falls on every variant alike.
    rounds = 20
    for _ in range(rounds):
        for name, client in apps.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(exchanges // rounds):
                response = client.post("/token", data=form)
                assert response.status_code == 200, response.get_data(as_text=True)
            timings[name].append((time.perf_counter() - started) / (exchanges // rounds) * 1e6)
            cpu[name] += time.process_time() - cpu_started
    issuer.stop()
    base, base_best = statistics.median(timings["limits off"]), min(timings["limits off"])
    base_cpu = cpu["limits off"] / exchanges * 1e6
    for name, runs in timings.items():
        us, best, used = statistics.median(runs), min(runs), cpu[name] / exchanges * 1e6
        print(
            f"  {name:36} {us:5.0f} us/exchange ({us - base:+5.0f})"
            f"  best round {best:5.0f} ({best - base_best:+5.0f})  CPU {used:5.0f} ({used - base_cpu:+4.0f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", type=int, default=5000)
    parser.add_argument("--exchanges", type=int, default=1000)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sts-bench-limits-"))
    os.chdir(work)  # no ./sts.yaml of the checkout under the benchmark's own settings
    try:
        print("One check (single thread):")
        with sqlite_store(work) as store:
            measure_store("sqlite", store, args.checks)
            measure_limiter("sqlite", store, args.checks)
        try:
            with postgres_store(args.postgres) as store:
                measure_store("postgresql", store, args.checks)
                measure_limiter("postgresql", store, args.checks)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what it could not measure
            print(f"  postgresql: not measured ({type(exc).__name__})")
        if shutil.which("redis-server"):
            with redis_rate_store(work) as store:
                measure_store("redis", store, args.checks)
                measure_limiter("redis", store, args.checks)
        print("POST /token through the Flask test client, SQLite (median and best of 20 interleaved rounds):")
        measure_exchanges(work, args.exchanges)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
