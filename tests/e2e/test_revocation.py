"""Revocation holds wherever a token of ours is presented, at every instance sharing the store.

A token this service issued can be revoked three ways: by ``jti`` at
``POST /revoke`` (RFC 7009), for every token of a subject by an operator
(``sts revoke subject``), and by a security event about the subject (CAEP
``session-revoked``, RFC 8417 SETs at ``POST /ssf/events``).  Each of them
must hold when the token is presented again as the subject token
(re-exchange, RFC 8693 §3 ``access_token``), as the actor token (RFC 8693
§2.1), at introspection (RFC 7662) and so in a resource server's
introspection-mode verifier, and at every instance sharing the store.

Two app instances are built on one store: one SQLite file, one PostgreSQL
schema, or one private Redis database (then each instance has its own SQLite
file for its audit trail, so the store is the only thing they share).  A
token is issued by one instance and revoked at the other.
"""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from sts_client import TokenVerifier
from sts_client.errors import InvalidToken
from werkzeug.test import TestResponse

from sts.app import create_app
from sts.cli import main
from sts.core.audit import token_hash
from sts.core.client_secrets import hash_secret
from sts.dev.issuer import DevIssuer, RunningServer
from sts.settings.load import load_settings
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    DEFAULT_CLIENTS,
    JWT_TYPE,
    STS_ISSUER,
    exchange_form,
    upstream_issuer,
)
from tests.support.clients_support import Served
from tests.support.clock import Clock
from tests.support.postgres import PG_SERVER
from tests.support.redis_server import RedisProcess

SUBJECT = "repo:acme/app:ref:refs/heads/main"
AGENT = "system:serviceaccount:agents:a1"
DEPLOY = "https://deploy.example.com"
RS = ("deploy-api", "deploy-api-secret-0123456789-abcdefghijkl")
LEEWAY = 30  # the settings default
SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"

#: The GitHub job's tokens (its agent may act for it with a token of ours), the agent's own
#: tokens, and re-exchange of the job's tokens of ours.
POLICY: dict[str, Any] = {
    "version": 1,
    "rules": [
        {
            "name": "deploy",
            "issuer": "upstream",
            "subject": SUBJECT,
            "claims": {"repository_id": "123456"},
            "require_client_authentication": False,
            "delegation": {"actors": [{"issuer": "self", "subject": AGENT}]},
            "grant": {"audiences": [DEPLOY], "scopes": ["deploy:read"], "max_lifetime": 300},
        },
        {
            # The agent's token of ours names this service too: as an actor token it is the agent's
            # credential here (a bearer token of ours for another audience is refused in that seat).
            "name": "agent",
            "issuer": "upstream",
            "subject": AGENT,
            "require_client_authentication": False,
            "grant": {"audiences": [DEPLOY, STS_ISSUER], "max_lifetime": 300},
        },
        {
            "name": "reexchange",
            "issuer": "self",
            "subject": SUBJECT,
            "require_client_authentication": False,
            "grant": {"audiences": [DEPLOY], "scopes": ["deploy:read"], "max_lifetime": 300},
        },
    ],
}
CLIENTS: list[dict[str, Any]] = [
    *DEFAULT_CLIENTS,
    {
        "client_id": RS[0],
        "auth_method": "client_secret_basic",
        "secret_hash": hash_secret(RS[1]),
        "audiences": [DEPLOY],
    },
]


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


