"""The workload library: ``StsAuth`` caching, renewal, retries and DPoP; the attestation sources.

The STS here is the authorization-server double, because it does what RFC
9449 asks of a token endpoint (nonce demand, ``cnf.jkt``, ``token_type:
DPoP``) and the real STS does not do yet; the resource server is a Flask app
using the library's own verifier, both over real HTTP.  The flows through the
real STS are in ``test_clients_e2e.py``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from flask import Flask, Response, g, request
from joserfc import jws
from sts_client import (
    AttestationUnavailable,
    CallableAttestation,
    ExchangeRefused,
    FileAttestation,
    GitHubActionsAttestation,
    GitLabCIAttestation,
    StepUpFailed,
    StsAuth,
    StsUnavailable,
    TokenVerifier,
)
from sts_client.flask import require_token
from werkzeug.wrappers import Request
from werkzeug.wrappers import Response as WerkzeugResponse

from tests.support.clients_support import AUDIENCE, INTROSPECTION_CLIENT, FakeAuthorizationServer, Served
from tests.support.clock import Clock

RS_NONCE = "rs-nonce-1"


@pytest.fixture
def fake() -> Iterator[FakeAuthorizationServer]:
    server = FakeAuthorizationServer()
    yield server
    server.stop()


def _proof_claims() -> dict[str, Any]:
    proof = request.headers.get("DPoP")
    if not proof:
        return {}
    claims: dict[str, Any] = json.loads(jws.extract_compact(proof.encode()).payload)
    return claims


@pytest.fixture
def resource_server(fake: FakeAuthorizationServer) -> Iterator[Served]:
    """A Flask API protected with ``@require_token``; revocation through the double's introspection."""
    verifier = TokenVerifier(
        fake.issuer, AUDIENCE, introspection=INTROSPECTION_CLIENT, introspection_cache_seconds=0
    )
    app = Flask("resource-server")
    app.config["calls"] = []

    @app.before_request
    def record() -> None:
        app.config["calls"].append(request.headers.get("Authorization", "").split(" ")[0])

    @app.get("/items")
    @require_token(verifier, scopes="deploy:read")
    def items() -> dict[str, Any]:
        return {"sub": g.token.subject, "jkt": g.token.jkt, "jti": g.token.jti}

    @app.post("/fresh")
    @require_token(verifier, max_age=60)
    def fresh() -> dict[str, Any]:
        return {"echo": request.get_json(), "auth_time": g.token.auth_time}

    @app.get("/nonce")
    def nonce() -> Any:
        # RFC 9449 §9: a resource server may demand a nonce of its own.
        if _proof_claims().get("nonce") != RS_NONCE:
            refusal = Response(status=401)
            refusal.headers["WWW-Authenticate"] = 'DPoP error="use_dpop_nonce", error_description="nonce"'
            refusal.headers["DPoP-Nonce"] = RS_NONCE
            return refusal
        return require_token(verifier)(lambda: {"ok": True, "jkt": g.token.jkt})()

    @app.get("/always-refused")
    def refused() -> Any:
        refusal = Response(status=401)
        refusal.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        return refusal

    served = Served(app)
    served.app = app  # type: ignore[attr-defined]
    yield served
    served.stop()


def calls(rs: Served) -> list[str]:
    recorded: list[str] = rs.app.config["calls"]  # type: ignore[attr-defined]
    return recorded


def subjects(*names: str) -> CallableAttestation:
    """An attestation source handing out the given subject tokens in turn (then the last one)."""
    handed: list[str] = []

    def next_subject() -> str:
        value = names[min(len(handed), len(names) - 1)]
        handed.append(value)
        return value

    source = CallableAttestation(next_subject)
    source.handed = handed  # type: ignore[attr-defined]
    return source


# -- DPoP ------------------------------------------------------------------------------------------


