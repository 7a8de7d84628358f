"""Shared fixtures: a real development issuer over HTTP, settings in a temporary directory, an app."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from joserfc.jwk import ECKey

from sts.app import create_app
from sts.core.client_secrets import hash_secret
from sts.dev.issuer import DevIssuer, RunningServer
from sts.settings import Settings
from sts.settings.load import load_settings
from tests.support.clock import Clock
from tests.support.postgres import pg, pg_database  # noqa: F401 - fixtures for every test module
from tests.support.redis_server import RedisProcess

STS_ISSUER = "https://sts.test"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
FORM = "application/x-www-form-urlencoded"

GATEWAY_SECRET = "gateway-secret-with-enough-entropy-0123456789"
POSTER_SECRET = "poster secret/with+odd:chars"
#: The signer client's private key, generated per test session (never committed).
SIGNER_KEY = ECKey.generate_key("P-256", auto_kid=True)

DEFAULT_CLIENTS: list[dict[str, Any]] = [
    {
        "client_id": "gateway",
        "auth_method": "client_secret_basic",
        "secret_hash": hash_secret(GATEWAY_SECRET),
    },
    {"client_id": "poster", "auth_method": "client_secret_post", "secret_hash": hash_secret(POSTER_SECRET)},
    {
        "client_id": "signer",
        "auth_method": "private_key_jwt",
        "jwks": {"keys": [SIGNER_KEY.as_dict(private=False)]},
        "algorithms": ["ES256"],
    },
]

DEFAULT_POLICY: dict[str, Any] = {
    "version": 1,
    "rules": [
        {
            "name": "deploy",
            "issuer": "upstream",
            "subject": "repo:acme/app:ref:refs/heads/main",
            "claims": {"repository_id": "123456"},
            "require_client_authentication": False,
            "grant": {
                "audiences": ["https://deploy.example.com"],
                "scopes": ["deploy:read", "deploy:write"],
                "default_scopes": ["deploy:read"],
                "max_lifetime": 300,
            },
        },
        {
            "name": "ledger-with-client",
            "issuer": "upstream",
            "subject": "system:serviceaccount:payments:api",
            "clients": ["gateway", "signer", "poster"],
            "grant": {
                "resources": ["https://ledger.example.com/api"],
                "audiences": ["ledger"],
                "scopes": ["ledger:read", "ledger:write", "ledger:admin"],
                "max_lifetime": 600,
            },
        },
    ],
}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """This test run's own ``redis-server`` (the machine's shared one is never written to)."""
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_redis_url(redis_server: RedisProcess) -> str:
    """A database of the private server that no other test has used: empty, never flushed."""
    return redis_server.fresh_url()


@pytest.fixture
def clock() -> Clock:
    """The test's clock, standing at the current whole second until the test moves it.

    Give it to ``create_app(settings, clock=clock)`` and mint upstream tokens at ``clock()``.
    """
    return Clock(float(int(time.time())))


@pytest.fixture
def upstream() -> Iterator[RunningServer]:
    """A development issuer serving its JWKS over real HTTP on loopback."""
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


def upstream_issuer(upstream: RunningServer) -> dict[str, Any]:
    """The ``issuers`` entry of the test settings: ``upstream``, the development issuer served here."""
    return {
        "name": "upstream",
        "issuer": upstream.issuer.issuer_url,
        "jwks_uri": upstream.jwks_uri,
        "algorithms": ["RS256"],
        "audiences": [STS_ISSUER],
        "max_token_age": 3600,
    }


def settings_for(
    directory: Path,
    upstream: RunningServer,
    policy: dict[str, Any] | None = None,
    *,
    issuers: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> Settings:
    """Test settings in ``directory``: SQLite, keys, one policy file, trusting ``upstream``."""
    policies = directory / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "test.yaml").write_text(yaml.safe_dump(policy or DEFAULT_POLICY))
    values: dict[str, Any] = {
        "issuer": STS_ISSUER,
        "database_url": f"sqlite:///{directory / 'sts.sqlite'}",
        "keys_dir": str(directory / "keys"),
        "policies_dir": str(policies),
        "clients": DEFAULT_CLIENTS,
        "issuers": issuers if issuers is not None else [upstream_issuer(upstream)],
    }
    values.update(overrides)
    return load_settings(config_file=None, environ={}, overrides=values)


@pytest.fixture
def make_settings(tmp_path: Path, upstream: RunningServer) -> Callable[..., Settings]:
    def build(policy: dict[str, Any] | None = None, **overrides: Any) -> Settings:
        return settings_for(tmp_path, upstream, policy, **overrides)

    return build


@pytest.fixture
def app(make_settings: Callable[..., Settings]) -> Flask:
    return create_app(make_settings())


@pytest.fixture
def make_app(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., Flask]]:
    """Apps built from the shared test settings with overrides; their pools are closed afterwards."""
    apps: list[Flask] = []

    def build(**overrides: Any) -> Flask:
        app = create_app(make_settings(**overrides))
        apps.append(app)
        return app

    yield build
    for app in apps:
        runtime = app.extensions["sts"]
        runtime.engine.dispose()
        if runtime.redis_client is not None:
            runtime.redis_client.close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def exchange_form(subject_token: str, **params: Any) -> dict[str, Any]:
    form: dict[str, Any] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": JWT_TYPE,
    }
    form.update(params)
    return form


def now() -> float:
    return time.time()


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """The common default umask (022), under which a file created 0644 would be world-readable."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)
