"""A fake upstream workload-token issuer.  DEVELOPMENT ONLY -- NEVER TRUST IT IN PRODUCTION.

**Anyone who can reach this issuer, or read its key file, can mint any
workload identity.**  An STS that trusts it grants tokens to whoever asks.
Use it for the README quickstart and the test suite, never in a deployment.

It plays the upstream issuers the STS attests (see "Real workload tokens" in
the project standards): GitHub Actions, Kubernetes projected service-account
tokens, GitLab CI ``id_tokens`` and SPIFFE JWT-SVIDs, plus any generic OIDC
issuer through :meth:`DevIssuer.mint`.  The tokens carry the claims and
headers the real issuers send, signed with an RS256 (RSA 2048) or ES256 key
whose public half is served as a real JWKS over HTTP::

    GET /.well-known/openid-configuration   discovery (issuer, jwks_uri, ...)
    GET /.well-known/jwks                   the JWK set (Cache-Control: max-age=300)
    GET /openid/v1/jwks                     the same set, at the Kubernetes path

and, as an insecure convenience for ``curl`` in the quickstart::

    POST /mint/github-actions   POST /mint/kubernetes
    POST /mint/gitlab           POST /mint/spiffe

    POST /mint/github-actions HTTP/1.1
    Content-Type: application/json

    {"audience": "http://127.0.0.1:8080", "environment": "prod",
     "claims": {"actor": "alice"}}

    HTTP/1.1 200 OK
    Content-Type: application/json
    Cache-Control: no-store

    {"token": "eyJhbGciOiJSUzI1NiIsImtpZCI6Ii..."}

The body's top-level members are the keyword arguments of the matching
``*_token`` method; ``claims`` adds or overrides claims (``null`` removes
one).  :meth:`DevIssuer.serve_in_thread` refuses to bind anything but a
loopback address.

Tokens are built with joserfc, always with an explicit one-element
algorithm list; ``kid`` is the key's RFC 7638 thumbprint.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self
from urllib.parse import urlsplit

from joserfc import jwt
from joserfc.jwk import ECKey, Key, KeyParameters, KeySetSerialization, OctKey, RSAKey
from joserfc.jws import JWSRegistry
from joserfc.registry import HeaderParameter
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "DEFAULT_ISSUER_URL",
    "DEFAULT_KEY_DIR",
    "SUPPORTED_ALGORITHMS",
    "DevIssuer",
    "RunningServer",
    "require_loopback_host",
]

#: Where ``sts dev`` keeps the dev issuer's private key (``/keys/*`` is git-ignored).
DEFAULT_KEY_DIR: Final = Path("keys/dev-issuer")
#: The issuer URL the quickstart serves the dev issuer at.
DEFAULT_ISSUER_URL: Final = "http://127.0.0.1:8081"

#: Signing algorithms a dev issuer key may use, and the key each needs.
SUPPORTED_ALGORITHMS: Final[Mapping[str, str]] = {"RS256": "RSA 2048", "ES256": "EC P-256"}

_RSA_KEY_BITS: Final = 2048
_JWKS_CACHE_CONTROL: Final = "max-age=300"
_MAX_MINT_BODY_BYTES: Final = 64 * 1024

SigningKey = RSAKey | ECKey


class DevIssuer:
    """A development issuer: one ``iss``, one signing key, a published JWK set.

    Construct it with :meth:`ephemeral` (key in memory, for tests),
    :meth:`load_or_create` (key persisted so another process signs with the
    same key the server publishes) or :meth:`serve_ephemeral` (an issuer whose
    ``iss`` is the URL it is served at).  Every ``*_token`` method takes
    ``now`` so tests control time, and ``**extra`` claims that are merged
    last: they add or override claims, and a claim given as ``None`` is
    removed (to craft, say, a Kubernetes token without ``exp``).
    """

    def __init__(self, issuer_url: str, key: SigningKey, alg: str | None = None) -> None:
        if not issuer_url:
            raise ValueError("issuer_url must not be empty")
        algorithm = alg if alg is not None else _default_algorithm(key)
        _check_signing_key(key, algorithm)
        self._issuer_url = issuer_url
        self._alg = algorithm
        self._signing_key = _with_jwk_parameters(key, algorithm)
        self._published: tuple[SigningKey, ...] = (self._signing_key,)
        self._lock = threading.Lock()
        self._jwks_requests = 0

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def ephemeral(cls, issuer_url: str, alg: str = "RS256") -> Self:
        """An issuer with a fresh in-memory key (tests)."""
        return cls(issuer_url, _generate_key(alg), alg)

    @classmethod
    def load_or_create(cls, key_dir: Path, issuer_url: str, alg: str = "RS256") -> Self:
        """An issuer whose private key lives in ``key_dir/signing-key-<alg>.pem`` (PEM, mode 0600).

        The key is created on first use.  Creation is atomic (write a private
        temporary file, then hard-link it into place), so two processes
        starting together end up with the same key rather than a torn file.
        """
        _algorithm_key_type(alg)
        path = key_dir / f"signing-key-{alg.lower()}.pem"
        if not path.exists():
            key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_new_private_file(path, _generate_key(alg).as_pem(private=True))
        return cls(issuer_url, _load_private_key(path, alg), alg)

    @classmethod
    def serve_ephemeral(
        cls, *, alg: str = "RS256", host: str = "127.0.0.1", port: int = 0, mint_endpoints: bool = True
    ) -> RunningServer:
        """Serve a fresh in-memory issuer whose ``iss`` is its own base URL.

        With ``port=0`` the URL is only known once the socket is bound, so the
        server is bound first and the issuer created for the URL it got; the
        discovery document's ``issuer`` then matches the URL it is fetched
        from, as OpenID Connect Discovery requires.
        """
        require_loopback_host(host)
        server = make_server(host, port, _not_ready_app, threaded=True)
        issuer = cls(_base_url(host, server.server_port), _generate_key(alg), alg)
        server.app = issuer.wsgi_app(mint_endpoints=mint_endpoints)
        return RunningServer(server, issuer, host)

    # -- keys ---------------------------------------------------------------------------------

    @property
    def issuer_url(self) -> str:
        return self._issuer_url

    @property
    def alg(self) -> str:
        return self._alg

    @property
    def kid(self) -> str:
        """The current signing key's ``kid`` (its RFC 7638 thumbprint)."""
        return _key_id(self._signing_key)

    @property
    def jwks_requests(self) -> int:
        """How many times the JWK set was served over HTTP (for cache tests)."""
        with self._lock:
            return self._jwks_requests

    def jwks(self) -> KeySetSerialization:
        """The public JWK set, RFC 7517 §5: ``{"keys": [...]}`` with no private members.

        A plain dict, ready for ``json.dumps`` or ``KeySet.import_key_set``.
        """
        with self._lock:
            published = self._published
        return {"keys": [key.as_dict(private=False) for key in published]}

    def rotate_key(self, *, keep_previous: bool = True) -> str:
        """Start signing with a fresh key (in memory only) and return its ``kid``.

        With ``keep_previous`` the old public key stays in the JWK set, as in
        a real overlap period; without it the old key disappears at once, so
        tokens already issued stop verifying after a JWKS refetch.
        """
        new_key = _with_jwk_parameters(_generate_key(self._alg), self._alg)
        with self._lock:
            self._published = (new_key, *self._published) if keep_previous else (new_key,)
            self._signing_key = new_key
        return _key_id(new_key)

    # -- minting ------------------------------------------------------------------------------

    def mint(
        self,
        claims: Mapping[str, Any],
        *,
        header: Mapping[str, Any] | None = None,
        alg: str | None = None,
        key: Key | None = None,
    ) -> str:
        """Sign exactly ``claims`` (nothing added) -- the raw tool for crafting bad tokens.

        The protected header is ``{"alg", "kid"}``; ``header`` is merged over
        it (``{"typ": "at+jwt"}``, ``{"jku": ...}``; a value of ``None``
        removes a member, e.g. ``{"kid": None}``).  Names listed in a ``crit``
        header are accepted so tests can send unknown critical headers.
        ``key`` signs with some other key (an attacker's, one not in the JWK
        set); its ``kid`` is then that key's thumbprint.  ``alg`` defaults to
        this issuer's algorithm, or to the natural one for ``key``.
        """
        with self._lock:
            signing_key: Key = key if key is not None else self._signing_key
        algorithm = alg if alg is not None else _default_algorithm(signing_key)
        protected: dict[str, Any] = {"alg": algorithm, "kid": _key_id(signing_key)}
        for name, value in (header or {}).items():
            if name == "alg":
                raise ValueError("set the algorithm with alg=..., not through header")
            if value is None:
                protected.pop(name, None)
            else:
                protected[name] = value
        critical = protected.get("crit", [])
        registry = JWSRegistry(
            header_registry={
                name: HeaderParameter("test-only critical header", _accept_any) for name in critical
            },
            algorithms=[algorithm],
            strict_check_header=False,
        )
        return jwt.encode(
            protected, dict(claims), signing_key, algorithms=[algorithm], registry=registry, default_type=None
        )

    def github_actions_token(
        self,
        *,
        audience: str,
        repository: str = "acme/app",
        repository_id: str = "123456",
        owner: str = "acme",
        owner_id: str = "7890",
        ref: str = "refs/heads/main",
        environment: str | None = None,
        event_name: str = "push",
        runner_environment: str = "github-hosted",
        workflow: str = "deploy.yml",
        actor: str = "octocat",
        actor_id: str = "583231",
        repository_visibility: str = "private",
        immutable_sub: bool = False,
        now: float | None = None,
        lifetime: int = 300,
        **extra: Any,
    ) -> str:
        """A GitHub Actions OIDC token (header ``typ: JWT``; ids are strings).

        ``sub`` follows GitHub's precedence: ``repo:OWNER/REPO:environment:ENV``
        when the job targets an environment, else ``repo:OWNER/REPO:pull_request``
        for ``pull_request`` events, else ``repo:OWNER/REPO:ref:REF``.  With
        ``immutable_sub`` the prefix is ``repo:OWNER@OWNER_ID/REPO@REPO_ID``.
        """
        owner_part, slash, repo_name = repository.partition("/")
        if not slash or not owner_part or not repo_name:
            raise ValueError("repository must be OWNER/REPO")
        prefix = (
            f"repo:{owner}@{owner_id}/{repo_name}@{repository_id}" if immutable_sub else f"repo:{repository}"
        )
        if environment is not None:
            sub = f"{prefix}:environment:{environment}"
        elif event_name == "pull_request":
            sub = f"{prefix}:pull_request"
        else:
            sub = f"{prefix}:ref:{ref}"
        iat, exp = _lifetime(now, lifetime)
        sha = secrets.token_hex(20)
        workflow_ref = f"{repository}/.github/workflows/{workflow}@{ref}"
        claims: dict[str, Any] = {
            "jti": str(uuid.uuid4()),
            "sub": sub,
            "aud": audience,
            "ref": ref,
            "sha": sha,
            "repository": repository,
            "repository_owner": owner,
            "repository_owner_id": owner_id,
            "repository_id": repository_id,
            "repository_visibility": repository_visibility,
            "run_id": str(1_000_000_000 + secrets.randbelow(9_000_000_000)),
            "run_number": "42",
            "run_attempt": "1",
            "runner_environment": runner_environment,
            "actor": actor,
            "actor_id": actor_id,
            "workflow": workflow,
            "head_ref": "",
            "base_ref": "",
            "event_name": event_name,
            "ref_type": "tag" if ref.startswith("refs/tags/") else "branch",
            "workflow_ref": workflow_ref,
            "workflow_sha": sha,
            "job_workflow_ref": workflow_ref,
            "job_workflow_sha": sha,
            "iss": self._issuer_url,
            "nbf": iat,
            "exp": exp,
            "iat": iat,
        }
        if environment is not None:
            claims["environment"] = environment
        return self.mint(_merge_claims(claims, extra), header={"typ": "JWT"})

    def kubernetes_token(
        self,
        *,
        audience: str | list[str],
        namespace: str = "payments",
        service_account: str = "api",
        pod: str | None = "api-7d9f",
        node: str = "node-a",
        service_account_uid: str | None = None,
        pod_uid: str | None = None,
        now: float | None = None,
        lifetime: int = 600,
        warnafter: int | None = None,
        **extra: Any,
    ) -> str:
        """A Kubernetes projected service-account token (TokenRequest API).

        No ``typ`` header, as real clusters send.  ``aud`` is always a list.
        Object uids are stable per name (so two tokens for one service account
        agree) unless given; pass a new ``service_account_uid`` to model a
        service account deleted and re-created under the same name.
        ``pod=None`` gives a token bound to no pod (``kubectl create token``).
        ``warnafter`` is an absolute timestamp: set it (with a long
        ``lifetime``) to model a cluster that silently extended the expiry.
        """
        iat, exp = _lifetime(now, lifetime)
        details: dict[str, Any] = {
            "namespace": namespace,
            "serviceaccount": {
                "name": service_account,
                "uid": service_account_uid or self._stable_uid("serviceaccount", namespace, service_account),
            },
        }
        if pod is not None:
            details["pod"] = {"name": pod, "uid": pod_uid or self._stable_uid("pod", namespace, pod)}
            details["node"] = {"name": node, "uid": self._stable_uid("node", "", node)}
        if warnafter is not None:
            details["warnafter"] = warnafter
        claims: dict[str, Any] = {
            "aud": [audience] if isinstance(audience, str) else list(audience),
            "exp": exp,
            "iat": iat,
            "iss": self._issuer_url,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": details,
            "nbf": iat,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        return self.mint(_merge_claims(claims, extra))

    def gitlab_token(
        self,
        *,
        audience: str,
        project_path: str = "acme/app",
        project_id: str = "4242",
        namespace_id: str = "77",
        ref: str = "main",
        ref_type: str = "branch",
        ref_protected: bool = True,
        pipeline_source: str = "push",
        environment: str | None = None,
        runner_environment: str = "gitlab-hosted",
        user_login: str = "dev-user",
        user_id: str = "1001",
        now: float | None = None,
        lifetime: int = 300,
        **extra: Any,
    ) -> str:
        """A GitLab CI ``id_tokens`` token (header ``typ: JWT``; ids are strings).

        ``sub`` is ``project_path:GROUP/PROJECT:ref_type:TYPE:ref:REF``.  For a
        merge request from a fork, pass the fork's ``project_path`` and
        ``project_id``: real GitLab names the fork there too.
        """
        namespace_path, slash, _ = project_path.rpartition("/")
        if not slash or not namespace_path:
            raise ValueError("project_path must be GROUP/PROJECT")
        iat, exp = _lifetime(now, lifetime)
        sha = secrets.token_hex(20)
        ref_path = f"refs/tags/{ref}" if ref_type == "tag" else f"refs/heads/{ref}"
        instance_host = urlsplit(self._issuer_url).netloc
        claims: dict[str, Any] = {
            "namespace_id": namespace_id,
            "namespace_path": namespace_path,
            "project_id": project_id,
            "project_path": project_path,
            "user_id": user_id,
            "user_login": user_login,
            "pipeline_id": str(100_000 + secrets.randbelow(900_000)),
            "pipeline_source": pipeline_source,
            "job_id": str(1_000_000 + secrets.randbelow(9_000_000)),
            "ref": ref,
            "ref_type": ref_type,
            "ref_path": ref_path,
            "ref_protected": "true" if ref_protected else "false",
            "runner_id": 1,
            "runner_environment": runner_environment,
            "sha": sha,
            "project_visibility": "private",
            "ci_config_ref_uri": f"{instance_host}/{project_path}//.gitlab-ci.yml@{ref_path}",
            "ci_config_sha": sha,
            "jti": str(uuid.uuid4()),
            "iss": self._issuer_url,
            "iat": iat,
            # GitLab back-dates nbf by a few seconds for clock skew.
            "nbf": iat - 5,
            "exp": exp,
            "sub": f"project_path:{project_path}:ref_type:{ref_type}:ref:{ref}",
            "aud": audience,
        }
        if environment is not None:
            claims["environment"] = environment
            claims["environment_protected"] = "false"
        return self.mint(_merge_claims(claims, extra), header={"typ": "JWT"})

    def spiffe_svid(
        self,
        spiffe_id: str,
        audience: str | list[str],
        *,
        now: float | None = None,
        lifetime: int = 300,
        **extra: Any,
    ) -> str:
        """A SPIFFE JWT-SVID: ``sub`` is the SPIFFE ID, ``aud`` a list, ``exp`` and ``iat``; ``typ: JWT``.

        No ``iss``, as SPIRE sends by default; add one through ``extra``.
        """
        parts = urlsplit(spiffe_id)
        if parts.scheme != "spiffe" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError("spiffe_id must look like spiffe://trust-domain/path")
        iat, exp = _lifetime(now, lifetime)
        claims: dict[str, Any] = {
            "sub": spiffe_id,
            "aud": [audience] if isinstance(audience, str) else list(audience),
            "exp": exp,
            "iat": iat,
        }
        return self.mint(_merge_claims(claims, extra), header={"typ": "JWT"})

    def _stable_uid(self, kind: str, namespace: str, name: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self._issuer_url}#{kind}/{namespace}/{name}"))

    # -- HTTP ---------------------------------------------------------------------------------

    def wsgi_app(self, *, mint_endpoints: bool = True) -> WSGIApplication:
        """The issuer as a WSGI app (see the module docstring for the routes).

        ``jwks_uri`` in the discovery document is built from the request's
        own host, so it points at this server even when ``iss`` names a real
        issuer (``https://token.actions.githubusercontent.com``).  That trusts
        the ``Host`` header, which is acceptable only because this is a
        loopback development tool.  ``mint_endpoints=False`` drops the
        ``/mint/*`` routes.
        """
        rules = [
            Rule("/.well-known/openid-configuration", endpoint="discovery", methods=["GET"]),
            Rule("/.well-known/jwks", endpoint="jwks", methods=["GET"]),
            Rule("/openid/v1/jwks", endpoint="jwks", methods=["GET"]),
        ]
        if mint_endpoints:
            rules.extend(
                Rule(f"/mint/{kind}", endpoint=f"mint/{kind}", methods=["POST"]) for kind in _MINT_ENDPOINTS
            )
        url_map = Map(rules)

        @Request.application
        def application(request: Request) -> Response:
            request.max_content_length = _MAX_MINT_BODY_BYTES
            adapter = url_map.bind_to_environ(request.environ)
            try:
                endpoint, _ = adapter.match()
            except HTTPException as error:
                return _json_response(
                    {"error": (error.name or "error").lower().replace(" ", "_")},
                    status=error.code or 500,
                    headers=dict(error.get_headers()),
                )
            if endpoint == "discovery":
                return _json_response(
                    self._discovery_document(request.host_url), cache_control=_JWKS_CACHE_CONTROL
                )
            if endpoint == "jwks":
                with self._lock:
                    self._jwks_requests += 1
                return _json_response(self.jwks(), cache_control=_JWKS_CACHE_CONTROL)
            return self._handle_mint(request, _MINT_ENDPOINTS[endpoint.removeprefix("mint/")])

        return application

    def serve_in_thread(
        self, host: str = "127.0.0.1", port: int = 0, *, mint_endpoints: bool = True
    ) -> RunningServer:
        """Serve this issuer from a background thread; ``port=0`` picks a free port.

        Refuses (``ValueError``) any host that is not a loopback address: the
        mint endpoints hand out arbitrary identities.
        """
        require_loopback_host(host)
        server = make_server(host, port, self.wsgi_app(mint_endpoints=mint_endpoints), threaded=True)
        return RunningServer(server, self, host)

    def _discovery_document(self, host_url: str) -> dict[str, Any]:
        return {
            "issuer": self._issuer_url,
            "jwks_uri": f"{host_url}.well-known/jwks",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self._alg],
        }

    def _handle_mint(self, request: Request, endpoint: _MintEndpoint) -> Response:
        if request.mimetype != "application/json":
            return _mint_error(415, "send Content-Type: application/json")
        body = request.get_json(silent=True) if request.get_data(cache=True) else {}
        if not isinstance(body, dict):
            return _mint_error(400, "the body must be a JSON object")
        arguments = {name: value for name, value in body.items() if name != "claims"}
        unknown = sorted(set(arguments) - set(endpoint.parameters))
        if unknown:
            return _mint_error(400, f"unknown parameters {unknown}; put extra claims under 'claims'")
        missing = sorted(endpoint.required - set(arguments))
        if missing:
            return _mint_error(400, f"missing parameters {missing}")
        for name, value in arguments.items():
            if not endpoint.parameters[name](value):
                return _mint_error(400, f"parameter {name!r} has the wrong type")
        extra = body.get("claims", {})
        if not isinstance(extra, dict):
            return _mint_error(400, "'claims' must be a JSON object")
        # A claim named like a parameter (or "self") would bind to that parameter instead.
        clashing = sorted(set(extra) & {*endpoint.parameters, "self"})
        if clashing:
            return _mint_error(400, f"set {clashing} as top-level parameters, not under 'claims'")
        try:
            token = endpoint.mint(self, {**arguments, **extra})
        except ValueError as error:
            # Only this module's own messages ("repository must be OWNER/REPO") reach here.
            return _mint_error(400, str(error))
        return _json_response({"token": token}, cache_control="no-store")


