"""What one token exchange costs on Redis, counted: round trips and writes (each waits for an fsync).

Redis is latency-bound: with ``appendfsync always`` every write waits for the append-only file to
reach the disk before Redis answers.  ``MONITOR`` on this run's private redis-server lists every
command an app sends to its own database, and, for a script, the commands it ran inside (``lua``).
The counts pin the shape of an exchange (:mod:`sts.adapters.redis.ledger`): the subject's state
and behaviour baseline are read in one ``MGET`` while the request is decided (the DPoP proof's
``jti`` and the subject token are only checked against the ledger's epoch, which this process
knows); both uses are claimed in one script before the audit record is committed, and confirmed,
with the baseline, in one script after it.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from flask import Flask

from sts.app import create_app
from sts.dev.issuer import DevIssuer, RunningServer
from sts.settings import Settings
from tests.conftest import STS_ISSUER, exchange_form
from tests.core.test_dpop import EC_KEY, proof

SUBJECT = "repo:acme/app:ref:refs/heads/main"
DEPLOY = "https://deploy.example.com"
#: Commands that write (the others only read); a script counts as a write when it ran one.
WRITES = {"SET", "DEL", "PEXPIRE", "PEXPIREAT", "EXPIRE", "INCR", "HSET", "EXEC"}


def policy(*, single_use: bool = True) -> dict[str, Any]:
    """The benchmark's rule (benchmarks/bench.py ``rule_set``): DPoP, single use, risk."""
    return {
        "version": 1,
        "rules": [
            {
                "name": "bench",
                "issuer": "upstream",
                "subject": SUBJECT,
                "claims": {"repository_id": "123456"},
                "require_client_authentication": False,
                "require_dpop": True,
                "single_use": single_use,
                "grant": {"audiences": [DEPLOY], "scopes": ["deploy:read"], "max_lifetime": 300},
                "risk": {"networks": ["127.0.0.0/8"]},
            }
        ],
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@dataclass
class RoundTrip:
    """One command the app sent, with the commands a script it ran called inside it."""

    command: str
    inside: list[str] = field(default_factory=list)

    @property
    def writes(self) -> bool:
        return self.command in WRITES or any(c in WRITES for c in self.inside)


class Monitor:
    """``MONITOR`` of one database of the private server, on a thread of its own."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.db = int(self.client.connection_pool.connection_kwargs.get("db", 0))
        self.seen: list[RoundTrip] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            self._ready.set()
            for event in monitor.listen():
                if self._stop:
                    return
                if int(event["db"]) != self.db:
                    continue
                words = event["command"].split()
                name = words[0].upper() if words else ""
                with self._lock:
                    if event["client_type"] == "lua" and self.seen:
                        self.seen[-1].inside.append(name)
                    else:
                        self.seen.append(RoundTrip(name))

    def take(self) -> list[RoundTrip]:
        """What was seen so far (after a marker round trip, so nothing is still on its way)."""
        marker = f"marker-{time.monotonic_ns()}"
        self.client.get(marker)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with self._lock:
                if any(r.command == "GET" for r in self.seen[-1:]):
                    seen, self.seen = self.seen[:-1], []
                    return seen
            time.sleep(0.01)
        raise AssertionError("MONITOR did not see the marker")

    def close(self) -> None:
        self._stop = True
        self.client.get("marker-stop")
        self._thread.join(5)
        self.client.close()


@pytest.fixture
def redis_app(
    make_settings: Callable[..., Settings], fresh_redis_url: str
) -> Iterator[Callable[..., tuple[Flask, Monitor]]]:
    made: list[tuple[Flask, Monitor]] = []

    def build(**policy_args: Any) -> tuple[Flask, Monitor]:
        app = create_app(
            make_settings(
                policy(**policy_args),
                store="redis",
                redis_url=fresh_redis_url,
                # As in the benchmark: each limit would add a script (a write) of its own.
                rate_limits={"enabled": False},
            )
        )
        made.append((app, Monitor(fresh_redis_url)))
        return made[-1]

    yield build
    for app, monitor in made:
        monitor.close()
        app.extensions["sts"].engine.dispose()
        app.extensions["sts"].redis_client.close()


def exchange(app: Flask, upstream: RunningServer) -> int:
    token = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    resp = app.test_client().post(
        "/token",
        data=exchange_form(token, audience=DEPLOY),
        headers={"DPoP": proof(EC_KEY, time.time())},
    )
    assert resp.status_code == 200, resp.get_json()
    return resp.status_code


def counted(app: Flask, monitor: Monitor, upstream: RunningServer) -> list[RoundTrip]:
    exchange(app, upstream)  # The first one also reads the ledger's epoch and loads the scripts.
    monitor.take()
    exchange(app, upstream)
    return monitor.take()


def test_a_single_use_dpop_exchange_is_two_writes(
    redis_app: Callable[..., tuple[Flask, Monitor]], upstream: RunningServer
) -> None:
    """Before: six round trips, four of them writes (the proof's jti, the reservation, its
    confirmation, the baseline), each waiting for an fsync; then four (the state and the baseline
    read apart)."""
    app, monitor = redis_app()
    seen = counted(app, monitor, upstream)
    shape = [(r.command, r.writes) for r in seen]
    # The subject's state and baseline; claim the proof and the token; confirm, with the baseline.
    assert shape == [("MGET", False), ("EVALSHA", True), ("EVALSHA", True)], seen
    claim, confirm = seen[1:]
    assert claim.inside == ["GET", "GET", "GET", "SET", "SET"], seen
    # The epoch, the reservation, the use; the baseline (read first: a reset one's counters count
    # nothing), its counters read and advanced.
    assert confirm.inside == ["GET", "GET", "SET", "GET", "SET", "GET", "SET"], seen


def test_a_dpop_exchange_without_single_use_is_two_writes(
    redis_app: Callable[..., tuple[Flask, Monitor]], upstream: RunningServer
) -> None:
    """As before: the proof's jti (now claimed at the commit, before the record), the baseline (a
    script: its counters are advanced from the stored ones)."""
    app, monitor = redis_app(single_use=False)
    seen = counted(app, monitor, upstream)
    shape = [(r.command, r.writes) for r in seen]
    assert shape == [("MGET", False), ("EVALSHA", True), ("EVALSHA", True)], seen
    assert seen[2].inside == ["GET", "SET", "GET", "SET"], seen


def test_a_token_held_by_a_request_in_flight_is_refused_on_record_and_then_granted(
    redis_app: Callable[..., tuple[Flask, Monitor]], upstream: RunningServer, fresh_redis_url: str
) -> None:
    """The claim comes after the decision, so a 503 there (the token still held by another
    request's reservation) must be recorded as a refusal by the pipeline: no record was written."""
    app, _ = redis_app()
    app.extensions["sts"].exchange.ledger.inner.wait = 0.1  # (behind the metrics) a short wait
    token = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    payload = token.split(".")[1]
    jti = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
    held = f"sts:replay:subject_token:upstream:{jti}"
    other = redis.Redis.from_url(fresh_redis_url)
    other.set(held, b"r:another-request", px=60_000)

    def send() -> Any:
        return app.test_client().post(
            "/token",
            data=exchange_form(token, audience=DEPLOY),
            headers={"DPoP": proof(EC_KEY, time.time())},
        )

    refused = send()
    assert refused.status_code == 503, refused.get_json()
    assert refused.get_json()["error"] == "temporarily_unavailable"
    [record] = app.extensions["sts"].audit.recent(limit=5)
    assert (record["outcome"], record["error"], record["issued_jti"]) == (
        "refused",
        "temporarily_unavailable",
        None,
    )
    assert "store.unavailable" in record["reasons"]
    other.delete(held)  # The other request gave up: this one's retry gets the token.
    assert send().status_code == 200
    assert other.get(held) == b"1"
    other.close()
