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
   presented as ``DPoP``.  A token with ``cnf.x5t#S256`` (RFC 8705 §3) needs
   ``client_certificate``, the certificate of the request's mutual-TLS
   connection, whose SHA-256 thumbprint it must be; any other confirmation
   method cannot be checked here and is refused.
   With ``dpop_nonces`` (:class:`~sts_client.dpop_nonce.DPoPNonces`), the
   proof must also carry a nonce this resource server issued recently, else
   ``use_dpop_nonce`` with a ``DPoP-Nonce`` header (RFC 9449 §9).
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

Step 1 is :mod:`sts_client.authorization`, step 2 :mod:`sts_client.access_token`;
this module puts the steps together and checks the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import requests

from .access_token import VerifiedAccessToken, access_token_from_claims, verify_access_token_jwt
from .assurance import at_least, parse_acr_values, rank, satisfies
from .authorization import HeaderSource, dpop_proof, header_values, request_credentials
from .certificate import ClientCertificate, certificate_thumbprint
from .discovery import DiscoveryError, ServerMetadata, check_endpoint_url, fetch_metadata
from .dpop import (
    DEFAULT_DPOP_ALGORITHMS,
    InMemoryReplayCache,
    ReplayCache,
    ReplayCacheFull,
    ReplayCacheUnavailable,
    check_proof,
    proof_replay_key,
)
from .dpop_nonce import DPoPNonces
from .errors import (
    InsufficientScope,
    InsufficientUserAuthentication,
    InvalidDPoPProof,
    InvalidToken,
    TemporarilyUnavailable,
    UseDPoPNonce,
    VerificationError,
)
from .introspection import IntrospectionClient, IntrospectionUnavailable
from .jwks import ASYMMETRIC_ALGORITHMS, JWKSCache

__all__ = ["HeaderSource", "TokenVerifier", "VerifiedAccessToken", "header_values"]

log = logging.getLogger(__name__)

