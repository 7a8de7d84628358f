"""A fake upstream workload-token issuer.  DEVELOPMENT ONLY -- NEVER TRUST IT IN PRODUCTION.

**Anyone who can reach this issuer, or read its key file, can mint any
workload identity.**  An STS that trusts it grants tokens to whoever asks.
Use it for the README quickstart and the test suite, never in a deployment.

It plays the upstream issuers the STS attests (see "Real workload tokens" in
the project standards): GitHub Actions, Kubernetes projected service-account
tokens, GitLab CI ``id_tokens`` and SPIFFE JWT-SVIDs
(:mod:`sts.dev.platform_tokens`), plus any generic OIDC issuer through
:meth:`DevIssuer.mint`.  The tokens are signed with an RS256 (RSA 2048) or
ES256 key (:mod:`sts.dev.issuer_keys`) whose public half is served as a real
JWKS over HTTP, with discovery and, as an insecure convenience for ``curl``,
``POST /mint/<kind>`` endpoints (:mod:`sts.dev.issuer_http`).
:meth:`DevIssuer.serve_in_thread` refuses to bind anything but a loopback
address.

Tokens are built with joserfc, always with an explicit one-element
algorithm list; ``kid`` is the key's RFC 7638 thumbprint.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from joserfc import jwt
from joserfc.jwk import Key, KeySetSerialization
from joserfc.jws import JWSRegistry
from joserfc.registry import HeaderParameter
from werkzeug.serving import BaseWSGIServer, make_server

from .issuer_http import ServedIssuer, issuer_wsgi_app, not_ready_app
from .issuer_keys import (
    SigningKey,
    check_signing_key,
    default_algorithm,
    generate_key,
    key_id,
    load_or_create_key,
    with_jwk_parameters,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

__all__ = [
    "DEFAULT_ISSUER_URL",
    "DEFAULT_KEY_DIR",
    "DevIssuer",
    "RunningServer",
    "require_loopback_host",
]

#: Where ``sts dev`` keeps the dev issuer's private key (``/keys/*`` is git-ignored).
DEFAULT_KEY_DIR: Final = Path("keys/dev-issuer")
#: The issuer URL the quickstart serves the dev issuer at.
DEFAULT_ISSUER_URL: Final = "http://127.0.0.1:8081"


class DevIssuer(ServedIssuer):
    """A development issuer: one ``iss``, one signing key, a published JWK set.

    Construct it with :meth:`ephemeral` (key in memory, for tests),
    :meth:`load_or_create` (key persisted so another process signs with the
    same key the server publishes) or :meth:`serve_ephemeral` (an issuer whose
    ``iss`` is the URL it is served at).  The ``*_token`` methods come from
    :class:`~sts.dev.platform_tokens.PlatformTokens`; :meth:`mint` signs
    anything.
    """

    def __init__(self, issuer_url: str, key: SigningKey, alg: str | None = None) -> None:
        if not issuer_url:
            raise ValueError("issuer_url must not be empty")
        algorithm = alg if alg is not None else default_algorithm(key)
        check_signing_key(key, algorithm)
        self._issuer_url = issuer_url
        self._alg = algorithm
        self._signing_key = with_jwk_parameters(key, algorithm)
        self._published: tuple[SigningKey, ...] = (self._signing_key,)
        self._lock = threading.Lock()
        self._jwks_requests = 0

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def ephemeral(cls, issuer_url: str, alg: str = "RS256") -> Self:
        """An issuer with a fresh in-memory key (tests)."""
        return cls(issuer_url, generate_key(alg), alg)

    @classmethod
    def load_or_create(cls, key_dir: Path, issuer_url: str, alg: str = "RS256") -> Self:
        """An issuer whose private key lives in ``key_dir/signing-key-<alg>.pem`` (PEM, mode 0600).

        The key is created on first use.  Creation is atomic (write a private
        temporary file, then hard-link it into place), so two processes
        starting together end up with the same key rather than a torn file.
        """
        return cls(issuer_url, load_or_create_key(key_dir, alg), alg)

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
        server = make_server(host, port, not_ready_app, threaded=True)
        issuer = cls(_base_url(host, server.server_port), generate_key(alg), alg)
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
        return key_id(self._signing_key)

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

    def count_jwks_request(self) -> None:
        """Count one JWK set served over HTTP (see :attr:`jwks_requests`)."""
        with self._lock:
            self._jwks_requests += 1

    def rotate_key(self, *, keep_previous: bool = True) -> str:
        """Start signing with a fresh key (in memory only) and return its ``kid``.

        With ``keep_previous`` the old public key stays in the JWK set, as in
        a real overlap period; without it the old key disappears at once, so
        tokens already issued stop verifying after a JWKS refetch.
        """
        new_key = with_jwk_parameters(generate_key(self._alg), self._alg)
        with self._lock:
            self._published = (new_key, *self._published) if keep_previous else (new_key,)
            self._signing_key = new_key
        return key_id(new_key)

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
        algorithm = alg if alg is not None else default_algorithm(signing_key)
        protected: dict[str, Any] = {"alg": algorithm, "kid": key_id(signing_key)}
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

    # -- HTTP ---------------------------------------------------------------------------------

    def wsgi_app(self, *, mint_endpoints: bool = True) -> WSGIApplication:
        """The issuer as a WSGI app (:func:`sts.dev.issuer_http.issuer_wsgi_app`).

        ``mint_endpoints=False`` drops the ``/mint/*`` routes.
        """
        return issuer_wsgi_app(self, mint_endpoints=mint_endpoints)

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


def _accept_any(value: Any) -> None:
    return None


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
