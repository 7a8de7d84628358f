"""Attestation profiles (``sts/core/profiles``): the upstream issuers and helpers of the tests here.

Each upstream issuer is a development issuer serving its keys over real HTTP on
loopback, with the ``iss`` the real service uses (GitHub Actions, a GitLab
instance, a Kubernetes cluster, a SPIFFE trust domain, a corporate OpenID
Connect provider) and the claims it really sends (STANDARDS.md, "Real workload
tokens").  Tokens go through ``POST /token``; every refusal is checked for its
OAuth error *and*, through the audit record, for the exact reason, so a test
cannot pass because something else happened to refuse.  The Kubernetes
TokenReview API and a SPIFFE bundle endpoint are small local HTTP servers that
speak the real wire format.  The app's clock is fixed and tokens are minted at
it; nothing sleeps.

One file per profile: ``test_github.py``, ``test_gitlab.py``, ``test_kubernetes.py``,
``test_spiffe.py`` and ``test_generic.py``; our own tokens in ``test_own_tokens.py``; and in
``test_examples.py`` the example policies that need profiles (``policies/examples``) end to
end, like ``tests/core/test_policy.py`` does for the others, and ``sts policy check``
accepting them with a matching config.
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from flask import Flask
from werkzeug.test import TestResponse

from sts.app import create_app
from sts.dev.issuer import DevIssuer, RunningServer
from sts.settings import Settings
from tests.conftest import STS_ISSUER, exchange_form
from tests.support.clock import Clock

GITHUB_ISS = "https://token.actions.githubusercontent.com"
GITLAB_ISS = "https://gitlab.example.com"
KUBERNETES_ISS = "https://kubernetes.default.svc.cluster.local"
#: Only SVIDs that carry an ``iss`` (SPIRE's ``jwt_issuer``) name it; SPIRE's default sends none.
SPIFFE_ISS = "https://oidc.spire.example.org"
PARTNER_ISS = "https://oidc.spire.partner.example"
CORP_ISS = "https://idp.example.com/realms/corp"
TRUST_DOMAIN = "example.org"
PARTNER_DOMAIN = "partner.example"
BILLING_ID = "spiffe://example.org/ns/billing/sa/worker"

DEPLOY = "https://deploy.example.com"
PREVIEW = "https://preview.example.com"
LEDGER = "https://ledger.example.com/api"
LEDGER_AUDIENCE = "https://ledger.example.com"
REPORTS = "https://reports.example.com"
YEAR = 365 * 86400

#: The Keycloak-style service account of the generic-oidc example (its stable ``sub``).
REPORTS_SA = "5b0c7f4e-2f7e-4d38-9a55-3f0f6c1d2e8a"
CORP_MAPPINGS = {
    "client": "azp",
    "realm_roles": "realm_access/roles",
    "reports_roles": "resource_access/reports-api/roles",
}


# -- upstream issuers, served over HTTP for the whole directory ------------------------------------

UPSTREAMS = {
    "github-actions": (GITHUB_ISS, "RS256"),
    "gitlab": (GITLAB_ISS, "RS256"),
    "kubernetes": (KUBERNETES_ISS, "RS256"),
    "spiffe": (SPIFFE_ISS, "ES256"),
    "spiffe-partner": (PARTNER_ISS, "ES256"),
    "corp-oidc": (CORP_ISS, "RS256"),
}


@pytest.fixture(scope="package")
def upstream() -> Iterator[RunningServer]:
    """Overrides conftest's per-test issuer (only ``make_settings`` needs it): one for the directory."""
    with DevIssuer.serve_ephemeral(alg="ES256") as server:
        yield server


@pytest.fixture(scope="package")
def upstreams() -> Iterator[dict[str, RunningServer]]:
    """One development issuer per issuer name, each with the real service's ``iss``."""
    with contextlib.ExitStack() as stack:
        yield {
            name: stack.enter_context(DevIssuer.ephemeral(iss, alg).serve_in_thread())
            for name, (iss, alg) in UPSTREAMS.items()
        }


