"""Minting: RFC 9068 JWT access tokens.

Header ``typ: at+jwt`` (RFC 9068 §2.1) so a resource server can tell an
access token from an ID token or any other JWT; claims ``iss``, ``sub``,
``aud``, ``exp``, ``iat``, ``jti``, ``client_id``, ``scope`` and ``auth_time``
(§2.2): here ``auth_time`` is when the presented attestation was issued, so a
resource server can demand fresh attestation (RFC 9470).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..protocol.identifiers import random_urlsafe
from .ports import Signer

ACCESS_TOKEN_TYP = "at+jwt"


@dataclass(frozen=True)
class IssuedToken:
    token: str
    jti: str
    issued_at: int
    expires_at: int
    kid: str

    def __repr__(self) -> str:
        return f"IssuedToken(jti={self.jti!r}, expires_at={self.expires_at}, kid={self.kid!r})"


def new_jti() -> str:
    return random_urlsafe(16)


def mint_access_token(
    signer: Signer,
    *,
    issuer: str,
    subject: str,
    audiences: tuple[str, ...],
    scopes: tuple[str, ...],
    client_id: str,
    lifetime: int,
    now: float,
    auth_time: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> IssuedToken:
    iat = int(now)
    exp = iat + lifetime
    jti = new_jti()
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audiences[0] if len(audiences) == 1 else list(audiences),
        "exp": exp,
        "iat": iat,
        "nbf": iat,
        "jti": jti,
        "client_id": client_id,
    }
    if scopes:
        claims["scope"] = " ".join(scopes)
    if auth_time is not None:
        claims["auth_time"] = int(auth_time)
    if extra:
        claims.update(extra)
    token = signer.sign({"typ": ACCESS_TOKEN_TYP}, claims)
    return IssuedToken(token=token, jti=jti, issued_at=iat, expires_at=exp, kid=signer.kid)
