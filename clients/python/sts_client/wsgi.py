"""Plain WSGI middleware (PEP 3333): protect path prefixes of any WSGI application.

::

    from sts_client import TokenVerifier
    from sts_client.wsgi import ProtectedPath, TokenMiddleware

    verifier = TokenVerifier("https://sts.example.com", "https://deploy.example.com")
    application = TokenMiddleware(application, verifier, [
        ProtectedPath("/api", scopes=("deploy:read",)),
        ProtectedPath("/api/releases", scopes=("deploy:write",), max_age=300),
    ])

The longest matching prefix decides (a prefix matches whole path segments:
``/api`` covers ``/api`` and ``/api/x``, not ``/apix``); paths under no prefix
pass untouched.  A verified token is put in
``environ["sts_client.token"]`` for the application; a refused request gets
the status, ``WWW-Authenticate`` challenge(s) and a JSON error body and never
reaches the application.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit
from wsgiref.util import request_uri

from .certificate import ClientCertificate
from .dpop import request_target_url
from .errors import VerificationError
from .verifier import TokenVerifier

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ENVIRON_KEY", "ProtectedPath", "TokenMiddleware", "environ_certificate"]

#: Where the :class:`~sts_client.verifier.VerifiedAccessToken` is put in the WSGI environ.
ENVIRON_KEY: Final = "sts_client.token"

_REASONS: Final = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 503: "Service Unavailable"}


#: RFC 3986 §3.2.2-3.2.3: an IP literal or a reg-name (unreserved, percent-encoded, sub-delims),
#: then an optional port; no userinfo, and none of ``/?#`` that would end the authority.
_AUTHORITY: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{0,5})?")


@dataclass(frozen=True)
class ProtectedPath:
    """A path prefix and what it needs: scopes, attestation no older than ``max_age`` seconds, and
    one of the assurance levels ``acr_values`` (or a higher one; RFC 9470).

    The prefix is matched against the request's whole path, ``SCRIPT_NAME`` + ``PATH_INFO``:
    under a dispatcher that mounts the application at ``/mw``, protect ``/mw/api``, not ``/api``
    (which would match nothing there, and leave ``/mw/api`` open)."""

    prefix: str
    scopes: tuple[str, ...] = ()
    max_age: int | None = None
    acr_values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/"):
            raise ValueError(f"a path prefix starts with '/': {self.prefix!r}")
        object.__setattr__(self, "prefix", self.prefix.rstrip("/") or "/")

    def matches(self, path: str) -> bool:
        if self.prefix == "/":
            return True
        return path == self.prefix or path.startswith(self.prefix + "/")


def _headers_of(environ: WSGIEnvironment) -> list[tuple[str, str]]:
    """The request headers a verifier needs, from the CGI-style environ (PEP 3333)."""
    pairs = []
    for key, name in (("HTTP_AUTHORIZATION", "Authorization"), ("HTTP_DPOP", "DPoP")):
        value = environ.get(key)
        if value is not None:
            pairs.append((name, str(value)))
    return pairs


class TokenMiddleware:
    """Verify tokens for requests under the protected prefixes; pass everything else through."""

    def __init__(
        self,
        app: WSGIApplication,
        verifier: TokenVerifier,
        paths: Iterable[ProtectedPath | str],
        *,
        url: Callable[[WSGIEnvironment], str] | None = None,
        client_certificate: Callable[[WSGIEnvironment], ClientCertificate | None] | None = None,
    ) -> None:
        self.app = app
        self.verifier = verifier
        protected = [p if isinstance(p, ProtectedPath) else ProtectedPath(p) for p in paths]
        # Longest prefix first, so the most specific rule decides.
        self.paths = sorted(protected, key=lambda p: len(p.prefix), reverse=True)
        self._url = url
        #: The request's mutual-TLS client certificate, for certificate-bound tokens (RFC 8705 §3):
        #: by default ``SSL_CLIENT_CERT`` of the environ, which a server sets and a client cannot.
        self._certificate = client_certificate or environ_certificate

    def _rule_for(self, path: str) -> ProtectedPath | None:
        return next((rule for rule in self.paths if rule.matches(path)), None)

    @staticmethod
    def _target(environ: WSGIEnvironment) -> str:
        """The request's URL for ``htu``: the path as the client sent it where the server says so
        (:func:`~sts_client.dpop.request_target_url`), else rebuilt from the decoded ``PATH_INFO``.

        The authority is the ``Host`` header only when it is one (RFC 3986 §3.2: a host and a
        port, nothing more): servers such as granian and wsgiref pass any ``Host`` on, and
        :func:`wsgiref.util.request_uri` pastes it in as it is, so ``Host: api.example/y#`` made
        ``/admin``'s URL read as ``/y`` and a proof for ``/y`` passed there (an outside audit).
        Any other ``Host`` is ignored: the server's own ``SERVER_NAME`` and ``SERVER_PORT`` stand
        in, as for a request without one (PEP 3333's URL reconstruction)."""
        host = environ.get("HTTP_HOST")
        if host is not None and not _AUTHORITY.fullmatch(str(host)):
            environ = {**environ, "HTTP_HOST": ""}
        rebuilt = request_uri(environ, include_query=False)
        parts = urlsplit(rebuilt)
        # PEP 3333: the decoded path's bytes, as latin-1; the client's text is UTF-8.
        whole = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
        try:
            path = whole.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return rebuilt
        return request_target_url(f"{parts.scheme}://{parts.netloc}", environ, path) or rebuilt

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
        rule = self._rule_for(path or "/")
        if rule is None:
            return self.app(environ, start_response)
        url = self._url(environ) if self._url is not None else self._target(environ)
        try:
            environ[ENVIRON_KEY] = self.verifier.verify(
                str(environ.get("REQUEST_METHOD", "GET")),
                url,
                _headers_of(environ),
                scopes=rule.scopes,
                max_age=rule.max_age,
                acr_values=rule.acr_values,
                client_certificate=self._certificate(environ),
            )
        except VerificationError as error:
            return _refuse(error, start_response)
        nonce = environ[ENVIRON_KEY].dpop_nonce
        if nonce is None:
            return self.app(environ, start_response)

        def with_nonce(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            # RFC 9449 §9: a fresher nonce for the client's next proof.
            return start_response(status, [*headers, ("DPoP-Nonce", nonce)], exc_info)

        return self.app(environ, with_nonce)


def environ_certificate(environ: WSGIEnvironment) -> ClientCertificate | None:
    """The client certificate the server put in the environ (``SSL_CLIENT_CERT``, PEM), if any."""
    value = environ.get("SSL_CLIENT_CERT")
    return value if isinstance(value, str | bytes) and value else None


def _refuse(error: VerificationError, start_response: StartResponse) -> list[bytes]:
    body = json.dumps(error.body()).encode()
    headers: list[tuple[str, Any]] = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        *error.headers(),
    ]
    start_response(f"{error.status} {_REASONS.get(error.status, 'Error')}", headers)
    return [body]