def issuer_entries(
    servers: Mapping[str, RunningServer], changes: Mapping[str, Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The ``issuers`` setting for every upstream; ``changes[name]`` is merged in (``None`` removes)."""
    base: dict[str, dict[str, Any]] = {
        "github-actions": {
            "profile": "github-actions",
            "algorithms": ["RS256"],
            "max_token_age": 900,
            "require_jti": True,
        },
        "gitlab": {"profile": "gitlab-ci", "algorithms": ["RS256"], "max_token_age": 900},
        # No max_token_age: the kubernetes profile's default (3600 s) is under test.
        "kubernetes": {
            "profile": "kubernetes",
            "algorithms": ["RS256"],
            "jwks_uri": f"{servers['kubernetes'].url}/openid/v1/jwks",
        },
        "spiffe": {"profile": "spiffe", "trust_domain": TRUST_DOMAIN, "algorithms": ["ES256"]},
        "spiffe-partner": {"profile": "spiffe", "trust_domain": PARTNER_DOMAIN, "algorithms": ["ES256"]},
        "corp-oidc": {"algorithms": ["RS256"], "max_token_age": 600, "claim_mappings": CORP_MAPPINGS},
    }
    entries = []
    for name, server in servers.items():
        entry: dict[str, Any] = {
            "name": name,
            "issuer": server.issuer.issuer_url,
            "jwks_uri": server.jwks_uri,
            "audiences": [STS_ISSUER],
            **base[name],
        }
        for key, value in (changes or {}).get(name, {}).items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
        entries.append(entry)
    return entries


@pytest.fixture
def build(
    make_settings: Callable[..., Settings], upstreams: dict[str, RunningServer], clock: Clock
) -> Callable[..., Flask]:
    """An app trusting every upstream, with ``rules`` as its policy and the fixed clock."""

    def _build(
        rules: list[dict[str, Any]],
        *,
        changes: Mapping[str, Mapping[str, Any]] | None = None,
        **overrides: Any,
    ) -> Flask:
        settings = make_settings(
            {"version": 1, "rules": rules}, issuers=issuer_entries(upstreams, changes), **overrides
        )
        return create_app(settings, clock=clock)

    return _build


@dataclass
class Mint:
    """Mints realistic upstream tokens at the app's fixed time."""

    servers: Mapping[str, RunningServer]
    now: float

    def issuer(self, name: str) -> DevIssuer:
        return self.servers[name].issuer

    def github(self, **kwargs: Any) -> str:
        return self.issuer("github-actions").github_actions_token(
            **{"audience": STS_ISSUER, "now": self.now, **kwargs}
        )

    def gitlab(self, **kwargs: Any) -> str:
        return self.issuer("gitlab").gitlab_token(**{"audience": STS_ISSUER, "now": self.now, **kwargs})

    def kubernetes(self, **kwargs: Any) -> str:
        return self.issuer("kubernetes").kubernetes_token(
            **{"audience": STS_ISSUER, "now": self.now, **kwargs}
        )

    def svid(self, spiffe_id: str = BILLING_ID, *, issuer: str = "spiffe", **kwargs: Any) -> str:
        return self.issuer(issuer).spiffe_svid(spiffe_id, STS_ISSUER, **{"now": self.now, **kwargs})

    def corp(self, **changes: Any) -> str:
        return self.issuer("corp-oidc").mint(corp_claims(self.now, **changes), header={"typ": "JWT"})

    def remint(
        self, name: str, token: str, *, header: Mapping[str, Any] | None = None, **changes: Any
    ) -> str:
        """The claims of ``token`` (``changes`` applied, ``None`` removes), signed again by ``name``."""
        claims = {**payload(token), **changes}
        return self.issuer(name).mint({k: v for k, v in claims.items() if v is not None}, header=header)


@pytest.fixture
def mint(upstreams: dict[str, RunningServer], clock: Clock) -> Mint:
    return Mint(upstreams, clock.now)


def corp_claims(now: float, **changes: Any) -> dict[str, Any]:
    """A Keycloak client-credentials access token of the ``reports-batch`` service account."""
    iat = int(now)
    claims: dict[str, Any] = {
        "exp": iat + 300,
        "iat": iat,
        "jti": str(uuid.uuid4()),
        "iss": CORP_ISS,
        "aud": [STS_ISSUER, "account"],
        "sub": REPORTS_SA,
        "typ": "Bearer",
        "azp": "reports-batch",
        "acr": "1",
        "realm_access": {"roles": ["default-roles-corp", "offline_access", "batch-jobs"]},
        "resource_access": {"reports-api": {"roles": ["export"]}, "account": {"roles": ["view-profile"]}},
        "scope": "profile email",
        "clientId": "reports-batch",
        "preferred_username": "service-account-reports-batch",
        "email_verified": False,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


# -- exchanging, and reading the decision back ------------------------------------------------------


def payload(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    loaded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return loaded


def post(app: Flask, token: str, headers: Mapping[str, str] | None = None, **form: Any) -> TestResponse:
    return app.test_client().post("/token", data=exchange_form(token, **form), headers=dict(headers or {}))


def last_record(app: Flask) -> dict[str, Any]:
    records: list[dict[str, Any]] = app.extensions["sts"].audit.recent(1)
    assert len(records) == 1
    return records[0]


def refused(
    app: Flask, token: str, reason: str, *, error: str = "invalid_request", status: int = 400, **form: Any
) -> dict[str, Any]:
    """Exchange ``token``; assert the refusal, its audited ``reason``, and return the audit record."""
    response = post(app, token, **form)
    body = response.get_json()
    assert response.status_code == status, body
    assert body["error"] == error, body
    assert "access_token" not in body
    record = last_record(app)
    assert record["outcome"] == "refused"
    assert reason in record["reasons"], record["reasons"]
    return record


def granted(app: Flask, token: str, rule: str, **form: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Exchange ``token``; assert ``rule`` granted it; return the response body and the issued claims."""
    response = post(app, token, **form)
    body = response.get_json()
    assert response.status_code == 200, (body, last_record(app)["reasons"])
    record = last_record(app)
    assert record["outcome"] == "granted"
    assert record["rule"] == rule
    return body, payload(body["access_token"])


def grant(audiences: list[str], scopes: list[str], max_lifetime: int = 300) -> dict[str, Any]:
    return {
        "audiences": audiences,
        "scopes": scopes,
        "default_scopes": scopes[:1],
        "max_lifetime": max_lifetime,
    }


# -- a local HTTP server (the TokenReview API, a SPIFFE bundle endpoint) ---------------------------


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class LocalHTTP:
    """A real HTTP(S) server on 127.0.0.1 whose ``respond(request) -> (status, json)`` decides answers."""

    def __init__(
        self, respond: Callable[[SeenRequest], tuple[int, Any]], *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.respond = respond
        self.seen: list[SeenRequest] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = SeenRequest(
                    self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
                with outer._lock:
                    outer.seen.append(request)
                status, answer = outer.respond(request)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01})
        self.thread.daemon = True
        self.thread.start()
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# -- the GitHub Actions rules (test_github.py, test_own_tokens.py) ---------------------------------

GITHUB_RULES: list[dict[str, Any]] = [
    {
        "name": "gh-deploy",
        "issuer": "github-actions",
        "facts": {
            "repository_id": "123456",
            "owner_id": "7890",
            "ref": "refs/heads/main",
            "is_pull_request": False,
        },
        "require_client_authentication": False,
        "grant": grant([DEPLOY], ["deploy:read", "deploy:write"]),
    },
    {
        "name": "gh-pull-request-preview",
        "issuer": "github-actions",
        "facts": {"repository_id": "123456", "is_pull_request": True},
        "require_client_authentication": False,
        "grant": grant([PREVIEW], ["preview:write"]),
    },
]


@pytest.fixture
def github_app(build: Callable[..., Flask]) -> Flask:
    return build(GITHUB_RULES)
