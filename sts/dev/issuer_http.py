"""The dev issuer over HTTP (werkzeug WSGI).  DEVELOPMENT ONLY: the mint endpoints hand out any identity.

Routes::

    GET /.well-known/openid-configuration   discovery (issuer, jwks_uri, ...)
    GET /.well-known/jwks                   the JWK set (Cache-Control: max-age=300)
    GET /openid/v1/jwks                     the same set, at the Kubernetes path

and, as an insecure convenience for ``curl`` in the quickstart::

    POST /mint/github-actions   POST /mint/kubernetes
    POST /mint/gitlab           POST /mint/spiffe

    POST /mint/github-actions HTTP/1.1
    Content-Type: application/json

    {"audience": "http://127.0.0.1:8080", "environment": "prod",
     "claims": {"actor": "alice"}}

    HTTP/1.1 200 OK
    Content-Type: application/json
    Cache-Control: no-store

    {"token": "eyJhbGciOiJSUzI1NiIsImtpZCI6Ii..."}

The body's top-level members are the keyword arguments of the matching
``*_token`` method of :class:`sts.dev.platform_tokens.PlatformTokens`;
``claims`` adds or overrides claims (``null`` removes one).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from joserfc.jwk import KeySetSerialization
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from .platform_tokens import PlatformTokens


class ServedIssuer(PlatformTokens):
    """What the HTTP endpoints need of :class:`~sts.dev.issuer.DevIssuer`: its tokens, and its keys."""

    @property
    @abstractmethod
    def alg(self) -> str:
        """The algorithm the tokens are signed with."""

    @abstractmethod
    def jwks(self) -> KeySetSerialization:
        """The public JWK Set."""

    @abstractmethod
    def count_jwks_request(self) -> None:
        """Note one fetch of the JWK Set."""


if TYPE_CHECKING:
    from collections.abc import Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


_JWKS_CACHE_CONTROL: Final = "max-age=300"
_MAX_MINT_BODY_BYTES: Final = 64 * 1024


def issuer_wsgi_app(issuer: ServedIssuer, *, mint_endpoints: bool = True) -> WSGIApplication:
    """``issuer`` as a WSGI app (see the module docstring for the routes).

    ``jwks_uri`` in the discovery document is built from the request's
    own host, so it points at this server even when ``iss`` names a real
    issuer (``https://token.actions.githubusercontent.com``).  That trusts
    the ``Host`` header, which is acceptable only because this is a
    loopback development tool.  ``mint_endpoints=False`` drops the
    ``/mint/*`` routes.
    """
    rules = [
        Rule("/.well-known/openid-configuration", endpoint="discovery", methods=["GET"]),
        Rule("/.well-known/jwks", endpoint="jwks", methods=["GET"]),
        Rule("/openid/v1/jwks", endpoint="jwks", methods=["GET"]),
    ]
    if mint_endpoints:
        rules.extend(
            Rule(f"/mint/{kind}", endpoint=f"mint/{kind}", methods=["POST"]) for kind in _MINT_ENDPOINTS
        )
    url_map = Map(rules)

    @Request.application
    def application(request: Request) -> Response:
        request.max_content_length = _MAX_MINT_BODY_BYTES
        adapter = url_map.bind_to_environ(request.environ)
        try:
            endpoint, _ = adapter.match()
        except HTTPException as error:
            return _json_response(
                {"error": (error.name or "error").lower().replace(" ", "_")},
                status=error.code or 500,
                headers=dict(error.get_headers()),
            )
        if endpoint == "discovery":
            return _json_response(
                _discovery_document(issuer, request.host_url), cache_control=_JWKS_CACHE_CONTROL
            )
        if endpoint == "jwks":
            issuer.count_jwks_request()
            return _json_response(issuer.jwks(), cache_control=_JWKS_CACHE_CONTROL)
        return _handle_mint(issuer, request, _MINT_ENDPOINTS[endpoint.removeprefix("mint/")])

    return application


def not_ready_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Answers 503 while a server bound before its issuer existed is being set up."""
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"dev issuer starting\n"]


def _discovery_document(issuer: ServedIssuer, host_url: str) -> dict[str, Any]:
    return {
        "issuer": issuer.issuer_url,
        "jwks_uri": f"{host_url}.well-known/jwks",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [issuer.alg],
    }


def _handle_mint(issuer: PlatformTokens, request: Request, endpoint: _MintEndpoint) -> Response:
    if request.mimetype != "application/json":
        return _mint_error(415, "send Content-Type: application/json")
    body = request.get_json(silent=True) if request.get_data(cache=True) else {}
    if not isinstance(body, dict):
        return _mint_error(400, "the body must be a JSON object")
    arguments = {name: value for name, value in body.items() if name != "claims"}
    unknown = sorted(set(arguments) - set(endpoint.parameters))
    if unknown:
        return _mint_error(400, f"unknown parameters {unknown}; put extra claims under 'claims'")
    missing = sorted(endpoint.required - set(arguments))
    if missing:
        return _mint_error(400, f"missing parameters {missing}")
    for name, value in arguments.items():
        if not endpoint.parameters[name](value):
            return _mint_error(400, f"parameter {name!r} has the wrong type")
    extra = body.get("claims", {})
    if not isinstance(extra, dict):
        return _mint_error(400, "'claims' must be a JSON object")
    # A claim named like a parameter (or "self") would bind to that parameter instead.
    clashing = sorted(set(extra) & {*endpoint.parameters, "self"})
    if clashing:
        return _mint_error(400, f"set {clashing} as top-level parameters, not under 'claims'")
    try:
        token = endpoint.mint(issuer, {**arguments, **extra})
    except ValueError as error:
        # Only the token builders' own messages ("repository must be OWNER/REPO") reach here.
        return _mint_error(400, str(error))
    return _json_response({"token": token}, cache_control="no-store")


# -- mint endpoint table --------------------------------------------------------------------------


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_optional_str(value: object) -> bool:
    return value is None or isinstance(value, str)


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_optional_int(value: object) -> bool:
    return value is None or _is_int(value)


def _is_optional_number(value: object) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _is_audience(value: object) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and bool(value) and all(isinstance(item, str) for item in value)
    )


@dataclass(frozen=True)
class _MintEndpoint:
    parameters: Mapping[str, Callable[[object], bool]]
    required: frozenset[str]
    mint: Callable[[PlatformTokens, dict[str, Any]], str]


_TIME_PARAMETERS: Final[Mapping[str, Callable[[object], bool]]] = {
    "now": _is_optional_number,
    "lifetime": _is_int,
}

_MINT_ENDPOINTS: Final[Mapping[str, _MintEndpoint]] = {
    "github-actions": _MintEndpoint(
        parameters={
            "audience": _is_str,
            "repository": _is_str,
            "repository_id": _is_str,
            "owner": _is_str,
            "owner_id": _is_str,
            "ref": _is_str,
            "environment": _is_optional_str,
            "event_name": _is_str,
            "runner_environment": _is_str,
            "workflow": _is_str,
            "actor": _is_str,
            "actor_id": _is_str,
            "repository_visibility": _is_str,
            "immutable_sub": _is_bool,
            **_TIME_PARAMETERS,
        },
        required=frozenset({"audience"}),
        mint=lambda issuer, arguments: issuer.github_actions_token(**arguments),
    ),
    "kubernetes": _MintEndpoint(
        parameters={
            "audience": _is_audience,
            "namespace": _is_str,
            "service_account": _is_str,
            "pod": _is_optional_str,
            "node": _is_str,
            "service_account_uid": _is_optional_str,
            "pod_uid": _is_optional_str,
            "warnafter": _is_optional_int,
            **_TIME_PARAMETERS,
        },
        required=frozenset({"audience"}),
        mint=lambda issuer, arguments: issuer.kubernetes_token(**arguments),
    ),
    "gitlab": _MintEndpoint(
        parameters={
            "audience": _is_str,
            "project_path": _is_str,
            "project_id": _is_str,
            "namespace_id": _is_str,
            "ref": _is_str,
            "ref_type": _is_str,
            "ref_protected": _is_bool,
            "pipeline_source": _is_str,
            "environment": _is_optional_str,
            "runner_environment": _is_str,
            "user_login": _is_str,
            "user_id": _is_str,
            **_TIME_PARAMETERS,
        },
        required=frozenset({"audience"}),
        mint=lambda issuer, arguments: issuer.gitlab_token(**arguments),
    ),
    "spiffe": _MintEndpoint(
        parameters={"spiffe_id": _is_str, "audience": _is_audience, **_TIME_PARAMETERS},
        required=frozenset({"spiffe_id", "audience"}),
        mint=lambda issuer, arguments: issuer.spiffe_svid(**arguments),
    ),
}


def _mint_error(status: int, description: str) -> Response:
    return _json_response({"error": "invalid_request", "error_description": description}, status=status)


def _json_response(
    body: Mapping[str, Any],
    *,
    status: int = 200,
    cache_control: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    response = Response(
        json.dumps(body), status=status, mimetype="application/json", headers=dict(headers or {})
    )
    response.headers["Content-Type"] = "application/json"
    if cache_control is not None:
        response.headers["Cache-Control"] = cache_control
    return response
