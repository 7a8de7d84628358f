"""End to end over real HTTP: the real STS, a resource server using the library, a workload using ``StsAuth``.

Three servers on 127.0.0.1 with ephemeral ports: the STS (``create_app``; its
``issuer`` is its own URL, so the port is bound first), the development
upstream issuer (conftest's ``upstream``), and a Flask resource server with
``@require_token``.  The workload code in these tests is only
``session.get(url, auth=auth)``: every renewal is the library's own doing.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from flask import Flask, g
from sts_client import CallableAttestation, ExchangeRefused, StsAuth, TokenVerifier
from sts_client.flask import require_token

from sts.dev.issuer import DevIssuer, RunningServer
from sts.settings import Settings
from tests.conftest import DEFAULT_POLICY
from tests.support.clients_support import RS_CLIENT, Served, Sts, serve_sts

DEPLOY = "https://deploy.example.com"


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    """Overrides conftest's per-test issuer: one RSA key for the module keeps the file fast."""
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@pytest.fixture
def start_sts(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> Iterator[Callable[..., Sts]]:
    started: list[Sts] = []

    def start(policy: dict[str, Any] | None = None, **overrides: Any) -> Sts:
        sts = serve_sts(make_settings, upstream, policy, **overrides)
        started.append(sts)
        return sts

    yield start
    for sts in started:
        sts.served.stop()


@dataclasses.dataclass
class ResourceServer:
    served: Served
    seen: list[int]

    @property
    def url(self) -> str:
        return self.served.url


@pytest.fixture
def start_rs() -> Iterator[Callable[..., ResourceServer]]:
    started: list[Served] = []

    def start(verifier: TokenVerifier) -> ResourceServer:
        app = Flask("deploy-api")
        seen: list[int] = []

        @app.get("/deployments")
        @require_token(verifier, scopes="deploy:read")
        def deployments() -> dict[str, Any]:
            return {"sub": g.token.subject, "auth_time": g.token.auth_time, "jkt": g.token.jkt}

        @app.post("/releases")
        @require_token(verifier, scopes="deploy:read", max_age=60)
        def releases() -> dict[str, Any]:
            return {"released_by": g.token.subject, "auth_time": g.token.auth_time}

        @app.after_request
        def record(response: Any) -> Any:
            seen.append(response.status_code)
            return response

        served = Served(app)
        started.append(served)
        return ResourceServer(served, seen)

    yield start
    for served in started:
        served.stop()


class Attestation:
    """The workload's platform: hands out GitHub Actions tokens, the first ones ``first_age`` seconds old."""

    def __init__(self, upstream: RunningServer, sts_url: str, *, stale: int = 1, first_age: int = 600):
        self.upstream = upstream
        self.sts_url = sts_url
        self.stale = stale
        self.first_age = first_age
        self.issued_at: list[int] = []

    def __call__(self) -> str:
        age = self.first_age if len(self.issued_at) < self.stale else 0
        now = time.time() - age
        self.issued_at.append(int(now))
        return self.upstream.issuer.github_actions_token(audience=self.sts_url, now=now, lifetime=age + 300)


def test_resource_server_step_up_is_answered_with_fresh_attestation(
    start_sts: Callable[..., Sts], start_rs: Callable[..., ResourceServer], upstream: RunningServer
) -> None:
    sts = start_sts()
    rs = start_rs(TokenVerifier(sts.url, DEPLOY))
    attestation = Attestation(upstream, sts.url)
    auth = StsAuth(sts.url, DEPLOY, scope="deploy:read", attestation=CallableAttestation(attestation))
    session = requests.Session()

    # A route without max_age takes the token whose attestation is ten minutes old.
    listed = session.get(f"{rs.url}/deployments", auth=auth, timeout=10)
    assert listed.status_code == 200
    assert listed.json()["auth_time"] == attestation.issued_at[0]
    assert auth.exchanges == 1

    # The release route demands attestation at most 60 s old: 401 step-up, renewal, retry.
    released = session.post(f"{rs.url}/releases", json={"version": "1.2.3"}, auth=auth, timeout=10)
    assert released.status_code == 200, released.text
    assert [r.status_code for r in released.history] == [401]
    challenge = released.history[0].headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer error="insufficient_user_authentication"')
    assert 'max_age="60"' in challenge
    assert released.json() == {
        "released_by": "repo:acme/app:ref:refs/heads/main",
        "auth_time": attestation.issued_at[1],
    }
    assert attestation.issued_at[1] - attestation.issued_at[0] >= 599
    assert auth.exchanges == 2
    assert rs.seen == [200, 401, 200]
    granted = [r for r in sts.audit(5) if r["outcome"] == "granted"]
    assert len(granted) == 2


def test_sts_step_up_refusal_is_answered_with_fresh_attestation(
    start_sts: Callable[..., Sts], start_rs: Callable[..., ResourceServer], upstream: RunningServer
) -> None:
    # Any source outside 10.0.0.0/8 weighs 60 = step_up_at: stale attestation must be renewed.
    policy = {
        "version": 1,
        "rules": [
            {
                **DEFAULT_POLICY["rules"][0],
                "risk": {"networks": ["10.0.0.0/8"], "weights": {"unusual_network": 60}},
            }
        ],
    }
    sts = start_sts(policy)
    rs = start_rs(TokenVerifier(sts.url, DEPLOY))
    attestation = Attestation(upstream, sts.url)
    auth = StsAuth(sts.url, DEPLOY, attestation=CallableAttestation(attestation))

    resp = requests.get(f"{rs.url}/deployments", auth=auth, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.history == []  # the renewal happened at the STS, before the call
    assert len(attestation.issued_at) == 2 and auth.exchanges == 2
    assert resp.json()["auth_time"] == attestation.issued_at[1]
    refused, granted = sorted(sts.audit(2), key=lambda r: r["outcome"] != "refused")
    assert refused["error"] == "insufficient_user_authentication"
    assert refused["reasons"][-1] == "risk.step_up"
    assert granted["outcome"] == "granted"
    assert auth.token().expires_in <= 120  # fresh but still risky: narrowed and shortened (0.4 x 300)


def test_a_second_step_up_refusal_is_raised_not_looped(
    start_sts: Callable[..., Sts], upstream: RunningServer
) -> None:
    policy = {
        "version": 1,
        "rules": [
            {
                **DEFAULT_POLICY["rules"][0],
                "risk": {"networks": ["10.0.0.0/8"], "weights": {"unusual_network": 60}},
            }
        ],
    }
    sts = start_sts(policy)
    attestation = Attestation(upstream, sts.url, stale=10)  # the platform only has stale tokens
    auth = StsAuth(sts.url, DEPLOY, attestation=CallableAttestation(attestation))
    with pytest.raises(ExchangeRefused) as info:
        auth.token()
    assert info.value.is_step_up
    assert info.value.max_age == 60
    assert info.value.signals == ["unusual_network"]
    assert auth.exchanges == 2


def test_revoked_token_is_renewed_after_invalid_token(
    start_sts: Callable[..., Sts], start_rs: Callable[..., ResourceServer], upstream: RunningServer
) -> None:
    sts = start_sts()
    verifier = TokenVerifier(sts.url, DEPLOY, introspection=RS_CLIENT, introspection_cache_seconds=0)
    rs = start_rs(verifier)
    auth = StsAuth(sts.url, DEPLOY, attestation=CallableAttestation(Attestation(upstream, sts.url, stale=0)))
    session = requests.Session()
    assert session.get(f"{rs.url}/deployments", auth=auth, timeout=10).status_code == 200
    first = auth.token()

    # The resource server revokes the token (RFC 7009), as a resource server it was issued for may.
    basic = base64.b64encode(":".join(RS_CLIENT).encode()).decode()
    revoked = requests.post(
        f"{sts.url}/revoke",
        data={"token": first.access_token},
        headers={"Authorization": f"Basic {basic}"},
        timeout=10,
    )
    assert revoked.status_code == 200

    resp = session.get(f"{rs.url}/deployments", auth=auth, timeout=10)
    assert resp.status_code == 200
    assert [r.status_code for r in resp.history] == [401]
    assert 'error="invalid_token"' in resp.history[0].headers["WWW-Authenticate"]
    assert auth.token() is not first
    assert auth.exchanges == 2


def _sts_supports_dpop(sts: Sts) -> bool:
    metadata = requests.get(f"{sts.url}/.well-known/oauth-authorization-server", timeout=10).json()
    return bool(metadata.get("dpop_signing_alg_values_supported"))


def test_dpop_end_to_end_with_server_nonces(
    start_sts: Callable[..., Sts], start_rs: Callable[..., ResourceServer], upstream: RunningServer
) -> None:
    fields = {f.name for f in dataclasses.fields(Settings)}
    sts = start_sts(**({"dpop_nonce": True} if "dpop_nonce" in fields else {}))
    if not _sts_supports_dpop(sts):
        pytest.skip("the STS does not advertise DPoP yet (dpop_signing_alg_values_supported)")
    rs = start_rs(TokenVerifier(sts.url, DEPLOY))
    auth = StsAuth(
        sts.url, DEPLOY, attestation=CallableAttestation(Attestation(upstream, sts.url, stale=0)), dpop=True
    )
    assert auth.dpop_key is not None
    resp = requests.get(f"{rs.url}/deployments", auth=auth, timeout=10)
    assert resp.status_code == 200, resp.text
    token = auth.token()
    assert token.token_type == "DPoP"
    if "dpop_nonce" in fields:
        # RFC 9449 §8: the first proof had no nonce; the STS asked for one; the retry was granted.
        outcomes = [(r["outcome"], r["error"]) for r in reversed(sts.audit(2))]
        assert outcomes == [("refused", "use_dpop_nonce"), ("granted", None)]
    assert resp.json()["jkt"] == auth.dpop_key.jkt
    # The same token as Bearer is refused by the resource server (RFC 9449 §7.2).
    stolen = requests.get(
        f"{rs.url}/deployments", headers={"Authorization": f"Bearer {token.access_token}"}, timeout=10
    )
    assert stolen.status_code == 401
    assert "DPoP" in stolen.headers["WWW-Authenticate"]


def test_the_verifiers_key_cache_revalidates_the_sts_jwks(start_sts: Callable[..., Sts]) -> None:
    """The resource server's key cache and the STS agree on conditional requests: once the set's
    max-age (300 s) has passed it is revalidated with the STS's ETag, and the STS answers 304."""
    from sts_client.jwks import JWKSCache

    sts = start_sts()
    statuses: list[int] = []
    session = requests.Session()
    session.hooks["response"].append(lambda response, *args, **kwargs: statuses.append(response.status_code))
    now = [1000.0]
    keys = JWKSCache(f"{sts.url}/.well-known/jwks.json", session=session, clock=lambda: now[0])
    kid = requests.get(f"{sts.url}/.well-known/jwks.json", timeout=10).json()["keys"][0]["kid"]
    first = keys.key_for(kid, "ES256")
    now[0] += 300
    assert keys.key_for(kid, "ES256") is first
    assert statuses == [200, 304]
