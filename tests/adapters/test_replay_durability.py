"""Replay records across a Redis restart: kept, or known to be lost (issue 9, item 2).

With ``store: redis`` the single-use ledger and the ``jti`` caches (DPoP
proofs, client assertions, SETs) live in Redis's memory.  Each test starts a
redis-server of its own (``tests/support/redis_server.py``), exchanges, ``kill -9``s
it and starts it again on the same port and directory:

* without persistence it comes back empty.  Every credential that could have
  been accepted before the loss is refused (reason ``*.replay_window_lost``)
  until it expires; credentials issued after the loss (and the leeway) work;
* with an append-only file it comes back whole: a replay is refused by the
  ledger itself (``subject_token.replayed``), and nothing else is refused;
* from an RDB snapshot it comes back without the latest records: a loss;
* a process started after the loss still knows of it (the database remembers
  the ledger's epoch).

The app runs on the wall clock plus an offset the test moves (:class:`OffsetClock`):
Redis expires entries on its own clock, and moving the offset stands for the
time after which credentials issued after the loss are accepted.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from flask import Flask
from joserfc import jwt
from joserfc.jwk import ECKey
from redis.backoff import NoBackoff
from redis.retry import Retry
from werkzeug.test import TestResponse

from sts.adapters.redis import persistence
from sts.adapters.redis.client import connect as connect_redis
from sts.adapters.redis.epoch import LedgerEpoch
from sts.adapters.redis.ledger import RedisReplayCache
from sts.adapters.redis.persistence import persistence_warnings
from sts.app import create_app
from sts.core.client_secrets import hash_secret
from sts.core.clients import REPLAY_WINDOW_LOST as ASSERTION_WINDOW_LOST
from sts.core.dpop import REPLAY_WINDOW_LOST as PROOF_WINDOW_LOST
from sts.core.exchange.single_use import REPLAY_WINDOW_LOST as TOKEN_WINDOW_LOST
from sts.core.ports import ReplayWindowLost, StoreUnavailable
from sts.core.subject_state import STATE_TTL, SubjectState, identity_key
from sts.dev.issuer import DevIssuer, RunningServer
from tests.conftest import SIGNER_KEY, STS_ISSUER, exchange_form, settings_for
from tests.support.redis_server import RedisProcess, free_port

#: A client that fails at once (redis-py retries a connection error for seconds by default).
NO_RETRY = Retry(NoBackoff(), 0)

#: Tokens exchanged before each restart (the issue measured 100; 20 keeps the file fast).
N = 20
LEEWAY = 30  # the settings default
DEPLOY = "https://deploy.example.com"
LEDGER = "https://ledger.example.com/api"
TOKEN_URL = STS_ISSUER + "/token"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
DPOP_KEY = ECKey.generate_key("P-256")

POLICY: dict[str, Any] = {
    "version": 1,
    "rules": [
        {
            "name": "deploy-once",
            "issuer": "upstream",
            "subject": "repo:acme/app:ref:refs/heads/main",
            "require_client_authentication": False,
            "single_use": True,
            "grant": {"audiences": [DEPLOY]},
        },
        {
            "name": "ledger",
            "issuer": "upstream",
            "subject": "system:serviceaccount:payments:api",
            "require_client_authentication": False,
            "grant": {"resources": [LEDGER]},
        },
    ],
}


class OffsetClock:
    """The wall clock plus an offset the test moves.

    Not the shared standing ``Clock`` (tests/support/clock.py): Redis expires the replay
    records on its own clock, which keeps running, so the app's time must run with it.
    """

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    """Overrides conftest's per-test issuer: one RSA key for the module."""
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """Start private redis-servers (each in a directory of its own); all stopped afterwards."""
    started: list[RedisProcess] = []

    def start(**kwargs: Any) -> RedisProcess:
        server = RedisProcess(tmp_path / f"redis-{len(started)}", **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@dataclass
class Service:
    """One app (one process of the fleet) on ``store: redis``."""

    app: Flask
    clock: OffsetClock
    upstream: RunningServer

    def deploy_token(self) -> str:
        """A single-use subject token, issued now (on the app's clock)."""
        return self.upstream.issuer.github_actions_token(
            audience=STS_ISSUER, jti=str(uuid.uuid4()), now=self.clock()
        )

    def workload_token(self) -> str:
        return self.upstream.issuer.kubernetes_token(audience=[STS_ISSUER], now=self.clock())

    def exchange(self, subject_token: str, **params: Any) -> TestResponse:
        headers = {"DPoP": params.pop("dpop")} if "dpop" in params else {}
        params.setdefault("audience", DEPLOY)
        return self.app.test_client().post(
            "/token", data=exchange_form(subject_token, **params), headers=headers
        )

    def ledger_exchange(self, subject_token: str, **params: Any) -> TestResponse:
        return self.exchange(subject_token, audience=None, resource=LEDGER, **params)

    def reasons(self) -> list[str]:
        record: dict[str, Any] = self.app.extensions["sts"].audit.recent(1)[0]
        return list(record["reasons"])

    def proof(self, **claims: Any) -> str:
        """A DPoP proof (RFC 9449 §4.2) for this token endpoint, made now."""
        header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": DPOP_KEY.as_dict(private=False)}
        body = {"jti": uuid.uuid4().hex, "htm": "POST", "htu": TOKEN_URL, "iat": int(self.clock()), **claims}
        return jwt.encode(header, body, DPOP_KEY, algorithms=["ES256"])

    def assertion(self) -> str:
        """A private_key_jwt client assertion of the ``signer`` client (RFC 7523 §3), made now."""
        now = int(self.clock())
        claims = {"iss": "signer", "sub": "signer", "aud": STS_ISSUER, "iat": now, "exp": now + 60}
        claims["jti"] = uuid.uuid4().hex
        return jwt.encode({"alg": "ES256", "kid": SIGNER_KEY.kid}, claims, SIGNER_KEY, algorithms=["ES256"])


@pytest.fixture
def make_service(tmp_path: Path, upstream: RunningServer) -> Iterator[Callable[..., Service]]:
    apps: list[Flask] = []

    def build(server: RedisProcess, clock: OffsetClock | None = None, **overrides: Any) -> Service:
        settings = settings_for(
            tmp_path, upstream, POLICY, store="redis", redis_url=server.url(0), **overrides
        )
        clock = clock or OffsetClock()
        app = create_app(settings, clock=clock)
        apps.append(app)
        return Service(app, clock, upstream)

    yield build
    for app in apps:
        close(app)


def close(app: Flask) -> None:
    runtime = app.extensions["sts"]
    runtime.engine.dispose()
    if runtime.redis_client is not None:
        runtime.redis_client.close()


def restart(server: RedisProcess) -> None:
    """``kill -9`` the server and start it again on the same port and directory."""
    server.kill()
    server.start()


def delete_every_key(server: RedisProcess) -> None:
    """What a flush of this test's own ``redis-server`` does: every record gone, no restart."""
    client = redis.Redis(port=server.port)
    for key in list(client.scan_iter()):
        client.delete(key)
    assert client.dbsize() == 0
    client.close()


def exchange_all(service: Service, tokens: list[str]) -> None:
    for token in tokens:
        resp = service.exchange(token)
        assert resp.status_code == 200, (resp.get_json(), service.reasons())


def assert_window_lost(service: Service, resp: TestResponse) -> None:
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json() == {"error": "invalid_request", "error_description": TOKEN_WINDOW_LOST}
    assert "subject_token.replay_window_lost" in service.reasons()


# -- single-use subject tokens ------------------------------------------------------------------------


def test_an_empty_restart_refuses_every_replay_and_tokens_issued_after_it_work(
    redis_servers: Callable[..., RedisProcess], make_service: Callable[..., Service]
) -> None:
    server = redis_servers(appendonly=False)
    service = make_service(server)
    tokens = [service.deploy_token() for _ in range(N)]
    exchange_all(service, tokens)

    restart(server)
    accepted = 0
    for token in tokens:
        resp = service.exchange(token)
        accepted += resp.status_code == 200
        assert_window_lost(service, resp)
    assert accepted == 0  # was N of N before the ledger knew its epoch

    # Tokens issued once the loss (and the leeway for issuers' clocks) has passed work, once.
    service.clock.advance(LEEWAY + 2)
    fresh = [service.deploy_token() for _ in range(3)]
    exchange_all(service, fresh)
    for token in fresh:
        resp = service.exchange(token)
        assert resp.status_code == 400 and service.reasons()[-1] == "subject_token.replayed"


def test_a_restart_that_replays_its_append_only_file_keeps_the_ledger(
    redis_servers: Callable[..., RedisProcess], make_service: Callable[..., Service]
) -> None:
    server = redis_servers(appendonly=True)
    service = make_service(server)
    tokens = [service.deploy_token() for _ in range(N)]
    exchange_all(service, tokens)

    restart(server)
    for token in tokens:
        resp = service.exchange(token)
        assert resp.status_code == 400, resp.get_json()
        assert service.reasons()[-1] == "subject_token.replayed"
    # Not treated as a loss: a token issued before the restart, never used, still works.
    assert service.app.extensions["sts"].replay.epoch.lost_at is None
    exchange_all(service, [service.deploy_token() for _ in range(3)])


def test_a_restart_from_an_rdb_snapshot_is_a_loss(
    redis_servers: Callable[..., RedisProcess], make_service: Callable[..., Service]
) -> None:
    # The snapshot holds the epoch and the first records, not the ones written after it.
    server = redis_servers(appendonly=False)
    service = make_service(server)
    before, after = [service.deploy_token() for _ in range(5)], [service.deploy_token() for _ in range(5)]
    exchange_all(service, before)
    redis.Redis(port=server.port).save()
    exchange_all(service, after)

    restart(server)
    assert redis.Redis(port=server.port).exists(b"sts:ledger-epoch")  # the snapshot kept the epoch
    for token in before + after:
        assert_window_lost(service, service.exchange(token))


def test_a_process_started_after_the_loss_knows_of_it(
    redis_servers: Callable[..., RedisProcess], make_service: Callable[..., Service]
) -> None:
    # The whole fleet restarts with Redis (a reboot): no process remembers the old epoch, but the
    # database does.
    server = redis_servers(appendonly=False)
    first = make_service(server)
    tokens = [first.deploy_token() for _ in range(5)]
    exchange_all(first, tokens)
    close(first.app)

    restart(server)
    second = make_service(server, clock=first.clock)
    for token in tokens:
        assert_window_lost(second, second.exchange(token))
    assert second.app.extensions["sts"].replay.epoch.lost_at is not None


def test_a_restart_while_another_process_runs_on_is_seen_by_both(
    redis_servers: Callable[..., RedisProcess], make_service: Callable[..., Service]
) -> None:
    server = redis_servers(appendonly=False)
    one = make_service(server)
    two = make_service(server, clock=one.clock)
    tokens = [one.deploy_token() for _ in range(4)]
    exchange_all(one, tokens)

    restart(server)
    # The first process to write after the restart begins the new epoch; the other sees it.
    for service in (two, one, two, one):
        assert_window_lost(service, service.exchange(tokens.pop()))
    epochs = {s.app.extensions["sts"].replay.epoch.lost_at for s in (one, two)}
    assert len(epochs) == 1 and None not in epochs


# -- DPoP proofs, client assertions, SETs -------------------------------------------------------------


def test_a_dpop_proof_replayed_after_an_empty_restart_is_refused(
    redis_servers: Callable[..., RedisProcess], make_service: Callable[..., Service]
) -> None:
    server = redis_servers(appendonly=False)
    service = make_service(server)
    token, proof = service.workload_token(), service.proof()
    assert service.ledger_exchange(token, dpop=proof).status_code == 200

    restart(server)
    resp = service.ledger_exchange(token, dpop=proof)
    assert resp.status_code == 400
    assert resp.get_json() == {"error": "invalid_dpop_proof", "error_description": PROOF_WINDOW_LOST}
    assert service.reasons()[-1] == "dpop.replay_window_lost"

    service.clock.advance(LEEWAY + 2)
    fresh = service.proof()
    assert service.ledger_exchange(token, dpop=fresh).status_code == 200
    assert service.ledger_exchange(token, dpop=fresh).status_code == 400
    assert service.reasons()[-1] == "dpop.replayed_jti"


def test_with_nonces_a_proof_with_the_nonce_given_after_the_loss_works_at_once(
    redis_servers: Callable[..., RedisProcess], make_service: Callable[..., Service]
) -> None:
    server = redis_servers(appendonly=False)
    service = make_service(server, dpop_nonce=True)
    token = service.workload_token()
    challenge = service.ledger_exchange(token, dpop=service.proof())
    assert challenge.get_json()["error"] == "use_dpop_nonce"
    proof = service.proof(nonce=challenge.headers["DPoP-Nonce"])
    assert service.ledger_exchange(token, dpop=proof).status_code == 200

    restart(server)
    resp = service.ledger_exchange(token, dpop=proof)
    # RFC 9449 §8: a client answers use_dpop_nonce with a fresh proof carrying the new nonce.
    assert resp.status_code == 400 and resp.get_json()["error"] == "use_dpop_nonce"
    assert service.reasons()[-1] == "dpop.replay_window_lost"
    retried = service.ledger_exchange(token, dpop=service.proof(nonce=resp.headers["DPoP-Nonce"]))
    assert retried.status_code == 200, service.reasons()


def test_a_client_assertion_replayed_after_an_empty_restart_is_refused(
    redis_servers: Callable[..., RedisProcess], make_service: Callable[..., Service]
) -> None:
    server = redis_servers(appendonly=False)
    service = make_service(server)
    token, assertion = service.workload_token(), service.assertion()
    auth = {"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": assertion}
    assert service.ledger_exchange(token, **auth).status_code == 200

    restart(server)
    resp = service.ledger_exchange(token, **auth)
    assert resp.status_code == 401
    assert resp.get_json() == {"error": "invalid_client", "error_description": ASSERTION_WINDOW_LOST}
    assert service.reasons()[-1] == "client_assertion.replay_window_lost"

    service.clock.advance(LEEWAY + 2)
    fresh = {"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": service.assertion()}
    assert service.ledger_exchange(token, **fresh).status_code == 200


def test_a_set_replayed_after_an_empty_restart_is_refused(
    redis_servers: Callable[..., RedisProcess], make_service: Callable[..., Service], upstream: RunningServer
) -> None:
    with DevIssuer.serve_ephemeral(alg="ES256", mint_endpoints=False) as transmitter:
        entry = {
            "name": "idp",
            "issuer": transmitter.issuer.issuer_url,
            "jwks_uri": transmitter.jwks_uri,
            "algorithms": ["ES256"],
        }
        server = redis_servers(appendonly=False)
        service = make_service(server, transmitters=[entry])

        def set_token() -> str:
            sub_id = {"format": "iss_sub", "iss": upstream.issuer.issuer_url, "sub": "someone"}
            claims = {
                "iss": transmitter.issuer.issuer_url,
                "aud": STS_ISSUER,
                "iat": int(service.clock()),
                "jti": uuid.uuid4().hex,
                "sub_id": sub_id,
                "events": {"https://schemas.openid.net/secevent/caep/event-type/credential-change": {}},
            }
            return transmitter.issuer.mint(claims, header={"typ": "secevent+jwt"})

        def push(token: str) -> TestResponse:
            headers = {"Content-Type": "application/secevent+jwt"}
            return service.app.test_client().post("/ssf/events", data=token, headers=headers)

        event = set_token()
        assert push(event).status_code == 202
        restart(server)
        refused = push(event)
        assert refused.status_code == 400 and refused.get_json()["err"] == "invalid_request"
        assert service.reasons() == ["set.replay_window_lost"]
        service.clock.advance(LEEWAY + 2)
        assert push(set_token()).status_code == 202


def test_the_replay_cache_raises_for_what_the_lost_records_may_have_seen(
    redis_servers: Callable[..., RedisProcess],
) -> None:
    server = redis_servers(appendonly=False)
    client = connect_redis(server.url(0))
    cache = RedisReplayCache(client)
    now = time.time()
    assert cache.first_use("dpop", "a", now + 60, now, valid_from=now - 10) is True
    restart(server)
    with pytest.raises(ReplayWindowLost) as lost:
        cache.first_use("dpop", "a", now + 60, now, valid_from=now - 10)
    assert now <= lost.value.lost_at <= time.time() + 1
    with pytest.raises(ReplayWindowLost):
        cache.first_use("dpop", "b", now + 60, now, valid_from=None)  # unknown: assume the worst
    later = lost.value.lost_at
    assert cache.first_use("dpop", "c", later + 60, later, valid_from=later) is True
    assert cache.first_use("dpop", "c", later + 60, later, valid_from=later) is False
    client.close()


# -- persistence settings, checked at start -----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param({"appendonly": False}, ["appendonly no"], id="no-aof"),
        pytest.param(
            {"appendonly": True, "appendfsync": "everysec"}, ["appendfsync everysec"], id="everysec"
        ),
        pytest.param({"appendonly": True}, [], id="aof-always"),
        pytest.param(
            {"appendonly": True, "extra_args": ("--maxmemory-policy", "allkeys-lru")},
            ["maxmemory-policy allkeys-lru"],
            id="evicting",
        ),
        # CONFIG disabled (as on many managed services): INFO persistence still tells about the AOF.
        pytest.param(
            {"appendonly": False, "extra_args": ("--rename-command", "CONFIG", "")},
            ["appendonly no"],
            id="no-config-no-aof",
        ),
        # INFO never shows appendfsync: said so.  The eviction policy it shows (INFO memory): it was
        # taken for noeviction, and single-use records were evicted unwarned (an outside audit).
        pytest.param(
            {"appendonly": True, "extra_args": ("--rename-command", "CONFIG", "")},
            ["cannot read Redis's appendfsync"],
            id="no-config-aof",
        ),
        pytest.param(
            {
                "appendonly": True,
                "extra_args": ("--rename-command", "CONFIG", "", "--maxmemory-policy", "volatile-lru"),
            },
            ["cannot read Redis's appendfsync", "maxmemory-policy volatile-lru"],
            id="no-config-evicting",
        ),
    ],
)
def test_persistence_settings_that_cannot_keep_the_ledger_are_warned_about(
    redis_servers: Callable[..., RedisProcess],
    make_service: Callable[..., Service],
    caplog: pytest.LogCaptureFixture,
    options: dict[str, Any],
    expected: list[str],
) -> None:
    server = redis_servers(**options)
    client = redis.Redis(port=server.port)
    warnings = persistence_warnings(client)
    client.close()
    assert len(warnings) == len(expected), warnings
    for warning, words in zip(warnings, expected, strict=True):
        assert words in warning

    with caplog.at_level(logging.WARNING, logger="sts.adapters.redis.persistence"):
        make_service(server)
    logged = [r.getMessage() for r in caplog.records if r.name == "sts.adapters.redis.persistence"]
    assert [w in m for w, m in zip(warnings, logged, strict=True)] == [True] * len(warnings)


