"""Verification keys of trusted issuers, from a JWK Set file or a ``jwks_uri``.

Three adapters for :class:`sts.core.ports.IssuerKeys`:

* :class:`StaticJWKS` holds a JWK Set (RFC 7517 §5) given in the
  configuration (a client's inline ``jwks``).
* :class:`FileJWKS` reads a JWK Set from a file once, at start.
* :class:`HttpJWKS` fetches it from an issuer's ``jwks_uri`` when first needed,
  caches it for as long as the response's ``Cache-Control`` allows
  (RFC 9111 §5.2.2), refetches once when a token names an unknown ``kid`` (key
  rotation), and keeps serving the last good keys for a bounded time while the
  issuer is down.

All three load a key set through the same filter (:func:`_index_key_set`).  Only
public, asymmetric signature keys are kept: a JWK Set published by an issuer
must not hold private or symmetric keys, RSA keys must have at least 2048 bits
(RFC 7518 §3.3, §3.5) and the public exponent 65537 (NIST SP 800-56B; see
:func:`sts.core.jose.rsa_key_problem`), and a key whose ``use`` is not ``sig`` (RFC 7517 §4.2) or
whose ``key_ops`` lacks ``verify`` (RFC 7517 §4.3) is not a verification key.
A skipped key is logged by ``kid``, never by its material.

Keys are chosen only by ``kid`` and the algorithm the caller has already
allow-listed, never from the token's own ``jwk``/``jku``/``x5u``/``x5c``
headers (RFC 8725 §3.1, §3.10); the algorithm must fit the key type and any
``alg`` the JWK declares (RFC 7517 §4.4).

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
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import requests
from cryptography.exceptions import UnsupportedAlgorithm
from joserfc.errors import InvalidKeyTypeError, JoseError
from joserfc.jwk import ECKey, JWKRegistry, Key, OKPKey

from sts.adapters.http_body import BodyUnreadable, read_body
from sts.adapters.tracing import outbound_headers
from sts.core.jose import rsa_key_problem
from sts.core.ports import KeysUnavailable, UnknownKeyId
from sts.errors import ConfigurationError

__all__ = ["FileJWKS", "HttpJWKS", "StaticJWKS", "validate_jwks_url"]

logger = logging.getLogger(__name__)

#: JWS algorithms (RFC 7518 §3.1, RFC 8037 §3.1, RFC 9864) this module can
#: match to a key, with the key type and curve each one needs.  ``HS*`` and
#: ``none`` are deliberately absent: an issuer's keys are public.
_ALGORITHM_KEYS: Final[Mapping[str, tuple[str, str | None]]] = MappingProxyType(
    {
        "RS256": ("RSA", None),
        "RS384": ("RSA", None),
        "RS512": ("RSA", None),
        "PS256": ("RSA", None),
        "PS384": ("RSA", None),
        "PS512": ("RSA", None),
        "ES256": ("EC", "P-256"),
        "ES384": ("EC", "P-384"),
        "ES512": ("EC", "P-521"),
        "EdDSA": ("OKP", "Ed25519"),
        "Ed25519": ("OKP", "Ed25519"),
    }
)

#: JWK members that only a private or symmetric key has (RFC 7518 §6.2.2,
#: §6.3.2, §6.4.1; RFC 8037 §2).
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

#: RFC 9111 §1.2.2: a delta-seconds value too large to represent is taken as 2^31.
_MAX_DELTA_SECONDS: Final = 2**31

_DIGITS: Final = re.compile(r"[0-9]+")
_SHOWN_CHARS: Final = 64


SIGNING_USES = frozenset({"sig", "jwt-svid"})


def _show(value: object) -> str:
    """A short, quoted rendering of an untrusted value (a ``kid`` or ``alg``) for logs."""
    text = value if isinstance(value, str) else str(type(value).__name__)
    return repr(text[:_SHOWN_CHARS] + ("..." if len(text) > _SHOWN_CHARS else ""))


def _allowed_algorithms(algorithms: Collection[str], source: str) -> frozenset[str]:
    """Validate the configured allow-list (RFC 8725 §3.1, §3.2: an explicit list, never ``none``)."""
    if isinstance(algorithms, str):
        raise ConfigurationError(
            f"{source}: algorithms must be a collection of names, not the string {algorithms!r}"
        )
    allowed = frozenset(algorithms)
    if not allowed:
        raise ConfigurationError(f"{source}: no JWS algorithms allowed")
    unsupported = sorted(str(alg) for alg in allowed if alg not in _ALGORITHM_KEYS)
    if unsupported:
        raise ConfigurationError(
            f"{source}: unsupported JWS algorithms {unsupported}; supported: {sorted(_ALGORITHM_KEYS)}"
        )
    return allowed


def _check_request(kid: object, alg: object, allowed: frozenset[str]) -> None:
    """Refuse an algorithm outside the allow-list, or a non-string ``kid``/``alg``, before any lookup."""
    if not isinstance(alg, str) or alg not in allowed:
        raise UnknownKeyId(f"algorithm {_show(alg)} is not allowed for this issuer")
    if kid is not None and not isinstance(kid, str):
        raise UnknownKeyId(f"kid of type {type(kid).__name__} is not a string")


# ---------------------------------------------------------------------------
# Loading a key set (shared by both adapters)
# ---------------------------------------------------------------------------


class _BadKeySet(ValueError):
    """The document is not a JWK Set at all."""


@dataclass(frozen=True, slots=True)
class _KeyIndex:
    """An immutable lookup table built once per loaded key set.

    ``keys`` maps ``(kid, alg)`` to the one key usable for it; ``(None, alg)``
    is present only when exactly one key in the set fits ``alg``.  Looking a
    key up is therefore a single dictionary access.
    """

    keys: Mapping[tuple[str | None, str], Key]
    usable: int


def _skip(source: str, position: int, kid: object, reason: str) -> None:
    logger.warning("JWKS %s: skipping key #%d (kid %s): %s", source, position, _show(kid), reason)


def _import_public_key(entry: object, position: int, set_size: int, source: str) -> Key | None:
    """Import one JWK if it is a well-formed public signature key, else log why and return None.

    The checks on the raw member names run before anything is parsed, so a
    private key is never even imported.
    """
    if not isinstance(entry, dict):
        _skip(source, position, None, "not a JSON object")
        return None
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        _skip(source, position, kid, "kid is not a string")
        return None
    kty = entry.get("kty")
    if kty == "oct":
        _skip(source, position, kid, "symmetric key (kty 'oct'); a JWK Set must hold only public keys")
        return None
    private = sorted(_PRIVATE_MEMBERS.intersection(entry))
    if private:
        _skip(source, position, kid, f"private key members {private}; a JWK Set must hold only public keys")
        return None
    use = entry.get("use")
    # SPIFFE bundles mark JWT-SVID signing keys ``use: jwt-svid`` (SPIFFE Trust Domain and
    # Bundle, §4.2.2); ``x509-svid`` and ``enc`` keys never verify a JWT here.
    if use is not None and use not in SIGNING_USES:
        _skip(source, position, kid, f"use is {_show(use)}, not 'sig' (RFC 7517 §4.2)")
        return None
    key_ops = entry.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        _skip(source, position, kid, "key_ops does not include 'verify' (RFC 7517 §4.3)")
        return None
    if kid is None and set_size != 1:
        _skip(source, position, kid, f"no kid, in a set of {set_size} keys")
        return None
    if kty == "RSA":
        # Measured before import: joserfc only warns about short RSA keys, and accepts any exponent.
        problem = rsa_key_problem(entry)
        if problem is not None:
            _skip(source, position, kid, problem)
            return None
    if use == "jwt-svid":
        # joserfc knows only the RFC 7517 values of ``use``; a JWT-SVID key is a signature key.
        entry = {**entry, "use": "sig"}
    try:
        key = JWKRegistry.import_key(entry)
    except InvalidKeyTypeError:
        # RFC 7517 §5: a key of a type we do not understand is ignored.
        _skip(source, position, kid, f"unsupported kty {_show(kty)}")
        return None
    except (JoseError, ValueError, TypeError, KeyError, UnsupportedAlgorithm) as exc:
        _skip(source, position, kid, f"malformed ({type(exc).__name__})")
        return None
    if key.is_private:  # Belt and braces: the member check above should make this unreachable.
        _skip(source, position, kid, "private key")
        return None
    return key


def _fits(key: Key, alg: str) -> bool:
    """Whether ``alg`` can be used with ``key`` (key type, curve, and the JWK's own ``alg``)."""
    key_type, curve = _ALGORITHM_KEYS[alg]
    if key.key_type != key_type:
        return False
    if curve is not None and not (isinstance(key, ECKey | OKPKey) and key.curve_name == curve):
        return False
    declared = key.alg
    return declared is None or declared == alg


def _index_key_set(document: object, algorithms: frozenset[str], source: str) -> _KeyIndex:
    """Build the lookup table for a parsed JWK Set (RFC 7517 §5).

    Raises :class:`_BadKeySet` when ``document`` is not an object with a
    ``keys`` array; individual bad keys are skipped with a warning.
    """
    if not isinstance(document, dict):
        raise _BadKeySet("not a JSON object")
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise _BadKeySet("no 'keys' array")
    keys = [
        key
        for position, entry in enumerate(entries)
        if (key := _import_public_key(entry, position, len(entries), source)) is not None
    ]

    table: dict[tuple[str | None, str], Key] = {}
    ambiguous: set[tuple[str | None, str]] = set()
    for alg in sorted(algorithms):
        fitting = [key for key in keys if _fits(key, alg)]
        if len(fitting) == 1:
            table[(None, alg)] = fitting[0]
        for key in fitting:
            if key.kid is None:
                continue
            slot: tuple[str | None, str] = (key.kid, alg)
            if slot in table or slot in ambiguous:
                # RFC 7517 §4.5: keys SHOULD have distinct kids.  Two keys that
                # both fit would make the choice arbitrary, so neither is used.
                ambiguous.add(slot)
                table.pop(slot, None)
            else:
                table[slot] = key
    for kid, alg in sorted(ambiguous, key=str):
        logger.warning("JWKS %s: kid %s names several %s keys; none of them is used", source, _show(kid), alg)

    usable = sum(1 for key in keys if any(_fits(key, alg) for alg in algorithms))
    return _KeyIndex(keys=MappingProxyType(table), usable=usable)


def _parse_key_set(body: bytes, algorithms: frozenset[str], source: str) -> _KeyIndex:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _BadKeySet(f"not valid JSON ({type(exc).__name__})") from exc
    return _index_key_set(document, algorithms, source)


# ---------------------------------------------------------------------------
# A key set given in the configuration, or read from a file
# ---------------------------------------------------------------------------


class StaticJWKS:
    """Keys from a JWK Set given as a parsed JSON object (for example inline in the configuration).

    Used for a client registered with its ``jwks`` (RFC 7591 §2) rather than
    a ``jwks_uri``.  A document that is not a JWK Set, or holds no usable key
    for ``algorithms``, raises :class:`~sts.errors.ConfigurationError` naming
    ``source``, so the service refuses to start.
    """

    def __init__(
        self, jwks: Mapping[str, Any], *, algorithms: Collection[str], source: str = "inline JWKS"
    ) -> None:
        self._source = source
        self._algorithms = _allowed_algorithms(algorithms, source)
        document: object = jwks
        if isinstance(jwks, Mapping) and isinstance(jwks.get("keys"), list | tuple):
            # Configuration loaders may hand over frozen mappings and tuples.
            entries = [dict(entry) if isinstance(entry, Mapping) else entry for entry in jwks["keys"]]
            document = {**jwks, "keys": entries}
        try:
            index = _index_key_set(document, self._algorithms, source)
        except _BadKeySet as exc:
            raise ConfigurationError(f"{source}: not a JWK Set: {exc}") from exc
        if index.usable == 0:
            raise ConfigurationError(
                f"{source}: no usable public signature key for {sorted(self._algorithms)}"
                " (see the warnings logged above)"
            )
        self._index = index

    def key_for(self, kid: str | None, alg: str) -> Key:
        """Return the key for ``kid`` usable with ``alg``; raise :class:`UnknownKeyId` if there is none."""
        _check_request(kid, alg, self._algorithms)
        key = self._index.keys.get((kid, alg))
        if key is None:
            raise UnknownKeyId(f"{self._source}: no {alg} key with kid {_show(kid)}")
        return key


class FileJWKS(StaticJWKS):
    """An issuer's keys from a local JWK Set file, read once at construction.

    For issuers whose keys are distributed out of band (a SPIFFE trust bundle,
    an air-gapped cluster's service-account keys).  A file that cannot be
    read, is not a JWK Set, or holds no usable key for ``algorithms`` raises
    :class:`~sts.errors.ConfigurationError` naming the path, so the service
    refuses to start.
    """

    def __init__(self, path: Path, *, algorithms: Collection[str]) -> None:
        self._path = Path(path)
        source = str(self._path)
        _allowed_algorithms(algorithms, source)
        try:
            body = self._path.read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"{source}: cannot read JWKS file: {exc.strerror or exc}") from exc
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ConfigurationError(f"{source}: not valid JSON ({exc})") from exc
        if not isinstance(document, dict):
            raise ConfigurationError(f"{source}: not a JWK Set: not a JSON object")
        super().__init__(document, algorithms=algorithms, source=source)

    @property
    def path(self) -> Path:
        return self._path


