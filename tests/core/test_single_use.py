"""Single-use subject tokens (policy ``single_use: true``), on the embedded store and on real Redis.

A rule with ``single_use`` lets its subject token be exchanged once: the
token's ``jti`` (else a hash of the token) is recorded, atomically, until the
token expires, under the purpose ``subject_token:<issuer name>``.  Checked here:

* a second exchange is ``invalid_request`` (``subject_token.replayed``); a
  refused first attempt does not use the token up;
* the key: ``jti`` when there is one (two tokens sharing a ``jti`` are one
  token), else the hash, which an ECDSA signature re-encoding must not change;
  the same ``jti`` from two issuers are two tokens;
* races: concurrent requests with one token against a real threaded HTTP
  server, and against two app instances sharing the store: exactly one 200;
* failing closed: a Redis that is down, or that goes away while the app runs,
  is ``503 temporarily_unavailable`` with ``Retry-After`` and no token; once
  it is back, exchanges work again and what it remembered still holds;
* two-phase single use: a failure injected between the reservation and the
  commit (the database cut by a TCP relay, the audit table gone, Redis cut
  after the audit commit) is a 503 that never uses the token up: the retry
  gets the token, and a replay after it is still refused.

The embedded store runs on SQLite and on PostgreSQL (a schema of this run's
private database, see ``tests/adapters/test_stores.py``).

Redis isolation: the app's keys live in a database of this test run's own
redis-server that no other test uses (``tests/support/redis_server.py``).  The app
runs on the wall clock here because Redis expires entries on its own clock.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import requests
from flask import Flask
from joserfc import jwt
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry
from sqlalchemy import select
from werkzeug.serving import make_server

from sts.adapters.sql.schema import replay_entries
from sts.app import create_app
from sts.core.audit import token_hash
from sts.core.ports import CLOCK_MARGIN
from sts.dev.issuer import DevIssuer, RunningServer
from sts.settings import Settings
from tests.conftest import STS_ISSUER, exchange_form
from tests.support.postgres import PG_SERVER, PgSchema
from tests.support.redis_server import url_of

SUBJECT = "repo:acme/app:ref:refs/heads/main"
PARTNER_SUBJECT = "partner-job"
DEPLOY = "https://deploy.example.com"
LEDGER = "https://ledger.example.com/api"
#: Nothing listens on port 1: connections are refused at once.
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"
#: The order of the P-256 group (FIPS 186-4 D.1.2.3), to re-encode an ECDSA signature.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
RACERS = 24

POLICY: dict[str, Any] = {
    "version": 1,
    "rules": [
        {
            "name": "deploy-once",
            "issuer": "upstream",
            "subject": SUBJECT,
            "claims": {"repository_id": "123456"},
            "require_client_authentication": False,
            "single_use": True,
            "grant": {
                "audiences": [DEPLOY],
                "scopes": ["deploy:read", "deploy:write"],
                "default_scopes": ["deploy:read"],
            },
        },
        {
            "name": "ledger-reusable",
            "issuer": "upstream",
            "subject": "system:serviceaccount:payments:api",
            "require_client_authentication": False,
            "grant": {"resources": [LEDGER]},
        },
        {
            "name": "partner-once",
            "issuer": "partner",
            "subject": PARTNER_SUBJECT,
            "require_client_authentication": False,
            "single_use": True,
            "grant": {"audiences": [DEPLOY]},
        },
    ],
}


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    """Overrides conftest's per-test issuer (RS256, like GitHub): one key for the module."""
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@pytest.fixture(scope="module")
def partner() -> Iterator[RunningServer]:
    """A second issuer, signing with ES256."""
    with DevIssuer.serve_ephemeral(alg="ES256") as server:
        yield server


@pytest.fixture
def redis_db(fresh_redis_url: str) -> Iterator[redis.Redis]:
    """An empty database of this run's private redis-server (see tests/support/redis_server.py)."""
    client = redis.Redis.from_url(fresh_redis_url, socket_timeout=2)
    yield client
    client.close()