def test_a_redis_down_at_start_has_its_settings_read_once_it_answers(
    redis_servers: Callable[..., RedisProcess],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The service started before Redis (as compose and Kubernetes often start them): the settings
    were never read, and a Redis without an append-only file and evicting went unwarned (an outside
    fault campaign).  They are read once it answers."""
    monkeypatch.setattr(persistence, "RETRY_SECONDS", 0.05)
    earlier = set(threading.enumerate())
    port = free_port()
    client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5, retry=NO_RETRY)
    with caplog.at_level(logging.INFO, logger="sts.adapters.redis.persistence"):
        persistence.check_at_start(client, cast(LedgerEpoch, None), time.time())  # never reached
        assert "its persistence is checked once it answers" in caplog.text
        redis_servers(port=port, appendonly=False, extra_args=("--maxmemory-policy", "volatile-lru"))
        deadline = time.monotonic() + 10
        while "persistence settings were read" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("appendonly no" in m for m in logged), logged
    assert any("maxmemory-policy volatile-lru" in m for m in logged), logged
    [thread] = [t for t in threading.enumerate() if t.name == "sts-redis-settings" and t not in earlier] or [
        None
    ]
    if thread is not None:  # (it logs, then returns)
        thread.join(timeout=5)
        assert not thread.is_alive()  # it ended
    client.close()


def test_a_redis_that_never_answers_is_said_to_have_gone_unchecked(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread gives up after ``RETRIES`` and says so (a review: it ended silently)."""
    monkeypatch.setattr(persistence, "RETRY_SECONDS", 0.01)
    monkeypatch.setattr(persistence, "RETRIES", 3)
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2, retry=NO_RETRY)
    earlier = set(threading.enumerate())
    with caplog.at_level(logging.WARNING, logger="sts.adapters.redis.persistence"):
        persistence.check_at_start(client, cast(LedgerEpoch, None), time.time())
        [thread] = [t for t in threading.enumerate() if t.name == "sts-redis-settings" and t not in earlier]
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert "its persistence settings were not read" in caplog.text
    client.close()