# ---------------------------------------------------------------------------
# A key set fetched over HTTPS
# ---------------------------------------------------------------------------


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


class _FetchFailed(Exception):
    """The key set could not be fetched or was not a JWK Set."""


@dataclass(frozen=True, slots=True)
class _CacheState:
    """One immutable snapshot of the cache; replaced whole, under the lock, after each fetch attempt.

    Readers take a reference without locking (an attribute read is atomic),
    so they always see a consistent index and expiry.
    """

    index: _KeyIndex | None = None
    fresh_until: float = float("-inf")
    attempts: int = 0
    last_attempt: float | None = None
    last_error: str | None = None


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
    ) -> None:
        validate_jwks_url(url)
        self._url = url
        self._algorithms = _allowed_algorithms(algorithms, url)
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
        _check_request(kid, alg, self._algorithms)
        state = self._state
        key = state.index.keys.get((kid, alg)) if state.index is not None else None
        if key is not None and self._clock() < state.fresh_until:
            return key
        # Expired cache or unknown kid.  A caller that already holds a usable
        # (if stale) key need not wait for another thread's fetch; one
        # without a key must, so that concurrent callers share one request.
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
                f"{self._url}: no {alg} key with kid {_show(kid)} and the key set cannot be refreshed:"
                f" {state.last_error}"
            )
        raise UnknownKeyId(f"{self._url}: no {alg} key with kid {_show(kid)}")

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
        if not self._lock.acquire(blocking=wait):
            return self._state  # Another thread is fetching; serve the stale set meanwhile.
        try:
            state = self._state
            if state.attempts != seen.attempts:
                return state
            now = self._clock()
            if self._rate_limited(state, now):
                return state
            fetched: tuple[_KeyIndex, float] | None = None
            error = "unexpected error while fetching"
            try:
                fetched = self._fetch()
            except _FetchFailed as exc:
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

    def _fetch(self) -> tuple[_KeyIndex, float]:
        """GET the key set; return its index and freshness lifetime, or raise :class:`_FetchFailed`."""
        try:
            with self._session.get(
                self._url,
                headers={
                    "Accept": "application/jwk-set+json, application/json",
                    # Asking for no compression keeps max_bytes meaningful.
                    "Accept-Encoding": "identity",
                    # W3C Trace Context: the fetch is part of the request that needed the keys.
                    **outbound_headers(),
                },
                timeout=self._timeout,
                allow_redirects=False,
                stream=True,
            ) as response:
                status = response.status_code
                if 300 <= status < 400:
                    raise _FetchFailed(f"HTTP {status} redirect (redirects are not followed)")
                if status != 200:
                    raise _FetchFailed(f"HTTP {status}")
                body = read_body(response, max_bytes=self._max_bytes, timeout=self._timeout)
                cache_control = response.headers.get("Cache-Control")
                age = response.headers.get("Age")
        except requests.RequestException as exc:
            raise _FetchFailed(f"request failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
        except BodyUnreadable as exc:
            raise _FetchFailed(str(exc)) from None
        try:
            index = _parse_key_set(body, self._algorithms, self._url)
        except _BadKeySet as exc:
            raise _FetchFailed(f"not a JWK Set: {exc}") from exc
        if index.usable == 0:
            logger.warning(
                "JWKS %s: the key set holds no usable key for %s", self._url, sorted(self._algorithms)
            )
        return index, self._freshness_lifetime(cache_control, age)

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
