"""Errors of the client libraries.

Resource-server side: :class:`VerificationError` and one subclass per
challenge a protected resource answers with (RFC 6750 §3, RFC 9449 §7.1,
RFC 9470 §3).  Each carries its HTTP status, error code and a fixed, safe
``error_description``; ``reason`` is a short machine-readable tag for the
resource server's own log (``token.expired``, ``dpop.htu_mismatch``...) and
never goes to the caller, so an attacker cannot learn which check failed.

Workload side: :class:`ExchangeError` and its subclasses, raised when the
STS refuses a token exchange or cannot be reached, and
:class:`AttestationUnavailable` when the workload's own credential cannot be
had.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .assurance import StepUpRequest
from .challenges import Challenge

__all__ = [
    "AttestationUnavailable",
    "ExchangeError",
    "ExchangeRefused",
    "InsufficientScope",
    "InsufficientUserAuthentication",
    "InvalidDPoPProof",
    "InvalidRequest",
    "InvalidToken",
    "MissingToken",
    "StepUpFailed",
    "StsUnavailable",
    "TemporarilyUnavailable",
    "UseDPoPNonce",
    "VerificationError",
]


# -- resource server --------------------------------------------------------------------------


class VerificationError(Exception):
    """A request's access token (or its proof of possession) is not acceptable.

    ``scheme`` is the authentication scheme the challenge is written for: the
    one the request used (``Bearer`` or ``DPoP``), so a DPoP client gets a
    ``DPoP`` challenge (RFC 9449 §7.1).  The verifier fills in ``realm`` and
    ``dpop_algorithms`` (the ``algs`` parameter) before raising.
    """

    status: ClassVar[int] = 401
    error: ClassVar[str | None] = "invalid_token"
    description: ClassVar[str] = "The access token is invalid."

    def __init__(self, reason: str, detail: str = "", *, scheme: str = "Bearer") -> None:
        super().__init__(reason if not detail else f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.scheme = scheme
        self.realm: str | None = None
        self.dpop_algorithms: tuple[str, ...] = ()

    def params(self) -> dict[str, str]:
        """The challenge's parameters beyond ``realm``, in the order they are written."""
        params: dict[str, str] = {}
        if self.error is not None:
            params["error"] = self.error
            params["error_description"] = self.description
        return params

    def challenges(self) -> list[Challenge]:
        """The ``WWW-Authenticate`` challenges for this refusal (usually one)."""
        return [self._challenge(self.scheme, self.params())]

    def _challenge(self, scheme: str, params: Mapping[str, str]) -> Challenge:
        ordered: dict[str, str] = {}
        if self.realm is not None:
            ordered["realm"] = self.realm
        ordered.update(params)
        if scheme == "DPoP" and self.dpop_algorithms:
            ordered["algs"] = " ".join(self.dpop_algorithms)
        return Challenge(scheme, ordered)

    def headers(self) -> list[tuple[str, str]]:
        """Response headers: one ``WWW-Authenticate`` line per challenge, and ``Cache-Control``."""
        lines = [("WWW-Authenticate", challenge.render()) for challenge in self.challenges()]
        return [*lines, ("Cache-Control", "no-store")]

    def body(self) -> dict[str, Any]:
        """A JSON body repeating the error (empty when the challenge carries no error code)."""
        if self.error is None:
            return {}
        return {"error": self.error, "error_description": self.description}


class MissingToken(VerificationError):
    """No access token at all (or one in a scheme we do not take): RFC 6750 §3.1 says no error code.

    The answer offers both schemes this resource accepts::

        WWW-Authenticate: Bearer
        WWW-Authenticate: DPoP algs="ES256 PS256"
    """

    error = None
    description = "An access token is required."

    def challenges(self) -> list[Challenge]:
        return [self._challenge("Bearer", {}), self._challenge("DPoP", {})]


class InvalidRequest(VerificationError):
    """RFC 6750 §3.1 ``invalid_request``: malformed ``Authorization``, or it appears twice."""

    status = 400
    error = "invalid_request"
    description = "The request is malformed."


