"""SPIFFE JWT-SVIDs (SPIFFE JWT-SVID standard; SPIFFE ID standard).

``sub`` is the SPIFFE ID ``spiffe://TRUST-DOMAIN/path``: lower-case trust
domain of ``[a-z0-9.-_]``, path segments of ``[A-Za-z0-9.-_]`` that are not
``.`` or ``..``, no query, fragment, port or user info.  The trust domain
must be the one the issuer entry is configured for (``trust_domain``), so a
bundle for one trust domain can never vouch for another.  ``aud`` and
``exp`` are required (checked in attestation); ``typ`` may be absent,
``JWT`` or ``JOSE``; algorithms are RS/ES/PS 256/384/512.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ...errors import ConfigurationError
from .base import ProfileOptions, refuse

NAME = "spiffe"
ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"})
TYP = frozenset({None, "jwt", "jose"})
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
MAX_ID_LENGTH = 2048


def parse_spiffe_id(value: str) -> tuple[str, str]:
    """Return (trust domain, path) of a valid SPIFFE ID, else raise ValueError."""
    if len(value) > MAX_ID_LENGTH or not value.startswith("spiffe://"):
        raise ValueError("not a spiffe:// URI")
    rest = value[len("spiffe://") :]
    trust_domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise ValueError("bad trust domain")
    if slash:
        segments = path.split("/")
        if any(not _SEGMENT.fullmatch(s) or s in {".", ".."} for s in segments):
            raise ValueError("bad path")
        return trust_domain, "/" + path
    return trust_domain, ""


class SpiffeProfile:
    name = NAME

    def check_options(self, issuer_name: str, options: ProfileOptions) -> None:
        if not options.trust_domain or not _TRUST_DOMAIN.fullmatch(options.trust_domain):
            raise ConfigurationError(
                f"setting issuers.{issuer_name}.trust_domain: a SPIFFE issuer needs its "
                "trust domain (lower-case, e.g. example.org)"
            )

    def facts(self, subject: str, claims: Mapping[str, Any], options: ProfileOptions) -> dict[str, Any]:
        try:
            trust_domain, path = parse_spiffe_id(subject)
        except ValueError as exc:
            raise refuse(NAME, "malformed_spiffe_id", str(exc)) from None
        if trust_domain != options.trust_domain:
            raise refuse(NAME, "foreign_trust_domain", trust_domain[:100])
        return {"spiffe_id": subject, "trust_domain": trust_domain, "path": path}