def test_dpop_bound_tokens_with_a_token_endpoint_nonce(
    fake: FakeAuthorizationServer, resource_server: Served
) -> None:
    fake.dpop_nonce = "as-nonce-7"
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("subject-1"), dpop=True)
    assert auth.dpop_key is not None
    first = requests.get(f"{resource_server.url}/items", auth=auth, timeout=5)
    assert first.status_code == 200, first.text
    assert first.json()["jkt"] == auth.dpop_key.jkt
    # RFC 9449 §8: the first proof had no nonce, the STS said use_dpop_nonce, the retry carried it.
    assert [(r["dpop"], r["nonce"]) for r in fake.token_requests] == [(True, None), (True, "as-nonce-7")]
    assert auth.token().token_type == "DPoP"
    # The token is reused with a fresh proof (the verifier refuses a replayed jti).
    second = requests.get(f"{resource_server.url}/items", auth=auth, timeout=5)
    assert second.status_code == 200 and second.json()["jti"] == first.json()["jti"]
    assert len(fake.token_requests) == 2 and auth.exchanges == 1
    assert calls(resource_server) == ["DPoP", "DPoP"]


@pytest.mark.parametrize(
    "path", ["/files/plain", "/files/caf%C3%A9", "/files/a%2Fb", "/files/100%25", "/files/%7Euser"]
)
def test_dpop_paths_with_percent_encodings_pass_the_libraries_own_resource_server(
    fake: FakeAuthorizationServer, resource_server: Served, path: str
) -> None:
    """RFC 9449 §4.3: ``htu`` is compared with the URI the client used.  A decoded path has lost
    ``%2F`` and ``%25``, and shows ``café`` for ``caf%C3%A9``: the decorator takes the path as sent
    (``RAW_URI``/``REQUEST_URI``) and compares IRIs as URIs."""
    app: Flask = resource_server.app  # type: ignore[attr-defined]
    verifier = TokenVerifier(fake.issuer, AUDIENCE)
    app.add_url_rule(
        "/files/<path:name>",
        "files",
        require_token(verifier)(lambda name: {"name": name, "jkt": g.token.jkt}),
    )
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("s"), dpop=True)
    resp = requests.get(f"{resource_server.url}{path}", auth=auth, timeout=5)
    assert resp.status_code == 200, (resp.status_code, resp.headers.get("WWW-Authenticate"))
    assert resp.json()["jkt"] == auth.dpop_key.jkt  # type: ignore[union-attr]


def test_a_url_with_user_information_gets_a_proof_without_it(
    fake: FakeAuthorizationServer, resource_server: Served
) -> None:
    """RFC 9110 §4.2.4: an http(s) target URI carries no user information, so neither does ``htu``
    (an outside audit: the proof carried ``alice:s3cret@``, leaked it in a header, and failed)."""
    app: Flask = resource_server.app  # type: ignore[attr-defined]
    seen: list[str] = []
    app.before_request(lambda: seen.append(request.headers.get("DPoP", "")) and None)
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("s"), dpop=True)
    url = resource_server.url.replace("://", "://alice:s3cret@", 1)
    resp = requests.get(f"{url}/items", auth=auth, timeout=5)
    assert resp.status_code == 200, (resp.status_code, resp.headers.get("WWW-Authenticate"))
    [proof] = seen
    htu = json.loads(jws.extract_compact(proof.encode()).payload)["htu"]
    assert htu == f"{resource_server.url}/items" and "s3cret" not in htu


def test_a_session_shared_with_the_sts_is_not_sent_through_its_own_auth(
    fake: FakeAuthorizationServer, resource_server: Served
) -> None:
    """The README's two patterns together: the session given to ``StsAuth`` for the STS also has it
    as its ``auth``.  The STS requests went through that auth, which waited for the lock its caller
    held (an outside audit: a stall for the whole timeout, then a failure)."""
    session = requests.Session()
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("s"), session=session, timeout=3)
    session.auth = auth
    started = time.monotonic()
    resp = session.get(f"{resource_server.url}/items", timeout=5)
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - started < 2.5 and auth.exchanges == 1


@pytest.mark.parametrize(
    "session_auth",
    [
        requests.auth.HTTPProxyAuth("proxy-user", "proxy-pass"),
        requests.auth.HTTPDigestAuth("other-service", "its-password"),
    ],
    ids=["proxy-auth", "digest-auth"],
)
def test_no_session_auth_runs_on_the_sts_requests(fake: FakeAuthorizationServer, session_auth: Any) -> None:
    """The session's own auth never runs on the STS requests: over https ``HTTPProxyAuth`` sends the
    proxy's password to the endpoint itself (it reaches no proxy there; proxy credentials go in
    the proxy URL), and ``HTTPDigestAuth`` answers a server's 401 challenge with a digest of
    another service's password (outside re-checks)."""
    session = requests.Session()
    session.auth = session_auth
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("s"), session=session)
    auth.token()
    [sent] = fake.token_requests
    assert sent["proxy_authorization"] is None and sent["authorization"] is None


