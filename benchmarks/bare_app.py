"""The floor the benchmark compares against: a bare Flask endpoint that verifies and signs.

It does the cryptography and the claim checks a full exchange cannot avoid, and nothing else:

* verify the ES256 DPoP proof (RFC 9449 §4.3): ``typ: dpop+jwt``, the public ``jwk`` of its header
  verifies the signature, ``htm``, ``htu``, ``iat`` within ``BARE_DPOP_MAX_AGE``, a ``jti``; and take
  the key's RFC 7638 thumbprint;
* verify the RS256 subject token against its issuer's JWKS (``iss``, ``aud``, ``exp``, ``nbf``);
* sign an ES256 ``at+jwt`` (RFC 9068) bound to the proof's key (``cnf.jkt``, RFC 9449 §6).

No policy, no client authentication, no risk, no replay or single-use store, no audit record.
Configured by environment: ``BARE_JWKS`` (the subject token issuer's JWK Set, JSON),
``BARE_ISSUER`` (its ``iss``), ``BARE_AUDIENCE`` (the ``aud`` the subject token must name),
``BARE_HTU`` (the token endpoint URL the proofs name); ``BARE_NULL=1`` answers a constant instead,
after reading the form (the cost of serving alone).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any

from flask import Flask, request
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, KeySet
from joserfc.jwt import JWTClaimsRegistry

_keys = KeySet.import_key_set(json.loads(os.environ["BARE_JWKS"]))
_signing = ECKey.generate_key("P-256", auto_kid=True)
_subject_claims = JWTClaimsRegistry(
    iss={"essential": True, "value": os.environ["BARE_ISSUER"]},
    aud={"essential": True, "value": os.environ["BARE_AUDIENCE"]},
    exp={"essential": True},
    sub={"essential": True},
)
_proof_claims = JWTClaimsRegistry(
    htm={"essential": True, "value": "POST"},
    htu={"essential": True, "value": os.environ["BARE_HTU"]},
    jti={"essential": True},
    iat={"essential": True},
)
_max_age = int(os.environ.get("BARE_DPOP_MAX_AGE", "300"))

app = Flask("bare")


def _error(description: str) -> tuple[dict[str, str], int]:
    return {"error": "invalid_request", "error_description": description}, 400


_null = os.environ.get("BARE_NULL") == "1"


@app.errorhandler(JoseError)
def refused(exc: JoseError) -> tuple[dict[str, str], int]:
    return _error(f"{type(exc).__name__}: {exc.description}")


@app.post("/token")
def token() -> Any:
    if _null:  # the benchmark's "serving" system: what serving a request costs, with no work
        _ = request.form, request.headers.get("DPoP")
        return {"access_token": "x", "token_type": "DPoP"}, 200, {"Cache-Control": "no-store"}
    proof = request.headers.get("DPoP", "")
    header = jws.extract_compact(proof.encode()).protected
    if (
        header.get("typ") != "dpop+jwt"
        or header.get("alg") != "ES256"
        or not isinstance(header.get("jwk"), dict)
    ):
        return _error("bad proof header")
    proof_key = JWKRegistry.import_key(header["jwk"], "EC")
    if proof_key.is_private:
        return _error("private key in proof")
    checked = jwt.decode(proof, proof_key, algorithms=["ES256"])
    _proof_claims.validate(checked.claims)
    now = int(time.time())
    if not now - _max_age <= checked.claims["iat"] <= now + 5:
        return _error("stale proof")

    subject = jwt.decode(request.form["subject_token"], _keys, algorithms=["RS256"])
    _subject_claims.validate(subject.claims)

    claims = {
        "iss": "https://floor.bench",
        "sub": subject.claims["sub"],
        "aud": request.form.get("audience", "x"),
        "scope": request.form.get("scope", ""),
        "client_id": subject.claims["sub"],
        "iat": now,
        "exp": now + 300,
        "jti": secrets.token_urlsafe(16),
        "cnf": {"jkt": proof_key.thumbprint()},
    }
    signed = jwt.encode(
        {"alg": "ES256", "typ": "at+jwt", "kid": _signing.kid}, claims, _signing, algorithms=["ES256"]
    )
    body = {
        "access_token": signed,
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "DPoP",
        "expires_in": 300,
        "scope": claims["scope"],
    }
    return body, 200, {"Cache-Control": "no-store", "Pragma": "no-cache"}


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}
