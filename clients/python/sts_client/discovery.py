"""Authorization server metadata (RFC 8414) and the small, careful JSON fetch both sides use.

The STS publishes its metadata at the well-known location derived from its
issuer identifier (RFC 8414 §3.1: the well-known segment goes between the
host and the issuer's path)::

    GET /.well-known/oauth-authorization-server HTTP/1.1
    Host: sts.example.com
    Accept: application/json

    HTTP/1.1 200 OK
    Content-Type: application/json

    {"issuer": "https://sts.example.com",
     "token_endpoint": "https://sts.example.com/token",
     "jwks_uri": "https://sts.example.com/.well-known/jwks.json",
     "introspection_endpoint": "https://sts.example.com/introspect", ...}

The ``issuer`` in the document must be exactly the issuer we asked about
(RFC 8414 §3.3), or the document is refused: otherwise one server could
name another's keys.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import requests
import requests.auth
import urllib3.exceptions
from requests.structures import CaseInsensitiveDict

__all__ = [
    "DiscoveryError",
    "ServerMetadata",
    "check_endpoint_url",
    "fetch_metadata",
    "get_json",
    "metadata_url",
]

#: Metadata, a JWK Set or an introspection answer is small; more than this is refused unread.
MAX_DOCUMENT_BYTES: Final = 256 * 1024
_CHUNK: Final = 16 * 1024


class DiscoveryError(Exception):
    """A document could not be fetched, or is not what it must be; the message says which."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint_url(url: str, what: str) -> None:
    """Raise :class:`ValueError` unless ``url`` is https (plain http only on a loopback host).

    Keys, metadata and tokens travel over these URLs; anything but TLS would
    let a network attacker substitute them (RFC 8414 §2, RFC 6749 §3.1).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{what} must be an absolute https URL, not {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{what} must not contain credentials")
    if parts.fragment:
        raise ValueError(f"{what} must not have a fragment")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ValueError(f"{what} must use https (plain http only for a loopback host): {url!r}")


def get_json(
    session: requests.Session,
    url: str,
    *,
    timeout: float,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    data: Mapping[str, str] | list[tuple[str, str]] | None = None,
) -> tuple[int, Any, CaseInsensitiveDict[str]]:
    """Fetch ``url`` and parse a JSON body of at most :data:`MAX_DOCUMENT_BYTES`.

    Returns the status, the parsed body (``None`` when it is not JSON) and
    the response headers.  Redirects are not followed: a redirected key or
    metadata URL is a misconfiguration, not something to chase.  A loopback
    URL is fetched directly, never through a proxy from the environment
    (``HTTP_PROXY``): plain http is allowed there only because the traffic
    stays on this machine (an outside audit saw a subject token sent in clear
    to the proxy).  Raises :class:`DiscoveryError` when the server cannot be
    reached, has not answered in full within ``timeout`` seconds, or sends
    too large a body.
    """
    request_headers = {"Accept": "application/json", **(headers or {})}
    authorization = CaseInsensitiveDict(request_headers).get("Authorization")
    direct = _is_loopback(urlsplit(url).hostname or "")
    try:
        status, body, response_headers = _fetch_within(
            session,
            timeout,
            method=method,
            url=url,
            auth=_CallersAuthorization(authorization),
            headers=request_headers,
            data=data,
            timeout=timeout,
            allow_redirects=False,
            stream=True,
            proxies=dict(_NO_PROXIES) if direct else None,
        )
    except requests.Timeout:
        raise DiscoveryError(f"{_origin(url)} did not answer within {timeout:.1f}s") from None
    except requests.RequestException as exc:
        raise DiscoveryError(f"cannot reach {_origin(url)}: {type(exc).__name__}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise DiscoveryError(f"reading from {_origin(url)} failed: {type(exc).__name__}") from None
    try:
        document = json.loads(bytes(body)) if body else None
    except (ValueError, RecursionError):
        document = None
    return status, document, response_headers


#: ``proxies`` for a request that must not go through the environment's proxies: a key set to
#: None keeps ``requests`` from filling it in from ``HTTP_PROXY`` and the like (and drops the
#: session's own).
_NO_PROXIES: Final = {"http": None, "https": None, "all": None}


def _read_body(response: requests.Response, url: str) -> bytes:
    body = bytearray()
    while chunk := response.raw.read1(_CHUNK, decode_content=True):
        body.extend(chunk)
        if len(body) > MAX_DOCUMENT_BYTES:
            raise DiscoveryError(f"{_origin(url)} answered more than {MAX_DOCUMENT_BYTES} bytes")
    return bytes(body)


class _CallersAuthorization(requests.auth.AuthBase):
    """The request's ``auth``: ``Authorization`` is exactly the caller's (the client's credentials,
    GitHub's request token, or none), and nothing else runs: not the session's own ``auth``, not
    ``~/.netrc``'s credentials.

    Outside audits: an ``StsAuth`` that was also the session's auth ran on this request's thread
    and waited for the lock its caller held; another service's ``HTTPBasicAuth`` or ``~/.netrc``
    replaced the client's credentials; an ``HTTPDigestAuth`` answered a server's ``401`` challenge
    with a digest of another service's password; and ``HTTPProxyAuth`` sends the proxy's password
    to the endpoint itself over https (it reaches no proxy there).  Proxy credentials go in the
    proxy's URL (``HTTPS_PROXY=http://user:password@proxy:3128``), which urllib3 sends on
    ``CONNECT``.
    """

    def __init__(self, authorization: str | None) -> None:
        self.authorization = authorization

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if self.authorization is None:
            request.headers.pop("Authorization", None)
        else:
            request.headers["Authorization"] = self.authorization
        return request


def _fetch_within(
    session: requests.Session, seconds: float, **arguments: Any
) -> tuple[int, bytes, CaseInsensitiveDict[str]]:
    """``session.request(**arguments)`` and its whole body, waited for at most ``seconds``.

    Its ``timeout`` bounds each socket read only.  Outside audits held the caller (and every
    thread waiting for the lock it held) for as long as the server liked: a status line and
    headers sent a byte at a time; a gzip body of empty deflate blocks, which ``read1`` keeps
    reading because they decode to nothing; a chunked body's trailer lines, which ``http.client``
    reads without limit.  So the whole exchange runs on a helper thread; past ``seconds`` the
    caller gets :class:`requests.Timeout`, and the response's socket is shut down so that the
    helper's read ends too.  A helper still waiting for the headers cannot be reached (``requests``
    shows no socket before the response); it ends when the server stops sending, or its read
    times out.  While :data:`ABANDONED_PER_ORIGIN` such helpers of one origin are still running,
    a further call to it fails at once: a server dribbling its headers cost the caller a thread
    and a socket per call, without limit (an outside re-check).  Calls in time are not counted.
    """
    origin = _origin_of(arguments["url"])
    with _abandoned_lock:
        if _abandoned.get(origin, 0) >= ABANDONED_PER_ORIGIN:
            raise requests.Timeout("earlier requests to this server have not ended")
    outcome: dict[str, Any] = {}
    done = threading.Event()
    lock = threading.Lock()

    def run() -> None:
        response: requests.Response | None = None
        try:
            response = session.request(**arguments)
            with lock:
                if outcome.get("abandoned"):
                    return
                outcome["reading"] = response
            body = _read_body(response, arguments["url"])
            outcome["result"] = (response.status_code, body, response.headers)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc
        finally:
            if response is not None:
                response.close()
            with lock:
                done.set()
                if outcome.get("abandoned"):
                    _count_abandoned(origin, -1)

    threading.Thread(target=run, name="sts-client-request", daemon=True).start()
    if not done.wait(seconds):
        with lock:
            if not done.is_set():
                outcome["abandoned"] = True
                _count_abandoned(origin, +1)
            reading = outcome.get("reading")
        if reading is not None:
            _shut_down(reading)  # what the helper then reads (an end, or an error) is not used
        raise requests.Timeout(f"no complete answer within {seconds:.1f}s")
    if "error" in outcome:
        raise outcome["error"]
    result: tuple[int, bytes, CaseInsensitiveDict[str]] = outcome["result"]
    return result


#: How many helper threads of :func:`_fetch_within` whose callers stopped waiting may still run
#: for one origin (scheme, host, port) before further calls to it fail at once.
ABANDONED_PER_ORIGIN: Final = 8
_abandoned: dict[tuple[str, str, int | None], int] = {}
_abandoned_lock = threading.Lock()


def _origin_of(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return (parts.scheme, (parts.hostname or "").lower(), port)


def _count_abandoned(origin: tuple[str, str, int | None], change: int) -> None:
    with _abandoned_lock:
        count = _abandoned.get(origin, 0) + change
        if count > 0:
            _abandoned[origin] = count
        else:
            _abandoned.pop(origin, None)


def _shut_down(response: requests.Response) -> None:
    """Shut down the socket a streamed response reads from: a read blocked in another thread then
    returns (closing the socket would not wake it).  Found through urllib3's connection, else
    through ``http.client``'s file; when neither is there, the helper's reads end by their own
    timeout once the server stops sending."""
    raw = response.raw
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:
        file = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(file, "raw", None), "_sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _origin(url: str) -> str:
    """Scheme, host and path of a URL, without query (which may carry secrets) -- for messages."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def metadata_url(issuer: str) -> str:
    """RFC 8414 §3.1: ``https://host/path`` -> ``https://host/.well-known/oauth-authorization-server/path``."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", ""))


@dataclass(frozen=True)
class ServerMetadata:
    """The members of RFC 8414 metadata these libraries use; ``document`` holds all of it."""

    issuer: str
    token_endpoint: str | None
    jwks_uri: str | None
    introspection_endpoint: str | None
    revocation_endpoint: str | None
    dpop_signing_alg_values_supported: tuple[str, ...]
    document: Mapping[str, Any] = field(repr=False)


def _optional_url(document: Mapping[str, Any], name: str) -> str | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DiscoveryError(f"metadata member {name} is not a string")
    try:
        check_endpoint_url(value, f"metadata member {name}")
    except ValueError as exc:
        raise DiscoveryError(str(exc)) from None
    return value


def fetch_metadata(issuer: str, *, session: requests.Session, timeout: float = 10.0) -> ServerMetadata:
    """Fetch and check the STS's metadata; raise :class:`DiscoveryError` when it cannot be used."""
    url = metadata_url(issuer)
    status, document, _ = get_json(session, url, timeout=timeout)
    if status != 200 or not isinstance(document, dict):
        raise DiscoveryError(f"metadata at {url} answered HTTP {status} without a JSON object")
    if document.get("issuer") != issuer:
        # RFC 8414 §3.3: MUST be identical to the issuer the metadata was fetched for.
        raise DiscoveryError(f"metadata at {url} names another issuer, not {issuer!r}")
    algs = document.get("dpop_signing_alg_values_supported")
    return ServerMetadata(
        issuer=issuer,
        token_endpoint=_optional_url(document, "token_endpoint"),
        jwks_uri=_optional_url(document, "jwks_uri"),
        introspection_endpoint=_optional_url(document, "introspection_endpoint"),
        revocation_endpoint=_optional_url(document, "revocation_endpoint"),
        dpop_signing_alg_values_supported=tuple(a for a in algs if isinstance(a, str))
        if isinstance(algs, list)
        else (),
        document=document,
    )
