"""Client authentication at the token endpoint.

* ``client_secret_basic`` / ``client_secret_post`` (RFC 6749 §2.3.1): the
  secret is compared in constant time with its stored hash.
* ``private_key_jwt`` (RFC 7523 §2.2, §3; OpenID Connect Core §9): a JWT
  signed with the client's registered key; ``iss`` = ``sub`` = client_id,
  ``aud`` = this server's issuer identifier (the token endpoint URL is also
  accepted, as many client libraries send it), ``exp`` required and bounded,
  ``jti`` required and usable once until ``exp``.  An assertion typed
  ``client-authentication+jwt`` follows draft-ietf-oauth-rfc7523bis (the
  fix for the "audience injection" attack on assertions whose ``aud`` is a
  token endpoint URL): its ``aud`` must be the issuer identifier, alone, as a
  JSON string.

A client must use the method it is registered with.  Every failure is
``invalid_client`` (401) with the same public description.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..errors import InvalidClient, TemporarilyUnavailable
from ..protocol.client_auth import (
    CLIENT_SECRET_BASIC,
    CLIENT_SECRET_POST,
    NONE,
    PRIVATE_KEY_JWT,
    ClientCredentials,
)
from .claims import ClaimInvalid, ClaimRules, check_claims, normalise_typ
from .client_secrets import SecretChecksPaused, check_secrets
from .jose import JWSInvalid, peek, verify_signature
from .ports import (
    IssuerKeys,
    KeysUnavailable,
    ReplayCache,
    ReplayWindowLost,
    StoreUnavailable,
    UnknownKeyId,
)

#: The explicit type of a client assertion (draft-ietf-oauth-rfc7523bis §4, IANA media type
#: ``application/client-authentication+jwt``).
EXPLICIT_ASSERTION_TYP = "client-authentication+jwt"
#: ``typ`` values accepted on a client assertion: none, ``JWT`` (RFC 7523), or the explicit one.
ASSERTION_TYP = frozenset({None, "jwt", EXPLICIT_ASSERTION_TYP})


@dataclass(frozen=True)
class RegisteredClient:
    client_id: str
    auth_method: str
    secret_hash: str | None = None
    keys: IssuerKeys | None = None
    algorithms: frozenset[str] = frozenset()


def recorded_client_id(clients: Mapping[str, RegisteredClient], client_id: str | None) -> str | None:
    """How a presented ``client_id`` is written to the audit trail and its reasons: as it is when
    it names a registered client; otherwise only as a digest (``unregistered:`` and 16 bytes of its
    SHA-256), since an unknown "client id" is often a secret sent in the wrong place (credentials
    swapped in a Basic header): an outside audit found a client's secret stored in the clear."""
    if client_id is None or client_id in clients:
        return client_id
    digest = hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"unregistered:{digest}"


def is_public(clients: Mapping[str, RegisteredClient], client_id: str) -> bool:
    """Whether ``client_id`` is registered as a public client (``auth_method: none``)."""
    client = clients.get(client_id)
    return client is not None and client.auth_method == NONE


@dataclass(frozen=True)
class AuthenticatedClient:
    client_id: str
    method: str


@dataclass(frozen=True)
class AssertionAudience:
    """What a client assertion's ``aud`` may name (RFC 7523 §3 (3)): this server.

    ``endpoint`` is the URL of the endpoint the assertion is presented at, when
    that is not the token endpoint (``/introspect``, ``/revoke``): client
    libraries such as Authlib sign for the URL they post to, and an assertion
    so signed is usable only there.
    """

    issuer: str
    token_endpoint: str
    endpoint: str | None = None

    def accepted(self) -> frozenset[str]:
        names = {self.issuer, self.issuer.rstrip("/"), self.token_endpoint}
        if self.endpoint is not None:
            names.add(self.endpoint)
        return frozenset(names)


def authenticate_client(
    creds: ClientCredentials,
    clients: Mapping[str, RegisteredClient],
    replay: ReplayCache,
    audience: AssertionAudience,
    *,
    now: float,
    leeway: int,
    max_assertion_lifetime: int,
) -> AuthenticatedClient | None:
    """Return the authenticated client, None for an anonymous request, or raise ``invalid_client``.

    A ``client_id`` without a credential is anonymous too when it names a public client
    (``auth_method: none``, RFC 7591 §2: what client libraries configured for ``none``
    send, RFC 6749 §3.2.1); it proves nothing, so it is never an authenticated client.  Any
    other ``client_id`` without a credential is ``invalid_client`` (RFC 6749 §5.2).
    """
    if (
        creds.method == CLIENT_SECRET_BASIC
        and creds.secret == ""
        and creds.client_id is not None
        and is_public(clients, creds.client_id)
    ):
        # A public client's id in Basic with an empty password: what requests-oauthlib sends for a
        # client without a secret.  It proves nothing, as the id alone in the body (below).
        return None
    if creds.method == NONE:
        if creds.client_id is not None and not is_public(clients, creds.client_id):
            raise InvalidClient(
                "client.unauthenticated_client_id", recorded_client_id(clients, creds.client_id) or ""
            )
        return None
    if creds.method == PRIVATE_KEY_JWT:
        return _authenticate_assertion(
            creds, clients, replay, audience, now=now, leeway=leeway, max_lifetime=max_assertion_lifetime
        )
    client = clients.get(creds.client_id or "")
    if client is None:
        # A client id holding ":" sent as it is (no form encoding): the split naming a client.
        for later_id, later_secret in creds.later_splits:
            if later_id in clients and later_id.isprintable():
                creds = replace(creds, client_id=later_id, secret=later_secret, literal_secret=None)
                client = clients[later_id]
                break
    stored = client.secret_hash if client else None
    candidates = [creds.secret or ""]
    if creds.literal_secret is not None and creds.literal_secret != creds.secret:
        # The same secret as the client literally sent it (see ClientCredentials.literal_secret).
        candidates.append(creds.literal_secret)
    try:
        ok = check_secrets(candidates, stored)
    except SecretChecksPaused:
        raise TemporarilyUnavailable(
            "client.secret_checks_paused", recorded_client_id(clients, creds.client_id) or ""
        ) from None
    if client is None:
        raise InvalidClient("client.unknown", recorded_client_id(clients, creds.client_id) or "")
    if client.auth_method != creds.method and not _basic_for_post(client, creds):
        raise InvalidClient("client.wrong_auth_method", creds.method)
    if not ok:
        raise InvalidClient("client.bad_secret", client.client_id)
    return AuthenticatedClient(client.client_id, creds.method)