@pytest.fixture
def pg_schema(pg_database: str) -> Iterator[PgSchema]:
    """A schema of its own in this module's private PostgreSQL database, dropped afterwards."""
    schema = PgSchema(pg_database, f"t_{uuid.uuid4().hex[:12]}")
    schema.execute(f'CREATE SCHEMA "{schema.schema}"')
    yield schema
    schema.execute(f'DROP SCHEMA IF EXISTS "{schema.schema}" CASCADE')


@pytest.fixture(params=["embedded", "postgresql", "redis"])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings overrides for each replay store: embedded on SQLite or PostgreSQL, or Redis."""
    if request.param == "redis":
        db: redis.Redis = request.getfixturevalue("redis_db")
        return {"store": "redis", "redis_url": url_of(db)}
    if request.param == "postgresql":
        schema: PgSchema = request.getfixturevalue("pg_schema")
        return {"store": "embedded", "database_url": schema.url}
    return {"store": "embedded"}


@pytest.fixture
def settings_for(
    make_settings: Callable[..., Settings], upstream: RunningServer, partner: RunningServer
) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        issuers = [
            {
                "name": name,
                "issuer": server.issuer.issuer_url,
                "jwks_uri": server.jwks_uri,
                "algorithms": [server.issuer.alg],
                "audiences": [STS_ISSUER],
                "max_token_age": 3600,
            }
            for name, server in (("upstream", upstream), ("partner", partner))
        ]
        return make_settings(POLICY, issuers=issuers, **overrides)

    return build


@pytest.fixture
def make_app(settings_for: Callable[..., Settings]) -> Iterator[Callable[..., Flask]]:
    """Apps on the wall clock; pools closed afterwards.  ``settings`` shares one configuration."""
    apps: list[Flask] = []

    def build(settings: Settings | None = None, **overrides: Any) -> Flask:
        app = create_app(settings or settings_for(**overrides))
        apps.append(app)
        return app

    yield build
    for app in apps:
        runtime = app.extensions["sts"]
        runtime.engine.dispose()
        if runtime.redis_client is not None:
            runtime.redis_client.close()


# -- helpers -------------------------------------------------------------------------------------


def deploy_token(upstream: RunningServer, **claims: Any) -> str:
    return upstream.issuer.github_actions_token(audience=STS_ISSUER, **claims)


def partner_token(partner: RunningServer, **claims: Any) -> str:
    """A token of the ES256 partner issuer; a claim given as None is left out (``jti=None``)."""
    iat = int(time.time())
    base: dict[str, Any] = {
        "iss": partner.issuer.issuer_url,
        "sub": PARTNER_SUBJECT,
        "aud": STS_ISSUER,
        "iat": iat,
        "nbf": iat,
        "exp": iat + 300,
        "jti": str(uuid.uuid4()),
    }
    base.update(claims)
    return partner.issuer.mint({k: v for k, v in base.items() if v is not None}, header={"typ": "JWT"})


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a token this test minted (no verification needed to read it back)."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def reencode_es256_signature(token: str) -> str:
    """The same JWS with its ECDSA signature (r, s) re-encoded as (r, n - s): also valid."""
    signing_input, _, signature = token.rpartition(".")
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    r, s = raw[:32], int.from_bytes(raw[32:], "big")
    other = r + (P256_ORDER - s).to_bytes(32, "big")
    return f"{signing_input}.{base64.urlsafe_b64encode(other).rstrip(b'=').decode()}"


@dataclass
class Outcome:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def post(app: Flask, subject_token: str, *, audience: str | None = DEPLOY, **params: Any) -> Outcome:
    if audience is not None:
        params["audience"] = audience
    resp = app.test_client().post("/token", data=exchange_form(subject_token, **params))
    return Outcome(resp.status_code, resp.get_json(), dict(resp.headers))


def records(app: Flask) -> list[dict[str, Any]]:
    """Audit records, newest first."""
    found: list[dict[str, Any]] = app.extensions["sts"].audit.recent(limit=500)
    return found


def verified_claims(app: Flask, outcome: Outcome) -> dict[str, Any]:
    """Verify the issued token against the app's published JWKS (ES256 only)."""
    jwks = app.test_client().get("/.well-known/jwks.json").get_json()
    decoded = jwt.decode(outcome.body["access_token"], KeySet.import_key_set(jwks), algorithms=["ES256"])
    assert decoded.header["typ"] == "at+jwt"
    JWTClaimsRegistry(
        iss={"essential": True, "value": STS_ISSUER},
        aud={"essential": True},
        exp={"essential": True},
        jti={"essential": True},
    ).validate(decoded.claims)
    return dict(decoded.claims)


