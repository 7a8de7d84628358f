"""Client libraries for the workload token-exchange broker (an RFC 8693 STS).

* :mod:`sts_client.verifier` -- resource servers: verify the STS's access
  tokens (RFC 9068, :mod:`sts_client.access_token`), DPoP proofs (RFC 9449),
  attestation age and assurance level (RFC 9470, :mod:`sts_client.assurance`);
  :mod:`sts_client.flask` and :mod:`sts_client.wsgi` plug it into an app.
* :mod:`sts_client.workload` -- workloads: ``requests`` authentication that
  exchanges the workload's credential and renews it on its own
  (:mod:`sts_client.workload_tokens` holds the tokens, whatever the HTTP client).
* :mod:`sts_client.ci` -- the ``sts-ci`` command for GitHub Actions and GitLab CI.

Only ``requests``, ``joserfc`` and ``cryptography`` are needed; Flask only for
:mod:`sts_client.flask`, a Redis client only for :mod:`sts_client.redis_replay`.
"""

from __future__ import annotations

from .assurance import ACR_ATTESTED, ACR_POP, ACR_POSTURE
from .attestation import (
    AttestationSource,
    CallableAttestation,
    FileAttestation,
    GitHubActionsAttestation,
    GitLabCIAttestation,
)
from .dpop import DPoPKey, InMemoryReplayCache, ReplayCache, ReplayCacheUnavailable
from .dpop_nonce import DPoPNonces
from .errors import (
    AttestationUnavailable,
    ExchangeError,
    ExchangeRefused,
    InsufficientScope,
    InsufficientUserAuthentication,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    MissingToken,
    StepUpFailed,
    StsUnavailable,
    TemporarilyUnavailable,
    UseDPoPNonce,
    VerificationError,
)
from .exchange import IssuedToken, TokenExchangeClient
from .redis_replay import RedisReplayCache
from .verifier import TokenVerifier, VerifiedAccessToken
from .workload import StsAuth

__version__ = "0.1.0"

__all__ = [
    "ACR_ATTESTED",
    "ACR_POP",
    "ACR_POSTURE",
    "AttestationSource",
    "AttestationUnavailable",
    "CallableAttestation",
    "DPoPKey",
    "DPoPNonces",
    "ExchangeError",
    "ExchangeRefused",
    "FileAttestation",
    "GitHubActionsAttestation",
    "GitLabCIAttestation",
    "InMemoryReplayCache",
    "InsufficientScope",
    "InsufficientUserAuthentication",
    "InvalidDPoPProof",
    "InvalidRequest",
    "InvalidToken",
    "IssuedToken",
    "MissingToken",
    "RedisReplayCache",
    "ReplayCache",
    "ReplayCacheUnavailable",
    "StepUpFailed",
    "StsAuth",
    "StsUnavailable",
    "TemporarilyUnavailable",
    "TokenExchangeClient",
    "TokenVerifier",
    "UseDPoPNonce",
    "VerificationError",
    "VerifiedAccessToken",
]
