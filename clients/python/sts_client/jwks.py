"""The STS's verification keys, fetched from its ``jwks_uri`` and cached.

Rules (RFC 8725 §3.1, §3.10; RFC 7517):

* keys come only from the issuer's JWK Set, chosen by ``kid``; never from the
  token's own header (``jwk``, ``jku``, ``x5u``, ``x5c`` are ignored);
* only public, asymmetric signature keys are kept: a key with private
  members, a symmetric (``oct``) key, ``use`` other than ``sig``,
  ``key_ops`` without ``verify``, an RSA key under 2048 bits or with a public
  exponent other than 65537 is skipped;
* the algorithms accepted are an explicit list: ``ES256`` (what the STS signs
  with by default) plus what the published keys declare in ``alg``, and
  never ``none`` or ``HS*``; an algorithm must also fit the key's type and
  curve.

Caching: the set is kept for as long as the response's ``Cache-Control:
max-age`` says (RFC 9111 §5.2.2.1; ``no-store``/``no-cache`` mean "refetch
when next needed"), with a floor of ``min_refresh_interval`` so a server
cannot turn every request into a fetch, and a cap.  A token naming an unknown
``kid`` causes one refetch (a key rotation), at most once per
``min_refresh_interval``; concurrent callers share one fetch (single flight).
A set served with a strong ``ETag`` is revalidated with ``If-None-Match``: a
``304 Not Modified`` keeps it for another lifetime without sending it again
(RFC 9110 §13.1.2).
While the issuer is unreachable the last good set keeps serving for
``max_stale`` seconds past its expiry.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final

import requests
from cryptography.exceptions import UnsupportedAlgorithm
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, Key, OKPKey
from joserfc.util import base64_to_int

from .discovery import DiscoveryError, check_endpoint_url, get_json

__all__ = ["ASYMMETRIC_ALGORITHMS", "JWKSCache", "KeysUnavailable", "UnknownKey", "key_fits"]

log = logging.getLogger(__name__)

#: Asymmetric JWS algorithms (RFC 7518 §3.1, RFC 9864) and the key type and curve each needs.
ASYMMETRIC_ALGORITHMS: Final[Mapping[str, tuple[str, str | None]]] = MappingProxyType(
    {
        "ES256": ("EC", "P-256"),
        "ES384": ("EC", "P-384"),
        "ES512": ("EC", "P-521"),
        "RS256": ("RSA", None),
        "RS384": ("RSA", None),
        "RS512": ("RSA", None),
        "PS256": ("RSA", None),
        "PS384": ("RSA", None),
        "PS512": ("RSA", None),
        "Ed25519": ("OKP", "Ed25519"),
        # RFC 8037's name for the same, deprecated by RFC 9864 but what many issuers and clients send.
        "EdDSA": ("OKP", "Ed25519"),
    }
)

#: JWK members only a private or symmetric key has (RFC 7518 §6.2.2, §6.3.2, §6.4.1; RFC 8037 §2).
PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 16384
#: The only RSA public exponent accepted (``"e": "AQAB"``), as by the STS: NIST SP 800-56B Rev. 2
#: §6.2.1 requires 2**16 < e < 2**256, and 65537 is the value every issuer uses; e = 3 and the like
#: are refused.
RSA_PUBLIC_EXPONENT: Final = 65537
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache)\s*(?:[,=]|$)", re.IGNORECASE)


class KeysUnavailable(Exception):
    """No usable key set: the issuer cannot be reached and nothing usable is cached."""


class UnknownKey(Exception):
    """No published key has this ``kid`` (after the one allowed refetch), or it does not fit ``alg``."""


def key_fits(key: Key, alg: str) -> bool:
    """Whether ``alg`` is usable with ``key``: key type, curve, and the JWK's own ``alg`` (RFC 7517 §4.4)."""
    wanted = ASYMMETRIC_ALGORITHMS.get(alg)
    if wanted is None:
        return False
    key_type, curve = wanted
    if key.key_type != key_type:
        return False
    if curve is not None and not (isinstance(key, ECKey | OKPKey) and key.curve_name == curve):
        return False
    return key.alg is None or key.alg == alg


_ED25519_P: Final = 2**255 - 19
_ED448_P: Final = 2**448 - 2**224 - 1
#: RFC 8032 §5.1.2, §5.2.2: the length of a public key's encoding.
_KEY_BYTES: Final = {"Ed25519": 32, "Ed448": 57}
#: By curve: the field prime and the y-coordinates of the points of small order (RFC 8032 curves;
#: libsodium's ``ge25519_has_small_order`` list for Ed25519).  A public key of small order verifies
#: a forged signature (R a small-order point, S = 0) without any private key: a DPoP proof's
#: ``jwk`` comes from the sender, so such a key proves nothing (RFC 9449 §4.3).
_SMALL_ORDER_Y: Final = {
    "Ed25519": (
        _ED25519_P,
        {
            0,
            1,
            _ED25519_P - 1,
            0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,
            0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7,
        },
    ),
    "Ed448": (_ED448_P, {0, 1, _ED448_P - 1}),
}