def _basic_for_post(client: RegisteredClient, creds: ClientCredentials) -> bool:
    """A ``client_secret_post`` client may send its secret with HTTP Basic too: "The authorization
    server MUST support the HTTP Basic authentication scheme for authenticating clients that were
    issued a client password" (RFC 6749 §2.3.1, where the form parameters are the exception, for
    clients that cannot use Basic).  Not the reverse: a ``client_secret_basic`` client keeps its
    secret out of request bodies."""
    return client.auth_method == CLIENT_SECRET_POST and creds.method == CLIENT_SECRET_BASIC


#: Said to a client whose assertion the replay store can no longer vouch for.
REPLAY_WINDOW_LOST = (
    "The client assertion predates a loss of the server's replay records; sign a fresh assertion."
)


def _authenticate_assertion(
    creds: ClientCredentials,
    clients: Mapping[str, RegisteredClient],
    replay: ReplayCache,
    audience: AssertionAudience,
    *,
    now: float,
    leeway: int,
    max_lifetime: int,
) -> AuthenticatedClient:
    assertion = creds.assertion or ""
    try:
        peeked = peek(assertion)
    except JWSInvalid as exc:
        raise InvalidClient(f"client_assertion.{exc.reason}") from None
    claims = peeked.claims
    iss, sub = claims.get("iss"), claims.get("sub")
    if not isinstance(iss, str) or iss != sub:
        raise InvalidClient("client_assertion.iss_sub_mismatch")
    if creds.client_id is not None and creds.client_id != iss:
        raise InvalidClient("client_assertion.client_id_mismatch")
    client = clients.get(iss)
    if client is None:
        raise InvalidClient("client.unknown", recorded_client_id(clients, iss) or "")
    if client.auth_method != PRIVATE_KEY_JWT or client.keys is None:
        raise InvalidClient("client.wrong_auth_method", PRIVATE_KEY_JWT)
    typ = normalise_typ(peeked.header.get("typ"))
    if typ not in ASSERTION_TYP:
        raise InvalidClient("client_assertion.typ_not_accepted")
    try:
        verify_signature(assertion, peeked, client.algorithms, client.keys.key_for)
    except JWSInvalid as exc:
        raise InvalidClient(f"client_assertion.{exc.reason}") from None
    except UnknownKeyId:
        raise InvalidClient("client_assertion.unknown_kid") from None
    except KeysUnavailable as exc:
        raise TemporarilyUnavailable("client_assertion.keys_unavailable", str(exc)) from None

    explicit = typ == EXPLICIT_ASSERTION_TYP
    rules = ClaimRules(
        leeway=leeway,
        issuer=client.client_id,
        # RFC 7523 §3 (3): aud identifies this server; the URL of the token endpoint (or of the
        # endpoint this request is for) is accepted too, unless the assertion is typed as
        # draft-ietf-oauth-rfc7523bis defines it (then the issuer alone).
        accepted_audiences={audience.issuer} if explicit else audience.accepted(),
        max_remaining=max_lifetime,
        require_jti=True,
    )
    try:
        checked = check_claims(claims, rules, now=now)
    except ClaimInvalid as exc:
        raise InvalidClient(f"client_assertion.{exc.reason}", exc.detail) from None
    if explicit and claims.get("aud") != audience.issuer:
        # draft-ietf-oauth-rfc7523bis §4: the issuer identifier as the sole aud, a JSON string.
        raise InvalidClient("client_assertion.audience_not_sole_issuer")
    exp, jti, iat = checked.exp, checked.jti, checked.iat
    if exp is None or jti is None:  # Required by the rules; this keeps the types honest.
        raise InvalidClient("client_assertion.missing_exp" if exp is None else "client_assertion.missing_jti")
    key = hashlib.sha256(f"{client.client_id}\x00{jti}".encode()).hexdigest()
    # The earliest time it could have been accepted: its iat less the leeway; without iat, the
    # earliest its exp allows (a longer lifetime than max_lifetime is refused above).
    valid_from = iat - leeway if iat is not None else exp - max_lifetime - leeway
    try:
        first = replay.first_use("client_assertion", key, exp + leeway, now, valid_from=valid_from)
    except StoreUnavailable as exc:
        raise TemporarilyUnavailable("store.unavailable", str(exc)) from None
    except ReplayWindowLost as exc:
        raise InvalidClient(
            "client_assertion.replay_window_lost", str(exc), description=REPLAY_WINDOW_LOST
        ) from None
    if not first:
        raise InvalidClient("client_assertion.replayed")
    return AuthenticatedClient(client.client_id, PRIVATE_KEY_JWT)
