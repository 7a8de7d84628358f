"""Flask integration: ``@require_token``.  Needs the extra: ``pip install workload-sts-client[flask]``.

::

    from flask import Flask, g
    from sts_client import TokenVerifier
    from sts_client.flask import require_token

    app = Flask(__name__)
    verifier = TokenVerifier("https://sts.example.com", "https://deploy.example.com")

    @app.post("/releases")
    @require_token(verifier, scopes="deploy:write", max_age=300)
    def create_release():
        return {"by": g.token.subject}

A refused request never reaches the view: it gets the status, the
``WWW-Authenticate`` challenge(s) and a JSON error body from
:class:`~sts_client.errors.VerificationError`.  The URL compared with a DPoP
proof's ``htu`` is ``request.url``; behind a TLS-terminating proxy use
werkzeug's ``ProxyFix`` (or pass ``url=``) so it is the URL the client used.

This is the only module of the package that imports Flask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

try:
    import flask
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("sts_client.flask needs Flask: pip install 'workload-sts-client[flask]'") from exc

from .certificate import ClientCertificate
from .dpop import request_target_url
from .errors import VerificationError
from .verifier import TokenVerifier

__all__ = ["environ_certificate", "error_response", "require_token"]

F = TypeVar("F", bound=Callable[..., Any])


def error_response(error: VerificationError) -> flask.Response:
    """The answer to a refused request: status, challenge headers, JSON body."""
    response = flask.jsonify(error.body())
    response.status_code = error.status
    for name, value in error.headers():
        response.headers.add(name, value)
    return response


def require_token(
    verifier: TokenVerifier,
    scopes: str | Iterable[str] = (),
    max_age: int | None = None,
    *,
    acr_values: str | Iterable[str] | None = None,
    url: Callable[[flask.Request], str] | None = None,
    client_certificate: Callable[[flask.Request], ClientCertificate | None] | None = None,
) -> Callable[[F], F]:
    """Protect a view: verify the request's token, then set ``flask.g.token`` and call the view.

    ``scopes`` are needed in addition to the verifier's ``required_scopes``;
    ``max_age`` demands attestation at most that many seconds old and
    ``acr_values`` one of these assurance levels or a higher one (RFC 9470;
    see :mod:`sts_client.assurance`), e.g. ``acr_values=ACR_POP`` for a route
    that needs a proof-of-possession token.  ``client_certificate`` gives the client
    certificate of the request's mutual-TLS connection, for certificate-bound tokens
    (RFC 8705 §3); by default the WSGI environ's ``SSL_CLIENT_CERT`` (PEM, as Apache's
    mod_ssl exports it), which a server sets and a client cannot.  Behind a proxy that
    terminates TLS, pass a function reading the header the proxy sets (and overwrites).
    """
    certificate_of = client_certificate or environ_certificate
    route_scopes = tuple(scopes.split()) if isinstance(scopes, str) else tuple(scopes)

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            request = flask.request
            try:
                flask.g.token = verifier.verify(
                    request.method,
                    url(request) if url is not None else _url_of(request),
                    request.headers,
                    scopes=route_scopes,
                    max_age=max_age,
                    acr_values=acr_values,
                    client_certificate=certificate_of(request),
                )
            except VerificationError as error:
                return error_response(error)
            if flask.g.token.dpop_nonce is None:
                return view(*args, **kwargs)
            response = flask.make_response(view(*args, **kwargs))
            response.headers["DPoP-Nonce"] = flask.g.token.dpop_nonce  # RFC 9449 §9
            return response

        return cast("F", wrapper)

    return decorate


def environ_certificate(request: flask.Request) -> ClientCertificate | None:
    """The client certificate the server put in the WSGI environ (``SSL_CLIENT_CERT``), if any."""
    value = request.environ.get("SSL_CLIENT_CERT")
    return value if isinstance(value, str | bytes) and value else None


def _url_of(request: flask.Request) -> str:
    """The URL a proof's ``htu`` names: scheme and host as served (``ProxyFix`` applied), the path as
    the client sent it (see :func:`~sts_client.dpop.request_target_url`), else ``request.url``."""
    return (
        request_target_url(request.host_url, request.environ, request.script_root + request.path)
        or request.url
    )
