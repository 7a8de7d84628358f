"""An OAuth request as it arrived, before any checking, and the body format every endpoint takes.

The token (RFC 8693 §2.1), introspection (RFC 7662 §2.1) and revocation (RFC 7009 §2.1)
endpoints all take a form POST (RFC 6749 §3.2)::

    POST /token HTTP/1.1
    Content-Type: application/x-www-form-urlencoded
    Authorization: Basic ...

    grant_type=...&subject_token=eyJ...

The HTTP layer (:mod:`sts.http.wire`) reads a request into a :class:`WireRequest`;
the pipeline decides what it means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import InvalidRequest

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class WireRequest:
    """The request as it arrived, before any checking."""

    form: Mapping[str, Sequence[str]]
    query: Mapping[str, Sequence[str]]
    content_type: str | None
    authorization: str | None
    request_id: str
    source_ip: str | None = None
    user_agent: str | None = None
    #: Every ``DPoP`` header value (RFC 9449 §4.3: exactly one is allowed).
    dpop: tuple[str, ...] = ()
    #: ``x5t#S256`` of a client certificate forwarded by a trusted proxy (RFC 8705).
    client_cert_thumbprint: str | None = None
    #: The W3C Trace Context trace id this request belongs to (recorded in the audit details).
    trace_id: str | None = None


def check_content_type(content_type: str | None) -> None:
    """RFC 6749 §3.2: the token endpoint takes ``application/x-www-form-urlencoded`` in UTF-8
    (and so do introspection, RFC 7662 §2.1, and revocation, RFC 7009 §2.1)."""
    if content_type is None:
        raise InvalidRequest("request.wrong_content_type", "none")
    mime, _, params = content_type.partition(";")
    if mime.strip().lower() != FORM_CONTENT_TYPE:
        raise InvalidRequest("request.wrong_content_type", mime.strip()[:60])
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in {"utf-8", "utf8"}:
            raise InvalidRequest("request.unsupported_charset")
