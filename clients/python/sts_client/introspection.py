"""Revocation check through token introspection (RFC 7662), cached briefly.

A JWT access token verifies locally until it expires; whether the STS has
revoked it since (RFC 7009, or a security event about its subject) only the
STS knows.  A resource server that wants to know asks, authenticated as a
registered client whose ``audiences`` include its own::

    POST /introspect HTTP/1.1
    Host: sts.example.com
    Authorization: Basic ZGVwbG95LWFwaTpzZWNyZXQ=
    Content-Type: application/x-www-form-urlencoded

    token=eyJ0eXAiOiJhdCtqd3Qi...&token_type_hint=access_token

    HTTP/1.1 200 OK
    {"active": true, "sub": "...", "jti": "...", ...}        or        {"active": false}

Answers are cached per token for ``cache_seconds`` (never past the token's
``exp``), so a revocation takes effect within that time.  When the STS cannot
be asked, the check fails closed.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import quote

import requests

from .discovery import DiscoveryError, check_endpoint_url, get_json

__all__ = ["IntrospectionClient", "IntrospectionUnavailable"]


class IntrospectionUnavailable(Exception):
    """The introspection endpoint could not answer; the caller fails closed."""


def basic_credentials(client_id: str, secret: str) -> str:
    """RFC 6749 §2.3.1: both parts form-urlencoded before they are joined and base64-encoded."""
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


class IntrospectionClient:
    """Asks the STS whether a token is still active; remembers the answer briefly."""

    def __init__(
        self,
        endpoint: str | Callable[[], str],
        client_id: str,
        secret: str,
        *,
        session: requests.Session | None = None,
        cache_seconds: float = 30.0,
        timeout: float = 5.0,
        max_entries: int = 10_000,
    ) -> None:
        self._endpoint = endpoint
        self._authorization = basic_credentials(client_id, secret)
        self._session = session or requests.Session()
        self._cache_seconds = cache_seconds
        self._timeout = timeout
        self._max_entries = max_entries
        self._cache: OrderedDict[str, tuple[bool, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.requests = 0

    def __repr__(self) -> str:
        return "IntrospectionClient(...)"  # The credentials stay out of logs.

    def is_active(self, token: str, *, expires_at: float, now: float | None = None) -> bool:
        """Whether the STS says ``token`` is active.  Raises :class:`IntrospectionUnavailable`."""
        current = time.time() if now is None else now
        # The cache is keyed by a hash: it must not become a store of live tokens.
        key = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[1] > current:
                return cached[0]
        active = self._ask(token)
        until = min(current + self._cache_seconds, expires_at) if active else expires_at
        with self._lock:
            self._cache[key] = (active, until)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return active

    def _ask(self, token: str) -> bool:
        try:
            # Resolved from the issuer's metadata: one that cannot be read, or names no usable
            # endpoint, leaves introspection unavailable (fail closed, a 503), never a crash.
            endpoint = self._endpoint() if callable(self._endpoint) else self._endpoint
            check_endpoint_url(endpoint, "introspection_endpoint")
        except (ValueError, DiscoveryError) as exc:
            raise IntrospectionUnavailable(str(exc)) from None
        self.requests += 1
        try:
            status, body, _ = get_json(
                self._session,
                endpoint,
                timeout=self._timeout,
                method="POST",
                headers={"Authorization": self._authorization},
                data={"token": token, "token_type_hint": "access_token"},
            )
        except DiscoveryError as exc:
            raise IntrospectionUnavailable(str(exc)) from None
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("active"), bool):
            # 401 means our own credentials are wrong: an operator problem, not an inactive token.
            raise IntrospectionUnavailable(f"introspection answered HTTP {status}")
        return bool(body["active"])