def test_a_digest_challenge_gets_no_digest_of_a_session_password() -> None:
    """A server answering 401 with a Digest challenge got, from a session's ``HTTPDigestAuth``, a
    digest of another service's password in place of the caller's credentials (a re-check)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sts_client.discovery import get_json

    seen: list[str | None] = []

    class Challenge(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Digest realm="x", nonce="n", qop="auth"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Challenge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        session = requests.Session()
        session.auth = requests.auth.HTTPDigestAuth("other-service", "its-password")
        url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/x"
        client = {"Authorization": "Basic Y2xpZW50OnNlY3JldA=="}
        status, _, _ = get_json(session, url, timeout=5, headers=client)
    finally:
        server.shutdown()
        server.server_close()
    assert status == 401
    assert seen == ["Basic Y2xpZW50OnNlY3JldA=="], seen


def test_resource_server_nonce_is_answered_once_then_remembered(
    fake: FakeAuthorizationServer, resource_server: Served
) -> None:
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("subject-1"), dpop=True)
    resp = requests.get(f"{resource_server.url}/nonce", auth=auth, timeout=5)
    assert resp.status_code == 200, resp.text
    assert [r.status_code for r in resp.history] == [401]
    resp = requests.get(f"{resource_server.url}/nonce", auth=auth, timeout=5)
    assert resp.status_code == 200 and resp.history == []
    assert auth.exchanges == 1


def test_without_dpop_the_token_is_a_bearer_token(
    fake: FakeAuthorizationServer, resource_server: Served
) -> None:
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("subject-1"))
    resp = requests.get(f"{resource_server.url}/items", auth=auth, timeout=5)
    assert resp.status_code == 200 and resp.json()["jkt"] is None
    assert fake.token_requests[0]["dpop"] is False
    assert calls(resource_server) == ["Bearer"]


# -- caching and renewal -----------------------------------------------------------------------------


def test_token_is_cached_until_shortly_before_expiry(
    fake: FakeAuthorizationServer, resource_server: Served
) -> None:
    clock = Clock(time.time())
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("s"), clock=clock)
    session = requests.Session()
    for _ in range(3):
        assert session.get(f"{resource_server.url}/items", auth=auth, timeout=5).status_code == 200
    assert auth.exchanges == 1
    clock.now += 300 - 30 - 1  # 300 s token, renewed 30 s before expiry
    assert auth.token() is auth.token()
    assert auth.exchanges == 1
    clock.now += 1
    auth.token()
    assert auth.exchanges == 2
    # A short token is renewed when 10 % of its life is left.
    fake.token_lifetime = 60
    short = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("s"), clock=clock)
    short.token()
    clock.now += 53
    short.token()
    assert short.exchanges == 1
    clock.now += 1
    short.token()
    assert short.exchanges == 2


def test_attestation_step_up_from_the_resource_server_renews_and_retries(
    fake: FakeAuthorizationServer, resource_server: Served
) -> None:
    now = int(time.time())
    fake.auth_time = lambda subject: now - 600 if subject == "stale" else now
    source = subjects("stale", "fresh")
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=source)
    resp = requests.post(f"{resource_server.url}/fresh", json={"release": 42}, auth=auth, timeout=5)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"echo": {"release": 42}, "auth_time": now}  # the body went again
    assert [r.status_code for r in resp.history] == [401]
    assert source.handed == ["stale", "fresh"]  # type: ignore[attr-defined]
    assert fake.subjects_seen == ["stale", "fresh"]


def test_a_request_whose_body_was_an_iterator_is_not_sent_again_without_it(
    fake: FakeAuthorizationServer, resource_server: Served
) -> None:
    """A generator's body is read once: a retry would have gone out empty (and been served)."""
    now = int(time.time())
    fake.auth_time = lambda subject: now - 600 if subject == "stale" else now
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("stale", "fresh"))
    body = (part for part in [b'{"release": ', b"42}"])
    resp = requests.post(
        f"{resource_server.url}/fresh",
        data=body,
        headers={"Content-Type": "application/json"},
        auth=auth,
        timeout=5,
    )
    assert resp.status_code == 401 and resp.history == []
    assert fake.subjects_seen == ["stale", "fresh"]  # renewed: the caller's next call uses it