def test_an_epoch_unreadable_at_start_is_not_a_redis_that_cannot_be_reached(
    redis_servers: Callable[..., RedisProcess], caplog: pytest.LogCaptureFixture
) -> None:
    """The epoch's read also reads the database: failing there, after the settings were read and
    warned about, started the retry thread, which warned again (a review)."""

    class Unreadable:
        def sync(self, now: float) -> None:
            raise StoreUnavailable("database")

    server = redis_servers(appendonly=False)
    client = redis.Redis(port=server.port)
    earlier = set(threading.enumerate())
    with caplog.at_level(logging.WARNING, logger="sts.adapters.redis.persistence"):
        persistence.check_at_start(client, cast(LedgerEpoch, Unreadable()), time.time())
    logged = [r.getMessage() for r in caplog.records]
    assert sum("appendonly no" in m for m in logged) == 1
    assert any("ledger epoch could not be read at start" in m for m in logged)
    assert not any("cannot be reached" in m for m in logged)
    assert not [t for t in threading.enumerate() if t.name == "sts-redis-settings" and t not in earlier]
    client.close()


def test_redis_pointed_away_and_back_is_a_loss(
    redis_servers: Callable[..., RedisProcess], make_service: Callable[..., Service]
) -> None:
    """``redis_url`` moved to another Redis (a loss there), used, then moved back: the first Redis
    still holds its old epoch, and none of the records written meanwhile.  Its epoch began before
    the one in force since, which the database remembers: a loss again, found at the first use."""
    first, second = redis_servers(appendonly=True), redis_servers(appendonly=True)
    on_first = make_service(first)
    exchange_all(on_first, [on_first.deploy_token()])
    close(on_first.app)

    on_first.clock.advance(5)
    on_second = make_service(second, clock=on_first.clock)  # the move is a loss, as documented
    assert on_second.app.extensions["sts"].replay.epoch.lost_at is not None
    on_second.clock.advance(LEEWAY + 2)
    used = [on_second.deploy_token() for _ in range(4)]
    exchange_all(on_second, used)
    close(on_second.app)

    back = make_service(first, clock=on_first.clock)
    for token in used:
        assert_window_lost(back, back.exchange(token))  # were granted again before
    assert back.app.extensions["sts"].replay.epoch.lost_at is not None
    back.clock.advance(LEEWAY + 2)
    exchange_all(back, [back.deploy_token() for _ in range(2)])


