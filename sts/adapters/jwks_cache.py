"""An issuer's keys from its ``jwks_uri``: a cache, and the policy for refreshing it.

:class:`HttpJWKS` fetches the JWK Set (:mod:`sts.adapters.jwks_fetch`) when
first needed, keeps it for as long as the response's ``Cache-Control``
allows (RFC 9111 §5.2.2), refetches once when a token names an unknown ``kid``
(key rotation), and keeps serving the last good keys for a bounded time while
the issuer is down.  Which keys of the set are accepted is
:mod:`sts.adapters.jwks_acceptance`'s business.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Final

import requests
from joserfc.jwk import Key

from sts.core.ports import KeysUnavailable, UnknownKeyId
from sts.errors import ConfigurationError

from .http_body import Outbound
from .jwks_acceptance import (
    BadKeySet,
    KeyIndex,
    allowed_algorithms,
    check_request,
    parse_key_set,
    quote_untrusted,
)
from .jwks_fetch import FetchFailed, fetch_document, validate_jwks_url
from .request_threads import waiting

# The JWKS modules log under one name, so one logging setting covers all of them.
logger = logging.getLogger("sts.adapters.jwks")

#: RFC 9111 §1.2.2: a delta-seconds value too large to represent is taken as 2^31.
_MAX_DELTA_SECONDS: Final = 2**31

_DIGITS: Final = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class _CacheState:
    """One immutable snapshot of the cache; replaced whole, under the lock, after each fetch attempt.

    Readers take a reference without locking (an attribute read is atomic),
    so they always see a consistent index and expiry.
    """

    index: KeyIndex | None = None
    fresh_until: float = float("-inf")
    attempts: int = 0
    last_attempt: float | None = None
    last_error: str | None = None


#: Callers of one key source that may wait for its fetch under way at once (with the one fetching,
#: half of a worker's default 8 request threads).
MAX_WAITERS = 3
#: Seconds into a fetch until which callers beyond :data:`MAX_WAITERS` wait for it too; later
#: ones are refused at once.
BRIEF_WAIT = 0.5


class HttpJWKS:
    """An issuer's keys from its ``jwks_uri``, cached and refreshed on demand.

    Nothing is fetched at construction.  Afterwards:

    * fresh cache, known ``kid``: the key is returned with no network and no
      lock (one dictionary lookup);
    * unknown ``kid``: the set is refetched once, in case the issuer rotated
      its keys; concurrent callers share that one request, and refetches are
      at most one per ``refetch_interval`` seconds, so a stream of tokens
      with made-up ``kid`` values cannot make this service hammer the
      issuer;
    * expired cache: the set is refetched; while one caller fetches, others
      whose key is in the expired set keep using it;
    * issuer down (connection error, non-200, bad body): the last good set is
      served until ``max_stale`` seconds past its expiry, then
      :class:`KeysUnavailable`; failed attempts are rate-limited the same way.

    How long a fetched set stays fresh follows the response (RFC 9111
    §4.2.1): ``Cache-Control: max-age`` (§5.2.2.1) less the ``Age`` header
    (§4.2.3, §5.1), clamped to ``[min_ttl, max_ttl]``; ``no-store``
    (§5.2.2.5) or ``no-cache`` (§5.2.2.4) means ``min_ttl``; an invalid
    ``max-age`` makes the response stale (§4.2.1), which here also means
    ``min_ttl``; no ``max-age`` means ``default_ttl``.

    A key the set does not contain raises :class:`UnknownKeyId` when the
    latest fetch attempt succeeded, and :class:`KeysUnavailable` when it
    failed (the key may exist; the caller should ask the client to retry).

    Redirects are not followed, the body is capped at ``max_bytes`` (read in
    chunks, stopping as soon as it is exceeded), and ``timeout`` bounds the
    connection, each read, and reading the whole body, however slowly the
    server trickles it (:func:`sts.adapters.http_body.read_body`).  ``clock`` (seconds)
    is used for all cache arithmetic, so tests can move time.  A given
    ``session`` must not be used concurrently elsewhere; fetches of one
    instance are serialised by its lock.

    ``on_fetch(ok, usable_keys)`` is told of every fetch attempt once it is over
    (the metrics): whether it succeeded, and how many usable keys the cache holds.

    A caller with no usable key waits for the fetch under way; up to ``max_waiters`` of them
    (:data:`MAX_WAITERS`, with the fetching one half a worker's 8 request threads) as long as the
    fetch may take, any more only until the fetch is :data:`BRIEF_WAIT` seconds old, then they
    are refused (:class:`KeysUnavailable`, answered ``503``, to retry).  Each waiter holds a request thread:
    tokens naming new ``kid`` values of a slow key server (an issuer's in an outage, or a
    client's own ``jwks_uri``) held every request thread of a worker for 3 s at each refetch,
    stalling every other client's request (an outside audit), while a burst at a cold start
    still shares one quick fetch.  None: any number wait as long as the fetch.
    """

    def __init__(
        self,
        url: str,
        *,
        algorithms: Collection[str],
        session: requests.Session | None = None,
        timeout: float = 3.0,
        min_ttl: float = 60,
        max_ttl: float = 86400,
        default_ttl: float = 300,
        refetch_interval: float = 30.0,
        max_stale: float = 3600,
        clock: Callable[[], float] = time.time,
        max_bytes: int = 512 * 1024,
        on_fetch: Callable[[bool, int], None] | None = None,
        max_waiters: int | None = MAX_WAITERS,
    ) -> None:
        validate_jwks_url(url)
        self._url = url
        self._algorithms = allowed_algorithms(algorithms, url)
        if not timeout > 0:
            raise ConfigurationError(f"{url}: timeout must be positive")
        if not 0 <= min_ttl <= default_ttl <= max_ttl:
            raise ConfigurationError(f"{url}: need 0 <= min_ttl <= default_ttl <= max_ttl")
        if not refetch_interval >= 0 or not max_stale >= 0:
            raise ConfigurationError(f"{url}: refetch_interval and max_stale must not be negative")
        if max_bytes <= 0:
            raise ConfigurationError(f"{url}: max_bytes must be positive")
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()
        self._timeout = float(timeout)
        #: The fetch's helper thread: one at a time (a server that hangs holds no more than one).
        self._outbound = Outbound(1)
        self._min_ttl = float(min_ttl)
        self._max_ttl = float(max_ttl)
        self._default_ttl = float(default_ttl)
        self._refetch_interval = float(refetch_interval)
        self._max_stale = float(max_stale)
        self._clock = clock
        self._max_bytes = max_bytes
        self._on_fetch = on_fetch
        self._lock = threading.Lock()
        self._state = _CacheState()
        #: When the fetch under way started (``time.monotonic()``).
        self._fetch_started = 0.0
        #: Callers that may still wait for a fetch under way (see the class; None: any number).
        self._wait_slots = threading.BoundedSemaphore(max_waiters) if max_waiters is not None else None

    @property
    def url(self) -> str:
        return self._url

    def close(self) -> None:
        """Close the HTTP session if this instance created it."""
        if self._owns_session:
            self._session.close()

    def key_for(self, kid: str | None, alg: str) -> Key:
        """Return the key for ``kid`` usable with ``alg``.

        Raises :class:`UnknownKeyId` when the issuer does not publish one
        (after at most one refetch) and :class:`KeysUnavailable` when the
        keys cannot be had.
        """
        check_request(kid, alg, self._algorithms)
        state = self._state
        key = state.index.keys.get((kid, alg)) if state.index is not None else None
        if key is not None and self._clock() < state.fresh_until:
            return key
        # Expired cache or unknown kid.  A caller that already holds a usable
        # (if stale) key need not wait for another thread's fetch; one
        # without a key must, so that concurrent callers share one request.
        with waiting():  # a fetch, or another thread's: this request thread's turn goes meanwhile
            state = self._refresh(state, wait=key is None)
        return self._choose(state, kid, alg)

    def _choose(self, state: _CacheState, kid: str | None, alg: str) -> Key:
        if state.index is None:
            raise KeysUnavailable(f"{self._url}: keys never fetched: {state.last_error}")
        now = self._clock()
        if now >= state.fresh_until + self._max_stale:
            raise KeysUnavailable(
                f"{self._url}: keys expired {now - state.fresh_until:.0f}s ago"
                f" (max_stale {self._max_stale:.0f}s); last error: {state.last_error}"
            )
        key = state.index.keys.get((kid, alg))
        if key is not None:
            return key
        if state.last_error is not None:
            raise KeysUnavailable(
                f"{self._url}: no {alg} key with kid {quote_untrusted(kid)}"
                f" and the key set cannot be refreshed: {state.last_error}"
            )
        raise UnknownKeyId(f"{self._url}: no {alg} key with kid {quote_untrusted(kid)}")

    def _rate_limited(self, state: _CacheState, now: float) -> bool:
        return state.last_attempt is not None and now - state.last_attempt < self._refetch_interval

    def _refresh(self, seen: _CacheState, *, wait: bool) -> _CacheState:
        """Fetch the key set unless that is rate-limited or another thread just did; return the new state.

        ``seen`` is the snapshot the caller decided on.  If another attempt
        completed since (``attempts`` moved on), its result is used instead
        of fetching again: this is what makes the refetch single-flight.
        """
        if self._rate_limited(seen, self._clock()):
            return self._state
        if not self._lock.acquire(blocking=False):
            if not wait:
                return self._state  # Another thread is fetching; serve the stale set meanwhile.
            slots = self._wait_slots
            if slots is not None and not slots.acquire(blocking=False):
                # Enough threads wait for this fetch: one more waits only while the fetch is young
                # (a burst at a cold start shares a quick fetch), never for a slow fetch's bound.
                left = self._fetch_started + BRIEF_WAIT - time.monotonic()
                if left <= 0 or not self._lock.acquire(timeout=left):
                    raise KeysUnavailable(f"{self._url}: the key set is being fetched; retry")
            else:
                try:
                    self._lock.acquire()
                finally:
                    if slots is not None:
                        slots.release()
        try:
            state = self._state
            if state.attempts != seen.attempts:
                return state
            now = self._clock()
            if self._rate_limited(state, now):
                return state
            self._fetch_started = time.monotonic()
            fetched: tuple[KeyIndex, float] | None = None
            error = "unexpected error while fetching"
            try:
                fetched = self._fetch()
            except FetchFailed as exc:
                error = str(exc)
            finally:
                # Recorded even if _fetch raised something unexpected, so the
                # rate limit still holds.
                if fetched is not None:
                    index, lifetime = fetched
                    state = _CacheState(
                        index=index,
                        fresh_until=now + lifetime,
                        attempts=state.attempts + 1,
                        last_attempt=now,
                        last_error=None,
                    )
                    logger.info(
                        "JWKS %s: fetched %d usable keys, fresh for %.0fs", self._url, index.usable, lifetime
                    )
                else:
                    state = replace(state, attempts=state.attempts + 1, last_attempt=now, last_error=error)
                    logger.warning("JWKS %s: fetch failed: %s", self._url, error)
                self._state = state
                if self._on_fetch is not None:
                    self._on_fetch(fetched is not None, state.index.usable if state.index is not None else 0)
            return state
        finally:
            self._lock.release()

    def _fetch(self) -> tuple[KeyIndex, float]:
        """GET the key set; return its index and freshness lifetime, or raise :class:`FetchFailed`."""
        document = fetch_document(
            self._session,
            self._url,
            timeout=self._timeout,
            max_bytes=self._max_bytes,
            outbound=self._outbound,
        )
        try:
            index = parse_key_set(document.body, self._algorithms, self._url)
        except BadKeySet as exc:
            raise FetchFailed(f"not a JWK Set: {exc}") from exc
        if index.usable == 0:
            logger.warning(
                "JWKS %s: the key set holds no usable key for %s", self._url, sorted(self._algorithms)
            )
        return index, self._freshness_lifetime(document.cache_control, document.age)

    def _freshness_lifetime(self, cache_control: str | None, age: str | None) -> float:
        """Seconds the fetched set stays fresh (RFC 9111 §4.2.1), clamped to ``[min_ttl, max_ttl]``."""
        directives = _cache_directives(cache_control)
        if "no-store" in directives or "no-cache" in directives:
            return self._min_ttl
        if "max-age" not in directives:
            return self._default_ttl
        max_age = directives["max-age"]
        if max_age is None or not _DIGITS.fullmatch(max_age):
            return self._min_ttl
        lifetime = min(int(max_age), _MAX_DELTA_SECONDS)
        if age is not None and _DIGITS.fullmatch(age.strip()):
            lifetime -= min(int(age.strip()), _MAX_DELTA_SECONDS)
        return min(max(float(lifetime), self._min_ttl), self._max_ttl)


def _cache_directives(header: str | None) -> dict[str, str | None]:
    """Parse ``Cache-Control`` (RFC 9111 §5.2) into lower-cased names and their arguments.

    The first occurrence of a directive wins (§4.2.1).  Quoted arguments are
    unquoted; a comma inside a quoted field-name list (``no-cache="a, b"``)
    only yields a bogus extra name, which is ignored.
    """
    directives: dict[str, str | None] = {}
    if not header:
        return directives
    for item in header.split(","):
        name, sep, argument = item.partition("=")
        name = name.strip().lower()
        if not name or name in directives:
            continue
        value: str | None = None
        if sep:
            value = argument.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
        directives[name] = value
    return directives
