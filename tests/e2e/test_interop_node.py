"""Interoperability with panva/jose on Node.js: our tokens, our JWKS URL, a workload's DPoP proof.

``tests/e2e/node/`` is a tiny npm project pinning ``jose`` (``package-lock.json``
is committed; ``node_modules/`` is not).  The first test that needs it runs
``npm ci`` there when ``node_modules`` is missing or holds another version, so
a fresh clone needs no manual step.  The scripts:

* ``verify.mjs <jwks-url> <issuer> <audience>`` (token on stdin):
  ``jwtVerify`` with ``createRemoteJWKSet`` and ``typ: "at+jwt"``,
  ``algorithms: ["ES256"]``; prints ``{"header", "payload"}`` or exits 1 with
  ``{"code", "message", "claim"}`` on stderr.
* ``dpop.mjs [htm] [htu]`` (proof on stdin): imports the proof's own header
  ``jwk`` and verifies it with ``typ: "dpop+jwt"``; prints the header, payload
  and jose's RFC 7638 thumbprint of the key.

* ``dpop_sign.mjs <alg> <htm> <htu> [nonce]``: a Node.js client's own proof (``generateKeyPair`` +
  ``SignJWT``, nothing of ours); prints the proof and jose's RFC 7638 thumbprint of its key.

DPoP proofs otherwise come from the project's workload library (``sts_client.dpop.DPoPKey``
in ``clients/python``, imported from the source tree when not installed); only
the forged proof of the negative test is built with joserfc.  One test binds
a token at our token endpoint with such a proof and checks that the token's
``cnf.jkt`` is the thumbprint jose computes for the proof's key.

The tests are skipped only when ``node`` is not on ``PATH``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import ECKey

from sts.dev.issuer import RunningServer
from sts.settings import Settings
from tests.conftest import FORM, GATEWAY_SECRET, exchange_form
from tests.e2e.live_sts import LiveSts, serve_sts

NODE_DIR = Path(__file__).parent / "node"
CLIENT_SOURCE = Path(__file__).resolve().parents[2] / "clients" / "python"
DEPLOY = "https://deploy.example.com"
TIMEOUT = 10
NODE_TIMEOUT = 30
NPM_TIMEOUT = 180
MIN_NODE_MAJOR = 20


@dataclass(frozen=True)
class Node:
    executable: str

    def run(self, script: str, *args: str, stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.executable, script, *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=NODE_DIR,
            timeout=NODE_TIMEOUT,
            check=False,
        )


def _locked_jose_version() -> str:
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    return str(lock["packages"]["node_modules/jose"]["version"])


def _installed_jose_version() -> str | None:
    manifest = NODE_DIR / "node_modules" / "jose" / "package.json"
    if not manifest.is_file():
        return None
    return str(json.loads(manifest.read_text()).get("version"))


@pytest.fixture(scope="module")
def node() -> Node:
    """Node.js with the locked ``jose`` installed in ``tests/e2e/node/node_modules`` (``npm ci`` once)."""
    executable = shutil.which("node")
    if executable is None:
        pytest.skip("node is not on PATH: the panva/jose interoperability checks need Node.js 20+")
    version = subprocess.run(
        [executable, "--version"], capture_output=True, text=True, timeout=NODE_TIMEOUT, check=True
    ).stdout.strip()
    major = re.match(r"v(\d+)\.", version)
    assert major is not None and int(major.group(1)) >= MIN_NODE_MAJOR, f"need Node.js 20+, found {version}"

    if _installed_jose_version() != _locked_jose_version():
        npm = shutil.which("npm")
        assert npm is not None, "node is on PATH but npm is not: cannot install tests/e2e/node (npm ci)"
        installed = subprocess.run(
            [
                npm,
                "ci",
                "--prefer-offline",
                "--no-audit",
                "--no-fund",
                "--ignore-scripts",
                "--loglevel=error",
            ],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
            check=False,
        )
        assert installed.returncode == 0, (
            f"npm ci in {NODE_DIR} failed:\n{installed.stdout}\n{installed.stderr}"
        )
        assert _installed_jose_version() == _locked_jose_version()
    return Node(executable)


@pytest.fixture
def live(make_settings: Callable[..., Settings], upstream: RunningServer) -> Iterator[LiveSts]:
    with serve_sts(make_settings, upstream) as server:
        yield server


def exchange(live: LiveSts, subject_token: str, auth: tuple[str, str] | None = None, **params: Any) -> str:
    response = requests.post(
        live.token_endpoint,
        data=exchange_form(subject_token, **params),
        headers={"Content-Type": FORM},
        auth=auth,
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def verify(node: Node, live: LiveSts, token: str, audience: str) -> subprocess.CompletedProcess[str]:
    return node.run("verify.mjs", live.jwks_uri, live.issuer, audience, stdin=token)


def failure(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    return dict(json.loads(result.stderr.strip().splitlines()[-1]))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(part: str) -> dict[str, Any]:
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


# -- access tokens ------------------------------------------------------------------------------


def test_jose_verifies_an_issued_token_against_our_jwks_url(node: Node, live: LiveSts) -> None:
    token = exchange(live, live.github_actions_token(), audience=DEPLOY, scope="deploy:write")
    result = verify(node, live, token, DEPLOY)
    assert result.returncode == 0, result.stderr
    verified = json.loads(result.stdout)
    header, payload = verified["header"], verified["payload"]
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "ES256"
    published = requests.get(live.jwks_uri, timeout=TIMEOUT).json()["keys"]
    assert header["kid"] in {key["kid"] for key in published}
    assert payload["iss"] == live.issuer
    assert payload["aud"] in (DEPLOY, [DEPLOY])
    assert payload["sub"] == "repo:acme/app:ref:refs/heads/main"
    assert payload["scope"] == "deploy:write"
    assert 0 < payload["exp"] - time.time() <= 300


def test_jose_verifies_a_client_authenticated_token_with_two_audiences(node: Node, live: LiveSts) -> None:
    token = exchange(
        live,
        live.kubernetes_token(),
        auth=("gateway", GATEWAY_SECRET),
        audience="ledger",
        resource="https://ledger.example.com/api",
    )
    for audience in ("ledger", "https://ledger.example.com/api"):
        result = verify(node, live, token, audience)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["payload"]["client_id"] == "gateway"


def test_jose_rejects_a_tampered_token(node: Node, live: LiveSts) -> None:
    token = exchange(live, live.github_actions_token(), audience=DEPLOY, scope="deploy:read")
    header, payload, signature = token.split(".")
    claims = b64url_json(payload)
    claims["scope"] = "deploy:read deploy:write"
    forged = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    assert failure(verify(node, live, forged, DEPLOY))["code"] == "ERR_JWS_SIGNATURE_VERIFICATION_FAILED"

    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[10] ^= 0x01
    flipped = f"{header}.{payload}.{b64url(bytes(raw))}"
    assert failure(verify(node, live, flipped, DEPLOY))["code"] == "ERR_JWS_SIGNATURE_VERIFICATION_FAILED"

    # The untouched token still verifies: the failures above are the tampering's.
    assert verify(node, live, token, DEPLOY).returncode == 0


def test_jose_rejects_a_token_for_another_audience(node: Node, live: LiveSts) -> None:
    ledger_token = exchange(
        live, live.kubernetes_token(), auth=("gateway", GATEWAY_SECRET), audience="ledger"
    )
    refused = failure(verify(node, live, ledger_token, DEPLOY))
    assert refused["code"] == "ERR_JWT_CLAIM_VALIDATION_FAILED"
    assert refused["claim"] == "aud"

    deploy_token = exchange(live, live.github_actions_token(), audience=DEPLOY)
    refused = failure(verify(node, live, deploy_token, "https://elsewhere.example.com"))
    assert refused["code"] == "ERR_JWT_CLAIM_VALIDATION_FAILED"
    assert refused["claim"] == "aud"


def test_jose_rejects_our_token_under_another_issuer(node: Node, live: LiveSts) -> None:
    token = exchange(live, live.github_actions_token(), audience=DEPLOY)
    result = node.run("verify.mjs", live.jwks_uri, "https://sts.test", DEPLOY, stdin=token)
    refused = failure(result)
    assert refused["code"] == "ERR_JWT_CLAIM_VALIDATION_FAILED"
    assert refused["claim"] == "iss"


# -- DPoP proofs --------------------------------------------------------------------------------


def workload_dpop_key() -> Any:
    """A fresh key of the project's workload library (``sts_client.dpop.DPoPKey``, ``clients/python``).

    Imported from the source tree when the client package is not installed in this environment.
    """
    if importlib.util.find_spec("sts_client") is None:
        sys.path.append(str(CLIENT_SOURCE))
    return importlib.import_module("sts_client.dpop").DPoPKey()


def forged_proof(key: ECKey, htu: str, *, header_key: ECKey) -> str:
    """A DPoP proof signed by ``key`` but carrying ``header_key`` (the library cannot make one)."""
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": header_key.as_dict(private=False)}
    claims = {"jti": str(uuid.uuid4()), "htm": "POST", "htu": htu, "iat": int(time.time())}
    return jwt.encode(header, claims, key, algorithms=["ES256"])


def test_jose_verifies_a_workload_dpop_proof(node: Node) -> None:
    key = workload_dpop_key()
    url = "https://deploy.example.com/deployments?env=prod#top"
    access_token = "eyJ0eXAiOiJhdCtqd3QifQ.e30.c2ln"
    proof = key.proof("GET", url, access_token=access_token)
    result = node.run("dpop.mjs", "GET", "https://deploy.example.com/deployments", stdin=proof)
    assert result.returncode == 0, result.stderr
    verified = json.loads(result.stdout)
    assert verified["header"]["typ"] == "dpop+jwt"
    assert verified["header"]["alg"] == "ES256"
    assert not {"d", "kid"} & set(verified["header"]["jwk"])
    payload = verified["payload"]
    assert payload["htm"] == "GET"
    assert payload["htu"] == "https://deploy.example.com/deployments"  # no query, no fragment
    assert payload["ath"] == b64url(hashlib.sha256(access_token.encode()).digest())
    assert abs(payload["iat"] - time.time()) < 60
    assert isinstance(payload["jti"], str) and len(payload["jti"]) >= 16
    # jose and the library agree on the RFC 7638 thumbprint, the value a DPoP-bound token's cnf.jkt carries.
    assert verified["thumbprint"] == key.jkt


def test_jose_rejects_a_dpop_proof_not_signed_by_its_header_key(node: Node) -> None:
    htu = "https://sts.example.com/token"
    proof = forged_proof(ECKey.generate_key("P-256"), htu, header_key=ECKey.generate_key("P-256"))
    refused = failure(node.run("dpop.mjs", "POST", htu, stdin=proof))
    assert refused["code"] == "ERR_JWS_SIGNATURE_VERIFICATION_FAILED"

    genuine = workload_dpop_key().proof("POST", htu)
    assert failure(node.run("dpop.mjs", "GET", htu, stdin=genuine))["code"] == "DPOP_HTM_MISMATCH"


def test_dpop_bound_token_cnf_matches_the_proof_key_for_jose(node: Node, live: LiveSts) -> None:
    """The library's proof at our token endpoint: the token's cnf.jkt is the thumbprint jose computes."""
    key = workload_dpop_key()
    proof = key.proof("POST", live.token_endpoint)
    response = requests.post(
        live.token_endpoint,
        data=exchange_form(live.github_actions_token(), audience=DEPLOY),
        headers={"Content-Type": FORM, "DPoP": proof},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "DPoP"
    token = response.json()["access_token"]

    checked_proof = node.run("dpop.mjs", "POST", live.token_endpoint, stdin=proof)
    assert checked_proof.returncode == 0, checked_proof.stderr
    checked_token = verify(node, live, token, DEPLOY)
    assert checked_token.returncode == 0, checked_token.stderr
    jkt = json.loads(checked_token.stdout)["payload"]["cnf"]["jkt"]
    assert jkt == json.loads(checked_proof.stdout)["thumbprint"] == key.jkt


@pytest.mark.parametrize(
    "alg",
    [
        "ES256",
        "ES384",
        "PS256",
        "Ed25519",
        # joserfc warns on every use of the deprecated name (RFC 9864); the proof is still valid.
        pytest.param("EdDSA", marks=pytest.mark.filterwarnings("ignore::joserfc.errors.SecurityWarning")),
    ],
)
def test_a_dpop_proof_made_by_jose_binds_the_token(node: Node, live: LiveSts, alg: str) -> None:
    """A Node.js client's proof (jose's generateKeyPair + SignJWT, nothing of ours) is accepted at the
    token endpoint (RFC 9449 §4.3), and the token is bound to jose's RFC 7638 thumbprint of its key."""
    made = node.run("dpop_sign.mjs", alg, "POST", live.token_endpoint, stdin="")
    assert made.returncode == 0, made.stderr
    signed = json.loads(made.stdout)
    response = requests.post(
        live.token_endpoint,
        data=exchange_form(live.github_actions_token(), audience=DEPLOY),
        headers={"Content-Type": FORM, "DPoP": signed["proof"]},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "DPoP"
    checked = verify(node, live, response.json()["access_token"], DEPLOY)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["payload"]["cnf"] == {"jkt": signed["thumbprint"]}

    # The same proof again is a replay (RFC 9449 §11.1).
    replayed = requests.post(
        live.token_endpoint,
        data=exchange_form(live.github_actions_token(), audience=DEPLOY),
        headers={"Content-Type": FORM, "DPoP": signed["proof"]},
        timeout=TIMEOUT,
    )
    assert (replayed.status_code, replayed.json()["error"]) == (400, "invalid_dpop_proof")