# -- blocks and revocations ----------------------------------------------------------------------------

RS_SECRET = "resource-server-secret-0123456789abcdef"


@pytest.mark.parametrize("loss", ["every-key-deleted", "empty-restart"])
def test_blocks_and_revocations_outlive_a_redis_that_lost_its_records(
    redis_servers: Callable[..., RedisProcess], make_service: Callable[..., Service], loss: str
) -> None:
    """A revoked token stays inactive, and a blocked workload blocked, after Redis loses its
    records: the database keeps a durable copy, read until what was written before the loss
    has expired (before, the token introspected as active again and the workload was granted)."""
    server = redis_servers(appendonly=False)
    rs = {"client_id": "rs", "auth_method": "client_secret_post", "secret_hash": hash_secret(RS_SECRET),
          "audiences": [LEDGER]}  # fmt: skip
    service = make_service(server, clients=[rs])
    web = service.app.test_client()
    auth = {"client_id": "rs", "client_secret": RS_SECRET}

    def active(token: str) -> bool:
        answer = web.post("/introspect", data={"token": token, **auth})
        assert answer.status_code == 200, answer.get_json()
        return bool(answer.get_json()["active"])

    granted = service.ledger_exchange(service.workload_token())
    assert granted.status_code == 200, granted.get_json()
    token = granted.get_json()["access_token"]
    assert web.post("/revoke", data={"token": token, **auth}).status_code == 200
    assert not active(token)
    now = service.clock()

    def block(state: SubjectState) -> SubjectState:
        return state.with_event("operator.revoke", now, blocked_until=now + 3600)

    states = service.app.extensions["sts"].subject_states
    states.update(identity_key("upstream", "system:serviceaccount:payments:api"), block, STATE_TTL)
    assert service.ledger_exchange(service.workload_token()).status_code == 400

    if loss == "every-key-deleted":
        delete_every_key(server)
    else:
        restart(server)
    assert not active(token)
    refused = service.ledger_exchange(service.workload_token())
    assert refused.status_code == 400, refused.get_json()
    assert service.reasons()[-1] == "risk.denied"