@dataclass
class Instance:
    """One app instance: its test client and its audit trail."""

    app: Flask
    web: FlaskClient
    clock: Clock
    upstream: DevIssuer

    # -- tokens from the upstream issuer, minted at the app's time

    def job_token(self) -> str:
        return self.upstream.github_actions_token(audience=STS_ISSUER, now=self.clock.now)

    def agent_token(self) -> str:
        return self.upstream.kubernetes_token(
            audience=[STS_ISSUER], namespace="agents", service_account="a1", now=self.clock.now
        )

    def agent(self) -> str:
        """The agent's token of ours, for the deploy API and this service (its actor credential)."""
        return self.issue(self.agent_token(), audience=[DEPLOY, STS_ISSUER])

    # -- the endpoints

    def exchange(self, subject_token: str, *, actor: str | None = None, **params: Any) -> TestResponse:
        params.setdefault("audience", DEPLOY)
        form = exchange_form(subject_token, **params)
        if actor is not None:
            form.update(actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE)
        return self.web.post("/token", data=form)

    def issue(self, subject_token: str, **kwargs: Any) -> str:
        resp = self.exchange(subject_token, **kwargs)
        assert resp.status_code == 200, (resp.get_json(), self.last_record()["reasons"])
        return str(resp.get_json()["access_token"])

    def reexchange(self, token: str) -> TestResponse:
        return self.exchange(token, subject_token_type=ACCESS_TOKEN_TYPE)

    def revoke(self, token: str) -> None:
        resp = self.web.post("/revoke", data={"token": token}, headers=basic(*RS))
        assert resp.status_code == 200
        assert self.last_record()["outcome"] == "revoked"

    def active(self, token: str) -> bool:
        resp = self.web.post("/introspect", data={"token": token}, headers=basic(*RS))
        assert resp.status_code == 200
        return bool(resp.get_json()["active"])

    def last_record(self) -> dict[str, Any]:
        record: dict[str, Any] = self.app.extensions["sts"].audit.recent(1)[0]
        return record


def assert_refused(
    instance: Instance, resp: TestResponse, reason: str, *, status: int = 400
) -> dict[str, Any]:
    """The OAuth error over HTTP, nothing issued, and the audit record names the reason."""
    body = resp.get_json()
    assert resp.status_code == status, body
    assert body["error"] == ("invalid_request" if status == 400 else "temporarily_unavailable")
    assert "access_token" not in body
    record = instance.last_record()
    assert (record["endpoint"], record["outcome"], record["error"]) == ("token", "refused", body["error"])
    assert reason in record["reasons"], record["reasons"]
    assert record["issued_jti"] is None
    return record


# -- two instances on one store -------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    """Overrides conftest's per-test issuer: one RSA key for the module keeps the file fast."""
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@pytest.fixture(scope="module")
def transmitter() -> Iterator[RunningServer]:
    """A Shared Signals transmitter (an identity provider) whose JWKS is served over HTTP."""
    with DevIssuer.serve_ephemeral(alg="ES256", mint_endpoints=False) as server:
        yield server


def base_config(directory: Path, upstream: RunningServer, transmitter: RunningServer) -> dict[str, Any]:
    """Settings as a configuration file would hold them (also written out for the CLI)."""
    policies = directory / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "test.yaml").write_text(yaml.safe_dump(POLICY))
    return {
        "issuer": STS_ISSUER,
        "database_url": f"sqlite:///{directory / 'sts.sqlite'}",
        "keys_dir": str(directory / "keys"),
        "policies_dir": str(policies),
        "clients": CLIENTS,
        "issuers": [upstream_issuer(upstream)],
        "transmitters": [
            {
                "name": "idp",
                "issuer": transmitter.issuer.issuer_url,
                "jwks_uri": transmitter.jwks_uri,
                "algorithms": ["ES256"],
            }
        ],
    }


