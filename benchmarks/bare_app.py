"""The floor the benchmark compares against: a bare Flask endpoint that verifies and signs.

It does the two pieces of cryptography an exchange cannot avoid (verify the
subject token against its issuer's JWKS, sign an ES256 JWT) and nothing else:
no policy, no client authentication, no audit record, no replay store.
Configured by environment: BARE_JWKS (a JWK Set JSON string).
"""

from __future__ import annotations

import json
import os
import secrets
import time

from flask import Flask, request
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

_keys = KeySet.import_key_set(json.loads(os.environ["BARE_JWKS"]))
_signing = ECKey.generate_key("P-256", auto_kid=True)

app = Flask("bare")


@app.post("/token")
def token() -> dict[str, object]:
    verified = jwt.decode(request.form["subject_token"], _keys, algorithms=["RS256"])
    now = int(time.time())
    claims = {"iss": "bare", "sub": verified.claims["sub"], "aud": request.form.get("audience", "x"),
              "iat": now, "exp": now + 300, "jti": secrets.token_urlsafe(16)}  # fmt: skip
    signed = jwt.encode({"alg": "ES256", "typ": "at+jwt", "kid": _signing.kid}, claims, _signing, algorithms=["ES256"])
    return {"access_token": signed, "token_type": "Bearer", "expires_in": 300}