def test_a_flush_is_found_by_the_first_request_after_it(
    redis_servers: Callable[..., RedisProcess], make_service: Callable[..., Service]
) -> None:
    """Every key deleted (a flush: no restart, the same connections): the first request after it
    reads the epoch with the subject's state, before anything is decided, and gets the loss's own
    answer (it was a ``503`` when the loss was found only by the claim at commit)."""
    server = redis_servers(appendonly=True)
    service = make_service(server)
    tokens = [service.deploy_token() for _ in range(3)]
    exchange_all(service, tokens[:1])
    delete_every_key(server)
    for token in tokens:
        assert_window_lost(service, service.exchange(token))


@pytest.mark.parametrize("nonces", [True, False])
def test_a_dpop_proof_met_by_a_flush_gets_the_loss_answer_not_a_503(
    redis_servers: Callable[..., RedisProcess], make_service: Callable[..., Service], nonces: bool
) -> None:
    """Every key deleted (no restart, the same connection): the proof is verified before the loss is
    seen (by the read of the subject's state), and its claim at commit meets it.  The answer is the
    documented one for a proof the lost records may have seen (it was a 503 on each worker)."""
    server = redis_servers(appendonly=True)
    service = make_service(server, dpop_nonce=nonces)
    token = service.workload_token()
    claims: dict[str, Any] = {}
    if nonces:
        challenge = service.ledger_exchange(token, dpop=service.proof())
        claims["nonce"] = challenge.headers["DPoP-Nonce"]
    assert service.ledger_exchange(token, dpop=service.proof(**claims)).status_code == 200

    delete_every_key(server)
    resp = service.ledger_exchange(token, dpop=service.proof(**claims))
    assert resp.status_code == 400, resp.get_json()
    assert service.reasons()[-1] == "dpop.replay_window_lost"
    if nonces:
        assert resp.get_json()["error"] == "use_dpop_nonce"
        retried = service.ledger_exchange(token, dpop=service.proof(nonce=resp.headers["DPoP-Nonce"]))
        assert retried.status_code == 200, service.reasons()
    else:
        assert resp.get_json() == {"error": "invalid_dpop_proof", "error_description": PROOF_WINDOW_LOST}