def _okp_problem(entry: Mapping[str, object]) -> str | None:
    """Why an Ed25519 or Ed448 key must not verify: its ``x`` not a canonical point encoding, or a
    point of small order (a point and its negation share ``y``, read with the sign bit cleared)."""
    curve, value = _SMALL_ORDER_Y.get(str(entry.get("crv"))), entry.get("x")
    if curve is None or not isinstance(value, str):
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        return None
    if len(raw) != _KEY_BYTES[str(entry.get("crv"))]:
        return "OKP key of the wrong length"  # empty ("", "===="), short or long: no point
    y = int.from_bytes(raw, "little") & ~(1 << (8 * len(raw) - 1))
    if y >= curve[0]:
        return "OKP key not canonically encoded"
    return "OKP key of small order" if y in curve[1] else None


def import_public_key(entry: object) -> tuple[Key | None, str]:
    """Import one JWK if it is a well-formed public signature key; else ``(None, why)``.

    Member names are checked before anything is parsed, so a private key is
    never even imported.
    """
    if not isinstance(entry, dict):
        return None, "not a JSON object"
    if entry.get("kty") == "oct":
        return None, "symmetric key"
    private = sorted(PRIVATE_MEMBERS.intersection(entry))
    if private:
        return None, f"private members {private}"
    use = entry.get("use")
    if use is not None and use != "sig":
        return None, "use is not 'sig'"
    key_ops = entry.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return None, "key_ops lacks 'verify'"
    if entry.get("kty") == "RSA":
        modulus = entry.get("n")
        try:
            bits = base64_to_int(modulus).bit_length() if isinstance(modulus, str) else 0
        except ValueError:
            bits = 0
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            return None, f"RSA modulus of {bits} bits"
        exponent = entry.get("e")
        try:
            e = base64_to_int(exponent) if isinstance(exponent, str) else 0
        except ValueError:
            e = 0
        if e != RSA_PUBLIC_EXPONENT:
            return None, f"RSA public exponent other than {RSA_PUBLIC_EXPONENT}"
    if entry.get("kty") == "OKP" and (problem := _okp_problem(entry)) is not None:
        return None, problem
    try:
        key = JWKRegistry.import_key(entry)
    except (JoseError, ValueError, TypeError, KeyError, UnsupportedAlgorithm) as exc:
        return None, f"malformed ({type(exc).__name__})"
    if key.is_private or key.key_type not in ("EC", "RSA", "OKP"):
        return None, "not a public asymmetric key"
    return key, ""


@dataclass(frozen=True)
class _KeySet:
    by_kid: Mapping[str, Key]
    #: The one key of a set of one that has no ``kid`` (RFC 7517 §4.5 allows it).
    only_key: Key | None
    algorithms: frozenset[str]
    fetched_at: float
    expires_at: float
    #: The set's strong ``ETag``, sent as ``If-None-Match`` when it is next fetched (RFC 9110 §13.1.2).
    etag: str | None = None


def _cache_lifetime(cache_control: str | None, default: float, floor: float, cap: float) -> float:
    if cache_control:
        if _NO_CACHE.search(cache_control):
            return floor
        match = _MAX_AGE.search(cache_control)
        if match:
            return min(max(float(match.group(1)), floor), cap)
    return min(max(default, floor), cap)