class InvalidToken(VerificationError):
    """RFC 6750 §3.1 ``invalid_token``: expired, revoked, malformed, or not for us.

    With ``offer_dpop`` (a DPoP-bound token presented as a bearer token, RFC
    9449 §7.2) a second challenge tells the client which scheme to use.
    """

    error = "invalid_token"
    description = "The access token is invalid."

    def __init__(self, reason: str, detail: str = "", *, scheme: str = "Bearer", offer_dpop: bool = False):
        super().__init__(reason, detail, scheme=scheme)
        self.offer_dpop = offer_dpop

    def challenges(self) -> list[Challenge]:
        challenges = super().challenges()
        if self.offer_dpop and self.scheme != "DPoP":
            challenges.append(self._challenge("DPoP", {}))
        return challenges


class InsufficientScope(VerificationError):
    """RFC 6750 §3.1 ``insufficient_scope`` (403), naming the scopes the resource needs."""

    status = 403
    error = "insufficient_scope"
    description = "The access token does not grant the scope this resource requires."

    def __init__(
        self, reason: str, detail: str = "", *, scheme: str = "Bearer", required: Sequence[str] = ()
    ):
        super().__init__(reason, detail, scheme=scheme)
        self.required = tuple(required)

    def params(self) -> dict[str, str]:
        return {**super().params(), "scope": " ".join(self.required)}


class InsufficientUserAuthentication(VerificationError):
    """RFC 9470 §3: the attestation behind the token is too old, or its assurance level too low.

    For a workload, "authentication" is its attestation: the STS sets the
    token's ``auth_time`` to when the workload's own credential was issued and
    its ``acr`` to the assurance level the exchange reached (see
    :mod:`sts_client.assurance`), so the workload answers this by renewing
    with what is asked and exchanging again (docs/policies.md, "Refusals and
    renewing")::

        WWW-Authenticate: Bearer error="insufficient_user_authentication",
          error_description="A higher assurance level is required.",
          acr_values="urn:workload-sts:acr:pop urn:workload-sts:acr:posture", max_age="60"
    """

    error = "insufficient_user_authentication"
    description = "More recent attestation is required."
    level_description: ClassVar[str] = "A higher assurance level is required."

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        scheme: str = "Bearer",
        max_age: int | None = None,
        acr_values: Sequence[str] = (),
    ):
        super().__init__(reason, detail, scheme=scheme)
        self.max_age = max_age
        self.acr_values = tuple(acr_values)

    @property
    def text(self) -> str:
        """The error_description: a fixed text chosen by what fell short (the level, or the age of
        the attestation behind a token whose level would do: the challenge names both)."""
        return (
            self.level_description if self.acr_values and self.reason.startswith("acr.") else self.description
        )

    def params(self) -> dict[str, str]:
        params = {"error": self.error, "error_description": self.text}
        if self.acr_values:
            params["acr_values"] = " ".join(self.acr_values)
        if self.max_age is not None:
            params["max_age"] = str(self.max_age)
        return params

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error, "error_description": self.text}
        if self.acr_values:
            body["acr_values"] = " ".join(self.acr_values)
        if self.max_age is not None:
            body["max_age"] = self.max_age
        return body


class InvalidDPoPProof(VerificationError):
    """RFC 9449 §7.1 ``invalid_dpop_proof``; always a ``DPoP`` challenge listing ``algs``."""

    error = "invalid_dpop_proof"
    description = "The DPoP proof is invalid."

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail, scheme="DPoP")


class UseDPoPNonce(VerificationError):
    """RFC 9449 §9 ``use_dpop_nonce``: the proof needs this resource server's current nonce.

    A ``DPoP`` challenge, and the nonce to use in the ``DPoP-Nonce`` response header.
    """

    error = "use_dpop_nonce"
    description = "Resource server requires nonce in DPoP proof"

    def __init__(self, reason: str, nonce: str) -> None:
        super().__init__(reason, scheme="DPoP")
        self.nonce = nonce

    def headers(self) -> list[tuple[str, str]]:
        return [*super().headers(), ("DPoP-Nonce", self.nonce)]