def assert_granted(app: Flask, outcome: Outcome) -> dict[str, Any]:
    assert outcome.status == 200, (outcome.body, records(app)[0]["reasons"])
    return verified_claims(app, outcome)


def assert_replayed(app: Flask, outcome: Outcome, subject_token: str) -> None:
    assert outcome.status == 400, outcome.body
    assert outcome.body["error"] == "invalid_request"
    assert "access_token" not in outcome.body
    record = records(app)[0]
    assert record["outcome"] == "refused"
    assert "subject_token.replayed" in record["reasons"]
    assert record["subject_token_sha256"] == token_hash(subject_token)
    assert record["issued_jti"] is None


def assert_withheld(app: Flask, outcome: Outcome) -> None:
    """Fail closed: 503, Retry-After, no token, and the refusal on record."""
    assert outcome.status == 503, outcome.body
    assert outcome.body["error"] == "temporarily_unavailable"
    assert "access_token" not in outcome.body
    assert int(outcome.headers["Retry-After"]) > 0
    record = records(app)[0]
    assert record["outcome"] == "refused"
    assert record["error"] == "temporarily_unavailable"
    assert "store.unavailable" in record["reasons"]
    assert record["issued_jti"] is None


def stored_entries(app: Flask, redis_client: redis.Redis | None) -> dict[str, float]:
    """What the app's replay store remembers for subject tokens: key -> expiry (epoch seconds)."""
    if redis_client is not None:
        return {
            key.decode().removeprefix("sts:replay:"): redis_client.pexpiretime(key) / 1000
            for key in redis_client.scan_iter(match="sts:replay:subject_token:*")
        }
    with app.extensions["sts"].engine.connect() as conn:
        rows = conn.execute(select(replay_entries).where(replay_entries.c.key.like("subject_token:%")))
        return {row.key: row.expires_at for row in rows}