def test_invalid_token_renews_once(fake: FakeAuthorizationServer, resource_server: Served) -> None:
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("s1", "s2"))
    first = requests.get(f"{resource_server.url}/items", auth=auth, timeout=5).json()["jti"]
    fake.revoked.add(first)  # RFC 7009 revocation, seen through introspection
    resp = requests.get(f"{resource_server.url}/items", auth=auth, timeout=5)
    assert resp.status_code == 200
    assert resp.json()["jti"] != first
    assert auth.exchanges == 2


def test_a_refused_retry_is_not_retried_again(fake: FakeAuthorizationServer, resource_server: Served) -> None:
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("s1", "s2", "s3"))
    resp = requests.get(f"{resource_server.url}/always-refused", auth=auth, timeout=5)
    assert resp.status_code == 401
    assert len(resp.history) == 1
    assert auth.exchanges == 2
    assert len(calls(resource_server)) == 2


def test_a_redirect_to_another_host_gets_no_fresh_token(
    fake: FakeAuthorizationServer, resource_server: Served
) -> None:
    """requests drops Authorization when a redirect changes host; a 401 from there must not make
    the hook renew and hand the new token over (RFC 6750 §5.3)."""
    seen: list[str | None] = []
    elsewhere = Flask("elsewhere")

    @elsewhere.get("/steal")
    def steal() -> Any:
        seen.append(request.headers.get("Authorization"))
        refusal = Response(status=401)
        refusal.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        return refusal

    other = Served(elsewhere)
    try:
        app: Flask = resource_server.app  # type: ignore[attr-defined]
        app.add_url_rule(
            "/moved", "moved", lambda: Response(status=302, headers={"Location": f"{other.url}/steal"})
        )
        auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("s1", "s2"))
        resp = requests.get(f"{resource_server.url}/moved", auth=auth, timeout=5)
    finally:
        other.stop()
    assert resp.status_code == 401 and [r.status_code for r in resp.history] == [302]
    assert seen == [None]
    assert auth.exchanges == 1


def test_a_renewed_token_refused_again_raises_step_up_failed(
    fake: FakeAuthorizationServer, resource_server: Served
) -> None:
    """RFC 9470: one renewal for a step-up; a resource server that refuses the renewed token too is
    StepUpFailed, as documented (the retry is answered by the adapter, which runs no hooks)."""
    app: Flask = resource_server.app  # type: ignore[attr-defined]

    def never_enough() -> Any:
        refusal = Response(status=401)
        refusal.headers["WWW-Authenticate"] = 'Bearer error="insufficient_user_authentication", max_age="60"'
        return refusal

    app.add_url_rule("/never-enough", "never_enough", never_enough)
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("s1", "s2", "s3"))
    with pytest.raises(StepUpFailed):
        requests.get(f"{resource_server.url}/never-enough", auth=auth, timeout=5)
    assert auth.exchanges == 2


def test_other_refusals_are_returned_as_they_are(
    fake: FakeAuthorizationServer, resource_server: Served
) -> None:
    fake_scope_auth = StsAuth(fake.issuer, AUDIENCE, scope="deploy:write", attestation=subjects("s"))
    resp = requests.get(f"{resource_server.url}/items", auth=fake_scope_auth, timeout=5)
    assert resp.status_code == 403  # insufficient_scope: a new token would not help
    assert resp.history == [] and fake_scope_auth.exchanges == 1