class TemporarilyUnavailable(VerificationError):
    """The issuer's keys (or its introspection endpoint) cannot be reached: fail closed with 503.

    No challenge: the client did nothing wrong and must not renew its token.
    """

    status = 503
    error = "temporarily_unavailable"
    description = "The token cannot be checked right now; retry later."

    def challenges(self) -> list[Challenge]:
        return []

    def headers(self) -> list[tuple[str, str]]:
        return [("Retry-After", "5"), ("Cache-Control", "no-store")]


# -- workload -----------------------------------------------------------------------------------


class ExchangeError(Exception):
    """A token exchange did not produce a token."""


class StsUnavailable(ExchangeError):
    """The STS could not be reached, answered ``temporarily_unavailable``/5xx, or answered nonsense."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        #: Seconds the STS asked the caller to wait (``Retry-After``, RFC 9110 §10.2.3), if it said.
        self.retry_after = retry_after


class ExchangeRefused(ExchangeError):
    """The STS answered an OAuth error (RFC 6749 §5.2, RFC 8693 §2.2.2).

    ``body`` is the STS's JSON error object; ``max_age``, ``acr_values`` and
    ``step_up`` are set for a step-up refusal (``insufficient_user_authentication``),
    ``risk`` for a refusal for risk; ``clears`` says what would confirm
    unconfirmed attestation drift (an operator's accept, the probation left...).
    """

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        self.status = status
        self.body = dict(body)
        error = body.get("error")
        self.error = error if isinstance(error, str) else "invalid_response"
        description = body.get("error_description")
        self.description = description if isinstance(description, str) else ""
        max_age = body.get("max_age")
        self.max_age = max_age if isinstance(max_age, int) and not isinstance(max_age, bool) else None
        acr_values = body.get("acr_values")
        self.acr_values: tuple[str, ...] = (
            tuple(v for v in acr_values.split(" ") if v) if isinstance(acr_values, str) else ()
        )
        step_up = body.get("step_up")
        self.step_up: dict[str, Any] | None = step_up if isinstance(step_up, dict) else None
        risk = body.get("risk")
        self.risk: dict[str, Any] | None = risk if isinstance(risk, dict) else None
        super().__init__(f"{self.error}: {self.description}" if self.description else self.error)

    @property
    def is_step_up(self) -> bool:
        """Fresh attestation would help: RFC 9470's code, used by the STS for machines."""
        return self.error == "insufficient_user_authentication"

    @property
    def signals(self) -> list[str]:
        """The risk signals the STS named (step-up or risk refusal), if any."""
        for member in (self.step_up, self.risk):
            if member is not None and isinstance(member.get("signals"), list):
                return [str(s) for s in member["signals"]]
        return []

    @property
    def clears(self) -> list[dict[str, Any]]:
        """What would confirm unconfirmed drift (``step_up.clears`` or ``risk.clears``), if any."""
        for member in (self.step_up, self.risk):
            if member is not None and isinstance(member.get("clears"), list):
                return [dict(c) for c in member["clears"] if isinstance(c, dict)]
        return []


class StepUpFailed(ExchangeRefused):
    """A step-up (from the STS or a resource server) could not be answered; raised after one attempt.

    ``asked`` is what was asked for (``acr_values``, ``max_age``, and by
    whom); ``why`` says why this workload could not meet it.  When the STS
    refused the renewal, ``status`` and ``body`` are that refusal's; otherwise
    they describe the challenge.
    """

    def __init__(self, asked: StepUpRequest, why: str, *, refusal: ExchangeRefused | None = None) -> None:
        body: dict[str, Any] = (
            refusal.body
            if refusal is not None
            else {
                "error": "insufficient_user_authentication",
                **({"acr_values": " ".join(asked.acr_values)} if asked.acr_values else {}),
                **({"max_age": asked.max_age} if asked.max_age is not None else {}),
            }
        )
        super().__init__(refusal.status if refusal is not None else 401, body)
        self.asked = asked
        self.why = why
        self.args = (f"{asked.asked_by} asked for {asked.describe()}; it could not be met: {why}",)


class AttestationUnavailable(Exception):
    """The workload's own credential (its attestation) cannot be obtained; the message says why."""
