"""Support for the client-library tests: WSGI apps served over real HTTP, and an authorization-server double.

The double (:class:`FakeAuthorizationServer`) plays what the real STS does not
do yet, built to the RFCs: a token endpoint that binds tokens to DPoP keys
(RFC 9449 §5, ``cnf.jkt``) and demands a server nonce first (§8), next to
metadata (RFC 8414), a JWKS with a settable ``Cache-Control``, and
introspection (RFC 7662).  It checks DPoP proofs with joserfc directly, not
with the library under test.  Everything else is tested against the real STS.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from joserfc import jws, jwt
from joserfc.jwk import ECKey, JWKRegistry, Key
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from sts.app import create_app
from sts.core.client_secrets import hash_secret
from sts.dev.issuer import RunningServer
from sts.settings import Settings
from tests.conftest import DEFAULT_CLIENTS, DEFAULT_POLICY

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

AUDIENCE = "https://deploy.example.com"
INTROSPECTION_CLIENT = ("deploy-api", "deploy-api-secret-0123456789abcdef")
#: The resource server's client registration at the real STS (introspection, revocation).
RS_CLIENT = ("deploy-api", "deploy-api-secret-0123456789-abcdefghijkl")


class _QuietHandler(WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:
        return None


def _not_ready(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"starting\n"]


class Served:
    """A WSGI app on 127.0.0.1 with an ephemeral port, in a daemon thread.

    The socket is bound at construction, so the URL is known before the app
    exists (the STS's ``issuer`` must equal its own URL); :meth:`start` sets
    the app and starts serving.
    """

    def __init__(self, app: WSGIApplication | None = None) -> None:
        self.server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, app or _not_ready, threaded=True, request_handler=_QuietHandler
        )
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None
        if app is not None:
            self.start()

    def start(self, app: WSGIApplication | None = None) -> Served:
        if app is not None:
            self.server.app = app
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.server.server_close()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclasses.dataclass
class Sts:
    """The real STS (``create_app``) served over HTTP at the URL that is its ``issuer``."""

    served: Served
    app: Any

    @property
    def url(self) -> str:
        return self.served.url

    def audit(self, n: int) -> list[dict[str, Any]]:
        """The ``n`` newest audit records, newest first."""
        records: list[dict[str, Any]] = self.app.extensions["sts"].audit.recent(n)
        return records


def serve_sts(
    make_settings: Callable[..., Settings],
    upstream: RunningServer,
    policy: dict[str, Any] | None = None,
    *,
    clock: Callable[[], float] = time.time,
    **overrides: Any,
) -> Sts:
    """Bind a port, configure the STS with that URL as its issuer (trusting ``upstream``), then serve it.

    ``clock`` is the STS's time (tests that move time pass their own)."""
    served = Served()
    settings = make_settings(
        policy or DEFAULT_POLICY,
        issuer=served.url,
        issuers=[
            {
                "name": "upstream",
                "issuer": upstream.issuer.issuer_url,
                "jwks_uri": upstream.jwks_uri,
                "algorithms": ["RS256"],
                "audiences": [served.url],
                "max_token_age": 3600,
            }
        ],
        clients=[
            *DEFAULT_CLIENTS,
            {
                "client_id": RS_CLIENT[0],
                "auth_method": "client_secret_basic",
                "secret_hash": hash_secret(RS_CLIENT[1]),
                "audiences": [AUDIENCE],
            },
        ],
        **overrides,
    )
    app = create_app(settings, clock=clock)
    served.start(app)
    return Sts(served, app)


def new_signing_key() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"alg": "ES256", "use": "sig"}, auto_kid=True)