class JWKSCache:
    """The issuer's keys by ``kid``, fetched over HTTPS when needed.

    ``jwks_uri`` may be a callable, so the URI can come from metadata fetched
    on first use rather than at start.  ``clock`` is monotonic seconds
    (tests pass their own).
    """

    def __init__(
        self,
        jwks_uri: str | Callable[[], str],
        *,
        session: requests.Session | None = None,
        base_algorithms: tuple[str, ...] = ("ES256",),
        timeout: float = 5.0,
        default_max_age: float = 300.0,
        max_cache_age: float = 86400.0,
        min_refresh_interval: float = 30.0,
        max_stale: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        unknown = sorted(set(base_algorithms) - set(ASYMMETRIC_ALGORITHMS))
        if unknown:
            raise ValueError(f"not asymmetric JWS algorithms: {unknown}")
        self._jwks_uri = jwks_uri
        self._session = session or requests.Session()
        self._base_algorithms = frozenset(base_algorithms)
        self._timeout = timeout
        self._default_max_age = default_max_age
        self._max_cache_age = max_cache_age
        self._min_refresh_interval = min_refresh_interval
        self._max_stale = max_stale
        self._clock = clock
        self._keys: _KeySet | None = None
        self._generation = 0
        self._last_attempt: float | None = None
        self._fetch_lock = threading.Lock()
        self._fetches = 0

    @property
    def fetches(self) -> int:
        """How many times the set was fetched (for tests and metrics)."""
        return self._fetches

    def algorithms(self) -> frozenset[str]:
        """``base_algorithms`` plus every asymmetric ``alg`` the published keys declare."""
        keys = self._keys
        return self._base_algorithms | (keys.algorithms if keys is not None else frozenset())

    def key_for(self, kid: str | None, alg: str) -> Key:
        """The published key with ``kid`` usable for ``alg``.

        Raises :class:`UnknownKey` when there is none even after the one
        allowed refetch, :class:`KeysUnavailable` when no key set can be had.
        """
        keys = self._current()
        key = self._lookup(keys, kid)
        if key is None:
            # Perhaps the issuer rotated its keys: refetch once (rate-limited, single flight).
            keys = self._refresh(keys, because_unknown_kid=True)
            key = self._lookup(keys, kid)
        if key is None:
            raise UnknownKey("no published key has this kid")
        if alg not in self._base_algorithms | keys.algorithms or not key_fits(key, alg):
            raise UnknownKey("the algorithm is not allowed for this key")
        return key

    @staticmethod
    def _lookup(keys: _KeySet, kid: str | None) -> Key | None:
        if kid is None:
            return keys.only_key
        return keys.by_kid.get(kid)

    def _current(self) -> _KeySet:
        keys = self._keys
        if keys is not None and self._clock() < keys.expires_at:
            return keys
        return self._refresh(keys, because_unknown_kid=False)

    def _refresh(self, seen: _KeySet | None, *, because_unknown_kid: bool) -> _KeySet:
        generation = self._generation
        with self._fetch_lock:
            current = self._keys
            if self._generation != generation and current is not None:
                # Another thread fetched while this one waited: use its result.
                return current
            now = self._clock()
            if current is not None and now - current.fetched_at < self._min_refresh_interval:
                # Rate limit: tokens with made-up kids must not make us hammer the issuer.
                return current
            if (
                current is not None
                and self._last_attempt is not None
                and now - self._last_attempt < self._min_refresh_interval
            ):
                # The last attempt failed moments ago (threads that waited for it land here too):
                # no new request to the issuer, whatever the kid, until the interval has passed.
                if now < current.expires_at + self._max_stale:
                    return current
                raise KeysUnavailable("the issuer's keys could not be fetched moments ago")
            if (
                current is None
                and self._last_attempt is not None
                and now - self._last_attempt < min(self._min_refresh_interval, 5.0)
            ):
                raise KeysUnavailable("the issuer's keys could not be fetched moments ago")
            self._last_attempt = now
            try:
                fresh = self._fetch(now, current)
            except (DiscoveryError, ValueError) as exc:
                if current is not None and now < current.expires_at + self._max_stale:
                    log.warning("JWKS refetch failed (%s); still using the keys fetched before", exc)
                    return current
                raise KeysUnavailable(str(exc)) from None
            self._keys = fresh
            self._generation += 1
            return fresh

    def _fetch(self, now: float, current: _KeySet | None) -> _KeySet:
        uri = self._jwks_uri() if callable(self._jwks_uri) else self._jwks_uri
        check_endpoint_url(uri, "jwks_uri")
        self._fetches += 1
        request_headers = {"Accept": "application/jwk-set+json, application/json"}
        if current is not None and current.etag is not None:
            request_headers["If-None-Match"] = current.etag
        status, document, headers = get_json(
            self._session, uri, timeout=self._timeout, headers=request_headers
        )
        lifetime = _cache_lifetime(
            headers.get("Cache-Control"),
            self._default_max_age,
            self._min_refresh_interval,
            self._max_cache_age,
        )
        if status == 304 and current is not None and current.etag is not None:
            # The set held is still the published one (RFC 9110 §15.4.5): kept for another lifetime.
            return replace(current, fetched_at=now, expires_at=now + lifetime)
        if status != 200 or not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise DiscoveryError(f"jwks_uri answered HTTP {status} without a JWK Set")
        entries = document["keys"]
        by_kid: dict[str, Key] = {}
        duplicated: set[str] = set()
        usable: list[Key] = []
        for position, entry in enumerate(entries):
            key, why = import_public_key(entry)
            if key is None:
                log.warning("JWKS: skipping key #%d: %s", position, why)
                continue
            kid = key.kid
            if kid is None and len(entries) != 1:
                log.warning("JWKS: skipping key #%d: no kid, in a set of %d", position, len(entries))
                continue
            if kid is not None:
                if kid in by_kid or kid in duplicated:
                    # RFC 7517 §4.5: distinct kids.  Two keys under one kid make the choice arbitrary.
                    log.warning("JWKS: a kid is used twice; neither key is used")
                    duplicated.add(kid)
                    by_kid.pop(kid, None)
                    continue
                by_kid[kid] = key
            usable.append(key)
        declared = frozenset(alg for key in usable if (alg := key.alg) is not None and key_fits(key, alg))
        only_key = usable[0] if len(entries) == 1 and usable and usable[0].kid is None else None
        etag = headers.get("ETag")
        return _KeySet(
            by_kid=MappingProxyType(by_kid),
            only_key=only_key,
            algorithms=declared,
            fetched_at=now,
            expires_at=now + lifetime,
            # Only a strong tag of reasonable size: a weak one (``W/``) names a set only loosely.
            etag=etag if etag and len(etag) <= 256 and etag.startswith('"') else None,
        )
