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
  docs/policies.md "Refusals and renewing"): once;
* the resource server answers ``401`` with a ``WWW-Authenticate`` challenge
  ``error="insufficient_user_authentication"`` (RFC 9470, ``acr_values``,
  ``max_age``) or ``error="invalid_token"`` (RFC 6750): the call is then
  retried once with the new token.

A step-up is answered with what reaches what was asked (RFC 9470
``acr_values``, see :mod:`sts_client.assurance`): a new platform token for
``max_age``; a DPoP key for the proof-of-possession level (one is generated
when the workload had none, unless ``dpop_on_demand=False``); a posture token
from the ``posture`` source for the posture level.  The renewal asks the STS
for that level (``acr_values``), so the token it gets reaches it or the STS
says why not.  One attempt per challenge: if it cannot be met (nothing can
present the level, the platform has no newer credential, the STS or the
resource server refuses again), :class:`~sts_client.errors.StepUpFailed` is
raised saying what was asked for and why it could not be met.  It never loops.

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
from typing import Any

from requests.auth import AuthBase
from requests.cookies import extract_cookies_to_jar
from requests.models import PreparedRequest, Response

from .assurance import StepUpRequest, parse_acr_values
from .attestation import (
    AttestationSource,
    CallableAttestation,
    FileAttestation,
    GitHubActionsAttestation,
    GitLabCIAttestation,
)
from .challenges import Challenge, parse_challenges
from .errors import AttestationUnavailable, ExchangeRefused, StepUpFailed, StsUnavailable
from .exchange import IssuedToken, origin_of
from .workload_tokens import WorkloadTokens, token_summary

__all__ = [
    "AttestationSource",
    "AttestationUnavailable",
    "CallableAttestation",
    "ExchangeRefused",
    "FileAttestation",
    "GitHubActionsAttestation",
    "GitLabCIAttestation",
    "StepUpFailed",
    "StsAuth",
    "StsUnavailable",
]

log = logging.getLogger(__name__)

#: Challenges from a resource server that a new token (with fresh attestation) can answer.
RENEWING_ERRORS = frozenset({"insufficient_user_authentication", "invalid_token"})
_RETRIED = "_sts_auth_retried"


class StsAuth(WorkloadTokens, AuthBase):
    """``requests`` authentication with tokens from the STS for one audience.

    Built like :class:`~sts_client.workload_tokens.WorkloadTokens`, which says what each
    argument does.  Each request carries the current token (and a fresh DPoP proof when the
    token is bound); a ``401`` that renewal can answer is retried once with a new token, and a
    DPoP nonce demand once with the nonce (see the module docstring).
    """

    def __repr__(self) -> str:
        return f"StsAuth(audience={self.audience!r}, dpop={self.dpop_key is not None})"

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
        request.headers.pop("DPoP", None)
        request.headers.update(self._presentation(token, request.method or "GET", request.url or ""))

    def _on_response(self, response: Response, **kwargs: Any) -> Response:
        sent = response.request
        if getattr(sent, "_sts_token", None) is None:
            # Not a request this object authorised: a redirect's copy (requests carries the hook
            # over, and strips Authorization when the host changes).  Renewing and retrying here
            # would hand a fresh token to wherever the redirect led (RFC 6750 §5.3).
            return response
        nonce = response.headers.get("DPoP-Nonce")
        if nonce and self.dpop_key is not None and sent.url:
            self._remember_nonce(sent.url, nonce)
        if response.status_code != 401:
            return response
        challenges = parse_challenges(response.headers.get("WWW-Authenticate"))
        errors = {c.error for c in challenges}
        step_up = next((c for c in challenges if c.error == "insufficient_user_authentication"), None)
        asked = _asked_by(step_up, sent.url or "") if step_up is not None else None
        if getattr(sent, _RETRIED, False):
            if asked is not None:
                _release(response)
                raise StepUpFailed(asked, "the resource server refused the renewed token as well")
            return response
        used: IssuedToken | None = getattr(sent, "_sts_token", None)
        if "use_dpop_nonce" in errors and nonce and used is not None and used.is_dpop:
            log.info("resource server asks for a DPoP nonce; retrying with it")
            return self._retry(response, used, kwargs)
        if errors & RENEWING_ERRORS:
            log.info(
                "resource server answered %s%s; renewing attestation and the token",
                ",".join(sorted(str(e) for e in errors & RENEWING_ERRORS)),
                f" ({asked.describe()})" if asked is not None else "",
            )
            try:
                token = self.renew(rejected=used, asked=asked)
            except StepUpFailed:
                _release(response)
                raise
            if asked is not None and self._meets(token, asked) is False:
                _release(response)
                raise StepUpFailed(asked, f"the renewed token does not reach it ({token_summary(token)})")
            return self._retry(response, token, kwargs)
        return response

    def _retry(self, response: Response, token: IssuedToken, kwargs: dict[str, Any]) -> Response:
        """Send the request again, once, with ``token`` (and a new proof)."""
        sent = response.request
        position = getattr(sent, "_sts_body_position", None)
        if position is None and sent.body is not None and not isinstance(sent.body, bytes | str):
            # A body read from an iterator is gone: sent again, the request would go without it.
            # The refusal is the answer (the token is renewed: the caller's next call uses it).
            log.warning("the request is not sent again: its body was an iterator, read once")
            return response
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
        # The adapter runs no hooks: the retried answer is looked at here (a nonce to remember;
        # a resource server refusing the renewed token as well raises StepUpFailed).
        return self._on_response(again, **kwargs)


def _asked_by(challenge: Challenge, url: str) -> StepUpRequest:
    """RFC 9470 §3: what an ``insufficient_user_authentication`` challenge asks for."""
    raw_age = challenge.params.get("max_age")
    # Seconds: ten digits at most (4,301 made int() raise ValueError, out of StsAuth: an outside
    # fuzzing run); a longer value is no usable max_age, as a malformed one is not.
    usable = raw_age is not None and raw_age.isascii() and raw_age.isdigit() and len(raw_age) <= 10
    max_age = int(raw_age) if usable and raw_age is not None else None
    return StepUpRequest(
        parse_acr_values(challenge.params.get("acr_values")), max_age, f"the resource server {origin_of(url)}"
    )


def _release(response: Response) -> None:
    """Consume and close a refused response before raising, so its connection can be reused."""
    _ = response.content
    response.close()
