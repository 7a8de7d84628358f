"""The workload library: ``requests`` authentication that gets, caches and renews STS tokens by itself.

::

    import requests
    from sts_client.workload import FileAttestation, StsAuth

    auth = StsAuth("https://sts.example.com", "https://deploy.example.com",
                   scope="deploy:write",
                   attestation=FileAttestation("/var/run/secrets/tokens/sts-token"),
                   dpop=True)
    requests.post("https://deploy.example.com/releases", json={...}, auth=auth)

Before a call, :class:`StsAuth` exchanges the workload's credential for a
token for its audience (RFC 8693) and caches it until shortly before it
expires.  It renews on its own, gathering fresh attestation from its source
and exchanging again, when

* the STS answers the step-up refusal (``insufficient_user_authentication``,
  docs/policies.md "Refusals and renewing"): once; a second refusal is raised;
* the resource server answers ``401`` with a ``WWW-Authenticate`` challenge
  ``error="insufficient_user_authentication"`` (RFC 9470, ``max_age``) or
  ``error="invalid_token"`` (RFC 6750): the call is then retried once with
  the new token.

With ``dpop=True`` a per-process ES256 key is generated; every call carries
a fresh proof (``htm``, ``htu``, ``iat``, ``jti``, ``ath``), and a server
nonce (RFC 9449 §8, §9: ``use_dpop_nonce`` with a ``DPoP-Nonce`` header) is
answered by retrying once with it.  Whether the token really is DPoP-bound is
what the STS's ``token_type`` says (RFC 9449 §5); a ``Bearer`` answer is used
as a bearer token.

Tokens are never logged; ``repr`` shows none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import requests
from requests.auth import AuthBase
from requests.cookies import extract_cookies_to_jar
from requests.models import PreparedRequest, Response

from .attestation import (
    AttestationSource,
    CallableAttestation,
    FileAttestation,
    GitHubActionsAttestation,
    GitLabCIAttestation,
)
from .challenges import parse_challenges
from .dpop import DPoPKey
from .errors import AttestationUnavailable, ExchangeRefused, StsUnavailable
from .exchange import JWT_TOKEN_TYPE, IssuedToken, TokenExchangeClient, origin_of

__all__ = [
    "AttestationSource",
    "AttestationUnavailable",
    "CallableAttestation",
    "ExchangeRefused",
    "FileAttestation",
    "GitHubActionsAttestation",
    "GitLabCIAttestation",
    "StsAuth",
    "StsUnavailable",
]

log = logging.getLogger(__name__)

#: Challenges from a resource server that a new token (with fresh attestation) can answer.
RENEWING_ERRORS = frozenset({"insufficient_user_authentication", "invalid_token"})
_RETRIED = "_sts_auth_retried"


class StsAuth(AuthBase):
    """``requests`` authentication with tokens from the STS for one audience.

    ``sts_url`` is the STS's issuer (its token endpoint comes from its
    metadata).  ``attestation`` gives the workload's credential.
    ``client_credentials`` is an optional ``(client_id, secret)`` for rules
    that require client authentication.  A token is renewed
    ``min(refresh_margin, refresh_fraction * lifetime)`` seconds before it
    expires.  ``session`` is used for the STS; ``clock`` gives the time.
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
        dpop: bool = False,
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
        self.dpop_key = DPoPKey() if dpop else None
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
        self._nonces: dict[str, str] = {}
        #: How many exchanges this object made (for tests and metrics).
        self.exchanges = 0

    def __repr__(self) -> str:
        return f"StsAuth(audience={self.audience!r}, dpop={self.dpop_key is not None})"

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

    def renew(self, rejected: IssuedToken | None = None) -> IssuedToken:
        """A new token from fresh attestation, unless another thread already replaced ``rejected``."""
        with self._lock:
            if rejected is not None and self._token is not rejected and self._usable(self._token):
                assert self._token is not None
                return self._token
            self._token = None
            self._token = self._exchange()
            return self._token

    def _exchange(self) -> IssuedToken:
        """Exchange the source's current credential; on a step-up refusal, once more with a fresh one."""
        try:
            return self._exchange_once()
        except ExchangeRefused as refusal:
            if not refusal.is_step_up or not getattr(self.attestation, "renewable", True):
                raise
            log.info(
                "STS asks for fresh attestation (max_age=%s, signals=%s); renewing the credential",
                refusal.max_age,
                ",".join(refusal.signals) or "-",
            )
        # Renewing once is enough (docs/policies.md): a second step-up refusal is raised.
        return self._exchange_once()

    def _exchange_once(self) -> IssuedToken:
        subject_token = self.attestation.fetch()
        self.exchanges += 1
        issued = self._client.exchange(
            subject_token,
            audience=self.audience,
            resource=self.resource,
            scope=self.scope,
            subject_token_type=self.subject_token_type,
        )
        log.info(
            "obtained a %s token for %s (scope %s, %d s)",
            issued.token_type,
            self.audience,
            issued.scope or "-",
            issued.expires_in,
        )
        return issued

    # -- requests -------------------------------------------------------------------------------

    def __call__(self, request: PreparedRequest) -> PreparedRequest:
        token = self.token()
        self._authorize(request, token)
        try:
            # Remember where the body starts, so a retry can send it again (as HTTPDigestAuth does).
            position = request.body.tell()  # type: ignore[union-attr]
        except AttributeError:
            position = None
        request._sts_body_position = position  # type: ignore[attr-defined]
        request.register_hook("response", self._on_response)  # type: ignore[no-untyped-call]
        return request

    def _authorize(self, request: PreparedRequest, token: IssuedToken) -> None:
        request._sts_token = token  # type: ignore[attr-defined]
        if token.is_dpop and self.dpop_key is not None:
            url = request.url or ""
            with self._lock:
                nonce = self._nonces.get(origin_of(url))
            request.headers["Authorization"] = f"DPoP {token.access_token}"
            request.headers["DPoP"] = self.dpop_key.proof(
                request.method or "GET", url, access_token=token.access_token, nonce=nonce, now=self._clock()
            )
        else:
            request.headers["Authorization"] = f"Bearer {token.access_token}"
            request.headers.pop("DPoP", None)

    def _on_response(self, response: Response, **kwargs: Any) -> Response:
        sent = response.request
        nonce = response.headers.get("DPoP-Nonce")
        if nonce and self.dpop_key is not None and sent.url:
            with self._lock:
                self._nonces[origin_of(sent.url)] = nonce
        if response.status_code != 401 or getattr(sent, _RETRIED, False):
            return response
        errors = {c.error for c in parse_challenges(response.headers.get("WWW-Authenticate"))}
        used: IssuedToken | None = getattr(sent, "_sts_token", None)
        if "use_dpop_nonce" in errors and nonce and used is not None and used.is_dpop:
            log.info("resource server asks for a DPoP nonce; retrying with it")
            return self._retry(response, used, kwargs)
        if errors & RENEWING_ERRORS:
            log.info(
                "resource server answered %s; renewing attestation and the token",
                ",".join(sorted(str(e) for e in errors & RENEWING_ERRORS)),
            )
            return self._retry(response, self.renew(rejected=used), kwargs)
        return response

    def _retry(self, response: Response, token: IssuedToken, kwargs: dict[str, Any]) -> Response:
        """Send the request again, once, with ``token`` (and a new proof)."""
        sent = response.request
        position = getattr(sent, "_sts_body_position", None)
        if position is not None and sent.body is not None:
            sent.body.seek(position)  # type: ignore[union-attr]
        # Consume and release the refused response, so its connection can be reused.
        _ = response.content
        response.close()
        retry = sent.copy()
        setattr(retry, _RETRIED, True)
        retry._sts_body_position = position  # type: ignore[attr-defined]
        cookies = getattr(retry, "_cookies", None)
        if cookies is not None:
            extract_cookies_to_jar(cookies, sent, response.raw)  # type: ignore[no-untyped-call]
            retry.prepare_cookies(cookies)
        self._authorize(retry, token)
        connection = getattr(response, "connection", None)
        if connection is None:
            return response
        again: Response = connection.send(retry, **kwargs)
        again.history.append(response)
        again.request = retry
        return again