#: Seconds before the issuer's metadata is asked for again after a failed fetch.
METADATA_RETRY_SECONDS = 5.0


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
    ``replay_cache``.  ``dpop_nonces`` makes every DPoP proof carry a nonce
    this resource server issued (RFC 9449 §9; :mod:`sts_client.dpop_nonce`).
    ``clock`` gives the time (tests pass their own).
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
        dpop_nonces: DPoPNonces | None = None,
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
        self.dpop_nonces = dpop_nonces
        self._jwks_uri = jwks_uri
        self._introspection_endpoint = introspection_endpoint
        self._metadata: ServerMetadata | None = None
        self._metadata_lock = threading.Lock()
        #: When fetching the metadata last failed, and why.
        self._metadata_failure: tuple[float, str] | None = None
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
                now = self._clock()
                failed = self._metadata_failure
                if failed is not None and now - failed[0] < METADATA_RETRY_SECONDS:
                    # Failed moments ago: not asked again for every request meanwhile.
                    raise DiscoveryError(failed[1])
                try:
                    self._metadata = fetch_metadata(self.issuer, session=self._session, timeout=self._timeout)
                except DiscoveryError as exc:
                    self._metadata_failure = (now, str(exc))
                    raise
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
        client_certificate: ClientCertificate | None = None,
    ) -> VerifiedAccessToken:
        """Verify the request's access token (and DPoP proof); see the module docstring for the checks.

        ``url`` is the request's full URL as the client addressed it (scheme,
        host, path; the query is ignored), which DPoP's ``htu`` must match:
        behind a TLS-terminating proxy, pass the public URL.  ``max_age`` and
        ``acr_values`` are this route's demands on the attestation (RFC 9470):
        ``acr_values`` lists the levels it accepts (any higher level will do).
        ``client_certificate`` is the client certificate of the request's mutual-TLS
        connection (DER, or PEM), as the TLS layer verified it: a certificate-bound token
        (``cnf.x5t#S256``, RFC 8705 §3) is accepted only over that certificate.
        """
        current = self._clock() if now is None else now
        scheme = "Bearer"
        try:
            scheme, token = request_credentials(headers)
            claims = verify_access_token_jwt(
                token,
                keys=self.keys,
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                now=current,
                scheme=scheme,
            )
            _check_certificate(claims, client_certificate, scheme)
            jkt, nonce = self._check_binding(claims, scheme, method, url, headers, token, current)
            self._check_active(token, claims, current, scheme)
            verified = access_token_from_claims(claims, jkt)
            nonces = self.dpop_nonces
            if nonces is not None and jkt is not None and not nonces.is_current(nonce, current):
                verified = dataclasses.replace(verified, dpop_nonce=nonces.current(current))
            self._check_scopes(verified, _scope_list(scopes), scheme)
            self._check_authentication(verified, max_age, parse_acr_values(acr_values), current, scheme)
        except VerificationError as exc:
            exc.realm = self.realm
            exc.dpop_algorithms = self.dpop_algorithms
            log.info("access token refused: %s (%s %s)", exc.reason, method, _path_of(url))
            raise
        return verified

    def _check_binding(
        self,
        claims: Mapping[str, Any],
        scheme: str,
        method: str,
        url: str,
        headers: HeaderSource,
        token: str,
        now: float,
    ) -> tuple[str | None, str | None]:
        """RFC 9449 §7.1-7.2 and §9: the token's key binding and the request's proof of possession.

        The thumbprint of the key the token is bound to, and the proof's nonce.
        """
        if "cnf" in claims and not isinstance(claims["cnf"], dict):
            # ``"cnf": null`` (or any other non-object) is no absent cnf: never a bearer token
            # (RFC 9449 §7.1; the STS refuses it too: an outside audit).
            raise InvalidToken("token.unsupported_cnf", scheme=scheme)
        cnf = claims.get("cnf")
        if cnf is None or "jkt" not in cnf:
            # Unbound, or bound to a certificate only (checked by _check_certificate).
            if scheme == "DPoP":
                raise InvalidToken("token.not_dpop_bound", scheme=scheme)
            return None, None
        jkt = cnf.get("jkt")
        if not isinstance(jkt, str) or not jkt:
            # A confirmation we cannot check: refuse, never ignore.
            raise InvalidToken("token.unsupported_cnf", scheme=scheme)
        if scheme != "DPoP":
            raise InvalidToken("token.dpop_bound_used_as_bearer", scheme=scheme, offer_dpop=True)
        checked = check_proof(
            dpop_proof(headers),
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
        if self.dpop_nonces is not None and not self.dpop_nonces.accepts(checked.nonce, now):
            # §9: checked before the jti is recorded, so the client's retry with a new proof is clean.
            reason = "dpop.nonce_missing" if checked.nonce is None else "dpop.nonce_unknown"
            raise UseDPoPNonce(reason, self.dpop_nonces.current(now))
        try:
            first = self._replay.first_use(
                proof_replay_key(checked), checked.iat + self.dpop_max_age + self.leeway, now
            )
        except ReplayCacheFull as exc:
            raise TemporarilyUnavailable("dpop.replay_cache_full", str(exc), scheme=scheme) from None
        except ReplayCacheUnavailable as exc:
            raise TemporarilyUnavailable("dpop.replay_cache_unavailable", str(exc), scheme=scheme) from None
        if not first:
            raise InvalidDPoPProof("dpop.replayed")
        return jkt, checked.nonce

    def _check_active(self, token: str, claims: Mapping[str, Any], now: float, scheme: str) -> None:
        if self._introspection is None:
            return
        try:
            active = self._introspection.is_active(token, expires_at=float(claims["exp"]), now=now)
        except IntrospectionUnavailable as exc:
            raise TemporarilyUnavailable("introspection.unavailable", str(exc), scheme=scheme) from None
        if not active:
            raise InvalidToken("token.inactive", scheme=scheme)

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


#: The confirmation methods checked here: DPoP (RFC 9449 §6) and the client certificate (RFC 8705 §3).
_CHECKED_CNF = frozenset({"jkt", "x5t#S256"})


def _check_certificate(claims: Mapping[str, Any], certificate: ClientCertificate | None, scheme: str) -> None:
    """RFC 8705 §3: a token bound to a client certificate (``cnf.x5t#S256``) is accepted only over
    the mutual-TLS connection of that certificate; a mismatch is 401 ``invalid_token``.  A ``cnf``
    naming any other method, or none, is refused: it cannot be checked here, and ignoring it
    would take a bound token for a bearer token."""
    if "cnf" not in claims:
        return
    cnf = claims["cnf"]
    if not isinstance(cnf, dict) or not cnf or not set(cnf) <= _CHECKED_CNF:
        raise InvalidToken("token.unsupported_cnf", scheme=scheme)
    if "x5t#S256" not in cnf:
        return
    bound = cnf["x5t#S256"]
    if not isinstance(bound, str) or not bound:
        raise InvalidToken("token.unsupported_cnf", scheme=scheme)
    if certificate is None:
        raise InvalidToken("token.certificate_required", scheme=scheme)
    try:
        presented = certificate_thumbprint(certificate)
    except (ValueError, TypeError, UnicodeError):
        raise InvalidToken("token.certificate_unreadable", scheme=scheme) from None
    if not secrets.compare_digest(presented, bound):
        raise InvalidToken("token.certificate_mismatch", scheme=scheme)


def _path_of(url: str) -> str:
    """The path of a URL for the log; the query may carry data that does not belong there."""
    return url.split("?", 1)[0].split("#", 1)[0]