@contextlib.contextmanager
def serving(app: Flask) -> Iterator[str]:
    """The app on a real threaded HTTP server on loopback; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def racers_for(store: dict[str, Any]) -> int:
    """Fewer racers on PostgreSQL: each holds a connection of a server other test runs share."""
    return 8 if "database_url" in store else RACERS


def race(urls: list[str], subject_token: str, racers: int = RACERS) -> list[Outcome]:
    """``racers`` concurrent exchanges of one token, spread over ``urls``, released together.

    Each instance first fetches the issuer's keys (a request with the token's signature spoiled):
    of requests arriving while a fetch is slow, only a few wait and the rest are refused 503 at
    once (by design), which a loaded machine turned into a flaky race."""
    head, _, signature = subject_token.rpartition(".")
    spoiled = f"{head}.{signature[:-2]}{'B' if signature[-2] == 'A' else 'A'}{signature[-1]}"
    for url in urls:
        warm = requests.post(f"{url}/token", data=exchange_form(spoiled, audience=DEPLOY), timeout=30)
        assert warm.status_code == 400, warm.text
    barrier = threading.Barrier(racers)

    def one(i: int) -> Outcome:
        with requests.Session() as session:
            barrier.wait(timeout=10)
            resp = session.post(
                f"{urls[i % len(urls)]}/token", data=exchange_form(subject_token, audience=DEPLOY), timeout=30
            )
        return Outcome(resp.status_code, resp.json(), dict(resp.headers))

    with ThreadPoolExecutor(max_workers=racers) as pool:
        return list(pool.map(one, range(racers)))


class TcpRelay:
    """A TCP relay between the app and Redis, which a test cuts and restores.

    ``cut`` closes the listening socket and every relayed connection, so the
    app's pooled connection breaks and a new one is refused; ``restore``
    listens on the same port again.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def restore(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            doomed, self._open = self._open, []
            if self._listener is not None:
                doomed.append(self._listener)
                self._listener = None
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._open += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# -- once, and only once ---------------------------------------------------------------------------


def test_second_exchange_of_a_single_use_token_is_replayed(
    make_app: Callable[..., Flask], store: dict[str, Any], upstream: RunningServer
) -> None:
    app = make_app(**store)
    jti = str(uuid.uuid4())
    token = deploy_token(upstream, jti=jti, lifetime=120)

    claims = assert_granted(app, post(app, token))
    assert claims["sub"] == SUBJECT
    assert_replayed(app, post(app, token), token)
    # Also for another audience or scope: the token, not the request, is used up.
    assert_replayed(app, post(app, token, scope="deploy:write"), token)

    # Remembered under its issuer, until the token expires (plus the leeway it is accepted for);
    # Redis keeps it CLOCK_MARGIN longer, by its own clock (the database's purge waits as long).
    leeway = app.extensions["sts"].settings.leeway
    redis_client = app.extensions["sts"].redis_client
    entries = stored_entries(app, redis_client)
    assert list(entries) == [f"subject_token:upstream:{jti}"]
    expected = unverified_claims(token)["exp"] + leeway + (CLOCK_MARGIN if redis_client is not None else 0)
    assert math.isclose(entries[f"subject_token:upstream:{jti}"], expected, abs_tol=0.001)


def test_a_rule_without_single_use_exchanges_a_token_again(
    make_app: Callable[..., Flask], store: dict[str, Any], upstream: RunningServer
) -> None:
    app = make_app(**store)
    token = upstream.issuer.kubernetes_token(audience=[STS_ISSUER])
    first = assert_granted(app, post(app, token, audience=None, resource=LEDGER))
    second = assert_granted(app, post(app, token, audience=None, resource=LEDGER))
    assert first["jti"] != second["jti"]
    assert stored_entries(app, app.extensions["sts"].redis_client) == {}


@pytest.mark.parametrize(
    ("params", "error"),
    [
        pytest.param({"audience": "https://elsewhere.example.com"}, "invalid_target", id="wrong-audience"),
        pytest.param({"scope": "deploy:admin"}, "invalid_scope", id="scope-not-allowed"),
        pytest.param({"requested_token_type": "urn:x"}, "invalid_request", id="bad-request"),
    ],
)
def test_a_refused_first_attempt_does_not_use_the_token_up(
    make_app: Callable[..., Flask],
    store: dict[str, Any],
    upstream: RunningServer,
    params: dict[str, str],
    error: str,
) -> None:
    app = make_app(**store)
    token = deploy_token(upstream)
    refused = post(app, token, **params)
    assert refused.status == 400
    assert refused.body["error"] == error
    assert stored_entries(app, app.extensions["sts"].redis_client) == {}

    assert_granted(app, post(app, token))
    assert_replayed(app, post(app, token), token)


# -- what identifies a token -----------------------------------------------------------------------


def test_a_token_without_jti_is_known_by_its_hash(
    make_app: Callable[..., Flask], store: dict[str, Any], upstream: RunningServer
) -> None:
    app = make_app(**store)
    token, other = deploy_token(upstream, jti=None), deploy_token(upstream, jti=None)
    assert "jti" not in unverified_claims(token)
    assert token != other

    assert_granted(app, post(app, token))
    assert_replayed(app, post(app, token), token)
    assert_granted(app, post(app, other))
    assert_replayed(app, post(app, other), other)
    keys = list(stored_entries(app, app.extensions["sts"].redis_client))
    assert len(keys) == 2
    assert all(k.startswith("subject_token:upstream:") for k in keys)


def test_a_reencoded_signature_is_the_same_token(
    make_app: Callable[..., Flask], partner: RunningServer
) -> None:
    # ECDSA signatures are malleable: (r, n - s) verifies as well as (r, s).  A token without jti
    # must not get a second use from a re-encoded signature, whose string (and hash) differ.
    app = make_app()
    token = partner_token(partner, jti=None)
    twin = reencode_es256_signature(token)
    assert twin != token
    assert "jti" not in unverified_claims(token)

    assert_granted(app, post(app, token))
    assert_replayed(app, post(app, twin), twin)


def test_two_tokens_with_one_jti_from_one_issuer_are_one_token(
    make_app: Callable[..., Flask], store: dict[str, Any], upstream: RunningServer
) -> None:
    app = make_app(**store)
    jti = str(uuid.uuid4())
    first, second = deploy_token(upstream, jti=jti), deploy_token(upstream, jti=jti, run_attempt="2")
    assert first != second

    assert_granted(app, post(app, first))
    assert_replayed(app, post(app, second), second)


def test_one_jti_from_two_issuers_are_two_tokens(
    make_app: Callable[..., Flask], store: dict[str, Any], upstream: RunningServer, partner: RunningServer
) -> None:
    app = make_app(**store)
    jti = str(uuid.uuid4())
    from_upstream, from_partner = deploy_token(upstream, jti=jti), partner_token(partner, jti=jti)

    assert assert_granted(app, post(app, from_upstream))["sub"] == SUBJECT
    assert assert_granted(app, post(app, from_partner))["sub"] == PARTNER_SUBJECT
    assert_replayed(app, post(app, from_partner), from_partner)
    assert set(stored_entries(app, app.extensions["sts"].redis_client)) == {
        f"subject_token:upstream:{jti}",
        f"subject_token:partner:{jti}",
    }


# -- races -----------------------------------------------------------------------------------------


def assert_exactly_one_winner(app: Flask, outcomes: list[Outcome], token: str) -> None:
    statuses = Counter(o.status for o in outcomes)
    assert statuses == Counter({200: 1, 400: len(outcomes) - 1}), statuses
    assert {o.body["error"] for o in outcomes if o.status != 200} == {"invalid_request"}
    [winner] = [o for o in outcomes if o.status == 200]
    assert verified_claims(app, winner)["sub"] == SUBJECT
    trail = [r for r in records(app) if r["subject_token_sha256"] == token_hash(token)]
    assert Counter(r["outcome"] for r in trail) == Counter({"granted": 1, "refused": len(outcomes) - 1})
    assert all("subject_token.replayed" in r["reasons"] for r in trail if r["outcome"] == "refused")


def test_concurrent_exchanges_of_one_token_have_exactly_one_winner(
    make_app: Callable[..., Flask], store: dict[str, Any], upstream: RunningServer
) -> None:
    app = make_app(**store)
    token = deploy_token(upstream)
    with serving(app) as url:
        outcomes = race([url], token, racers_for(store))
    assert_exactly_one_winner(app, outcomes, token)


def test_two_instances_sharing_the_store_have_exactly_one_winner(
    make_app: Callable[..., Flask],
    settings_for: Callable[..., Settings],
    store: dict[str, Any],
    upstream: RunningServer,
) -> None:
    # Two app instances, as two processes of a fleet would be: one SQLite file, or one Redis.
    settings = settings_for(**store)
    one, two = make_app(settings), make_app(settings)
    assert one.extensions["sts"].replay is not two.extensions["sts"].replay
    token = deploy_token(upstream)
    with serving(one) as first, serving(two) as second:
        outcomes = race([first, second], token, racers_for(store))
    assert_exactly_one_winner(one, outcomes, token)


# -- failing closed --------------------------------------------------------------------------------


def test_unreachable_redis_withholds_every_token(
    make_app: Callable[..., Flask], upstream: RunningServer
) -> None:
    app = make_app(store="redis", redis_url=DEAD_REDIS_URL)
    token = deploy_token(upstream)

    started = time.monotonic()
    outcome = post(app, token)
    assert time.monotonic() - started < 2
    assert_withheld(app, outcome)

    # Without single_use too: every exchange reads the subject's security-event state
    # (revocations, blocks) from the store, so with the store gone nothing is issued.
    reusable = upstream.issuer.kubernetes_token(audience=[STS_ISSUER])
    assert_withheld(app, post(app, reusable, audience=None, resource=LEDGER))
    assert app.test_client().get("/healthz").status_code == 503


def test_losing_redis_while_running_fails_closed_until_it_is_back(
    make_app: Callable[..., Flask], upstream: RunningServer, redis_db: redis.Redis
) -> None:
    kwargs = redis_db.connection_pool.connection_kwargs
    relay = TcpRelay((kwargs["host"], kwargs["port"]))
    relay.restore()
    try:
        app = make_app(store="redis", redis_url=f"redis://127.0.0.1:{relay.port}/{kwargs['db']}")
        web = app.test_client()
        before, during = deploy_token(upstream), deploy_token(upstream)
        assert_granted(app, post(app, before))

        relay.cut()
        outcome = post(app, during)
        assert_withheld(app, outcome)
        assert web.get("/healthz").status_code == 503
        assert_withheld(app, post(app, deploy_token(upstream)))

        relay.restore()
        assert web.get("/healthz").status_code == 200
        # The token refused while Redis was away was not used up; the one used before still is.
        assert_granted(app, post(app, during))
        assert_replayed(app, post(app, before), before)
        assert len(stored_entries(app, redis_db)) == 2
    finally:
        relay.cut()


def test_a_failed_audit_write_does_not_burn_a_single_use_token(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """The token was withheld (503), so the same subject token must work on retry."""
    from sqlalchemy import text

    rule = {
        "name": "once",
        "issuer": "upstream",
        "subject": "repo:acme/app:ref:refs/heads/main",
        "require_client_authentication": False,
        "single_use": True,
        "grant": {"audiences": ["https://deploy.example.com"]},
    }
    app = create_app(make_settings({"version": 1, "rules": [rule]}))
    web = app.test_client()
    engine = app.extensions["sts"].engine
    subject = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    form = exchange_form(subject, audience="https://deploy.example.com")
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_events RENAME TO audit_events_away"))
    failed = web.post("/token", data=form)
    assert failed.status_code == 503 and "access_token" not in failed.get_json()
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_events_away RENAME TO audit_events"))
    retried = web.post("/token", data=form)
    assert retried.status_code == 200, retried.get_json()
    again = web.post("/token", data=form)
    assert again.status_code == 400 and again.get_json()["error"] == "invalid_request"


# -- two-phase single use: a failure never uses a token up ------------------------------------------


def break_once_after_the_reservation(app: Flask, failure: Callable[[], None]) -> None:
    """Inject ``failure`` once, right after the single-use reservation: when the token is signed."""
    exchange = app.extensions["sts"].exchange
    signer, armed = exchange.signer, [failure]

    def signer_after_failure() -> Any:
        while armed:
            armed.pop()()
        return signer()

    exchange.signer = signer_after_failure


@dataclass
class Fault:
    """A real failure of the audit store, and its repair."""

    app: Flask
    inject: Callable[[], None]
    repair: Callable[[], None]


def audit_table_fault(app: Flask) -> Fault:
    """The audit table renamed away (SQLite): every audit write fails until it is back."""
    engine = app.extensions["sts"].engine

    def rename(old: str, new: str) -> Callable[[], None]:
        def run() -> None:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")

        return run

    return Fault(
        app, rename("audit_events", "audit_events_away"), rename("audit_events_away", "audit_events")
    )


@pytest.fixture
def postgresql_cut(make_app: Callable[..., Flask], pg_schema: PgSchema) -> Iterator[Fault]:
    """The embedded store on PostgreSQL behind a TCP relay: the fault cuts every connection."""
    relay = TcpRelay(("127.0.0.1", 5432))
    relay.restore()
    url = pg_schema.url.replace(PG_SERVER, PG_SERVER.replace(":5432", f":{relay.port}"))
    try:
        yield Fault(make_app(database_url=url), relay.cut, relay.restore)
    finally:
        relay.cut()


@pytest.mark.parametrize("where", ["postgresql", "sqlite", "redis"])
def test_a_failure_between_reservation_and_commit_never_burns_the_token(
    request: pytest.FixtureRequest, make_app: Callable[..., Flask], upstream: RunningServer, where: str
) -> None:
    """Before two-phase single use, the PostgreSQL case burnt every token (the release after the
    failed audit write could not reach the database either): 5 of 5 retries were 400."""
    if where == "postgresql":
        fault: Fault = request.getfixturevalue("postgresql_cut")
    elif where == "redis":
        db: redis.Redis = request.getfixturevalue("redis_db")
        fault = audit_table_fault(make_app(store="redis", redis_url=url_of(db)))
    else:
        fault = audit_table_fault(make_app())
    app = fault.app
    burnt = 0
    for _ in range(5):
        token = deploy_token(upstream)
        break_once_after_the_reservation(app, fault.inject)
        try:
            failed = post(app, token)
        finally:
            fault.repair()
        assert failed.status == 503 and "access_token" not in failed.body, failed.body
        assert failed.body["error"] == "temporarily_unavailable"
        retried = post(app, token)
        burnt += retried.status != 200
        assert_granted(app, retried)
        assert_replayed(app, post(app, token), token)
    assert burnt == 0
    # One entry per token, written with its grant's audit record.
    assert len(stored_entries(app, app.extensions["sts"].redis_client)) == 5


def test_redis_lost_after_the_audit_commit_withholds_the_token_and_frees_it(
    make_app: Callable[..., Flask], upstream: RunningServer, redis_db: redis.Redis
) -> None:
    """The grant's record is committed, then the reservation cannot be confirmed: the token is
    withheld (503), and the reservation lapses, so the retry gets the token."""
    kwargs = redis_db.connection_pool.connection_kwargs
    relay = TcpRelay((kwargs["host"], kwargs["port"]))
    relay.restore()
    try:
        app = make_app(store="redis", redis_url=f"redis://127.0.0.1:{relay.port}/{kwargs['db']}")
        runtime = app.extensions["sts"]
        runtime.exchange.ledger.inner.hold = 1.0  # (behind the metrics) a short hold keeps the test short
        write = runtime.audit.write

        def write_then_lose_redis(record: Any) -> None:
            write(record)
            if record.outcome == "granted":
                relay.cut()

        runtime.audit.write = write_then_lose_redis
        token = deploy_token(upstream)
        failed = post(app, token)
        assert failed.status == 503 and "access_token" not in failed.body
        assert records(app)[0]["outcome"] == "granted"  # committed, but never sent
        relay.restore()
        runtime.audit.write = write

        # The retry waits for the lapsed reservation (Redis's clock), then wins it.
        assert_granted(app, post(app, token))
        assert_replayed(app, post(app, token), token)
    finally:
        relay.cut()


class CommitAnswerDropper(TcpRelay):
    """A relay that, once armed, passes the next commit on and breaks the connection instead of
    passing the server's answer back: the transaction is committed, and the app cannot know it."""

    #: What commits: a COMMIT, NUL-terminated, in a simple query ('Q', length 11, "COMMIT\0") or, at
    #: the end of a pipelined transaction, in the extended protocol's Parse message; or a grant's
    #: one statement, its own transaction in autocommit, in its Parse message.
    COMMITS = (b"COMMIT\x00", b"WITH entry AS (INSERT INTO replay_entries")

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(target)
        self.armed = False
        self._answer_lost_for: set[socket.socket] = set()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:  # type: ignore[override]
        try:
            while data := src.recv(65536):
                if dst in self._answer_lost_for:
                    break  # the server's answer to COMMIT: drop it, and the connection
                if self.armed and any(commit in data for commit in self.COMMITS):
                    self.armed = False
                    self._answer_lost_for.add(src)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def test_a_commit_whose_answer_is_lost_is_confirmed_and_the_token_sent(
    make_app: Callable[..., Flask], upstream: RunningServer, pg_schema: PgSchema
) -> None:
    """Without the check on a fresh connection, the app answered 503 for a committed use: the
    retry was then refused as a replay (the token burnt)."""
    relay = CommitAnswerDropper(("127.0.0.1", 5432))
    relay.restore()
    try:
        app = make_app(database_url=pg_schema.url.replace(":5432", f":{relay.port}"))
        token = deploy_token(upstream)
        break_once_after_the_reservation(app, lambda: setattr(relay, "armed", True))
        assert_granted(app, post(app, token))
        assert relay.armed is False  # the COMMIT went through the relay, its answer did not
        assert_replayed(app, post(app, token), token)
    finally:
        relay.cut()


def test_a_replay_racing_the_commit_loses_on_postgresql(
    make_app: Callable[..., Flask], upstream: RunningServer, pg_schema: PgSchema
) -> None:
    """Both requests pass the reservation (it only looks); the database lets one commit."""
    app = make_app(database_url=pg_schema.url)
    token = deploy_token(upstream)
    inner: list[Outcome] = []

    # While the first request is between reservation and commit, the same token is exchanged.
    break_once_after_the_reservation(app, lambda: inner.append(post(app, token)))
    outer = post(app, token)
    assert [o.status for o in (inner[0], outer)] == [200, 400]
    assert outer.body["error"] == "invalid_request"
    assert records(app)[0]["reasons"][-1] == "subject_token.replayed"
    assert records(app)[0]["issued_jti"] is None


def test_a_token_held_by_another_request_is_refused_with_the_holds_retry_after(
    make_app: Callable[..., Flask], upstream: RunningServer, redis_db: redis.Redis
) -> None:
    """With Redis, a grant claims the token for 30 s before its record is committed; a request
    that dies there leaves it held until the hold lapses.  The same token sent meanwhile was told
    ``Retry-After: 5``, four times over, and got through only after the 30 s (an outside
    re-check): the answer now says how long the hold has left (RFC 9110 §10.2.3)."""
    app = make_app(store="redis", redis_url=url_of(redis_db))
    web = app.test_client()
    token = deploy_token(upstream)
    jti = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["jti"]
    # Another request (of any instance) claimed the token and died: its reservation stays 20 s.
    held = f"sts:replay:subject_token:upstream:{jti}"
    redis_db.set(held, b"r:a-request-that-died", px=20_000)
    app.extensions["sts"].exchange.ledger.inner.wait = 0.2  # waited for the holder (2 s by default)
    refused = web.post("/token", data=exchange_form(token, audience=DEPLOY))
    assert refused.status_code == 503 and refused.get_json()["error"] == "temporarily_unavailable"
    assert 18 <= int(refused.headers["Retry-After"]) <= 20, refused.headers
    redis_db.delete(held)  # the hold lapses: the token is the next request's
    assert web.post("/token", data=exchange_form(token, audience=DEPLOY)).status_code == 200
