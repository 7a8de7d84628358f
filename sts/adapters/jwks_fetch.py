"""Getting an issuer's JWK Set over HTTP: where it may come from, and one bounded GET.

A request for the keys, on the wire::

    GET /.well-known/jwks.json HTTP/1.1
    Host: issuer.example
    Accept: application/jwk-set+json, application/json
    Accept-Encoding: identity

    HTTP/1.1 200 OK
    Content-Type: application/json
    Cache-Control: public, max-age=3600

    {"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig",
               "x": "...", "y": "..."}]}

Redirects are not followed, the body is capped at ``max_bytes`` (read in
chunks, stopping as soon as it is exceeded), and ``timeout`` bounds the
connection, each read, and reading the whole body, however slowly the server
trickles it (:func:`sts.adapters.http_body.read_body`); the whole answer, status
line and headers included, must come within twice ``timeout``
(:class:`sts.adapters.http_body.Outbound`).  What the response
means for the cache is :mod:`sts.adapters.jwks_cache`'s business.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from sts.adapters.http_body import BodyUnreadable, Outbound, read_body
from sts.adapters.tracing import outbound_headers
from sts.errors import ConfigurationError


def validate_jwks_url(url: str) -> None:
    """Raise :class:`~sts.errors.ConfigurationError` unless ``url`` is a safe JWKS location.

    The key set is the root of trust for every token of its issuer, so it
    must come over TLS (RFC 8414 §2: ``jwks_uri`` MUST use ``https``).  Plain
    ``http`` is accepted only for a loopback host (``localhost``,
    127.0.0.0/8, ``::1``), for development.  Credentials in the URL and
    fragments are refused.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"JWKS URL must be a string, not {type(url).__name__}")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - evaluated for its validation of the port.
    except ValueError as exc:
        raise ConfigurationError(f"JWKS URL {url!r} is malformed: {exc}") from exc
    if parts.username is not None or parts.password is not None:
        # The URL is not echoed: it holds a secret.
        raise ConfigurationError("JWKS URL must not contain credentials")
    if parts.scheme not in ("https", "http"):
        raise ConfigurationError(f"JWKS URL {url!r} must use https")
    if not host:
        raise ConfigurationError(f"JWKS URL {url!r} has no host")
    if parts.fragment:
        raise ConfigurationError(f"JWKS URL {url!r} must not have a fragment")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ConfigurationError(
            f"JWKS URL {url!r} must use https (plain http is allowed only for a loopback host)"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FetchFailed(Exception):
    """The key set could not be fetched or was not a JWK Set."""


@dataclass(frozen=True, slots=True)
class FetchedDocument:
    """A 200 response: its body and the headers that say how long it stays fresh (RFC 9111 §4.2)."""

    body: bytes
    cache_control: str | None
    age: str | None


def fetch_document(
    session: requests.Session, url: str, *, timeout: float, max_bytes: int, outbound: Outbound | None = None
) -> FetchedDocument:
    """GET ``url``; return the body and caching headers of a 200, or raise :class:`FetchFailed`.

    The whole answer, status line and headers included, must arrive within twice ``timeout``
    (on ``outbound``'s helper thread: see :class:`~sts.adapters.http_body.Outbound`).
    """
    headers = {
        "Accept": "application/jwk-set+json, application/json",
        # Asking for no compression keeps max_bytes meaningful.
        "Accept-Encoding": "identity",
        # W3C Trace Context: the fetch is part of the request that needed the keys.
        **outbound_headers(),
    }

    def get() -> FetchedDocument:
        answer = session.get(url, headers=headers, timeout=timeout, allow_redirects=False, stream=True)
        with answer as response:
            status = response.status_code
            if 300 <= status < 400:
                raise FetchFailed(f"HTTP {status} redirect (redirects are not followed)")
            if status != 200:
                raise FetchFailed(f"HTTP {status}")
            body = read_body(response, max_bytes=max_bytes, timeout=timeout)
            return FetchedDocument(body, response.headers.get("Cache-Control"), response.headers.get("Age"))

    try:
        return (outbound or Outbound(1)).run(get, 2 * timeout)
    except requests.RequestException as exc:
        raise FetchFailed(f"request failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
    except BodyUnreadable as exc:
        raise FetchFailed(str(exc)) from None
