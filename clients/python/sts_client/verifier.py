"""Resource-server verification of the STS's access tokens (RFC 9068, RFC 6750, RFC 9449, RFC 9470).

One call per request::

    verifier = TokenVerifier("https://sts.example.com", "https://deploy.example.com",
                             required_scopes=["deploy:read"])
    token = verifier.verify("POST", "https://deploy.example.com/releases?dry=1", request.headers,
                            scopes=["deploy:write"], max_age=300)

It either returns a :class:`VerifiedAccessToken` or raises a
:class:`~sts_client.errors.VerificationError` whose ``status``, ``headers()``
and ``body()`` are the answer to send.  What is checked, in order:

1. ``Authorization``: exactly one, scheme ``Bearer`` or ``DPoP``, a token68
   credential (RFC 6750 §2.1, RFC 9449 §7.1).  No token at all gets a bare
   challenge without an error code (RFC 6750 §3.1).
2. The JWT (RFC 9068 §4, RFC 8725): compact JWS, header ``typ`` ``at+jwt``,
   no ``crit``, ``alg`` on the explicit list (``ES256`` plus what the
   published keys declare), key from the STS's JWKS by ``kid`` (never from
   the token's header), signature; claims ``iss`` exactly the issuer, ``aud``
   naming this resource, ``exp``/``nbf``/``iat`` with ``leeway``, ``sub``,
   ``client_id`` and ``jti`` present.
3. Sender constraint (RFC 9449 §7.1, §7.2): a token with ``cnf.jkt`` must
   come as ``Authorization: DPoP`` with exactly one ``DPoP`` proof that passes
   :func:`~sts_client.dpop.check_proof`, whose key's thumbprint is
   ``cnf.jkt`` and whose ``jti`` was not seen before within the window; a
   bound token presented as ``Bearer`` is refused, and so is an unbound token
   presented as ``DPoP``.  Other confirmation methods (``x5t#S256``) cannot
   be checked here and are refused.
4. Revocation, when ``introspection`` credentials are given (RFC 7662).
5. Scopes: ``required_scopes`` and the route's ``scopes`` (403
   ``insufficient_scope``).
6. Attestation age and assurance level (RFC 9470 §3): with ``max_age``, a
   token whose ``auth_time`` is older, and with ``acr_values``, a token whose
   ``acr`` reaches none of them (levels are ordered, see
   :mod:`sts_client.assurance`: a higher one will do), gets the
   ``insufficient_user_authentication`` challenge naming both; the workload
   renews with what is asked, exchanges again and retries::

       WWW-Authenticate: Bearer error="insufficient_user_authentication",
         error_description="A higher assurance level is required.",
         acr_values="urn:workload-sts:acr:pop urn:workload-sts:acr:posture", max_age="60"
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import requests
from joserfc import jws
from joserfc.errors import ExpiredTokenError, InvalidClaimError, JoseError, MissingClaimError
from joserfc.jws import JWSRegistry
from joserfc.jwt import JWTClaimsRegistry

from .assurance import at_least, parse_acr_values, rank, satisfies
from .compact import MalformedJWS, extract_compact_jws
from .discovery import DiscoveryError, ServerMetadata, check_endpoint_url, fetch_metadata
from .dpop import (
    DEFAULT_DPOP_ALGORITHMS,
    InMemoryReplayCache,
    ReplayCache,
    ReplayCacheFull,
    check_proof,
    proof_replay_key,
)
from .errors import (
    InsufficientScope,
    InsufficientUserAuthentication,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    MissingToken,
    TemporarilyUnavailable,
    VerificationError,
)
from .introspection import IntrospectionClient, IntrospectionUnavailable
from .jwks import ASYMMETRIC_ALGORITHMS, JWKSCache, KeysUnavailable, UnknownKey

__all__ = ["HeaderSource", "TokenVerifier", "VerifiedAccessToken", "header_values"]

log = logging.getLogger(__name__)

#: RFC 9068 §2.1.
ACCESS_TOKEN_TYP: Final = "at+jwt"
MAX_TOKEN_BYTES: Final = 16 * 1024
#: RFC 6750 §2.1 ``b64token`` (RFC 9110 token68).
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

#: Anything that holds request headers: werkzeug ``Headers``, a ``dict``, ``requests``'
#: ``CaseInsensitiveDict``, ``wsgiref.headers.Headers``, or a list of (name, value) pairs.
HeaderSource = Mapping[str, str] | Iterable[tuple[str, str]] | Any


def header_values(headers: HeaderSource, name: str) -> list[str]:
    """Every value of header ``name`` (case-insensitive), one per field line.

    A server that folds repeated fields into one line joins them with commas
    (RFC 9110 §5.3), and neither a token68 credential nor a compact JWS
    contains a comma, so callers can also split on commas to count them.
    """
    getlist = getattr(headers, "getlist", None)
    if callable(getlist):
        return [str(v) for v in getlist(name)]
    get_all = getattr(headers, "get_all", None)
    if callable(get_all):
        return [str(v) for v in (get_all(name) or [])]
    wanted = name.lower()
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [str(value) for key, value in items if str(key).lower() == wanted]


@dataclass(frozen=True)
class VerifiedAccessToken:
    """What a verified access token says (RFC 9068 §2.2); the token itself is not kept."""

    subject: str
    client_id: str
    audience: tuple[str, ...]
    scopes: frozenset[str]
    issued_at: int
    expires_at: int
    jti: str
    auth_time: int | None = None
    #: The RFC 7638 thumbprint of the key the token is bound to (``cnf.jkt``), if DPoP-bound.
    jkt: str | None = None
    #: RFC 8693 §4.1: the current actor (``act``), with earlier actors nested in it.
    actor: Mapping[str, Any] | None = None
    #: RFC 9470 / RFC 9068 §2.2.1: the assurance level the STS's exchange reached.
    acr: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def token_type(self) -> str:
        return "DPoP" if self.jkt is not None else "Bearer"

    def has_scopes(self, *scopes: str) -> bool:
        return set(scopes) <= self.scopes


def _scope_list(scopes: str | Iterable[str] | None) -> tuple[str, ...]:
    if scopes is None:
        return ()
    if isinstance(scopes, str):
        return tuple(scopes.split())
    return tuple(scopes)


class TokenVerifier:
    """Verifies the STS's access tokens for one resource (audience).

    ``issuer`` is the STS's issuer identifier; its metadata (RFC 8414) gives
    the ``jwks_uri`` and the ``introspection_endpoint`` unless they are passed.
    Nothing is fetched until the first request, so a resource server can
    start while the STS is down (requests then fail closed with 503).

    ``introspection`` is the ``(client_id, secret)`` of this resource server
    at the STS; with it every token is also checked for revocation (answers
    cached ``introspection_cache_seconds``).  ``dpop_max_age`` is how old a
    DPoP proof's ``iat`` may be; its ``jti`` is remembered that long in
    ``replay_cache``.  ``clock`` gives the time (tests pass their own).
    """

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        jwks_uri: str | None = None,
        leeway: int = 30,
        required_scopes: str | Iterable[str] = (),
        introspection: tuple[str, str] | None = None,
        introspection_endpoint: str | None = None,
        introspection_cache_seconds: float = 30.0,
        dpop_max_age: int = 300,
        dpop_algorithms: Iterable[str] = DEFAULT_DPOP_ALGORITHMS,
        replay_cache: ReplayCache | None = None,
        algorithms: Iterable[str] = ("ES256",),
        realm: str | None = None,
        session: requests.Session | None = None,
        timeout: float = 5.0,
        jwks_min_refresh_interval: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_endpoint_url(issuer, "issuer")
        if jwks_uri is not None:
            check_endpoint_url(jwks_uri, "jwks_uri")
        if introspection_endpoint is not None:
            check_endpoint_url(introspection_endpoint, "introspection_endpoint")
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.required_scopes = _scope_list(required_scopes)
        self.dpop_max_age = dpop_max_age
        self.dpop_algorithms = tuple(dpop_algorithms)
        bad = sorted(set(self.dpop_algorithms) - set(ASYMMETRIC_ALGORITHMS))
        if bad or not self.dpop_algorithms:
            raise ValueError(f"DPoP algorithms must be asymmetric JWS algorithms, not {bad or 'none'}")
        self.realm = realm
        self._session = session or requests.Session()
        self._timeout = timeout
        self._clock = clock
        self._replay: ReplayCache = replay_cache if replay_cache is not None else InMemoryReplayCache()
        self._jwks_uri = jwks_uri
        self._introspection_endpoint = introspection_endpoint
        self._metadata: ServerMetadata | None = None
        self._metadata_lock = threading.Lock()
        self.keys = JWKSCache(
            self._resolve_jwks_uri,
            session=self._session,
            base_algorithms=tuple(algorithms),
            timeout=timeout,
            min_refresh_interval=jwks_min_refresh_interval,
        )
        self._introspection = (
            IntrospectionClient(
                self._resolve_introspection_endpoint,
                introspection[0],
                introspection[1],
                session=self._session,
                cache_seconds=introspection_cache_seconds,
                timeout=timeout,
            )
            if introspection is not None
            else None
        )

    def __repr__(self) -> str:
        return f"TokenVerifier(issuer={self.issuer!r}, audience={self.audience!r})"

    # -- discovery ------------------------------------------------------------------------------

    def _server_metadata(self) -> ServerMetadata:
        with self._metadata_lock:
            if self._metadata is None:
                self._metadata = fetch_metadata(self.issuer, session=self._session, timeout=self._timeout)
            return self._metadata

    def _resolve_jwks_uri(self) -> str:
        if self._jwks_uri is None:
            uri = self._server_metadata().jwks_uri
            if uri is None:
                raise DiscoveryError("the STS metadata names no jwks_uri")
            self._jwks_uri = uri
        return self._jwks_uri

    def _resolve_introspection_endpoint(self) -> str:
        if self._introspection_endpoint is None:
            try:
                endpoint = self._server_metadata().introspection_endpoint
            except DiscoveryError as exc:
                raise ValueError(str(exc)) from None
            if endpoint is None:
                raise ValueError("the STS metadata names no introspection_endpoint")
            self._introspection_endpoint = endpoint
        return self._introspection_endpoint

    # -- verification ---------------------------------------------------------------------------

    def verify(
        self,
        method: str,
        url: str,
        headers: HeaderSource,
        *,
        scopes: str | Iterable[str] = (),
        max_age: int | None = None,
        acr_values: str | Iterable[str] | None = None,
        now: float | None = None,
    ) -> VerifiedAccessToken:
        """Verify the request's access token (and DPoP proof); see the module docstring for the checks.

        ``url`` is the request's full URL as the client addressed it (scheme,
        host, path; the query is ignored), which DPoP's ``htu`` must match:
        behind a TLS-terminating proxy, pass the public URL.  ``max_age`` and
        ``acr_values`` are this route's demands on the attestation (RFC 9470):
        ``acr_values`` lists the levels it accepts (any higher level will do).
        """
        current = self._clock() if now is None else now
        scheme = "Bearer"
        try:
            scheme, token = self._credentials(headers)
            claims = self._verify_jwt(token, current, scheme)
            jkt = self._check_binding(claims, scheme, method, url, headers, token, current)
            self._check_active(token, claims, current, scheme)
            verified = self._result(claims, jkt)
            self._check_scopes(verified, _scope_list(scopes), scheme)
            self._check_authentication(verified, max_age, parse_acr_values(acr_values), current, scheme)
        except VerificationError as exc:
            exc.realm = self.realm
            exc.dpop_algorithms = self.dpop_algorithms
            log.info("access token refused: %s (%s %s)", exc.reason, method, _path_of(url))
            raise
        return verified

    def _credentials(self, headers: HeaderSource) -> tuple[str, str]:
        """RFC 6750 §2.1 / RFC 9449 §7.1: ``Authorization: Bearer <token>`` or ``DPoP <token>``."""
        values = header_values(headers, "Authorization")
        if not values:
            raise MissingToken("authorization.missing")
        if len(values) > 1 or "," in values[0]:
            raise InvalidRequest("authorization.repeated")
        auth_scheme, _, credentials = values[0].strip().partition(" ")
        lowered = auth_scheme.lower()
        if lowered not in ("bearer", "dpop"):
            raise MissingToken("authorization.other_scheme")
        scheme = "DPoP" if lowered == "dpop" else "Bearer"
        credentials = credentials.strip(" ")
        if not credentials or not _TOKEN68.fullmatch(credentials):
            raise InvalidRequest("authorization.malformed", scheme=scheme)
        return scheme, credentials

    def _verify_jwt(self, token: str, now: float, scheme: str) -> dict[str, Any]:
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise InvalidToken("token.not_a_jws", scheme=scheme)
        try:
            extracted = extract_compact_jws(token, max_bytes=MAX_TOKEN_BYTES)
        except MalformedJWS as exc:
            raise InvalidToken("token.malformed", str(exc), scheme=scheme) from None
        compact, header, claims = extracted.compact, extracted.header, extracted.claims
        # RFC 9068 §4: typ must be at+jwt ("application/" may be omitted; case-insensitive), so an
        # ID token or an upstream workload token signed by the same keys cannot pass for one.
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower().removeprefix("application/") != ACCESS_TOKEN_TYP:
            raise InvalidToken("token.typ", scheme=scheme)
        if "crit" in header:
            raise InvalidToken("token.crit", scheme=scheme)
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
            raise InvalidToken("token.alg", str(alg)[:20], scheme=scheme)
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("token.kid", scheme=scheme)
        try:
            key = self.keys.key_for(kid, alg)
        except UnknownKey as exc:
            raise InvalidToken("token.unknown_key", str(exc), scheme=scheme) from None
        except KeysUnavailable as exc:
            raise TemporarilyUnavailable("keys.unavailable", str(exc), scheme=scheme) from None
        try:
            registry = JWSRegistry(algorithms=[alg], strict_check_header=False)
            valid = jws.validate_compact(compact, key, registry=registry)
        except (JoseError, ValueError) as exc:
            raise InvalidToken("token.bad_signature", type(exc).__name__, scheme=scheme) from None
        if not valid:
            raise InvalidToken("token.bad_signature", scheme=scheme)
        claims_registry = JWTClaimsRegistry(
            now=int(now),
            leeway=self.leeway,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.audience},
            exp={"essential": True},
            iat={"essential": True},
            sub={"essential": True},
            jti={"essential": True},
            client_id={"essential": True},
        )
        try:
            claims_registry.validate(claims)
        except ExpiredTokenError:
            raise InvalidToken("token.expired", scheme=scheme) from None
        except MissingClaimError as exc:
            raise InvalidToken("token.missing_claim", str(exc), scheme=scheme) from None
        except InvalidClaimError as exc:
            raise InvalidToken("token.invalid_claim", str(exc), scheme=scheme) from None
        except JoseError as exc:
            raise InvalidToken("token.claims", type(exc).__name__, scheme=scheme) from None
        # joserfc compares iss with ==; make sure it is the exact string (RFC 8725 §3.8).
        if claims.get("iss") != self.issuer or not isinstance(claims.get("iss"), str):
            raise InvalidToken("token.iss", scheme=scheme)
        return claims

    def _check_binding(
        self,
        claims: Mapping[str, Any],
        scheme: str,
        method: str,
        url: str,
        headers: HeaderSource,
        token: str,
        now: float,
    ) -> str | None:
        """RFC 9449 §7.1-7.2: the token's key binding and the request's proof of possession."""
        cnf = claims.get("cnf")
        if cnf is None:
            if scheme == "DPoP":
                raise InvalidToken("token.not_dpop_bound", scheme=scheme)
            return None
        jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
        if not isinstance(jkt, str) or not jkt:
            # An mTLS-bound token (x5t#S256) or a confirmation we cannot check: refuse, never ignore.
            raise InvalidToken("token.unsupported_cnf", scheme=scheme)
        if scheme != "DPoP":
            raise InvalidToken("token.dpop_bound_used_as_bearer", scheme=scheme, offer_dpop=True)
        proofs = [part.strip() for value in header_values(headers, "DPoP") for part in value.split(",")]
        if len(proofs) != 1 or not proofs[0]:
            raise InvalidDPoPProof("dpop.count", str(len(proofs)))
        checked = check_proof(
            proofs[0],
            method=method,
            url=url,
            access_token=token,
            algorithms=self.dpop_algorithms,
            now=now,
            max_age=self.dpop_max_age,
            leeway=self.leeway,
        )
        if not secrets.compare_digest(checked.jkt, jkt):
            raise InvalidDPoPProof("dpop.key_mismatch")
        try:
            first = self._replay.first_use(
                proof_replay_key(checked), checked.iat + self.dpop_max_age + self.leeway, now
            )
        except ReplayCacheFull as exc:
            raise TemporarilyUnavailable("dpop.replay_cache_full", str(exc), scheme=scheme) from None
        if not first:
            raise InvalidDPoPProof("dpop.replayed")
        return jkt

    def _check_active(self, token: str, claims: Mapping[str, Any], now: float, scheme: str) -> None:
        if self._introspection is None:
            return
        try:
            active = self._introspection.is_active(token, expires_at=float(claims["exp"]), now=now)
        except IntrospectionUnavailable as exc:
            raise TemporarilyUnavailable("introspection.unavailable", str(exc), scheme=scheme) from None
        if not active:
            raise InvalidToken("token.inactive", scheme=scheme)

    @staticmethod
    def _result(claims: dict[str, Any], jkt: str | None) -> VerifiedAccessToken:
        aud = claims["aud"]
        scope = claims.get("scope")
        auth_time = claims.get("auth_time")
        act = claims.get("act")
        acr = claims.get("acr")
        return VerifiedAccessToken(
            subject=claims["sub"],
            client_id=str(claims["client_id"]),
            audience=(aud,) if isinstance(aud, str) else tuple(aud),
            scopes=frozenset(scope.split()) if isinstance(scope, str) else frozenset(),
            issued_at=int(claims["iat"]),
            expires_at=int(claims["exp"]),
            jti=claims["jti"],
            auth_time=int(auth_time)
            if isinstance(auth_time, int | float) and not isinstance(auth_time, bool)
            else None,
            jkt=jkt,
            actor=MappingProxyType(act) if isinstance(act, dict) else None,
            acr=acr if isinstance(acr, str) else None,
            claims=MappingProxyType(claims),
        )

    def _check_scopes(self, token: VerifiedAccessToken, route_scopes: tuple[str, ...], scheme: str) -> None:
        required = tuple(dict.fromkeys((*self.required_scopes, *route_scopes)))
        if not set(required) <= token.scopes:
            raise InsufficientScope("scope.insufficient", scheme=scheme, required=required)

    @staticmethod
    def _check_authentication(
        token: VerifiedAccessToken,
        max_age: int | None,
        acr_values: tuple[str, ...],
        now: float,
        scheme: str,
    ) -> None:
        """RFC 9470 §3: the attestation behind the token (``auth_time``) is at most ``max_age`` old
        and its level (``acr``) one of ``acr_values`` or above; else a challenge naming both."""
        if max_age is None and not acr_values:
            return
        reason = None
        if acr_values and not satisfies(token.acr, acr_values):
            reason = "acr.too_low" if token.acr is not None else "acr.missing"
        elif max_age is not None and token.auth_time is None:
            reason = "auth_time.missing"
        elif max_age is not None and token.auth_time is not None and now - token.auth_time > max_age:
            reason = "auth_time.too_old"
        if reason is None:
            return
        # Any level at or above the least one named will do: say so, lowest first.
        known = [v for v in acr_values if rank(v) >= 0]
        named = at_least(min(known, key=rank)) if known else acr_values
        raise InsufficientUserAuthentication(reason, scheme=scheme, max_age=max_age, acr_values=named)


def _path_of(url: str) -> str:
    """The path of a URL for the log; the query may carry data that does not belong there."""
    return url.split("?", 1)[0].split("#", 1)[0]