@dataclass
class Fleet:
    """Two instances sharing a store, and the configuration an operator's CLI would use."""

    one: Instance
    two: Instance
    config: dict[str, Any]
    directory: Path

    @property
    def both(self) -> tuple[Instance, Instance]:
        return self.one, self.two


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def fleet(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: RunningServer, transmitter: RunningServer
) -> Iterator[Fleet]:
    config = base_config(tmp_path, upstream, transmitter)
    per_instance: list[dict[str, Any]] = [{}, {}]
    schema = None
    if request.param == "postgresql":
        database = request.getfixturevalue("pg_database")
        schema = f"t_{secrets.token_hex(6)}"
        _pg_execute(database, f'CREATE SCHEMA "{schema}"')
        config["database_url"] = f"{PG_SERVER}/{database}?options=-csearch_path%3D{schema}"
    elif request.param == "redis":
        config.update(store="redis", redis_url=request.getfixturevalue("fresh_redis_url"))
        # Only Redis is shared: each instance keeps its own audit database.
        per_instance = [{"database_url": f"sqlite:///{tmp_path / f'audit-{n}.sqlite'}"} for n in (1, 2)]
        # The operator's CLI runs beside the first instance, on its database (it creates none).
        config["database_url"] = per_instance[0]["database_url"]
    clock = Clock(float(int(time.time())))
    apps = [
        create_app(load_settings(None, {}, overrides={**config, **extra}), clock=clock)
        for extra in per_instance
    ]
    one, two = (Instance(app, app.test_client(), clock, upstream.issuer) for app in apps)
    yield Fleet(one, two, config, tmp_path)
    for app in apps:
        app.extensions["sts"].engine.dispose()
    if schema is not None:
        _pg_execute(request.getfixturevalue("pg_database"), f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _pg_execute(database: str, statement: str) -> None:
    engine = create_engine(f"{PG_SERVER}/{database}", isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


# -- RFC 7009: revoked by jti ---------------------------------------------------------------------


def test_a_token_revoked_at_one_instance_is_refused_as_subject_token_at_every_instance(fleet: Fleet) -> None:
    """The attack: revoke a token at ``POST /revoke``, then present it again as ``subject_token``."""
    one, two = fleet.both
    token = one.issue(one.job_token())
    assert one.reexchange(token).status_code == 200  # usable before it is revoked
    two.revoke(token)
    for instance in fleet.both:
        record = assert_refused(instance, instance.reexchange(token), "subject_token.revoked")
        assert (record["issuer"], record["subject"]) == ("self", SUBJECT)
        assert record["subject_token_sha256"] == token_hash(token)
        assert record["details"]["detail"] == "jti"
        assert not instance.active(token)
    # Only that token: another one of the same subject is still good.
    assert one.reexchange(one.issue(one.job_token())).status_code == 200


def test_a_token_revoked_at_one_instance_is_refused_as_actor_token_at_every_instance(fleet: Fleet) -> None:
    one, two = fleet.both
    agent = one.agent()
    assert one.exchange(one.job_token(), actor=agent).status_code == 200
    two.revoke(agent)
    for instance in fleet.both:
        record = assert_refused(
            instance, instance.exchange(instance.job_token(), actor=agent), "actor_token.revoked"
        )
        assert (record["actor_issuer"], record["actor_subject"]) == ("self", AGENT)
        assert record["actor_token_sha256"] == token_hash(agent)


# -- operator revocation of every token of a subject ----------------------------------------------


@pytest.mark.parametrize("issuer_name", ["upstream", "self", "*"])
def test_operator_revocation_holds_for_subject_and_actor_tokens_at_every_instance(
    fleet: Fleet, issuer_name: str
) -> None:
    """``sts revoke subject`` names the subject under its upstream issuer, this service (``self``),
    or every issuer (``*``); each of them revokes the tokens of ours issued to it before."""
    one, two = fleet.both
    token = one.issue(one.job_token())
    agent = two.agent()
    config = fleet.directory / "cli.yaml"
    config.write_text(yaml.safe_dump(fleet.config))

    for subject in (SUBJECT, AGENT):
        result = CliRunner().invoke(
            main, ["--config", str(config), "revoke", "subject", issuer_name, subject]
        )
        assert result.exit_code == 0, result.output
    # The CLI revoked on the real clock; time moves on for the instances.
    one.clock.now = time.time() + 2
    for instance in fleet.both:
        record = assert_refused(instance, instance.reexchange(token), "subject_token.revoked")
        assert record["details"]["detail"] == "subject"
        assert_refused(instance, instance.exchange(instance.job_token(), actor=agent), "actor_token.revoked")
        assert not instance.active(token) and not instance.active(agent)
    # Tokens issued after the revocation are good (no --block).
    fresh_agent = one.agent()
    assert two.reexchange(two.issue(two.job_token(), actor=fresh_agent)).status_code == 200


# -- CAEP session-revoked -------------------------------------------------------------------------


def push_session_revoked(instance: Instance, transmitter: RunningServer, sub_id: dict[str, str]) -> None:
    claims = {
        "iss": transmitter.issuer.issuer_url,
        "aud": STS_ISSUER,
        "iat": int(instance.clock.now),
        "jti": uuid.uuid4().hex,
        "sub_id": sub_id,
        "events": {SESSION_REVOKED: {"event_timestamp": int(instance.clock.now)}},
    }
    body = transmitter.issuer.mint(claims, header={"typ": "secevent+jwt"})
    resp = instance.web.post("/ssf/events", data=body, headers={"Content-Type": "application/secevent+jwt"})
    assert resp.status_code == 202, resp.get_data(as_text=True)


@pytest.mark.parametrize("named_by", ["upstream", "self"])
def test_session_revoked_holds_for_subject_and_actor_tokens_at_every_instance(
    fleet: Fleet, transmitter: RunningServer, upstream: RunningServer, named_by: str
) -> None:
    """A session-revoked SET at one instance revokes the subject's tokens of ours everywhere, whether
    it names the subject under its upstream issuer or under this service's own issuer."""
    one, two = fleet.both
    token = one.issue(one.job_token())
    agent = one.agent()
    one.clock.now += 5
    iss = upstream.issuer.issuer_url if named_by == "upstream" else STS_ISSUER
    # The agent first: the job itself is not blocked yet, so only the actor token is at fault.
    push_session_revoked(two, transmitter, {"format": "iss_sub", "iss": iss, "sub": AGENT})
    for instance in fleet.both:
        record = assert_refused(
            instance, instance.exchange(instance.job_token(), actor=agent), "actor_token.revoked"
        )
        assert record["details"]["detail"] == "subject"
        assert not instance.active(agent)
        assert instance.active(token)
    push_session_revoked(two, transmitter, {"format": "iss_sub", "iss": iss, "sub": SUBJECT})
    for instance in fleet.both:
        assert_refused(instance, instance.reexchange(token), "subject_token.revoked")
        assert not instance.active(token)


# -- failing closed -------------------------------------------------------------------------------


def test_a_revocation_list_that_cannot_answer_is_503_for_subject_and_actor_tokens(
    tmp_path: Path, upstream: RunningServer, transmitter: RunningServer
) -> None:
    """Whether a token of ours was revoked cannot be told: nothing is issued (fail closed)."""
    config = base_config(tmp_path, upstream, transmitter)
    clock = Clock(float(int(time.time())))
    app = create_app(load_settings(None, {}, overrides=config), clock=clock)
    sts = Instance(app, app.test_client(), clock, upstream.issuer)
    token, agent = sts.issue(sts.job_token()), sts.agent()
    # Break only the revocation list, in this test's own database file.
    engine = create_engine(config["database_url"])
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE revoked_tokens"))
    engine.dispose()
    record = assert_refused(sts, sts.reexchange(token), "store.unavailable", status=503)
    assert record["issuer"] == "self"
    assert_refused(sts, sts.exchange(sts.job_token(), actor=agent), "store.unavailable", status=503)
    # Upstream tokens need no revocation list: they are still exchanged.
    assert sts.exchange(sts.job_token()).status_code == 200
    app.extensions["sts"].engine.dispose()


def test_a_redis_store_that_is_down_is_503_for_subject_and_actor_tokens_of_ours(
    tmp_path: Path, upstream: RunningServer, transmitter: RunningServer
) -> None:
    """The Redis store killed (``kill -9``): a token of ours cannot be cleared, so nothing is issued."""
    server = RedisProcess(tmp_path / "redis").start()
    try:
        config = {**base_config(tmp_path, upstream, transmitter), "store": "redis", "redis_url": server.url()}
        clock = Clock(float(int(time.time())))
        app = create_app(load_settings(None, {}, overrides=config), clock=clock)
        # Introspection without rate limits, to reach the revocation lookup itself.
        unlimited = {**config, "rate_limits": {"introspect": {"network": None, "client": None}}}
        introspection = create_app(load_settings(None, {}, overrides=unlimited), clock=clock)
        sts = Instance(app, app.test_client(), clock, upstream.issuer)
        token, agent = sts.issue(sts.job_token()), sts.agent()
        server.kill()
        assert_refused(sts, sts.reexchange(token), "store.unavailable", status=503)
        assert_refused(sts, sts.exchange(sts.job_token(), actor=agent), "store.unavailable", status=503)
        assert not Instance(introspection, introspection.test_client(), clock, upstream.issuer).active(token)
        # With its rate limits (kept in the same Redis), introspection is refused outright.
        assert sts.web.post("/introspect", data={"token": token}, headers=basic(*RS)).status_code == 503
        # The operator's revocation says so in one line, not a traceback, and fails.
        cli_config = tmp_path / "cli.yaml"
        cli_config.write_text(yaml.safe_dump(config))
        result = CliRunner().invoke(
            main, ["--config", str(cli_config), "revoke", "subject", "upstream", SUBJECT]
        )
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
        assert "nothing revoked: the store is unavailable" in result.output, result.output
        assert "Traceback" not in result.output
        for instance in (app, introspection):
            instance.extensions["sts"].engine.dispose()
    finally:
        server.stop()


def test_revocation_outlasts_the_leeway_in_which_an_expired_token_still_verifies(
    tmp_path: Path, upstream: RunningServer, transmitter: RunningServer
) -> None:
    """Tokens of ours verify until ``exp + leeway``: the revocation is remembered at least that long."""
    config = base_config(tmp_path, upstream, transmitter)
    clock = Clock(float(int(time.time())))
    app = create_app(load_settings(None, {}, overrides=config), clock=clock)
    sts = Instance(app, app.test_client(), clock, upstream.issuer)
    agent = sts.agent()
    sts.revoke(agent)
    clock.now += 300 + LEEWAY - 5  # past the agent token's exp, inside the leeway
    assert_refused(sts, sts.exchange(sts.job_token(), actor=agent), "actor_token.revoked")
    assert not sts.active(agent)
    app.extensions["sts"].engine.dispose()


# -- over real HTTP: two servers, one issuer --------------------------------------------------------


@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_over_http_a_token_revoked_at_one_server_is_refused_by_the_other(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    upstream: RunningServer,
    transmitter: RunningServer,
    store: str,
) -> None:
    """Two servers behind one issuer URL, as behind a load balancer: revoked at one, the token is
    refused by the other as subject token and by a resource server's verifier introspecting there."""
    first, second = Served(), Served()
    issuer = first.url
    config = base_config(tmp_path, upstream, transmitter)
    config["issuer"] = issuer
    config["issuers"][0]["audiences"] = [issuer]
    config["transmitters"] = []
    per_instance: list[dict[str, Any]] = [{}, {}]
    if store == "redis":
        config.update(store="redis", redis_url=request.getfixturevalue("fresh_redis_url"))
        per_instance = [{"database_url": f"sqlite:///{tmp_path / f'audit-{n}.sqlite'}"} for n in (1, 2)]
    apps = [create_app(load_settings(None, {}, overrides={**config, **extra})) for extra in per_instance]
    first.start(apps[0])
    second.start(apps[1])
    try:
        session = requests.Session()

        def exchange(server: Served, subject_token: str, token_type: str = JWT_TYPE) -> requests.Response:
            form = exchange_form(subject_token, subject_token_type=token_type, audience=DEPLOY)
            return session.post(f"{server.url}/token", data=form, timeout=10)

        job = upstream.issuer.github_actions_token(audience=issuer)
        token = exchange(first, job).json()["access_token"]
        assert exchange(second, token, ACCESS_TOKEN_TYPE).status_code == 200

        def verifier(server: Served) -> TokenVerifier:
            return TokenVerifier(
                issuer,
                DEPLOY,
                jwks_uri=f"{server.url}/.well-known/jwks.json",
                introspection=RS,
                introspection_endpoint=f"{server.url}/introspect",
                introspection_cache_seconds=0,
            )

        headers = {"Authorization": f"Bearer {token}"}
        assert verifier(second).verify("GET", f"{DEPLOY}/x", headers).subject == SUBJECT

        revoked = session.post(f"{first.url}/revoke", data={"token": token}, headers=basic(*RS), timeout=10)
        assert revoked.status_code == 200

        for server in (first, second):
            resp = exchange(server, token, ACCESS_TOKEN_TYPE)
            assert resp.status_code == 400 and resp.json()["error"] == "invalid_request", resp.text
            assert "access_token" not in resp.json()
            with pytest.raises(InvalidToken) as info:
                verifier(server).verify("GET", f"{DEPLOY}/x", headers)
            assert info.value.reason == "token.inactive"
        record = apps[1].extensions["sts"].audit.recent(5, endpoint="token")[0]
        assert record["reasons"][-1] == "subject_token.revoked"
    finally:
        first.stop()
        second.stop()
        for app in apps:
            app.extensions["sts"].engine.dispose()
