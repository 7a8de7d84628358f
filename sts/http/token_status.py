"""Endpoints: introspection (RFC 7662) and revocation (RFC 7009)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge

from ..core.exchange import WireRequest
from ..errors import InvalidRequest
from .responses import NO_STORE, json_response

if TYPE_CHECKING:
    from ..core.token_status import TokenStatus

bp = Blueprint("token_status", __name__)


def _service() -> TokenStatus:
    return cast("TokenStatus", current_app.extensions["sts"].token_status)


def _wire() -> WireRequest:
    try:
        form = request.form.to_dict(flat=False)
    except RequestEntityTooLarge:
        raise InvalidRequest("request.body_too_large") from None
    except BadRequest:
        raise InvalidRequest("request.malformed_body") from None
    authorizations = request.headers.getlist("Authorization")
    if len(authorizations) > 1:
        raise InvalidRequest("request.repeated_authorization_header")
    return WireRequest(
        form=form,
        query=request.args.to_dict(flat=False),
        content_type=request.headers.get("Content-Type"),
        authorization=authorizations[0] if authorizations else None,
        request_id=g.request_id,
        source_ip=g.get("client_address", request.remote_addr),
        user_agent=request.headers.get("User-Agent"),
        trace_id=g.get("trace_id"),
    )


@bp.post("/introspect")
def introspect() -> Response:
    """RFC 7662 §2: ``{"active": false}`` for anything not active for this caller."""
    return json_response(_service().introspect(_wire()), 200, NO_STORE)


@bp.post("/revoke")
def revoke() -> Response:
    """RFC 7009 §2.2: 200 with an empty body, also for unknown tokens."""
    _service().revoke(_wire())
    response = Response(status=200, headers=NO_STORE)
    del response.headers["Content-Type"]
    return response