class FakeAuthorizationServer:
    """Metadata, JWKS, introspection and an RFC 8693 + RFC 9449 token endpoint; see the module docstring."""

    def __init__(self) -> None:
        self.served = Served()
        self.url = self.served.url
        self.issuer = self.url
        self.key = new_signing_key()
        self.published: list[Key] = [self.key]
        self.jwks_cache_control = "public, max-age=300"
        self.jwks_available = True
        #: When set, served as the JWKS document instead of the published keys.
        self.jwks_document: dict[str, Any] | None = None
        #: When set, a JWKS request waits for it (to hold concurrent fetches together).
        self.jwks_gate: threading.Event | None = None
        self.jwks_requests = 0
        #: Whether the JWKS carries an ETag of its document (``"weak"``: a weak one) and answers 304.
        self.jwks_etag: bool | str = False
        #: The statuses of the JWKS answers, in order.
        self.jwks_statuses: list[int] = []
        self.metadata_issuer: str | None = None
        self.revoked: set[str] = set()
        self.introspection_requests = 0
        self.introspection_available = True
        #: Every metadata request, as its time (to count them).
        self.metadata_requests: list[float] = []
        #: When set, the token endpoint demands this nonce in DPoP proofs (RFC 9449 §8).
        self.dpop_nonce: str | None = None
        self.token_requests: list[dict[str, Any]] = []
        self.subjects_seen: list[str] = []
        self.token_lifetime = 300
        #: When set, the token endpoint answers this (status, body) instead of issuing.
        self.token_answer: tuple[int, dict[str, Any]] | None = None
        #: Headers sent with ``token_answer``.
        self.token_answer_headers: dict[str, str] = {}
        #: The ``auth_time`` of an issued token, from the subject token presented.
        self.auth_time: Callable[[str], int] = lambda subject: int(time.time())
        self.served.start(self.wsgi)

    def stop(self) -> None:
        self.served.stop()

    # -- minting ---------------------------------------------------------------------------------

    def mint(
        self,
        *,
        audience: str | list[str] = AUDIENCE,
        scope: str | None = "deploy:read",
        now: float | None = None,
        lifetime: int = 300,
        auth_time: int | None = None,
        jkt: str | None = None,
        header: dict[str, Any] | None = None,
        key: Key | None = None,
        alg: str = "ES256",
        omit: tuple[str, ...] = (),
        **claims: Any,
    ) -> str:
        """An RFC 9068 access token as the STS issues it; keyword arguments add or (None) remove claims.

        ``auth_time`` defaults to the issue time; ``omit`` leaves claims out altogether.
        """
        issued = int(time.time() if now is None else now)
        body: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "repo:acme/app:ref:refs/heads/main",
            "aud": audience,
            "exp": issued + lifetime,
            "iat": issued,
            "nbf": issued,
            "jti": uuid.uuid4().hex,
            "client_id": "repo:acme/app:ref:refs/heads/main",
            "auth_time": issued if auth_time is None else auth_time,
        }
        if scope is not None:
            body["scope"] = scope
        if jkt is not None:
            body["cnf"] = {"jkt": jkt}
        body.update(claims)
        body = {name: value for name, value in body.items() if value is not None and name not in omit}
        signing_key = key or self.key
        protected: dict[str, Any] = {"typ": "at+jwt", "alg": alg, "kid": signing_key.kid}
        for name, value in (header or {}).items():
            if value is None:
                protected.pop(name, None)
            else:
                protected[name] = value
        registry = jws.JWSRegistry(algorithms=[alg], strict_check_header=False)
        return jwt.encode(protected, body, signing_key, algorithms=[alg], registry=registry)

    def rotate(self) -> ECKey:
        self.key = new_signing_key()
        self.published = [self.key, *self.published]
        return self.key

    # -- HTTP ------------------------------------------------------------------------------------

    def wsgi(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        handler = {
            ("GET", "/.well-known/oauth-authorization-server"): self._metadata,
            ("GET", "/.well-known/jwks.json"): self._jwks,
            ("POST", "/introspect"): self._introspect,
            ("POST", "/token"): self._token,
        }.get((request.method, request.path))
        response = handler(request) if handler else _json({"error": "not_found"}, 404)
        return response(environ, start_response)

    def _metadata(self, request: Request) -> Response:
        self.metadata_requests.append(time.time())
        return _json(
            {
                "issuer": self.metadata_issuer or self.issuer,
                "token_endpoint": f"{self.url}/token",
                "jwks_uri": f"{self.url}/.well-known/jwks.json",
                "introspection_endpoint": f"{self.url}/introspect",
                "dpop_signing_alg_values_supported": ["ES256"],
            }
        )

    def _jwks(self, request: Request) -> Response:
        self.jwks_requests += 1
        if self.jwks_gate is not None:
            self.jwks_gate.wait(timeout=5)
        if not self.jwks_available:
            return _json({"error": "unavailable"}, 503)
        document = self.jwks_document or {"keys": [k.as_dict(private=False) for k in self.published]}
        response = _json(document)
        if self.jwks_etag:
            tag = '"' + hashlib.sha256(response.get_data()).hexdigest()[:16] + '"'
            tag = "W/" + tag if self.jwks_etag == "weak" else tag
            response.headers["ETag"] = tag
            if request.headers.get("If-None-Match") == tag:
                response = Response(status=304, headers={"ETag": tag})
        if self.jwks_cache_control:
            response.headers["Cache-Control"] = self.jwks_cache_control
        self.jwks_statuses.append(response.status_code)
        return response

    def _introspect(self, request: Request) -> Response:
        self.introspection_requests += 1
        if not self.introspection_available:
            return _json({"error": "temporarily_unavailable"}, 503)
        expected = base64.b64encode(":".join(INTROSPECTION_CLIENT).encode()).decode()
        if request.headers.get("Authorization") != f"Basic {expected}":
            return _json({"error": "invalid_client"}, 401)
        token = request.form.get("token", "")
        try:
            claims = jwt.decode(token, self.key, algorithms=["ES256"]).claims
        except Exception:
            return _json({"active": False})
        if claims["jti"] in self.revoked or claims["exp"] < time.time():
            return _json({"active": False})
        return _json({"active": True, **claims})

    def _token(self, request: Request) -> Response:
        """RFC 8693 exchange; any non-empty subject token is accepted (this is not what is under test)."""
        form = request.form
        proof = request.headers.get("DPoP")
        record: dict[str, Any] = {
            "dpop": proof is not None,
            "nonce": None,
            "form": form.to_dict(flat=False),
            "authorization": request.headers.get("Authorization"),
            "proxy_authorization": request.headers.get("Proxy-Authorization"),
        }
        self.token_requests.append(record)
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange":
            return _json({"error": "unsupported_grant_type"}, 400)
        subject = form.get("subject_token", "")
        if not subject:
            return _json({"error": "invalid_request"}, 400)
        self.subjects_seen.append(subject)
        if self.token_answer is not None:
            answer = _json(self.token_answer[1], self.token_answer[0])
            answer.headers.update(self.token_answer_headers)
            return answer
        jkt = None
        if proof is not None:
            try:
                jkt, nonce = self._check_token_endpoint_proof(proof)
            except ValueError:
                return _json({"error": "invalid_dpop_proof"}, 400)
            record["nonce"] = nonce
            if self.dpop_nonce is not None and nonce != self.dpop_nonce:
                response = _json({"error": "use_dpop_nonce", "error_description": "nonce required"}, 400)
                response.headers["DPoP-Nonce"] = self.dpop_nonce
                return response
        scope = form.get("scope", "deploy:read")
        token = self.mint(
            audience=form.getlist("audience") or AUDIENCE,
            scope=scope,
            lifetime=self.token_lifetime,
            auth_time=self.auth_time(subject),
            jkt=jkt,
        )
        return _json(
            {
                "access_token": token,
                "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "token_type": "DPoP" if jkt else "Bearer",
                "expires_in": self.token_lifetime,
                "scope": scope,
            }
        )

    def _check_token_endpoint_proof(self, proof: str) -> tuple[str, str | None]:
        """RFC 9449 §4.3 at the token endpoint, independently of the library under test."""
        header = jws.extract_compact(proof.encode()).headers()
        if header.get("typ") != "dpop+jwt" or header.get("alg") != "ES256":
            raise ValueError("typ/alg")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict) or "d" in jwk:
            raise ValueError("jwk")
        key = JWKRegistry.import_key(jwk)
        claims = jwt.decode(proof, key, algorithms=["ES256"]).claims
        if claims.get("htm") != "POST" or claims.get("htu") != f"{self.url}/token":
            raise ValueError("htm/htu")
        if "ath" in claims or abs(claims["iat"] - time.time()) > 60 or not claims.get("jti"):
            raise ValueError("claims")
        return key.thumbprint(), claims.get("nonce")


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")