def test_sts_refusals_and_outages_are_raised(fake: FakeAuthorizationServer, resource_server: Served) -> None:
    auth = StsAuth(fake.issuer, AUDIENCE, attestation=subjects("s"))
    fake.token_answer = (400, {"error": "invalid_target", "error_description": "The server will not issue."})
    with pytest.raises(ExchangeRefused) as refused:
        requests.get(f"{resource_server.url}/items", auth=auth, timeout=5)
    assert (refused.value.error, refused.value.status) == ("invalid_target", 400)
    assert not refused.value.is_step_up
    fake.token_answer = (503, {"error": "temporarily_unavailable"})
    with pytest.raises(StsUnavailable) as unavailable:
        requests.get(f"{resource_server.url}/items", auth=auth, timeout=5)
    assert unavailable.value.error == "temporarily_unavailable" and unavailable.value.retry_after is None
    # RFC 9110 §10.2.3: the wait the STS asks for (a rate limit's 429, an outage's 503) is kept.
    for status, header, kept in (
        (429, "7", 7),
        (503, " 30 ", 30),
        (503, "soon", None),
        (429, "99999999", 86400),
    ):
        fake.token_answer, fake.token_answer_headers = (
            (status, {"error": "temporarily_unavailable"}),
            {"Retry-After": header},
        )
        with pytest.raises(StsUnavailable) as waited:
            auth.token()
        assert (waited.value.status, waited.value.retry_after) == (status, kept)
    fake.token_answer_headers = {}
    wrong_endpoint = StsAuth(
        fake.issuer, AUDIENCE, attestation=subjects("s"), token_endpoint=f"{fake.url}/nope"
    )
    with pytest.raises(StsUnavailable, match="HTTP 404"):
        wrong_endpoint.token()
    assert calls(resource_server) == []  # nothing reached the resource server without a token


def test_client_credentials_are_sent_as_client_secret_basic(fake: FakeAuthorizationServer) -> None:
    auth = StsAuth(
        fake.issuer, AUDIENCE, attestation=subjects("s"), client_credentials=("my client", "p@ss:word/+")
    )
    auth.token()
    header = fake.token_requests[0]["authorization"]
    # RFC 6749 §2.3.1: form-urlencoded before base64.
    assert base64.b64decode(header.removeprefix("Basic ")).decode() == "my%20client:p%40ss%3Aword%2F%2B"


