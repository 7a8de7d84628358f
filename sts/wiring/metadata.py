"""The authorization server's metadata document (RFC 8414) and the endpoint URLs it names."""

from __future__ import annotations

from typing import Any

from ..core.assurance import LEVELS
from ..core.dpop import allowed_algorithms
from ..core.policy.index import PolicySet
from ..protocol.token_exchange import GRANT_TYPE_TOKEN_EXCHANGE
from ..settings import Settings


def introspection_endpoint(settings: Settings) -> str:
    return settings.issuer.rstrip("/") + "/introspect"


def revocation_endpoint(settings: Settings) -> str:
    return settings.issuer.rstrip("/") + "/revoke"


def build_metadata(settings: Settings, policy: PolicySet) -> dict[str, Any]:
    """RFC 8414 §2 metadata; ``issuer`` is exactly the configured issuer.

    §3.2: a member with zero elements is left out, never sent as ``[]``: so no
    ``code_challenge_methods_supported`` (no PKCE: there is no authorization
    endpoint).  ``response_types_supported`` is REQUIRED by §2 all the same;
    it holds ``none`` (the registered response type under which the
    authorization endpoint issues nothing), which is what a server without an
    authorization endpoint supports, and what clients that validate metadata
    (Authlib) accept.
    """
    methods = ["client_secret_basic", "client_secret_post", "private_key_jwt"]
    # What registered private_key_jwt clients may actually use (RFC 8414 §2).
    assertion_algs = sorted(
        {a for c in settings.clients if c.auth_method == "private_key_jwt" for a in c.algorithms}
        or {"ES256", "ES384", "RS256", "PS256", "Ed25519", "EdDSA"}
    )
    if policy.allows_anonymous:
        methods.append("none")
    metadata: dict[str, Any] = {
        "issuer": settings.issuer,
        "token_endpoint": settings.token_endpoint,
        "jwks_uri": settings.jwks_uri,
        "grant_types_supported": [GRANT_TYPE_TOKEN_EXCHANGE],
        "response_types_supported": ["none"],
        "token_endpoint_auth_methods_supported": methods,
        "token_endpoint_auth_signing_alg_values_supported": assertion_algs,
        "dpop_signing_alg_values_supported": sorted(allowed_algorithms(settings.dpop_algorithms)),
        # RFC 9470 §6 / OpenID Connect Discovery: the assurance levels, lowest first (sts.core.assurance).
        "acr_values_supported": list(LEVELS),
        "introspection_endpoint": introspection_endpoint(settings),
        "introspection_endpoint_auth_methods_supported": methods[:3],
        "introspection_endpoint_auth_signing_alg_values_supported": assertion_algs,
        "revocation_endpoint": revocation_endpoint(settings),
        "revocation_endpoint_auth_methods_supported": methods[:3],
        "revocation_endpoint_auth_signing_alg_values_supported": assertion_algs,
        "service_documentation": "https://github.com/workload-sts/workload-sts#readme",
    }
    if settings.mtls_client_cert_header:
        # RFC 8705 §3.3: tokens are bound to the client certificate a trusted proxy forwards
        # (``cnf.x5t#S256``); left out, the member means false.
        metadata["tls_client_certificate_bound_access_tokens"] = True
    # RFC 8414 §3.2: "Claims with zero elements MUST be omitted from the response."
    return {name: value for name, value in metadata.items() if value != []}
