"""Resource-server DPoP nonces (RFC 9449 §9): the nonce source, the verifier's demand, and the
workload client answering it through the Flask decorator and the WSGI middleware."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flask import Flask, g
from joserfc.jwk import ECKey
from sts_client import CallableAttestation, DPoPNonces, StsAuth, UseDPoPNonce
from sts_client.errors import InvalidDPoPProof
from sts_client.flask import require_token
from sts_client.verifier import TokenVerifier
from sts_client.wsgi import ProtectedPath, TokenMiddleware
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from tests.clients.test_clients_verifier import URL, dpop_headers, header_lines, sign_proof
from tests.support.clients_support import AUDIENCE, FakeAuthorizationServer, Served
from tests.support.clock import Clock

SECRET = b"s" * 32
NOW = 1_800_000_000.0  # on a period boundary for lifetime 300 (150 s periods)


@pytest.fixture
def fake() -> Iterator[FakeAuthorizationServer]:
    server = FakeAuthorizationServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client_key() -> ECKey:
    return ECKey.generate_key("P-256")


# -- the nonce source -------------------------------------------------------------------------------


def test_a_nonce_is_good_in_its_period_and_the_next_only() -> None:
    nonces = DPoPNonces(SECRET, lifetime=300)
    nonce = nonces.current(NOW)
    assert nonces.current(NOW + 149) == nonce  # one nonce for everybody within a period
    assert nonces.current(NOW + 150) != nonce
    assert nonces.accepts(nonce, NOW) and nonces.accepts(nonce, NOW + 299)
    assert not nonces.accepts(nonce, NOW + 300)  # two periods on
    assert not nonces.accepts(nonce, NOW - 1)  # issued "in the future"
    assert nonces.is_current(nonce, NOW + 10) and not nonces.is_current(nonce, NOW + 150)


def test_a_nonce_of_another_secret_or_altered_is_refused() -> None:
    nonces = DPoPNonces(SECRET)
    nonce = nonces.current(NOW)
    assert not DPoPNonces(b"t" * 32).accepts(nonce, NOW)
    raw = bytearray(base64.urlsafe_b64decode(nonce))
    raw[3] ^= 1  # another period with the same MAC
    assert not nonces.accepts(base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("="), NOW)
    # Another spelling of the same bytes (the standard alphabet's ``+/``) is not the nonce issued:
    # a nonce of a later period that has ``-`` or ``_``, checked in its own period.
    when = next(NOW + 150 * n for n in range(1000) if set("-_") & set(nonces.current(NOW + 150 * n)))
    spelled = nonces.current(when)
    assert not nonces.accepts(base64.b64encode(base64.urlsafe_b64decode(spelled)).decode().rstrip("="), when)
    assert nonces.accepts(spelled, when)
    for bad in (None, 7, "", nonce[:-1], nonce + "A", "!" * 32, "é" * 32, nonce.upper()):
        assert not nonces.accepts(bad, NOW), bad


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        DPoPNonces(b"short")


# -- the verifier -------------------------------------------------------------------------------------


def test_a_proof_without_the_nonce_gets_use_dpop_nonce_and_its_jti_is_not_burned(
    fake: FakeAuthorizationServer, client_key: ECKey
) -> None:
    nonces = DPoPNonces(SECRET)
    verifier = TokenVerifier(fake.issuer, AUDIENCE, dpop_nonces=nonces)
    token = fake.mint(jkt=client_key.thumbprint())
    now = time.time()
    proof = sign_proof(client_key, token=token, jti="first", iat=now)
    with pytest.raises(UseDPoPNonce) as info:
        verifier.verify("POST", URL, dpop_headers(token, proof), now=now)
    error = info.value
    assert (error.status, error.reason, error.body()["error"]) == (
        401,
        "dpop.nonce_missing",
        "use_dpop_nonce",
    )
    assert header_lines(error, "DPoP-Nonce") == [nonces.current(now)]
    assert header_lines(error)[0].startswith('DPoP error="use_dpop_nonce"')
    # The retry carries the nonce; the jti of the refused proof was not recorded.
    retry = sign_proof(client_key, token=token, jti="first", iat=now, claims={"nonce": nonces.current(now)})
    verified = verifier.verify("POST", URL, dpop_headers(token, retry), now=now)
    assert verified.jkt == client_key.thumbprint() and verified.dpop_nonce is None
    with pytest.raises(InvalidDPoPProof, match="replayed"):
        verifier.verify("POST", URL, dpop_headers(token, retry), now=now)


def test_a_nonce_from_elsewhere_is_refused_and_a_previous_one_gets_a_fresher_one(
    fake: FakeAuthorizationServer, client_key: ECKey
) -> None:
    nonces = DPoPNonces(SECRET, lifetime=300)
    verifier = TokenVerifier(fake.issuer, AUDIENCE, dpop_nonces=nonces)
    token = fake.mint(jkt=client_key.thumbprint())
    now = time.time()
    foreign = DPoPNonces(b"x" * 32).current(now)
    with pytest.raises(UseDPoPNonce) as info:
        verifier.verify(
            "POST", URL, dpop_headers(token, sign_proof(client_key, token=token, claims={"nonce": foreign}))
        )
    assert info.value.reason == "dpop.nonce_unknown"
    previous = nonces.current(now - 150)
    proof = sign_proof(client_key, token=token, iat=now, claims={"nonce": previous})
    verified = verifier.verify("POST", URL, dpop_headers(token, proof), now=now)
    assert verified.dpop_nonce == nonces.current(now)


def test_bearer_tokens_need_no_nonce(fake: FakeAuthorizationServer) -> None:
    verifier = TokenVerifier(fake.issuer, AUDIENCE, dpop_nonces=DPoPNonces(SECRET))
    verified = verifier.verify("GET", URL, {"Authorization": f"Bearer {fake.mint()}"})
    assert verified.jkt is None and verified.dpop_nonce is None


# -- the workload client against both integrations --------------------------------------------------


def test_the_workload_client_answers_the_flask_decorator_and_picks_up_fresher_nonces(
    fake: FakeAuthorizationServer,
) -> None:
    clock = Clock(time.time())
    fake.token_lifetime = 3600
    nonces = DPoPNonces(SECRET, lifetime=300, clock=clock)
    verifier = TokenVerifier(fake.issuer, AUDIENCE, dpop_nonces=nonces, clock=clock)
    app = Flask("nonce-rs")

    @app.get("/items")
    @require_token(verifier)
    def items() -> dict[str, Any]:
        return {"jkt": g.token.jkt}

    served = Served(app)
    try:
        auth = StsAuth(
            fake.issuer,
            AUDIENCE,
            attestation=CallableAttestation(lambda: "subject-1"),
            dpop=True,
            clock=clock,
        )
        first = requests.get(f"{served.url}/items", auth=auth, timeout=5)
        assert first.status_code == 200, first.text
        assert [r.status_code for r in first.history] == [401]
        assert first.history[0].headers["DPoP-Nonce"] == nonces.current()
        assert "DPoP-Nonce" not in first.headers  # the proof's nonce is the current one
        clock.now += 150  # the next period: the old nonce still passes, with a fresher one sent back
        second = requests.get(f"{served.url}/items", auth=auth, timeout=5)
        assert second.status_code == 200 and second.history == []
        assert second.headers["DPoP-Nonce"] == nonces.current()
        # The client took the fresher nonce: the answer in the same period sends none.
        third = requests.get(f"{served.url}/items", auth=auth, timeout=5)
        assert third.status_code == 200 and third.history == [] and "DPoP-Nonce" not in third.headers
        clock.now += 300  # two periods on: the client's nonce is refused once, then renewed
        fourth = requests.get(f"{served.url}/items", auth=auth, timeout=5)
        assert fourth.status_code == 200 and [r.status_code for r in fourth.history] == [401]
        assert auth.exchanges == 1
    finally:
        served.stop()


def test_the_wsgi_middleware_sends_the_challenge_and_the_fresher_nonce(
    fake: FakeAuthorizationServer, client_key: ECKey
) -> None:
    nonces = DPoPNonces(SECRET)
    verifier = TokenVerifier(fake.issuer, AUDIENCE, dpop_nonces=nonces)

    @Request.application
    def inner(request: Request) -> Response:
        return Response("ok", headers={"X-Inner": "1"})

    client = Client(TokenMiddleware(inner, verifier, [ProtectedPath("/releases")], url=lambda environ: URL))
    token = fake.mint(jkt=client_key.thumbprint())
    url = "https://deploy.example.com/releases"
    refused = client.post(url, headers=dpop_headers(token, sign_proof(client_key, token=token)))
    assert refused.status_code == 401 and refused.json == {
        "error": "use_dpop_nonce",
        "error_description": "Resource server requires nonce in DPoP proof",
    }
    assert refused.headers["DPoP-Nonce"] == nonces.current()
    now = time.time()
    old = sign_proof(client_key, token=token, claims={"nonce": nonces.current(now - 150)})
    passed = client.post(url, headers=dpop_headers(token, old))
    assert passed.status_code == 200 and passed.headers["X-Inner"] == "1"
    assert passed.headers["DPoP-Nonce"] == nonces.current()
