"""Endpoints: the token endpoint (RFC 8693), metadata (RFC 8414 and OpenID Connect Discovery),
JWKS, liveness and readiness.

Each blueprint is built by a factory that is given the services it uses
(:func:`sts.app.create_app` wires them); nothing here reaches for the
application's globals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import Blueprint, Response, request

from ..core.dpop import issue_nonce
from ..core.exchange import TokenExchange
from ..errors import TemporarilyUnavailable
from ..protocol.wire import WireRequest
from .responses import NO_STORE, Answer, json_response
from .wire import read_request


class TokenEndpoint:
    """What ``POST /token`` does with a request once it has been read, without Flask: served by
    :func:`token_blueprint` and by the lean path in front of Flask (:mod:`sts.http.token_fast`).

    ``nonce_secret``: the DPoP nonce secret (RFC 9449 §8), when nonces are on.
    ``database_ready``: whether the audit database's schema is in place (the token
    endpoint fails closed until it is).  ``mtls_header``: the header a trusted proxy
    forwards the client certificate in (RFC 8705).
    """

    def __init__(
        self,
        exchange: TokenExchange,
        *,
        clock: Callable[[], float],
        nonce_secret: bytes | None,
        database_ready: Callable[[], bool],
        mtls_header: str | None = None,
    ) -> None:
        self.exchange = exchange
        self.clock = clock
        self.nonce_secret = nonce_secret
        self.database_ready = database_ready
        self.mtls_header = mtls_header
        self.refuse_early = exchange.refuse_early

    def answer(self, wire: WireRequest) -> Answer:
        """The token response (RFC 8693 §2.2.1); raises the :class:`~sts.errors.OAuthError` to send."""
        if not self.database_ready():
            # Fail closed before anything is verified or used up: the database was down at start
            # and its schema is not in place yet (the refusal goes to the log if it cannot be audited).
            problem = TemporarilyUnavailable("database.not_ready")
            self.exchange.refuse_early(wire, problem)
            raise problem
        result = self.exchange.handle(wire)
        headers = dict(NO_STORE)
        if self.nonce_secret is not None:
            # RFC 9449 §8.2: a fresh nonce with every answer, so the client never has to fail first.
            headers["DPoP-Nonce"] = issue_nonce(self.nonce_secret, self.clock())
        return Answer(200, result.as_json(), headers)


def token_paths(issuer_path: str = "") -> tuple[str, ...]:
    """The token endpoint's routes: ``/token``, and ``{issuer_path}/token`` for an issuer with a path
    (the endpoints its metadata names live under that path too, and stay at the root, for a proxy
    that strips the prefix)."""
    return ("/token", f"{issuer_path}/token") if issuer_path else ("/token",)


def token_blueprint(endpoint: TokenEndpoint, *, issuer_path: str = "") -> Blueprint:
    """``POST /token`` (and ``POST {issuer_path}/token`` for an issuer with a path)."""
    bp = Blueprint("oauth", __name__)

    def token() -> Response:
        """RFC 8693 §2.1 token exchange::

        POST /token
        Content-Type: application/x-www-form-urlencoded

        grant_type=urn:ietf:params:oauth:grant-type:token-exchange&subject_token=...
        """
        answer = endpoint.answer(read_request(endpoint.mtls_header, endpoint.refuse_early))
        return json_response(answer.body, answer.status, answer.headers)

    for path, name in zip(token_paths(issuer_path), ("token", "token_under_issuer_path"), strict=False):
        bp.add_url_rule(path, name, token, methods=["POST"])
    return bp


def discovery_blueprint(
    metadata: Mapping[str, Any], public_jwks: Callable[[], Mapping[str, Any]], *, issuer_path: str = ""
) -> Blueprint:
    """RFC 8414 metadata, the same as an OpenID Connect Discovery document, and the JWK Set (RFC 7517
    §5); under the issuer's path too, if it has one.

    ``public_jwks``: every published signing key, public parts only (read at each request,
    so that a rotation is seen).
    """
    bp = Blueprint("discovery", __name__)

    def metadata_document() -> Response:
        """RFC 8414 §3 authorization server metadata."""
        return _conditional(json_response(metadata, 200, {"Cache-Control": "public, max-age=3600"}))

    def jwks() -> Response:
        """The JWK Set (RFC 7517 §5) of every published signing key, public parts only."""
        return _conditional(json_response(public_jwks(), 200, {"Cache-Control": "public, max-age=300"}))

    def openid_configuration() -> Response:
        """The same metadata as an OpenID Connect Discovery document, for token verifiers that
        find keys that way (see :func:`openid_configuration_document`).  The algorithms are read
        from the published keys at each request, as the JWK Set is, so a rotation to another
        algorithm is seen; cached as long as the JWK Set."""
        document = openid_configuration_document(metadata, public_jwks())
        return _conditional(json_response(document, 200, {"Cache-Control": "public, max-age=300"}))

    bp.add_url_rule("/.well-known/oauth-authorization-server", "metadata", metadata_document)
    bp.add_url_rule("/.well-known/openid-configuration", "openid_configuration", openid_configuration)
    bp.add_url_rule("/.well-known/jwks.json", "jwks", jwks)
    if issuer_path:
        # OpenID Connect Discovery 1.0 §4: the well-known segment is appended to the issuer.
        bp.add_url_rule(
            f"{issuer_path}/.well-known/openid-configuration",
            "openid_configuration_under_issuer_path",
            openid_configuration,
        )
        # RFC 8414 §3.1: the well-known segment goes between host and the issuer's path.
        bp.add_url_rule(
            f"/.well-known/oauth-authorization-server{issuer_path}", "metadata_path", metadata_document
        )
        bp.add_url_rule(f"{issuer_path}/.well-known/jwks.json", "jwks_under_issuer_path", jwks)
    return bp


def _conditional(response: Response) -> Response:
    """``response`` with a strong ``ETag`` of its body (RFC 9110 §8.8.3), answered ``304 Not
    Modified`` to a request whose ``If-None-Match`` names it (§13.1.2): a verifier polling the
    JWK Set or the metadata is told cheaply that nothing changed (a rotation changes the tag)."""
    response.add_etag()
    response.make_conditional(request)  # in place: 304, its body dropped, when the tag matches
    return response


def openid_configuration_document(
    metadata: Mapping[str, Any], published_jwks: Mapping[str, Any]
) -> dict[str, Any]:
    """The RFC 8414 ``metadata`` with the members OpenID Connect Discovery 1.0 §3 requires that
    RFC 8414 does not: ``subject_types_supported`` (``public``: a token's ``sub`` is the upstream
    workload's, the same for every audience) and ``id_token_signing_alg_values_supported``, the
    algorithms of the published signing keys (``alg`` of each key, RFC 7517 §4.4).

    This service issues access tokens, not ID tokens, and has no authorization endpoint; the
    document is served because verifiers of workload tokens find the issuer's keys this way:
    Kubernetes serves the same subset for its service-account tokens (KEP-1393), and cloud
    workload-identity federation (AWS IAM OIDC providers, Google Cloud workload identity pools),
    Vault's JWT auth and go-oidc read ``jwks_uri`` from it; go-oidc accepts only the algorithms
    listed in ``id_token_signing_alg_values_supported`` (RS256 when the member is absent).
    """
    keys = published_jwks.get("keys")
    algs = sorted(
        {key["alg"] for key in keys if isinstance(key, Mapping) and isinstance(key.get("alg"), str)}
        if isinstance(keys, list)
        else set()
    )
    document = {**metadata, "subject_types_supported": ["public"]}
    if algs:  # RFC 8414 §3.2: never an empty array.
        document["id_token_signing_alg_values_supported"] = algs
    return document


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