def test_no_other_credentials_take_the_place_of_the_clients(
    fake: FakeAuthorizationServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's auth for another service and ``~/.netrc`` never reach the STS in place of the
    client's credentials, nor without any (the re-check: requests let both replace the header)."""
    host = urlsplit(fake.issuer).hostname
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {host} login netrc-user password netrc-pass\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    for credentials in (("my client", "secret"), None):
        session = requests.Session()
        session.auth = requests.auth.HTTPBasicAuth("other-service", "its-password")
        fake.token_requests.clear()
        StsAuth(
            fake.issuer, AUDIENCE, attestation=subjects("s"), session=session, client_credentials=credentials
        ).token()
        header = fake.token_requests[0]["authorization"]
        if credentials is None:
            assert header is None
        else:
            assert base64.b64decode(header.removeprefix("Basic ")).decode() == "my%20client:secret"


def test_tokens_never_reach_the_log_or_repr(
    fake: FakeAuthorizationServer, resource_server: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    now = int(time.time())
    fake.auth_time = lambda subject: now - 600 if subject == "stale-subject-token" else now
    fake.dpop_nonce = "n"
    auth = StsAuth(
        fake.issuer,
        AUDIENCE,
        attestation=subjects("stale-subject-token", "fresh-subject-token"),
        dpop=True,
        client_credentials=("cid", "client-secret-value"),
    )
    resp = requests.post(f"{resource_server.url}/fresh", json={}, auth=auth, timeout=5)
    assert resp.status_code == 200
    token = auth.token()
    assert "renewing" in caplog.text  # the renewal is logged...
    for secret in (token.access_token, "stale-subject-token", "fresh-subject-token", "client-secret-value"):
        assert secret not in caplog.text  # ...without any credential
        assert secret not in repr(auth) + repr(token) + repr(auth._client)


# -- attestation sources ----------------------------------------------------------------------------


def test_file_attestation_is_read_again_on_every_fetch(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first.token.value\n")
    source = FileAttestation(path)
    assert source.fetch() == "first.token.value"
    path.write_text("second.token.value")  # the kubelet rotated it
    assert source.fetch() == "second.token.value"
    path.write_text("   ")
    with pytest.raises(AttestationUnavailable, match="empty"):
        source.fetch()
    path.unlink()
    with pytest.raises(AttestationUnavailable, match="cannot read"):
        source.fetch()


def test_file_attestation_reads_through_the_kubelets_swap(tmp_path: Path) -> None:
    """The kubelet writes a new ``..data_tmp`` directory, renames the link over ``..data`` and
    removes the old directory: a read that resolved the old one in between found nothing, and the
    workload failed (an outside audit).  A file that is gone for longer still fails."""
    old = tmp_path / "..2026_12_07_old"
    old.mkdir()
    (old / "token").write_text("first.token.value")
    (tmp_path / "..data").symlink_to(old.name)
    (tmp_path / "token").symlink_to("..data/token")
    source = FileAttestation(tmp_path / "token")
    assert source.fetch() == "first.token.value"

    # Mid-swap: the old directory removed, the link not yet turned (done 20 ms later).
    new = tmp_path / "..2026_12_07_new"
    new.mkdir()
    (new / "token").write_text("second.token.value")
    (old / "token").unlink()
    old.rmdir()

    def turn() -> None:
        (tmp_path / "..data_tmp").symlink_to(new.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    timer = threading.Timer(0.02, turn)
    timer.start()
    try:
        assert source.fetch() == "second.token.value"
    finally:
        timer.join()
    (new / "token").unlink()
    with pytest.raises(AttestationUnavailable, match="cannot read"):
        source.fetch()


def test_github_actions_attestation_requests_a_token_for_the_audience() -> None:
    seen: list[tuple[str, str | None]] = []

    @Request.application
    def runtime(req: Request) -> WerkzeugResponse:
        seen.append((req.full_path, req.headers.get("Authorization")))
        if req.headers.get("Authorization") != "bearer request-token":
            return WerkzeugResponse("{}", status=401)
        return WerkzeugResponse(json.dumps({"value": f"oidc-for-{req.args['audience']}"}))

    with Served(runtime) as served:
        env = {
            "ACTIONS_ID_TOKEN_REQUEST_URL": f"{served.url}/idtoken?api-version=2.0",
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "request-token",
        }
        source = GitHubActionsAttestation("https://sts.example.com", environ=env)
        assert source.fetch() == "oidc-for-https://sts.example.com"
        assert seen == [
            ("/idtoken?api-version=2.0&audience=https%3A%2F%2Fsts.example.com", "bearer request-token")
        ]
        env["ACTIONS_ID_TOKEN_REQUEST_TOKEN"] = "wrong"
        with pytest.raises(AttestationUnavailable, match="HTTP 401"):
            source.fetch()
    with pytest.raises(AttestationUnavailable, match="id-token: write"):
        GitHubActionsAttestation("https://sts.example.com", environ={}).fetch()


def test_gitlab_and_callable_attestation() -> None:
    assert GitLabCIAttestation("STS_ID_TOKEN", environ={"STS_ID_TOKEN": "a.b.c"}).fetch() == "a.b.c"
    assert GitLabCIAttestation().renewable is False
    with pytest.raises(AttestationUnavailable, match="id_tokens"):
        GitLabCIAttestation("MISSING", environ={}).fetch()
    with pytest.raises(AttestationUnavailable):
        CallableAttestation(lambda: None).fetch()  # type: ignore[arg-type, return-value]
    with pytest.raises(AttestationUnavailable, match="single token"):
        CallableAttestation(lambda: "two tokens").fetch()


def test_exchange_refused_reads_the_step_up_refusal() -> None:
    refusal = ExchangeRefused(
        400,
        {
            "error": "insufficient_user_authentication",
            "error_description": "Fresh attestation is required.",
            "max_age": 60,
            "step_up": {
                "required": "fresh_attestation",
                "max_attestation_age": 60,
                "signals": ["unusual_network"],
            },
        },
    )
    assert refusal.is_step_up and refusal.max_age == 60 and refusal.signals == ["unusual_network"]
    assert str(refusal) == "insufficient_user_authentication: Fresh attestation is required."


def test_a_server_trickling_its_headers_cannot_hold_the_caller() -> None:
    """``timeout`` bounds each socket read, so a server sending its status line and headers a byte at
    a time reset it forever (an outside audit held ``exchange()``, and every thread waiting for its
    lock, for as long as it liked): the answer's headers must come within ``timeout`` too."""
    import socket
    import threading as _threading

    import requests
    from sts_client.discovery import DiscoveryError, get_json

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = _threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
                if stop.wait(0.2):
                    return
                conn.sendall(bytes([byte]))

    thread = _threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()
    with pytest.raises(DiscoveryError):
        get_json(requests.Session(), f"http://127.0.0.1:{listener.getsockname()[1]}/", timeout=1.0)
    assert time.monotonic() - started < 3
    stop.set()
    listener.close()


def _hostile_server(answer: Callable[[Any, Any], None]) -> tuple[int, Callable[[], None]]:
    """A server on a free loopback port that reads one request per connection and then runs
    ``answer(connection, stop)``; returns its port and a function that stops it."""
    import socket
    import threading as _threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    stop = _threading.Event()

    def one(conn: Any) -> None:
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            answer(conn, stop)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            _threading.Thread(target=one, args=(conn,), daemon=True).start()

    _threading.Thread(target=serve, daemon=True).start()

    def close() -> None:
        stop.set()
        listener.close()

    return listener.getsockname()[1], close


def _gzip_of_nothing(conn: Any, stop: Any) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nConnection: close\r\n\r\n")
    conn.sendall(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # a gzip member's header
    while not stop.wait(0.2):
        conn.sendall(b"\x00\x00\x00\xff\xff")  # an empty stored deflate block: decodes to nothing


def _endless_trailer(conn: Any, stop: Any) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n")
    while not stop.wait(0.2):
        conn.sendall(b"X-Trailer: y\r\n")


def _raised_within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """What ``call`` raised, asserting it returned within 3 s; a call still running after
    ``seconds`` fails the test (its daemon thread left behind) rather than hanging it."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting after {seconds} s"
    assert time.monotonic() - started < 3
    return outcome[0]


@pytest.mark.parametrize("answer", [_gzip_of_nothing, _endless_trailer], ids=["gzip", "trailer"])
def test_a_body_that_never_ends_cannot_hold_the_caller(answer: Callable[[Any, Any], None]) -> None:
    """Each socket read brings something, so no read times out, and no ``read1`` returns: a gzip
    body of empty deflate blocks (urllib3 reads on while nothing decodes), or a chunked body's
    trailer lines (``http.client`` reads them without limit).  An outside audit held ``sts-ci
    exchange --timeout 3`` for good with either; the whole answer must come within ``timeout``."""
    import requests
    from sts_client import TokenExchangeClient
    from sts_client.discovery import DiscoveryError, get_json

    port, close = _hostile_server(answer)
    try:
        error = _raised_within(
            10, lambda: get_json(requests.Session(), f"http://127.0.0.1:{port}/", timeout=1.0)
        )
        assert isinstance(error, DiscoveryError) and "did not answer within" in str(error), error
        client = TokenExchangeClient(f"http://127.0.0.1:{port}", timeout=1.0)
        error = _raised_within(
            10, lambda: client.exchange("header.payload.signature", audience="https://api.example")
        )
        assert isinstance(error, StsUnavailable), error
        # The helper threads' reads end too (their sockets shut down), while the server goes on.
        end = time.monotonic() + 5
        while time.monotonic() < end and any(t.name == "sts-client-request" for t in threading.enumerate()):
            time.sleep(0.05)
        assert not [t for t in threading.enumerate() if t.name == "sts-client-request"]
    finally:
        close()


def test_helpers_left_waiting_for_dribbled_headers_are_bounded_per_server() -> None:
    """A helper still waiting for the headers cannot be shut down (``requests`` shows no socket
    yet): a server dribbling its headers cost a thread and a socket per timed-out call, without
    limit (an outside re-check).  Past ``ABANDONED_PER_ORIGIN`` of them, calls to that server fail
    at once; once it lets them go, calls go through again."""
    import requests
    from sts_client import discovery
    from sts_client.discovery import DiscoveryError, get_json

    release = threading.Event()

    def dribble(conn: Any, stop: Any) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        while not stop.wait(0.05) and not release.is_set():
            conn.sendall(b"X")
        conn.sendall(b"-Done: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")

    port, close = _hostile_server(dribble)
    url = f"http://127.0.0.1:{port}/"

    def helpers() -> int:
        return len([t for t in threading.enumerate() if t.name == "sts-client-request"])

    try:
        for _ in range(3 * discovery.ABANDONED_PER_ORIGIN):
            with pytest.raises(DiscoveryError):
                get_json(requests.Session(), url, timeout=0.2)
        assert helpers() <= discovery.ABANDONED_PER_ORIGIN
        started = time.monotonic()
        with pytest.raises(DiscoveryError):
            get_json(requests.Session(), url, timeout=5.0)
        assert time.monotonic() - started < 1, "refused at once while the helpers hang"
        release.set()
        end = time.monotonic() + 10
        while helpers() and time.monotonic() < end:
            time.sleep(0.05)
        assert helpers() == 0
        assert get_json(requests.Session(), url, timeout=5.0)[:2] == (200, {})
    finally:
        release.set()
        close()


def test_a_loopback_url_is_never_fetched_through_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain http is allowed for a loopback host only because the traffic stays on this machine;
    through ``HTTP_PROXY`` (self-hosted runners set it) the subject token crossed the network in
    clear to the proxy, which then asked its own localhost (an outside audit)."""
    import requests
    from sts_client.discovery import get_json

    proxied: list[bytes] = []

    def proxy(conn: Any, stop: Any) -> None:
        proxied.append(b"request")
        conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def service(conn: Any, stop: Any) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")

    proxy_port, close_proxy = _hostile_server(proxy)
    port, close = _hostile_server(service)
    try:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy_port}")
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        session = requests.Session()
        session.proxies = {"http": f"http://127.0.0.1:{proxy_port}"}
        for host in ("127.0.0.1", "localhost"):
            status, document, _ = get_json(session, f"http://{host}:{port}/token", timeout=5.0)
            assert (status, document) == (200, {}), host
        assert proxied == []
    finally:
        close()
        close_proxy()


def test_a_token_file_is_read_only_if_regular_and_only_so_far(tmp_path: Path) -> None:
    """Not a FIFO (which would block), nor /dev/zero, nor a huge file read whole before its size is
    checked (an outside audit); a symlink to a regular file, as the kubelet's ``..data``, is read."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(AttestationUnavailable, match="not a regular file"):
        FileAttestation(fifo).fetch()
    with pytest.raises(AttestationUnavailable, match="not a regular file"):
        FileAttestation("/dev/zero").fetch()
    huge = tmp_path / "huge"
    with huge.open("wb") as file:
        file.truncate(300 * 1024 * 1024)  # sparse: nothing written, 300 MiB long
    with pytest.raises(AttestationUnavailable):
        FileAttestation(huge).fetch()
    (tmp_path / "real").write_text("header.payload.signature")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert FileAttestation(tmp_path / "link").fetch() == "header.payload.signature"


def test_the_github_request_token_goes_only_over_tls() -> None:
    env = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": "http://attacker.example/oidc",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "t",
    }
    with pytest.raises(AttestationUnavailable, match="https"):
        GitHubActionsAttestation("https://sts.example.com", environ=env).fetch()


@pytest.mark.parametrize(
    ("max_age", "read"), [("60", 60), ("9" * 10, 9_999_999_999), ("1" * 4301, None), ("", None)]
)
def test_a_step_up_challenges_max_age_is_read_only_when_usable(max_age: str, read: int | None) -> None:
    """A max_age of 4,301 digits made int() raise ValueError out of StsAuth (an outside fuzzing
    run); a value that is no usable number of seconds is read as none, as a malformed one is."""
    from sts_client.challenges import parse_challenges
    from sts_client.workload import _asked_by

    header = f'Bearer error="insufficient_user_authentication", max_age="{max_age}"'
    [challenge] = parse_challenges(header)
    assert _asked_by(challenge, "https://rs.example.com/x").max_age == read


@pytest.mark.parametrize("auth_time", ["1" + "0" * 400, "-1e999", "1e999", "NaN", '"1"'])
def test_a_renewed_tokens_auth_time_that_is_no_numeric_date_is_no_attestation_time(auth_time: str) -> None:
    """A broken STS's ``auth_time`` of 10**400, an infinity or NaN raised OverflowError or ValueError
    out of StsAuth when it weighed the renewed token against a step-up's max_age (an outside
    re-check); such a value tells no attestation time: the token does not meet the max_age."""
    from sts_client.assurance import StepUpRequest
    from sts_client.exchange import IssuedToken
    from sts_client.workload_tokens import WorkloadTokens, token_summary

    payload = base64.urlsafe_b64encode(f'{{"auth_time":{auth_time}}}'.encode()).rstrip(b"=").decode()
    token = IssuedToken(f"eyJhbGciOiJFUzI1NiJ9.{payload}.c2ln", "Bearer", 300, time.time())
    assert "attested" not in token_summary(token)
    asked = StepUpRequest((), 60, "the resource server https://rs.example.com")
    tokens = WorkloadTokens.__new__(WorkloadTokens)
    tokens._clock = time.time
    assert tokens._meets(token, asked) is False
