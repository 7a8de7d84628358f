"""Reading a request's credentials: ``Authorization`` (RFC 6750 §2.1, RFC 9449 §7.1) and ``DPoP``.

Parsing only: :class:`~sts_client.verifier.TokenVerifier` decides what they are worth.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import InvalidDPoPProof, InvalidRequest, MissingToken

__all__ = ["HeaderSource", "dpop_proof", "header_values", "request_credentials"]

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


def request_credentials(headers: HeaderSource) -> tuple[str, str]:
    """RFC 6750 §2.1 / RFC 9449 §7.1: ``Authorization: Bearer <token>`` or ``DPoP <token>``.

    Returns ``(scheme, token)``, the scheme as ``Bearer`` or ``DPoP``.  No token at all
    (or another scheme) raises :class:`~sts_client.errors.MissingToken`; a repeated or
    malformed header :class:`~sts_client.errors.InvalidRequest`.
    """
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


def dpop_proof(headers: HeaderSource) -> str:
    """RFC 9449 §7.1: the request's one ``DPoP`` proof (more than one, or none, is refused)."""
    proofs = [part.strip() for value in header_values(headers, "DPoP") for part in value.split(",")]
    if len(proofs) != 1 or not proofs[0]:
        raise InvalidDPoPProof("dpop.count", str(len(proofs)))
    return proofs[0]