# -- keys evicted under maxmemory ---------------------------------------------------------------------

#: A Redis that evicts keys with an expiry (replay records have one) when its memory runs out: the
#: default of several managed services.
EVICTING = ("--maxmemory", "4mb", "--maxmemory-policy", "volatile-lru")


def evict_some(server: RedisProcess, at_least: int = 1) -> int:
    """Fill ``server`` with expiring keys until it has evicted ``at_least`` more; its count then.
    The keys are deleted after: a Redis left over its memory evicts at every write (the epoch's,
    the records'), and every look would find more."""
    client = redis.Redis(port=server.port)
    try:
        start = int(client.info("stats")["evicted_keys"])
        for _ in range(2000):
            with client.pipeline(transaction=False) as pipe:
                for _ in range(100):
                    pipe.set(f"fill:{uuid.uuid4().hex}", b"x" * 1024, ex=3600)
                pipe.execute()
            evicted = int(client.info("stats")["evicted_keys"])
            if evicted >= start + at_least:
                return evicted
        raise AssertionError("not evicted")
    finally:
        keys = list(client.scan_iter(match="fill:*", count=1000))
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i : i + 1000])
        client.close()


def test_keys_evicted_since_the_epoch_began_are_a_loss(redis_servers: Callable[..., RedisProcess]) -> None:
    """An evicting Redis dropped replay records unnoticed (the start only warned of its policy): an
    outside audit replayed 9 of 10 single-use tokens.  Keys evicted since the epoch was confirmed
    begin a new epoch, after a loss."""
    server = redis_servers(extra_args=EVICTING)
    client = connect_redis(server.url(0))
    epoch = LedgerEpoch(client)
    now = time.time()
    epoch.sync(now)
    before = client.get(epoch.key)
    epoch.sync(now + 1)  # nothing evicted: the epoch stays as it is, unwritten
    assert client.get(epoch.key) == before and epoch.lost_at is None
    evict_some(server)
    epoch.sync(now + 2)
    assert epoch.lost_at == math.ceil(now + 2)
    with pytest.raises(ReplayWindowLost):
        epoch.check(now + 1)
    epoch.check(now + 3)  # credentials from after the loss are fine
    # Another process finds the new epoch, and the loss, at its next sync.  (A Redis over its
    # memory evicts at every write, the new epoch's too: that process may find more, and a later
    # loss.)
    other = LedgerEpoch(connect_redis(server.url(0)))
    other.sync(now + 3)
    assert other.lost_at is not None and other.lost_at >= epoch.lost_at
    client.close()


