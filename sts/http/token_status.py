"""Endpoints: introspection (RFC 7662) and revocation (RFC 7009).

The requests are read as the token endpoint's are (:mod:`sts.http.wire`); a request that
cannot be read is refused and audited the same way.
"""

from __future__ import annotations

from flask import Blueprint, Response

from ..core.token_status import TokenStatus
from ..errors import OAuthError
from ..protocol.wire import WireRequest
from .responses import NO_STORE, json_response
from .wire import read_request


def token_status_blueprint(service: TokenStatus, *, mtls_header: str | None = None) -> Blueprint:
    """``POST /introspect`` and ``POST /revoke``, deciding with ``service``."""
    bp = Blueprint("token_status", __name__)

    def read(endpoint: str) -> WireRequest:
        def refuse_early(wire: WireRequest, problem: OAuthError) -> None:
            service.refuse_early(wire, endpoint, problem)

        return read_request(mtls_header, refuse_early)

    @bp.post("/introspect")
    def introspect() -> Response:
        """RFC 7662 §2: ``{"active": false}`` for anything not active for this caller."""
        return json_response(service.introspect(read("introspect")), 200, NO_STORE)

    @bp.post("/revoke")
    def revoke() -> Response:
        """RFC 7009 §2.2: 200 with an empty body, also for unknown tokens."""
        service.revoke(read("revoke"))
        response = Response(status=200, headers=NO_STORE)
        del response.headers["Content-Type"]
        return response

    return bp
