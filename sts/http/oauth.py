"""Endpoints: the token endpoint (RFC 8693), metadata (RFC 8414), JWKS, liveness and readiness.

Each blueprint is built by a factory that is given the services it uses
(:func:`sts.app.create_app` wires them); nothing here reaches for the
application's globals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import Blueprint, Response

from ..core.dpop import issue_nonce
from ..core.exchange import TokenExchange
from ..errors import TemporarilyUnavailable
from .responses import NO_STORE, json_response
from .wire import read_request


def token_blueprint(
    exchange: TokenExchange,
    *,
    clock: Callable[[], float],
    nonce_secret: bytes | None,
    database_ready: Callable[[], bool],
    mtls_header: str | None = None,
    issuer_path: str = "",
) -> Blueprint:
    """``POST /token`` (and ``POST {issuer_path}/token`` for an issuer with a path).

    ``nonce_secret``: the DPoP nonce secret (RFC 9449 §8), when nonces are on.
    ``database_ready``: whether the audit database's schema is in place (the token
    endpoint fails closed until it is).  ``mtls_header``: the header a trusted proxy
    forwards the client certificate in (RFC 8705).
    """
    bp = Blueprint("oauth", __name__)

    def token() -> Response:
        """RFC 8693 §2.1 token exchange::

        POST /token
        Content-Type: application/x-www-form-urlencoded

        grant_type=urn:ietf:params:oauth:grant-type:token-exchange&subject_token=...
        """
        wire = read_request(mtls_header, exchange.refuse_early)
        if not database_ready():
            # Fail closed before anything is verified or used up: the database was down at start
            # and its schema is not in place yet (the refusal goes to the log if it cannot be audited).
            problem = TemporarilyUnavailable("database.not_ready")
            exchange.refuse_early(wire, problem)
            raise problem
        result = exchange.handle(wire)
        headers = dict(NO_STORE)
        if nonce_secret is not None:
            # RFC 9449 §8.2: a fresh nonce with every answer, so the client never has to fail first.
            headers["DPoP-Nonce"] = issue_nonce(nonce_secret, clock())
        return json_response(result.as_json(), 200, headers)

    bp.add_url_rule("/token", "token", token, methods=["POST"])
    if issuer_path:
        # An issuer with a path: the endpoints its metadata names live under that path too
        # (and stay at the root, for a proxy that strips the prefix).
        bp.add_url_rule(f"{issuer_path}/token", "token_under_issuer_path", token, methods=["POST"])
    return bp


def discovery_blueprint(
    metadata: Mapping[str, Any], public_jwks: Callable[[], Mapping[str, Any]], *, issuer_path: str = ""
) -> Blueprint:
    """RFC 8414 metadata and the JWK Set (RFC 7517 §5); under the issuer's path too, if it has one.

    ``public_jwks``: every published signing key, public parts only (read at each request,
    so that a rotation is seen).
    """
    bp = Blueprint("discovery", __name__)

    def metadata_document() -> Response:
        """RFC 8414 §3 authorization server metadata."""
        return json_response(metadata, 200, {"Cache-Control": "public, max-age=3600"})

    def jwks() -> Response:
        """The JWK Set (RFC 7517 §5) of every published signing key, public parts only."""
        return json_response(public_jwks(), 200, {"Cache-Control": "public, max-age=300"})

    bp.add_url_rule("/.well-known/oauth-authorization-server", "metadata", metadata_document)
    bp.add_url_rule("/.well-known/jwks.json", "jwks", jwks)
    if issuer_path:
        # RFC 8414 §3.1: the well-known segment goes between host and the issuer's path.
        bp.add_url_rule(
            f"/.well-known/oauth-authorization-server{issuer_path}", "metadata_path", metadata_document
        )
        bp.add_url_rule(f"{issuer_path}/.well-known/jwks.json", "jwks_under_issuer_path", jwks)
    return bp


def health_blueprint(problems: Callable[[], list[str]]) -> Blueprint:
    """Liveness and readiness.  ``problems``: what stops this process from issuing a token now
    (empty when nothing does)."""
    bp = Blueprint("health", __name__)

    @bp.get("/livez")
    def livez() -> Response:
        """Liveness: the process is up and serves requests.  Checks no dependency, so that an
        orchestrator restarts a stuck process, never one that waits for its database."""
        return json_response({"status": "ok"}, 200, NO_STORE)

    @bp.get("/readyz")
    def readyz() -> Response:
        """Readiness, for load balancers: the audit database commits a write, the replay store
        answers and takes one, the signing key is loaded.  503 names what is missing."""
        found = problems()
        if found:
            return json_response({"status": "unavailable", "problems": found}, 503, NO_STORE)
        return json_response({"status": "ok"}, 200, NO_STORE)

    @bp.get("/healthz")
    def healthz() -> Response:
        """The readiness check under its earlier name, for existing load balancers and healthchecks."""
        return readyz()

    return bp
