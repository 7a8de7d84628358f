"""RFC 8693 token-exchange request and response, on the wire.

A request looks like this (RFC 8693 §2.1, line breaks for display)::

    POST /token HTTP/1.1
    Content-Type: application/x-www-form-urlencoded

    grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange
    &subject_token=eyJ...&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt
    &audience=https%3A%2F%2Fapi.example.com&scope=deploy%3Awrite

This module checks the shape of the request only: which parameters are
present, repeated or malformed.  Whether the tokens are any good, and what
may be granted, is decided in :mod:`sts.core`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import InvalidRequest, InvalidScope, InvalidTarget, UnsupportedGrantType

GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"

# RFC 8693 §3 token type identifiers.
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TOKEN_TYPE_REFRESH_TOKEN = "urn:ietf:params:oauth:token-type:refresh_token"
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
TOKEN_TYPE_SAML1 = "urn:ietf:params:oauth:token-type:saml1"
TOKEN_TYPE_SAML2 = "urn:ietf:params:oauth:token-type:saml2"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"

#: Token types this service can verify as subject or actor tokens.
ACCEPTED_INPUT_TOKEN_TYPES = frozenset({TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_ACCESS_TOKEN})
#: Token types this service can issue (both are the same RFC 9068 JWT access token).
ISSUABLE_TOKEN_TYPES = frozenset({TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT})

#: Parameters that RFC 8693 §2.1 and RFC 8707 §2 allow to repeat.
REPEATABLE = frozenset({"resource", "audience"})

#: Client authentication in the request body (RFC 6749 §2.3.1, RFC 7521 §4.2), wherever a client
#: authenticates.
CLIENT_AUTHENTICATION_PARAMETERS = frozenset(
    {"client_id", "client_secret", "client_assertion", "client_assertion_type"}
)
#: Every parameter the token endpoint defines: RFC 6749 §4.1.3 ``grant_type``, RFC 8693 §2.1,
#: RFC 8707 §2 ``resource``, client authentication, and this service's extensions
#: (``requested_expires_in``, ``posture_token``) and RFC 9470 ``acr_values``.  Any other parameter is
#: ignored.
TOKEN_EXCHANGE_PARAMETERS = CLIENT_AUTHENTICATION_PARAMETERS | {
    "grant_type",
    "subject_token",
    "subject_token_type",
    "actor_token",
    "actor_token_type",
    "resource",
    "audience",
    "scope",
    "requested_token_type",
    "requested_expires_in",
    "posture_token",
    "acr_values",
}

#: RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_MAX_SCOPES = 64
_MAX_TARGETS = 16
_MAX_LIFETIME_PARAM = 86400


@dataclass(frozen=True)
class TokenExchangeRequest:
    """A well-formed RFC 8693 §2.1 request.  ``repr`` never shows a token."""

    subject_token: str
    subject_token_type: str
    actor_token: str | None
    actor_token_type: str | None
    audiences: tuple[str, ...]
    resources: tuple[str, ...]
    scopes: tuple[str, ...] | None
    requested_token_type: str | None
    requested_lifetime: int | None
    #: Extension: a separately issued posture token about the same subject (see docs/policies.md).
    posture_token: str | None = None
    #: RFC 9470 §4 / OpenID Connect Core §3.1.2.1 ``acr_values``: the assurance levels asked for.
    acr_values: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"TokenExchangeRequest(subject_token_type={self.subject_token_type!r}, "
            f"actor={self.actor_token is not None}, audiences={self.audiences!r}, "
            f"resources={self.resources!r}, scopes={self.scopes!r})"
        )


def single(form: Mapping[str, Sequence[str]], name: str) -> str | None:
    """The one value of ``name``; RFC 6749 §3.1: empty means omitted, repeated is an error."""
    values = form.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest("request.repeated_parameter", name)
    value = values[0]
    return None if value == "" else value


def check_no_repeats(form: Mapping[str, Sequence[str]], defined: AbstractSet[str]) -> None:
    """Refuse a ``defined`` parameter sent more than once (other than ``resource`` and ``audience``).

    RFC 6749 §3.1 and §3.2: "Parameters sent without a value MUST be treated as
    if they were omitted from the request.  The authorization server MUST
    ignore unrecognized request parameters.  Request and response parameters
    MUST NOT be included more than once."  A parameter the endpoint does not
    define is unrecognized, so it is ignored, however often it is sent.
    """
    for name, values in form.items():
        if len(values) > 1 and name in defined and name not in REPEATABLE:
            raise InvalidRequest("request.repeated_parameter", name)


def parse_grant_type(form: Mapping[str, Sequence[str]]) -> str:
    grant_type = single(form, "grant_type")
    if grant_type is None:
        raise InvalidRequest("request.missing_grant_type")
    if grant_type != GRANT_TYPE_TOKEN_EXCHANGE:
        raise UnsupportedGrantType("request.unsupported_grant_type", grant_type[:100])
    return grant_type


def _token_type(value: str, what: str) -> str:
    if value not in ACCEPTED_INPUT_TOKEN_TYPES:
        raise InvalidRequest(f"request.unsupported_{what}_type", value[:100])
    return value


def parse_scope(value: str | None) -> tuple[str, ...] | None:
    """RFC 6749 §3.3: space-delimited, case-sensitive scope tokens; order kept, duplicates dropped."""
    if value is None:
        return None
    tokens = [t for t in value.split(" ") if t]
    if not tokens or len(tokens) > _MAX_SCOPES or not all(_SCOPE_TOKEN.fullmatch(t) for t in tokens):
        raise InvalidScope("request.malformed_scope")
    return tuple(dict.fromkeys(tokens))


def check_resource(value: str) -> str:
    """RFC 8707 §2: an absolute URI without a fragment, else ``invalid_target``."""
    try:
        parts = urlsplit(value)
    except ValueError:
        raise InvalidTarget("request.malformed_resource") from None
    if not parts.scheme or (not parts.netloc and parts.scheme in {"http", "https"}) or "#" in value:
        raise InvalidTarget("request.malformed_resource")
    if any(c.isspace() or ord(c) < 0x21 for c in value):
        raise InvalidTarget("request.malformed_resource")
    return value


def _targets(form: Mapping[str, Sequence[str]], name: str) -> tuple[str, ...]:
    """The distinct values of ``name`` (RFC 8693 §2.1 allows it several times), in order: at most
    :data:`_MAX_TARGETS` once repeats are dropped (the body's size limit bounds the rest)."""
    values = list(dict.fromkeys(v for v in form.get(name, ()) if v != ""))
    if len(values) > _MAX_TARGETS:
        raise InvalidTarget("request.too_many_targets", name)
    if name == "resource":
        values = [check_resource(v) for v in values]
    elif any(any(ord(c) < 0x20 for c in v) for v in values):
        raise InvalidTarget("request.malformed_audience")
    return tuple(values)


def parse_acr_values(value: str | None) -> tuple[str, ...]:
    """``acr_values``: space-separated, in order of preference (OpenID Connect Core §3.1.2.1)."""
    if value is None:
        return ()
    values = tuple(value.split(" "))
    if len(value) > 1000 or len(values) > 10 or not all(values) or not value.isascii():
        raise InvalidRequest("request.malformed_acr_values")
    return values


def parse_token_exchange(form: Mapping[str, Sequence[str]]) -> TokenExchangeRequest:
    """Check the RFC 8693 §2.1 parameters of a request whose grant type is token exchange."""
    check_no_repeats(form, TOKEN_EXCHANGE_PARAMETERS)
    subject_token = single(form, "subject_token")
    subject_token_type = single(form, "subject_token_type")
    if subject_token is None:
        raise InvalidRequest("request.missing_subject_token")
    if subject_token_type is None:
        raise InvalidRequest("request.missing_subject_token_type")
    _token_type(subject_token_type, "subject_token")

    actor_token = single(form, "actor_token")
    actor_token_type = single(form, "actor_token_type")
    # RFC 8693 §2.1: actor_token_type is REQUIRED when actor_token is present
    # and MUST NOT be included otherwise.
    if (actor_token is None) != (actor_token_type is None):
        raise InvalidRequest("request.actor_token_pairing")
    if actor_token_type is not None:
        _token_type(actor_token_type, "actor_token")

    requested_token_type = single(form, "requested_token_type")
    if requested_token_type is not None and requested_token_type not in ISSUABLE_TOKEN_TYPES:
        raise InvalidRequest("request.unsupported_requested_token_type", requested_token_type[:100])

    lifetime_raw = single(form, "requested_expires_in")
    requested_lifetime: int | None = None
    if lifetime_raw is not None:
        if not lifetime_raw.isascii() or not lifetime_raw.isdigit() or len(lifetime_raw) > 6:
            raise InvalidRequest("request.malformed_requested_expires_in")
        requested_lifetime = int(lifetime_raw)
        if not 1 <= requested_lifetime <= _MAX_LIFETIME_PARAM:
            raise InvalidRequest("request.malformed_requested_expires_in")

    return TokenExchangeRequest(
        subject_token=subject_token,
        subject_token_type=subject_token_type,
        actor_token=actor_token,
        actor_token_type=actor_token_type,
        audiences=_targets(form, "audience"),
        resources=_targets(form, "resource"),
        scopes=parse_scope(single(form, "scope")),
        requested_token_type=requested_token_type,
        requested_lifetime=requested_lifetime,
        posture_token=single(form, "posture_token"),
        acr_values=parse_acr_values(single(form, "acr_values")),
    )


@dataclass(frozen=True)
class TokenExchangeResponse:
    """RFC 8693 §2.2.1 successful response."""

    access_token: str
    issued_token_type: str
    token_type: str
    expires_in: int
    scope: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        body: dict[str, object] = {
            "access_token": self.access_token,
            "issued_token_type": self.issued_token_type,
            "token_type": self.token_type,
            "expires_in": self.expires_in,
        }
        if self.scope:
            body["scope"] = " ".join(self.scope)
        return body

    def __repr__(self) -> str:
        return f"TokenExchangeResponse(token_type={self.token_type!r}, expires_in={self.expires_in})"
