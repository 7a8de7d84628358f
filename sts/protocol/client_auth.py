"""Client credentials on the wire (RFC 6749 §2.3, RFC 7521 §4.2, RFC 7523 §2.2).

Three ways a client may authenticate at the token endpoint, never more than
one at once (RFC 6749 §2.3)::

    Authorization: Basic base64(urlencode(client_id) ":" urlencode(secret))
    client_id=...&client_secret=...                          (client_secret_post)
    client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer
    &client_assertion=eyJ...                                  (private_key_jwt)

or none at all, when a policy rule lets the subject token be the only credential.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

from ..errors import InvalidClient, InvalidRequest
from .token_exchange import single

#: Authorization schemes a client may mistakenly use here, as each is written in a challenge.
_KNOWN_SCHEMES = {
    "bearer": "Bearer",
    "dpop": "DPoP",
    "digest": "Digest",
    "negotiate": "Negotiate",
    "token": "Token",
    "mac": "MAC",
    "hoba": "HOBA",
    "gnap": "GNAP",
}
CLIENT_ASSERTION_TYPE_JWT = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

NONE = "none"
CLIENT_SECRET_BASIC = "client_secret_basic"
CLIENT_SECRET_POST = "client_secret_post"
PRIVATE_KEY_JWT = "private_key_jwt"

#: RFC 6749 Appendix A.1: client-id = *VSCHAR, VSCHAR = %x20-7E.
_CLIENT_ID = re.compile(r"[\x20-\x7e]{1,255}")


@dataclass(frozen=True)
class ClientCredentials:
    method: str
    client_id: str | None = None
    secret: str | None = field(default=None, repr=False)
    assertion: str | None = field(default=None, repr=False)
    #: Basic credentials as sent, before form-decoding: many clients (google-auth, Authlib)
    #: skip RFC 6749 §2.3.1's encoding, so a secret with ``+`` or ``%`` is tried both ways.
    literal_secret: str | None = field(default=None, repr=False)
    #: Basic credentials as sent, split at each later ``:`` (id, secret): a client id holding ``:``
    #: sent without the form encoding (Authlib, requests, google-auth do so) is found by the split
    #: whose id is registered (see :func:`sts.core.clients.authenticate_client`).
    later_splits: tuple[tuple[str, str], ...] = field(default=(), repr=False)


def _decode_basic(value: str) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
    """RFC 6749 §2.3.1 / RFC 7617: base64 of ``urlencoded-id:urlencoded-secret``.

    Bytes that are not UTF-8 are read as ISO-8859-1: RFC 7617 §2.1 leaves the charset to the
    server, and clients that skip the form encoding send a secret's non-ASCII characters in that
    charset (Authlib, and requests' ``HTTPBasicAuth`` under requests-oauthlib: an outside interop
    check had them refused).  A client id must be ASCII either way (``_check_client_id``)."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidClient("client.malformed_basic_credentials") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    client_id, sep, literal = text.partition(":")
    if not sep:
        raise InvalidClient("client.malformed_basic_credentials")
    parts = text.split(":")
    later = tuple((":".join(parts[:n]), ":".join(parts[n:])) for n in range(2, min(len(parts), 9)))
    client_id, secret = unquote_plus(client_id), unquote_plus(literal)
    if not client_id:
        raise InvalidClient("client.malformed_basic_credentials")
    _check_client_id(client_id)
    return client_id, secret, literal, later


def _check_client_id(client_id: str | None) -> None:
    """RFC 6749 Appendix A.1: refuse a ``client_id`` that is not VSCHAR.

    No registered client has such an id, and a control character (NUL) in the
    audit record would make PostgreSQL refuse the row, losing the refusal.
    """
    if client_id is not None and not _CLIENT_ID.fullmatch(client_id):
        raise InvalidClient("client.malformed_client_id")


def parse_client_credentials(
    form: Mapping[str, Sequence[str]], authorization: str | None
) -> ClientCredentials:
    form_id = single(form, "client_id")
    _check_client_id(form_id)
    form_secret = single(form, "client_secret")
    assertion = single(form, "client_assertion")
    assertion_type = single(form, "client_assertion_type")

    basic: tuple[str, str, str, tuple[tuple[str, str], ...]] | None = None
    if authorization is not None:
        scheme, _, rest = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            # Record only a known scheme name: a bare secret in the header must not reach the audit trail.
            known = scheme.lower() if scheme.lower() in _KNOWN_SCHEMES else "other"
            refused = InvalidClient("client.unsupported_authorization_scheme", known)
            refused.used_scheme = _KNOWN_SCHEMES.get(known)
            raise refused
        if "," in rest:
            # WSGI servers join a repeated header with ", "; base64 never holds a comma.
            raise InvalidRequest("request.repeated_authorization_header")
        basic = _decode_basic(rest)

    used = [m for m, present in (("basic", basic), ("post", form_secret), ("jwt", assertion)) if present]
    if len(used) > 1:
        raise InvalidRequest("client.multiple_authentication_methods", ",".join(used))

    if basic is not None:
        if form_id is not None and form_id != basic[0]:
            # A client id holding ":" sent as it is (no form encoding), with the same id in the
            # body (requests-oauthlib's include_client_id): the body names the split.
            for later_id, later_secret in basic[3]:
                if later_id == form_id:
                    return ClientCredentials(CLIENT_SECRET_BASIC, form_id, secret=later_secret)
            raise InvalidClient("client.client_id_mismatch")
        return ClientCredentials(
            CLIENT_SECRET_BASIC, basic[0], secret=basic[1], literal_secret=basic[2], later_splits=basic[3]
        )
    if form_secret is not None:
        if form_id is None:
            raise InvalidClient("client.missing_client_id")
        return ClientCredentials(CLIENT_SECRET_POST, form_id, secret=form_secret)
    if assertion is not None or assertion_type is not None:
        if assertion is None:
            raise InvalidRequest("client.missing_client_assertion")
        if assertion_type is None:
            raise InvalidRequest("client.missing_client_assertion_type")
        if assertion_type != CLIENT_ASSERTION_TYPE_JWT:
            raise InvalidClient("client.unsupported_assertion_type")
        return ClientCredentials(PRIVATE_KEY_JWT, form_id, assertion=assertion)
    # No credential: anonymous, or a client_id alone, which only a public client may send
    # (authenticate_client decides: it proves nothing either way).
    return ClientCredentials(NONE, form_id)
