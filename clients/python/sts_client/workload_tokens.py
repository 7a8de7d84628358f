"""A workload's tokens for one audience: got, cached, renewed and stepped up, and presented.

:class:`WorkloadTokens` holds everything about a workload's tokens that does not
depend on the HTTP client: the exchange (RFC 8693) from its attestation, the
cache, renewal before expiry and with fresh attestation, the step-up to what a
refusal or a challenge asks for (RFC 9470, :mod:`sts_client.assurance`), and the
headers that present a token (``Authorization``, and a DPoP proof with the
server's nonce, RFC 9449 §7.1, §9).  :class:`sts_client.workload.StsAuth` plugs
it into ``requests``; see :mod:`sts_client.workload` for the whole behaviour.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import requests
from joserfc import jws
from joserfc.errors import JoseError

from .assurance import ACR_POP, ACR_POSTURE, LEVELS, StepUpRequest, at_least, rank, satisfies
from .attestation import AttestationSource
from .dpop import DPoPKey
from .errors import AttestationUnavailable, ExchangeRefused, StepUpFailed
from .exchange import JWT_TOKEN_TYPE, IssuedToken, TokenExchangeClient, access_token_only, origin_of

__all__ = ["WorkloadTokens"]

#: The workload library logs under one name, whichever of its modules speaks.
log = logging.getLogger("sts_client.workload")


class WorkloadTokens:
    """Tokens from the STS for one audience (see :class:`sts_client.workload.StsAuth`).

    ``sts_url`` is the STS's issuer (its token endpoint comes from its
    metadata).  ``attestation`` gives the workload's credential.
    ``client_credentials`` is an optional ``(client_id, secret)`` for rules
    that require client authentication.  A token is renewed
    ``min(refresh_margin, refresh_fraction * lifetime)`` seconds before it
    expires.  ``session`` is used for the STS; ``clock`` gives the time.

    ``dpop`` is ``True`` (a key for this process), a :class:`DPoPKey` (one the
    workload keeps, so the STS sees the same key across restarts: the
    proof-of-possession level needs the identity's key to continue), or
    ``False``: then a key is made the first time a step-up asks for proof of
    possession, unless ``dpop_on_demand=False``.  ``posture`` gives posture
    tokens (evidence about the same subject from a trusted issuer), sent with
    every exchange when set.
    """

    def __init__(
        self,
        sts_url: str,
        audience: str,
        *,
        attestation: AttestationSource,
        scope: str | Sequence[str] | None = None,
        resource: str | Sequence[str] | None = None,
        client_credentials: tuple[str, str] | None = None,
        dpop: bool | DPoPKey = False,
        dpop_on_demand: bool = True,
        posture: AttestationSource | None = None,
        subject_token_type: str = JWT_TOKEN_TYPE,
        session: requests.Session | None = None,
        token_endpoint: str | None = None,
        refresh_margin: float = 30.0,
        refresh_fraction: float = 0.1,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self.scope = scope
        self.resource = resource
        self.attestation = attestation
        self.subject_token_type = subject_token_type
        self.dpop_key = dpop if isinstance(dpop, DPoPKey) else DPoPKey() if dpop else None
        self.posture = posture
        self._dpop_on_demand = dpop_on_demand
        #: The assurance level step-ups have asked for so far; every exchange presents what it takes.
        self.level: str | None = None
        self._clock = clock
        self._refresh_margin = refresh_margin
        self._refresh_fraction = refresh_fraction
        self._client = TokenExchangeClient(
            sts_url,
            session=session,
            token_endpoint=token_endpoint,
            client_credentials=client_credentials,
            dpop_key=self.dpop_key,
            timeout=timeout,
            clock=clock,
        )
        self._token: IssuedToken | None = None
        self._lock = threading.RLock()
        #: The ``DPoP-Nonce`` each resource server last sent, by origin (RFC 9449 §9).
        self._nonces: dict[str, str] = {}
        #: How many exchanges this object made (for tests and metrics).
        self.exchanges = 0

    # -- tokens ---------------------------------------------------------------------------------

    def _usable(self, token: IssuedToken | None) -> bool:
        if token is None:
            return False
        margin = min(self._refresh_margin, self._refresh_fraction * token.expires_in)
        return self._clock() < token.expires_at - margin

    def token(self) -> IssuedToken:
        """The cached token, or a new one when there is none or it is about to expire."""
        with self._lock:
            if not self._usable(self._token):
                self._token = self._exchange()
            assert self._token is not None
            return self._token

    def renew(self, rejected: IssuedToken | None = None, asked: StepUpRequest | None = None) -> IssuedToken:
        """A new token from fresh attestation (presenting what ``asked`` needs), unless another
        thread already replaced ``rejected`` with one that will do."""
        with self._lock:
            current = self._token
            if (
                rejected is not None
                and current is not None
                and current is not rejected
                and self._usable(current)
                and (asked is None or self._meets(current, asked) is not False)
            ):
                return current
            self._token = None
            self._token = self._exchange(asked)
            return self._token

    def _exchange(self, asked: StepUpRequest | None = None) -> IssuedToken:
        """Exchange the source's current credential; on a step-up refusal, once more with what it asks.

        ``asked`` is a resource server's step-up, already answered by this renewal: a step-up
        refusal from the STS then means it cannot be met, and is raised rather than retried.
        """
        if asked is not None:
            self._prepare(asked)
        try:
            return self._exchange_once()
        except ExchangeRefused as refusal:
            if not refusal.is_step_up:
                raise
            if asked is not None:
                raise StepUpFailed(
                    asked, f"the STS would not issue it ({_refusal_summary(refusal)})", refusal=refusal
                ) from None
            asked = StepUpRequest(refusal.acr_values, refusal.max_age, "the STS")
            self._prepare(asked, refusal)
            log.info(
                "STS asks for a step-up (%s, signals=%s); renewing the credential",
                asked.describe(),
                ",".join(refusal.signals) or "-",
            )
        # Renewing once is enough (docs/policies.md): a second step-up refusal is raised.
        try:
            return self._exchange_once()
        except ExchangeRefused as again:
            if again.is_step_up:
                raise StepUpFailed(
                    asked, f"the STS refused the renewal too ({_refusal_summary(again)})", refusal=again
                ) from None
            raise

    def _prepare(self, asked: StepUpRequest, refusal: ExchangeRefused | None = None) -> None:
        """Get ready to present what ``asked`` needs, or raise :class:`StepUpFailed` saying why not."""
        if asked.acr_values:
            known = sorted((v for v in asked.acr_values if v in LEVELS), key=rank)
            if not known:
                raise StepUpFailed(
                    asked,
                    f"this client knows none of those levels (it knows {' '.join(LEVELS)})",
                    refusal=refusal,
                )
            problems = [(level, self._cannot_present(level)) for level in known]
            level = next((lv for lv, problem in problems if problem is None), None)
            if level is None:
                raise StepUpFailed(asked, problems[0][1] or "", refusal=refusal)
            self._present(level)
        if (asked.max_age is not None or not asked.acr_values) and not getattr(
            self.attestation, "renewable", True
        ):
            raise StepUpFailed(
                asked,
                "the attestation source cannot give a newer credential (it is fixed for this job or process)",
                refusal=refusal,
            )

    def _cannot_present(self, level: str) -> str | None:
        """Why this workload cannot reach ``level`` (None when it can)."""
        if rank(level) >= rank(ACR_POP) and self.dpop_key is None and not self._dpop_on_demand:
            return "proof of possession is needed, and DPoP is off (StsAuth(dpop=..., dpop_on_demand=False))"
        if level == ACR_POSTURE and self.posture is None:
            return (
                "posture evidence is needed, and no posture token source is configured (StsAuth(posture=...))"
            )
        return None

    def _present(self, level: str) -> None:
        if rank(level) >= rank(ACR_POP) and self.dpop_key is None:
            log.info("a step-up asks for proof of possession: generating a DPoP key for this process")
            self.dpop_key = DPoPKey()
            self._client.dpop_key = self.dpop_key
        if rank(level) > rank(self.level):
            self.level = level

    def _meets(self, token: IssuedToken, asked: StepUpRequest) -> bool | None:
        """Whether ``token`` (its unverified claims: the client only decides whether to try it)
        reaches ``asked``; None when the token cannot be read."""
        claims = _unverified_claims(token.access_token)
        if claims is None:
            return None
        if asked.acr_values and not satisfies(claims.get("acr"), asked.acr_values):
            return False
        if asked.max_age is None:
            return True
        auth_time = _seconds(claims.get("auth_time"))
        return auth_time is not None and self._clock() - auth_time <= asked.max_age

    def _exchange_once(self) -> IssuedToken:
        subject_token = self.attestation.fetch()
        posture_token = None
        if self.posture is not None:
            try:
                posture_token = self.posture.fetch()
            except AttestationUnavailable:
                if self.level == ACR_POSTURE:
                    raise
                log.warning("no posture token this time; exchanging without one")
        self.exchanges += 1
        issued = self._client.exchange(
            subject_token,
            audience=self.audience,
            resource=self.resource,
            scope=self.scope,
            subject_token_type=self.subject_token_type,
            posture_token=posture_token,
            acr_values=at_least(self.level) if self.level else None,
        )
        access_token_only(issued)
        log.info(
            "obtained a %s token for %s (scope %s, %d s)",
            issued.token_type,
            self.audience,
            issued.scope or "-",
            issued.expires_in,
        )
        return issued

    # -- presenting -----------------------------------------------------------------------------

    def _presentation(self, token: IssuedToken, method: str, url: str) -> dict[str, str]:
        """The headers that present ``token`` on a ``method`` request to ``url``: ``Authorization``,
        and for a DPoP-bound token a fresh proof carrying the nonce the server last sent."""
        if token.is_dpop and self.dpop_key is not None:
            with self._lock:
                nonce = self._nonces.get(origin_of(url))
            proof = self.dpop_key.proof(
                method, url, access_token=token.access_token, nonce=nonce, now=self._clock()
            )
            return {"Authorization": f"DPoP {token.access_token}", "DPoP": proof}
        return {"Authorization": f"Bearer {token.access_token}"}

    def _remember_nonce(self, url: str, nonce: str) -> None:
        """RFC 9449 §9: the ``DPoP-Nonce`` a resource server sent, for the next proofs to its origin."""
        with self._lock:
            self._nonces[origin_of(url)] = nonce


def _unverified_claims(token: str) -> dict[str, Any] | None:
    """An access token's claims, not verified: only for deciding whether a renewal can help."""
    try:
        payload = json.loads(jws.extract_compact(token.encode("ascii")).payload)
    except (JoseError, ValueError, UnicodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _seconds(value: object) -> float | None:
    """A NumericDate (RFC 7519 §2) as a float; None for anything else: a string, a boolean, or a
    number no float holds or no finite one (a broken STS's ``10**400`` or ``NaN`` raised out of
    StsAuth: an outside re-check)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def token_summary(token: IssuedToken) -> str:
    claims = _unverified_claims(token.access_token) or {}
    auth_time = _seconds(claims.get("auth_time"))
    age = f", attested {int(time.time() - auth_time)} s ago" if auth_time is not None else ""
    return f"acr {claims.get('acr') or 'none'}{age}"


def _refusal_summary(refusal: ExchangeRefused) -> str:
    parts = [refusal.error]
    if refusal.acr_values:
        parts.append(f"acr_values={' '.join(refusal.acr_values)}")
    if refusal.max_age is not None:
        parts.append(f"max_age={refusal.max_age}")
    if refusal.signals:
        parts.append(f"signals={','.join(refusal.signals)}")
    return ", ".join(parts)