class RunningServer:
    """A dev issuer served from a daemon thread; a context manager that stops it on exit."""

    def __init__(self, server: BaseWSGIServer, issuer: DevIssuer, host: str) -> None:
        self._server = server
        self.issuer = issuer
        self.host = host
        self.port: int = server.server_port
        self.url = _base_url(host, self.port)
        self._stopped = False
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"dev-issuer:{self.port}",
            daemon=True,
        )
        self._thread.start()

    @property
    def discovery_url(self) -> str:
        return f"{self.url}/.well-known/openid-configuration"

    @property
    def jwks_uri(self) -> str:
        return f"{self.url}/.well-known/jwks"

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def require_loopback_host(host: str) -> None:
    """Raise ``ValueError`` unless ``host`` is a loopback address (or ``localhost`` resolving only to one)."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        if host == "localhost":
            try:
                infos = socket.getaddrinfo(host, None)
            except socket.gaierror as error:
                raise ValueError("'localhost' does not resolve") from error
            if infos and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos):
                return
    raise ValueError(
        f"the dev issuer only binds to loopback addresses, not {host!r}: it is a development tool"
    )


# -- mint endpoint table --------------------------------------------------------------------------


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_optional_str(value: object) -> bool:
    return value is None or isinstance(value, str)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_optional_int(value: object) -> bool:
    return value is None or _is_int(value)


def _is_optional_number(value: object) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _is_audience(value: object) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(item, str) for item in value)
    )


@dataclass(frozen=True)
class _MintEndpoint:
    parameters: Mapping[str, Callable[[object], bool]]
    required: frozenset[str]
    mint: Callable[[DevIssuer, dict[str, Any]], str]


_TIME_PARAMETERS: Final[Mapping[str, Callable[[object], bool]]] = {
    "now": _is_optional_number,
    "lifetime": _is_int,
}

_MINT_ENDPOINTS: Final[Mapping[str, _MintEndpoint]] = {
    "github-actions": _MintEndpoint(
        parameters={
            "audience": _is_str,
            "repository": _is_str,
            "repository_id": _is_str,
            "owner": _is_str,
            "owner_id": _is_str,
            "ref": _is_str,
            "environment": _is_optional_str,
            "event_name": _is_str,
            "runner_environment": _is_str,
            "workflow": _is_str,
            "actor": _is_str,
            "actor_id": _is_str,
            "repository_visibility": _is_str,
            "immutable_sub": _is_bool,
            **_TIME_PARAMETERS,
        },
        required=frozenset({"audience"}),
        mint=lambda issuer, arguments: issuer.github_actions_token(**arguments),
    ),
    "kubernetes": _MintEndpoint(
        parameters={
            "audience": _is_audience,
            "namespace": _is_str,
            "service_account": _is_str,
            "pod": _is_optional_str,
            "node": _is_str,
            "service_account_uid": _is_optional_str,
            "pod_uid": _is_optional_str,
            "warnafter": _is_optional_int,
            **_TIME_PARAMETERS,
        },
        required=frozenset({"audience"}),
        mint=lambda issuer, arguments: issuer.kubernetes_token(**arguments),
    ),
    "gitlab": _MintEndpoint(
        parameters={
            "audience": _is_str,
            "project_path": _is_str,
            "project_id": _is_str,
            "namespace_id": _is_str,
            "ref": _is_str,
            "ref_type": _is_str,
            "ref_protected": _is_bool,
            "pipeline_source": _is_str,
            "environment": _is_optional_str,
            "runner_environment": _is_str,
            "user_login": _is_str,
            "user_id": _is_str,
            **_TIME_PARAMETERS,
        },
        required=frozenset({"audience"}),
        mint=lambda issuer, arguments: issuer.gitlab_token(**arguments),
    ),
    "spiffe": _MintEndpoint(
        parameters={"spiffe_id": _is_str, "audience": _is_audience, **_TIME_PARAMETERS},
        required=frozenset({"spiffe_id", "audience"}),
        mint=lambda issuer, arguments: issuer.spiffe_svid(**arguments),
    ),
}


# -- helpers ---------------------------------------------------------------------------------------


def _mint_error(status: int, description: str) -> Response:
    return _json_response({"error": "invalid_request", "error_description": description}, status=status)


def _json_response(
    body: Mapping[str, Any],
    *,
    status: int = 200,
    cache_control: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    response = Response(
        json.dumps(body), status=status, mimetype="application/json", headers=dict(headers or {})
    )
    response.headers["Content-Type"] = "application/json"
    if cache_control is not None:
        response.headers["Cache-Control"] = cache_control
    return response


def _not_ready_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"dev issuer starting\n"]


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _lifetime(now: float | None, lifetime: int) -> tuple[int, int]:
    issued_at = int(time.time() if now is None else now)
    return issued_at, issued_at + lifetime


def _merge_claims(claims: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**claims, **extra}
    return {name: value for name, value in merged.items() if value is not None}


def _accept_any(value: Any) -> None:
    return None


def _key_id(key: Key) -> str:
    return key.kid or key.thumbprint()


def _algorithm_key_type(alg: str) -> type[SigningKey]:
    if alg == "RS256":
        return RSAKey
    if alg == "ES256":
        return ECKey
    raise ValueError(f"unsupported dev issuer algorithm {alg!r}; use one of {sorted(SUPPORTED_ALGORITHMS)}")


def _generate_key(alg: str) -> SigningKey:
    if _algorithm_key_type(alg) is RSAKey:
        return RSAKey.generate_key(_RSA_KEY_BITS)
    return ECKey.generate_key("P-256")


def _default_algorithm(key: Key) -> str:
    if isinstance(key, RSAKey):
        return "RS256"
    if isinstance(key, ECKey):
        by_curve = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
        if key.curve_name in by_curve:
            return by_curve[key.curve_name]
    if isinstance(key, OctKey):
        return "HS256"
    raise ValueError("cannot infer the algorithm for this key; pass alg=...")


def _check_signing_key(key: SigningKey, alg: str) -> None:
    if not isinstance(key, _algorithm_key_type(alg)):
        raise ValueError(f"{alg} needs a {SUPPORTED_ALGORITHMS[alg]} key")
    if not key.is_private:
        raise ValueError("the dev issuer needs a private key")
    if isinstance(key, RSAKey) and key.raw_value.key_size < _RSA_KEY_BITS:
        raise ValueError(f"RSA keys under {_RSA_KEY_BITS} bits are refused (RFC 8725 §3.5)")
    if isinstance(key, ECKey) and key.curve_name != "P-256":
        raise ValueError("ES256 needs a P-256 key")


def _with_jwk_parameters(key: SigningKey, alg: str) -> SigningKey:
    """A copy of ``key`` carrying ``alg``, ``use: sig`` and ``kid`` = RFC 7638 thumbprint."""
    parameters: KeyParameters = {"alg": alg, "use": "sig", "kid": key.thumbprint()}
    pem = key.as_pem(private=True)
    copy: SigningKey = (
        RSAKey.import_key(pem, parameters) if isinstance(key, RSAKey) else ECKey.import_key(pem, parameters)
    )
    return copy


def _load_private_key(path: Path, alg: str) -> SigningKey:
    pem = path.read_bytes()
    key_type = _algorithm_key_type(alg)
    try:
        key: SigningKey = key_type.import_key(pem)
    except ValueError as error:
        raise ValueError(f"{path} does not hold a {SUPPORTED_ALGORITHMS[alg]} private key") from error
    if not key.is_private:
        raise ValueError(f"{path} holds a public key; the dev issuer needs the private key")
    return key


def _write_new_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 holding ``data``, unless it already exists.

    The data goes to a private temporary file first and is hard-linked into
    place, which fails if another process got there first; either way the
    final file is complete when it appears.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        # The umask may have narrowed the mode; make it exactly owner read/write.
        os.fchmod(handle.fileno(), 0o600)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
