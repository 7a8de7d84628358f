"""Reading a form request off the wire: one path for ``/token``, ``/introspect`` and ``/revoke``.

Each of them takes an ``application/x-www-form-urlencoded`` POST (RFC 6749 §3.2, RFC 7662
§2.1, RFC 7009 §2.1).  The request is read into a :class:`~sts.protocol.wire.WireRequest`
here, the same way for all three; what it means is decided in :mod:`sts.core`.  A request
that cannot even be read (a body over ``max_body_bytes`` or unparseable, a repeated
``Authorization`` header, RFC 6749 §2.3) is refused here, and recorded first by the
endpoint's ``refuse_early``, so it is audited on every endpoint alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import g, request
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

from ..errors import InvalidRequest, OAuthError
from ..protocol.wire import WireRequest
from .client_cert import certificate_thumbprint

#: Records a request refused before it could be read (its audit record), e.g.
#: :meth:`sts.core.exchange.TokenExchange.refuse_early`.
RefuseEarly = Callable[[WireRequest, OAuthError], None]


def header_values(environ: Mapping[str, Any], name: str) -> list[str]:
    """Every value of the request header ``name`` (``"X-Forwarded-For"``), as
    ``request.headers.getlist(name)`` gives them, from the WSGI environ directly.

    A WSGI server puts each header in the environ once (PEP 3333: ``HTTP_X_FORWARDED_FOR``),
    repeated fields joined with commas (RFC 9110 §5.3), so there is at most one value.  Looked up
    by its key here because ``getlist`` reads every header of the request to find it, and the
    token endpoint asks for four on every request.
    """
    value = environ.get("HTTP_" + name.upper().replace("-", "_"))
    return [] if value is None else [value]


def read_request(mtls_header: str | None, refuse_early: RefuseEarly) -> WireRequest:
    """The current request as the pipeline takes it; raises the :class:`OAuthError` to send, after
    ``refuse_early`` has recorded it, when the request cannot be read."""
    problem: OAuthError | None = None
    form: dict[str, list[str]] = {}
    try:
        form = request.form.to_dict(flat=False)
    except RequestEntityTooLarge:
        problem = InvalidRequest("request.body_too_large")
    except BadRequest:
        problem = InvalidRequest("request.malformed_body")
    environ = request.environ
    authorizations = header_values(environ, "Authorization")
    if len(authorizations) > 1:
        problem = problem or InvalidRequest("request.repeated_authorization_header")
    wire = WireRequest(
        form=form,
        # An empty query string is the usual case: nothing to parse.
        query=request.args.to_dict(flat=False) if environ.get("QUERY_STRING") else {},
        content_type=environ.get("CONTENT_TYPE"),
        authorization=authorizations[0] if authorizations else None,
        request_id=g.request_id,
        source_ip=g.get("client_address", request.remote_addr),
        user_agent=environ.get("HTTP_USER_AGENT"),
        # WSGI servers join repeated header fields with commas (RFC 9110 §5.3), and a JWS never
        # holds one: split them again so that two proofs count as two (RFC 9449 §4.3 step 1).
        dpop=tuple(part for value in header_values(environ, "DPoP") for part in value.split(",")),
        client_cert_thumbprint=forwarded_certificate(mtls_header),
        trace_id=g.get("trace_id"),
    )
    if problem is not None:
        refuse_early(wire, problem)
        raise problem
    return wire


def forwarded_certificate(header: str | None) -> str | None:
    """The client certificate's ``x5t#S256``, only when a trusted proxy forwarded it in ``header``
    (RFC 8705 §3)."""
    if not header or not g.get("via_trusted_proxy", False):
        # No header configured, or the connection did not come through a trusted proxy.
        return None
    value = request.headers.get(header)
    return certificate_thumbprint(value) if value else None
