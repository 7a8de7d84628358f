"""OAuth errors, one exception per error code.

Each error carries its code (RFC 6749 §5.2, RFC 8693 §2.2.2, RFC 7009, RFC 9449),
its HTTP status and a fixed, safe ``error_description``.  The ``detail`` says
what really went wrong; it goes to the log and the audit record, never to the
caller, so an attacker cannot learn which check failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar


class OAuthError(Exception):
    """Base class: an OAuth error response.

    ``reason`` is a short, stable, machine-readable tag for the audit record
    (``subject_token.expired``, ``client.unknown``...).  ``detail`` is free
    text for operators.
    """

    error: ClassVar[str] = "server_error"
    status: ClassVar[int] = 500
    description: ClassVar[str] = "The server could not complete the request."
    #: Fixed descriptions chosen by the first part of ``reason``; never built from input.
    descriptions: ClassVar[dict[str, str]] = {}

    def __init__(self, reason: str, detail: str = "", *, description: str | None = None) -> None:
        super().__init__(reason if not detail else f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        if description is not None:
            # Callers may choose among fixed, safe texts; never interpolate input.
            self.public_description = description
        else:
            self.public_description = self.descriptions.get(reason.partition(".")[0], self.description)

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, object]:
        return {"error": self.error, "error_description": self.public_description}


class InvalidRequest(OAuthError):
    error = "invalid_request"
    status = 400
    description = "The request is missing a parameter, repeats one, or is otherwise malformed."
    descriptions: ClassVar[dict[str, str]] = {
        "subject_token": "The subject token is invalid, expired, already used, or not from a trusted issuer.",
        "actor_token": "The actor token is invalid, or not acceptable as an actor for this subject.",
        "policy": "No policy accepts this subject token (or actor) for the request.",
        "reexchange": "A re-exchanged token can only be narrowed.",
    }


class RiskRefused(InvalidRequest):
    """Refused for risk (RFC 8693 §2.2.2: unacceptable based on policy), with a ``risk`` member.

    ``{"error": "invalid_request", "error_description": "...",
       "risk": {"decision": "deny", "signals": ["shared_signal"]}}``; renewing the
    credential does not help, so there is no ``max_age``.  Refused for
    unconfirmed drift, ``risk.clears`` says what would confirm it (an operator's
    accept, the probation left; docs/policies.md "Drift confirmation").
    """

    description = "The request is refused for risk; the risk member says which signals."
    descriptions: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        signals: tuple[str, ...] = (),
        clears: Sequence[Mapping[str, object]] = (),
    ) -> None:
        super().__init__(reason, detail)
        self.signals = signals
        self.clears = tuple(clears)

    def body(self) -> dict[str, object]:
        risk: dict[str, object] = {"decision": "deny", "signals": list(self.signals)}
        if self.clears:
            risk["clears"] = [dict(c) for c in self.clears]
        return {**super().body(), "risk": risk}


class InvalidClient(OAuthError):
    """RFC 6749 §5.2: 401 with a ``WWW-Authenticate`` challenge."""

    error = "invalid_client"
    status = 401
    description = "Client authentication failed."

    realm: ClassVar[str] = "sts"
    #: The scheme the client used in ``Authorization`` when it is not Basic (one of a fixed set):
    #: RFC 6749 §5.2 asks for a challenge "matching the authentication scheme used by the client".
    used_scheme: str | None = None

    def headers(self) -> dict[str, str]:
        basic = f'Basic realm="{self.realm}", error="invalid_client"'
        if self.used_scheme is None:
            return {"WWW-Authenticate": basic}
        return {"WWW-Authenticate": f'{self.used_scheme} realm="{self.realm}", {basic}'}


class InvalidGrant(OAuthError):
    error = "invalid_grant"
    status = 400
    description = "The grant is invalid."


class StepUpRequired(OAuthError):
    """Stronger or fresher attestation is needed: the workload renews and exchanges again.

    The error code is RFC 9470's ``insufficient_user_authentication``, used here at
    the token endpoint with the same meaning for machines: the authentication event
    behind the presented token is not good enough now.  As RFC 9470 §3 does, it
    names what is needed: ``max_age`` (seconds since attestation) and/or
    ``acr_values`` (the assurance levels that would do, space-separated, lowest
    first; see :mod:`sts.core.assurance`).  Extension members::

        {"error": "insufficient_user_authentication",
         "error_description": "...",
         "max_age": 60,
         "acr_values": "urn:workload-sts:acr:pop urn:workload-sts:acr:posture",
         "step_up": {"required": "assurance_level", "max_attestation_age": 60,
                     "acr_values": ["urn:workload-sts:acr:pop", "urn:workload-sts:acr:posture"],
                     "signals": ["attestation_drift"], "clears": [...]}}

    ``required`` is ``fresh_attestation`` when only ``max_age`` is asked for.
    """

    error = "insufficient_user_authentication"
    status = 400
    description = "Fresh attestation is required: renew the workload credential and exchange again."
    #: Chosen when a level is asked for (fixed text, never built from input).
    level_description: ClassVar[str] = (
        "A higher assurance level is required: present what acr_values names and exchange again."
    )

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        max_age: int | None,
        signals: tuple[str, ...] = (),
        acr_values: Sequence[str] = (),
        clears: Sequence[Mapping[str, object]] = (),
    ) -> None:
        super().__init__(reason, detail, description=self.level_description if acr_values else None)
        self.max_age = max_age
        self.signals = signals
        self.acr_values = tuple(acr_values)
        self.clears = tuple(clears)

    def body(self) -> dict[str, object]:
        step_up: dict[str, object] = {
            "required": "assurance_level" if self.acr_values else "fresh_attestation",
        }
        body: dict[str, object] = super().body()
        if self.max_age is not None:
            body["max_age"] = self.max_age
            step_up["max_attestation_age"] = self.max_age
        if self.acr_values:
            body["acr_values"] = " ".join(self.acr_values)
            step_up["acr_values"] = list(self.acr_values)
        step_up["signals"] = list(self.signals)
        if self.clears:
            step_up["clears"] = [dict(c) for c in self.clears]
        return {**body, "step_up": step_up}


class UnauthorizedClient(OAuthError):
    error = "unauthorized_client"
    status = 400
    description = "The client is not authorized to make this request."


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"
    status = 400
    description = "The grant type is not supported."


class InvalidScope(OAuthError):
    error = "invalid_scope"
    status = 400
    description = "The requested scope is invalid or exceeds what may be granted."


class InvalidTarget(OAuthError):
    """RFC 8693 §2.2.2 / RFC 8707 §2: no token for the requested audience or resource."""

    error = "invalid_target"
    status = 400
    description = "The server will not issue a token for the requested audience or resource."


class UnsupportedTokenType(OAuthError):
    """RFC 7009 §2.2.1."""

    error = "unsupported_token_type"
    status = 400
    description = "The token type is not supported."


class InvalidDPoPProof(OAuthError):
    """RFC 9449 §5."""

    error = "invalid_dpop_proof"
    status = 400
    description = "The DPoP proof is invalid."


class UseDPoPNonce(OAuthError):
    """RFC 9449 §8: the client must retry with the nonce in the ``DPoP-Nonce`` header."""

    error = "use_dpop_nonce"
    status = 400
    description = "Authorization server requires nonce in DPoP proof."

    def __init__(self, nonce: str, reason: str = "dpop.nonce_required", detail: str = "") -> None:
        super().__init__(reason, detail)
        self.nonce = nonce

    def headers(self) -> dict[str, str]:
        return {"DPoP-Nonce": self.nonce}


class ServerError(OAuthError):
    error = "server_error"
    status = 500
    description = "The server could not complete the request."


class TemporarilyUnavailable(OAuthError):
    """A dependency (audit database, replay store, upstream JWKS) is unavailable.

    The server fails closed: nothing is issued.  ``Retry-After`` tells the
    client when to try again.
    """

    error = "temporarily_unavailable"
    status = 503
    description = "The service is temporarily unavailable; retry later."

    def __init__(self, reason: str, detail: str = "", *, retry_after: int = 5) -> None:
        super().__init__(reason, detail)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RateLimited(TemporarilyUnavailable):
    """Too many requests: a rate limit refused this one (RFC 6585 §4: ``429`` with ``Retry-After``).

    RFC 6749 defines no error code for this.  The code is ``temporarily_unavailable``,
    the one registered OAuth error that says "retry later" (RFC 6749 §4.1.2.1), which
    OAuth client libraries already treat as retryable; the status ``429`` (not ``503``)
    tells the caller that the limit is its own, not an outage.  ``invalid_request``
    would be wrong (the request is well formed), and ``slow_down`` (RFC 8628 §3.5)
    belongs to device-code polling and mandates a 5-second back-off of its own.
    The wait is in ``Retry-After`` (delay-seconds, RFC 9110 §10.2.3)::

        HTTP/1.1 429 Too Many Requests
        Retry-After: 3
        Content-Type: application/json

        {"error": "temporarily_unavailable",
         "error_description": "Too many requests; retry after the number of seconds in Retry-After."}
    """

    status = 429
    description = "Too many requests; retry after the number of seconds in Retry-After."


class ConfigurationError(Exception):
    """A setting, policy file or key file is invalid; the service refuses to start."""
