"""Endpoints: the token endpoint (RFC 8693), metadata (RFC 8414), JWKS, liveness and readiness."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

from ..core.dpop import issue_nonce
from ..core.exchange import WireRequest
from ..errors import InvalidRequest, OAuthError, TemporarilyUnavailable
from .client_cert import certificate_thumbprint
from .responses import NO_STORE, json_response

if TYPE_CHECKING:
    from ..app import Runtime

bp = Blueprint("oauth", __name__)


def runtime() -> Runtime:
    return cast("Runtime", current_app.extensions["sts"])


@bp.post("/token")
def token() -> Response:
    """RFC 8693 §2.1 token exchange::

    POST /token
    Content-Type: application/x-www-form-urlencoded

    grant_type=urn:ietf:params:oauth:grant-type:token-exchange&subject_token=...
    """
    rt = runtime()
    problem: OAuthError | None = None
    form: dict[str, list[str]] = {}
    try:
        form = request.form.to_dict(flat=False)
    except RequestEntityTooLarge:
        problem = InvalidRequest("request.body_too_large")
    except BadRequest:
        problem = InvalidRequest("request.malformed_body")
    authorizations = request.headers.getlist("Authorization")
    if len(authorizations) > 1:
        problem = problem or InvalidRequest("request.repeated_authorization_header")
    if problem is None and not rt.database_ready():
        # Fail closed before anything is verified or used up: the database was down at start
        # and its schema is not in place yet (the refusal goes to the log if it cannot be audited).
        problem = TemporarilyUnavailable("database.not_ready")
    wire = WireRequest(
        form=form,
        query=request.args.to_dict(flat=False),
        content_type=request.headers.get("Content-Type"),
        authorization=authorizations[0] if authorizations else None,
        request_id=g.request_id,
        source_ip=g.get("client_address", request.remote_addr),
        user_agent=request.headers.get("User-Agent"),
        # WSGI servers join repeated header fields with commas (RFC 9110 §5.3), and a JWS never
        # holds one: split them again so that two proofs count as two (RFC 9449 §4.3 step 1).
        dpop=tuple(part for value in request.headers.getlist("DPoP") for part in value.split(",")),
        client_cert_thumbprint=forwarded_certificate(),
        trace_id=g.get("trace_id"),
    )
    if problem is not None:
        rt.exchange.refuse_early(wire, problem)
        raise problem
    result = rt.exchange.handle(wire)
    headers = dict(NO_STORE)
    nonce_secret = rt.exchange.config.dpop.nonce_secret if rt.exchange.config.dpop else None
    if nonce_secret is not None:
        # RFC 9449 §8.2: a fresh nonce with every answer, so the client never has to fail first.
        headers["DPoP-Nonce"] = issue_nonce(nonce_secret, rt.clock())
    return json_response(result.as_json(), 200, headers)


def forwarded_certificate() -> str | None:
    """The client certificate's ``x5t#S256``, only when a trusted proxy forwarded it (RFC 8705)."""
    header = current_app.config.get("STS_MTLS_HEADER")
    if not header or not g.get("via_trusted_proxy", False):
        # No header configured, or the connection did not come through a trusted proxy.
        return None
    value = request.headers.get(header)
    return certificate_thumbprint(value) if value else None


def _metadata() -> Response:
    return json_response(runtime().metadata, 200, {"Cache-Control": "public, max-age=3600"})


@bp.get("/.well-known/oauth-authorization-server")
def metadata() -> Response:
    """RFC 8414 §3 authorization server metadata."""
    return _metadata()


@bp.get("/.well-known/jwks.json")
def jwks() -> Response:
    """The JWK Set (RFC 7517 §5) of every published signing key, public parts only."""
    rt = runtime()
    rt.keyring.reload_if_changed(rt.clock())
    return json_response(rt.keyring.public_jwks(), 200, {"Cache-Control": "public, max-age=300"})


@bp.get("/livez")
def livez() -> Response:
    """Liveness: the process is up and serves requests.  Checks no dependency, so that an
    orchestrator restarts a stuck process, never one that waits for its database."""
    return json_response({"status": "ok"}, 200, NO_STORE)


@bp.get("/readyz")
def readyz() -> Response:
    """Readiness, for load balancers: the audit database commits a write, the replay store
    answers and takes one, the signing key is loaded.  503 names what is missing."""
    problems = runtime().health()
    if problems:
        return json_response({"status": "unavailable", "problems": problems}, 503, NO_STORE)
    return json_response({"status": "ok"}, 200, NO_STORE)


@bp.get("/healthz")
def healthz() -> Response:
    """The readiness check under its earlier name, for existing load balancers and healthchecks."""
    return readyz()