def test_an_epoch_written_before_evictions_were_counted_learns_the_count(
    redis_servers: Callable[..., RedisProcess],
) -> None:
    """An older version's epoch names no count: the current one is taken, without a loss."""
    server = redis_servers(extra_args=EVICTING)
    evict_some(server)
    client = connect_redis(server.url(0))
    run_id = client.info("server")["run_id"]
    old = {"id": "0123456789abcdef", "created_at": 1, "run_id": run_id, "after_loss": False}
    client.set(b"sts:ledger-epoch", json.dumps(old))
    epoch = LedgerEpoch(client)
    epoch.sync(time.time())
    assert epoch.lost_at is None
    stored = json.loads(client.get(b"sts:ledger-epoch"))  # type: ignore[arg-type]
    assert stored["id"] == old["id"] and 0 < stored["evicted"] <= client.info("stats")["evicted_keys"]
    client.close()


def test_an_eviction_is_found_while_the_service_runs_and_replays_are_refused(
    redis_servers: Callable[..., RedisProcess],
    make_service: Callable[..., Service],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each worker looks at Redis's evicted keys every ``EVICTION_CHECK`` seconds: once it has seen
    them, single-use tokens exchanged before are refused (their records may be gone), and tokens
    issued after the loss work, once."""
    monkeypatch.setattr(persistence, "EVICTION_CHECK", 0.05)
    server = redis_servers(extra_args=EVICTING)
    service = make_service(server)
    tokens = [service.deploy_token() for _ in range(3)]
    exchange_all(service, tokens)
    evict_some(server)
    epoch = service.app.extensions["sts"].replay.epoch
    deadline = time.monotonic() + 10
    while epoch.lost_at is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert epoch.lost_at is not None
    for token in tokens:
        assert_window_lost(service, service.exchange(token))
    service.clock.advance(LEEWAY + 2)
    fresh = service.deploy_token()
    exchange_all(service, [fresh])
    assert service.exchange(fresh).status_code == 400 and service.reasons()[-1] == "subject_token.replayed"


def sync_after_restart(epoch: LedgerEpoch, now: float) -> None:
    """``epoch.sync(now)``, tried again while the first commands after a restart find their
    connections closed."""
    for _ in range(20):
        try:
            epoch.sync(now)
            return
        except StoreUnavailable:
            time.sleep(0.05)
    raise AssertionError("Redis did not answer after its restart")


def test_evictions_after_the_count_was_reset_are_a_loss(redis_servers: Callable[..., RedisProcess]) -> None:
    """``CONFIG RESETSTAT`` (monitoring tools send it) starts the count again: fewer than the epoch
    recorded, but not none, is evictions since (a review: they were taken for the reset alone)."""
    server = redis_servers(extra_args=EVICTING)
    recorded = evict_some(server, 500)
    client = connect_redis(server.url(0))
    epoch = LedgerEpoch(client)
    now = time.time()
    epoch.sync(now)
    assert epoch.lost_at is None
    client.config_resetstat()
    assert 0 < evict_some(server) < recorded
    epoch.sync(now + 2)
    assert epoch.lost_at == math.ceil(now + 2)
    client.config_resetstat()
    epoch.sync(now + 5)  # counted anew, none since: nothing more lost
    assert epoch.lost_at == math.ceil(now + 2)
    client.close()


@pytest.mark.parametrize(("policy", "lost"), [("volatile-random", True), ("noeviction", False)])
def test_a_restart_of_an_evicting_redis_is_a_loss_even_with_its_append_only_file(
    redis_servers: Callable[..., RedisProcess], policy: str, lost: bool
) -> None:
    """Redis writes an eviction to its append-only file as a ``DEL`` and counts evictions from
    its start: keys evicted after the last look and before a restart (or a failover) were gone
    unnoticed (a review).  A Redis that may evict is a loss when it restarts."""
    server = redis_servers(appendonly=True, extra_args=("--maxmemory", "4mb", "--maxmemory-policy", policy))
    client = connect_redis(server.url(0))
    epoch = LedgerEpoch(client)
    now = time.time()
    epoch.sync(now)
    restart(server)
    sync_after_restart(epoch, now + 1)
    assert epoch._known is not None and epoch._known.run_id == client.info("server")["run_id"]
    assert (epoch.lost_at is not None) is lost
    client.close()


def test_a_count_read_before_another_process_began_an_epoch_is_no_second_loss(
    redis_servers: Callable[..., RedisProcess],
) -> None:
    """The count is read after the epoch, on each try: one read before another process wrote a
    newer count into a new epoch was taken for a reset, written into it, and the next look found
    a second loss (a review)."""
    server = redis_servers(extra_args=EVICTING)
    one, two = (LedgerEpoch(connect_redis(server.url(0))) for _ in range(2))
    now = time.time()
    one.sync(now)
    two.sync(now)
    real = two._server
    calls = []

    def then_the_other_process(*args: Any) -> Any:
        answer = real()
        if not calls:  # the first try: evictions, and the other process's new epoch, after the read
            calls.append(answer)
            evict_some(server)
            one.sync(now + 2)
        return answer

    two._server = then_the_other_process  # type: ignore[method-assign]
    evict_some(server)
    two.sync(now + 3)
    two._server = real  # type: ignore[method-assign]
    begun = one._known
    assert begun is not None and two._known is not None and two._known.id == begun.id
    one.sync(now + 10)  # nothing evicted since: the same epoch
    assert one._known is not None and one._known.id == begun.id and one.lost_at == begun.created_at


def test_a_restart_of_a_redis_that_could_evict_is_a_loss_whatever_it_comes_back_with(
    redis_servers: Callable[..., RedisProcess],
) -> None:
    """Keys evicted just before a restart are gone from the append-only file: the epoch records
    whether Redis could evict, and a restart of one that could is a loss even if it comes back
    with ``noeviction`` (an outside test)."""
    server = redis_servers(appendonly=True, extra_args=EVICTING)
    client = connect_redis(server.url(0))
    epoch = LedgerEpoch(client)
    now = time.time()
    epoch.sync(now)
    assert json.loads(client.get(epoch.key))["evicting"] is True  # type: ignore[arg-type]
    server.kill()
    server.extra_args = ("--maxmemory-policy", "noeviction")
    server.start()
    sync_after_restart(epoch, now + 1)
    assert epoch.lost_at == math.ceil(now + 1)
    stored = json.loads(client.get(epoch.key))  # type: ignore[arg-type]
    assert stored["evicting"] is False and stored["after_loss"] is True
    # A policy changed while Redis runs is recorded (no loss: nothing restarted).
    client.config_set("maxmemory", "64mb")
    client.config_set("maxmemory-policy", "allkeys-lru")
    epoch.sync(now + 2)
    assert json.loads(client.get(epoch.key))["evicting"] is True  # type: ignore[arg-type]
    assert epoch.lost_at == math.ceil(now + 1)
    client.close()


def test_the_check_application_of_sts_serve_stops_watching(
    redis_servers: Callable[..., RedisProcess],
    make_service: Callable[..., Service],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``sts serve`` builds the application once before it forks its workers, and closes its
    connections; its eviction watcher opened one again, and looked every 2 s beside the workers'."""
    from sts.cli.serve import release_before_fork

    monkeypatch.setattr(persistence, "EVICTION_CHECK", 0.05)
    earlier = set(threading.enumerate())
    service = make_service(redis_servers())
    [watcher] = [t for t in threading.enumerate() if t.name == "sts-redis-evictions" and t not in earlier]
    release_before_fork(service.app.extensions["sts"])
    watcher.join(timeout=2)
    assert not watcher.is_alive()


def test_the_watcher_records_a_policy_changed_while_redis_runs(
    redis_servers: Callable[..., RedisProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without evictions the count does not move, but the epoch is re-read every few looks all the
    same: a policy made to evict while Redis runs is recorded, so that a restart that drops it is
    still a loss (a review)."""
    monkeypatch.setattr(persistence, "EVICTION_CHECK", 0.02)
    server = redis_servers(appendonly=True)
    client = connect_redis(server.url(0))
    epoch = LedgerEpoch(client)
    epoch.sync(time.time())
    persistence.watch_evictions(epoch, time.time)
    time.sleep(0.3)  # its first looks (the first re-reads the epoch: the count was not known)
    client.config_set("maxmemory", "64mb")
    client.config_set("maxmemory-policy", "volatile-lru")
    deadline = time.monotonic() + 5
    while not json.loads(client.get(epoch.key))["evicting"] and time.monotonic() < deadline:  # type: ignore[arg-type]
        time.sleep(0.02)
    assert json.loads(client.get(epoch.key))["evicting"] is True  # type: ignore[arg-type]
    assert epoch.lost_at is None
    epoch.unwatched.set()
    client.close()
