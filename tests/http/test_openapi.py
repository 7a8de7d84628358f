"""docs/openapi.yaml is a valid OpenAPI 3.1 document, and it describes the service as it runs.

The document is checked with ``openapi-spec-validator``; then every Flask
route must be documented with its methods (and every documented operation
must exist), and real responses from the Flask test client must validate
against the schema documented for their status.  OpenAPI 3.1 schema objects
are JSON Schema 2020-12, so they are used as they are: the whole document is
registered as one ``referencing`` resource, and a response is validated
against ``{"$ref": "<document>#/paths/.../schema"}`` so the ``$ref``s inside
resolve within the document.
"""

from __future__ import annotations

import base64
import copy
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012
from werkzeug.test import TestResponse

from sts import errors
from sts.adapters.signing_keys import SUPPORTED_ALGORITHMS
from sts.app import create_app
from sts.core.risk import DEFAULT_WEIGHTS
from sts.core.token_status import TOKEN_STATUS_PARAMETERS
from sts.dev.issuer import DevIssuer, RunningServer
from sts.protocol.client_auth import CLIENT_ASSERTION_TYPE_JWT
from sts.protocol.security_events import (
    DESCRIPTIONS,
    SESSION_REVOKED,
    ReceiverRateLimited,
    ReceiverUnavailable,
    SetRefused,
)
from sts.protocol.token_exchange import (
    ACCEPTED_INPUT_TOKEN_TYPES,
    GRANT_TYPE_TOKEN_EXCHANGE,
    ISSUABLE_TOKEN_TYPES,
    REPEATABLE,
    TOKEN_EXCHANGE_PARAMETERS,
)
from sts.settings import Settings
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    DEFAULT_CLIENTS,
    FORM,
    GATEWAY_SECRET,
    STS_ISSUER,
    exchange_form,
    now,
)

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
SPEC_URI = "urn:workload-sts:openapi"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
DEPLOY = "https://deploy.example.com"
LEDGER = "https://ledger.example.com/api"
SET_MEDIA_TYPE = "application/secevent+jwt"


# -- the document ------------------------------------------------------------------------------


def load_spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))


SPEC = load_spec()
REGISTRY: Registry = Registry().with_resource(SPEC_URI, DRAFT202012.create_resource(SPEC))


def escape(part: str) -> str:
    """RFC 6901 escaping of one reference token."""
    return part.replace("~", "~0").replace("/", "~1")


def pointer(parts: tuple[str, ...]) -> str:
    return "#/" + "/".join(escape(p) for p in parts)


def lookup(parts: tuple[str, ...]) -> Any:
    node: Any = SPEC
    for part in parts:
        node = node[part]
    return node


def deref(parts: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
    """The object at ``parts``, following local ``$ref``s; with where it really is."""
    node = lookup(parts)
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        parts = tuple(p.replace("~1", "/").replace("~0", "~") for p in ref[2:].split("/"))
        node = lookup(parts)
    return node, parts


def schema_errors(instance: Any, parts: tuple[str, ...]) -> list[str]:
    """Validation errors of ``instance`` against the schema object at ``parts`` of the document."""
    validator = Draft202012Validator({"$ref": SPEC_URI + pointer(parts)}, registry=REGISTRY)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]


def assert_valid(instance: Any, parts: tuple[str, ...]) -> None:
    problems = schema_errors(instance, parts)
    assert not problems, f"{instance!r} does not match {pointer(parts)}: {problems}"


def documented_path(route: str) -> str | None:
    """The documented path template that a concrete Flask route matches (one segment per parameter)."""
    if route in SPEC["paths"]:
        return route
    if route.startswith("/tenant-a/"):
        # An issuer with a path serves its endpoints under it too: the same operations,
        # on a server URL that includes the path.
        return documented_path(route.removeprefix("/tenant-a"))
    for template in SPEC["paths"]:
        pattern = "".join(
            "[^/]+" if piece.startswith("{") else re.escape(piece)
            for piece in re.split(r"(\{[^}]+\})", template)
        )
        if re.fullmatch(pattern, route):
            return template
    return None


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in SPEC["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                yield path, method, item[method]


def header_value(raw: str, schema: dict[str, Any]) -> Any:
    """A simple-style header value, read as its schema's type."""
    return int(raw) if schema.get("type") == "integer" and raw.isdigit() else raw


def check_response(response: TestResponse, path: str, method: str) -> Any:
    """Assert ``response`` is documented for this operation: status, headers, media type, body."""
    status = str(response.status_code)
    responses = SPEC["paths"][path][method]["responses"]
    assert status in responses, f"{method.upper()} {path}: status {status} is not documented"
    documented, where = deref(("paths", path, method, "responses", status))
    for name in documented.get("headers", {}):
        header, header_at = deref((*where, "headers", name))
        if header.get("required"):
            assert name in response.headers, f"{method.upper()} {path} {status}: no {name} header"
        if name in response.headers:
            assert_valid(header_value(response.headers[name], header["schema"]), (*header_at, "schema"))
    content = documented.get("content")
    if content is None:
        assert response.get_data() == b"", f"{method.upper()} {path} {status}: a body, none documented"
        return None
    assert response.mimetype in content, f"{method.upper()} {path} {status}: {response.mimetype}"
    body = response.get_json()
    assert_valid(body, (*where, "content", response.mimetype, "schema"))
    return body


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transmitter() -> Iterator[RunningServer]:
    """A Shared Signals transmitter: a dev issuer whose JWKS is served over real HTTP."""
    with DevIssuer.serve_ephemeral(alg="ES256", mint_endpoints=False) as server:
        yield server


@pytest.fixture
def ssf_app(make_settings: Callable[..., Settings], transmitter: RunningServer) -> Flask:
    entry = {
        "name": "idp",
        "issuer": transmitter.issuer.issuer_url,
        "jwks_uri": transmitter.jwks_uri,
        "algorithms": ["ES256"],
    }
    return create_app(make_settings(transmitters=[entry]))


@pytest.fixture
def path_app(make_settings: Callable[..., Settings]) -> Flask:
    return create_app(make_settings(issuer=STS_ISSUER + "/tenant-a"))


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def github_token(upstream: RunningServer) -> str:
    return upstream.issuer.github_actions_token(audience=STS_ISSUER)


def signed_set(transmitter: RunningServer, upstream: RunningServer, **changes: Any) -> str:
    claims: dict[str, Any] = {
        "iss": transmitter.issuer.issuer_url,
        "aud": STS_ISSUER,
        "iat": int(now()),
        "jti": uuid.uuid4().hex,
        "sub_id": {"format": "iss_sub", "iss": upstream.issuer.issuer_url, "sub": "repo:acme/app:ref:x"},
        "events": {SESSION_REVOKED: {"event_timestamp": int(now()) - 10}},
    }
    claims.update(changes)
    return transmitter.issuer.mint(claims, header={"typ": "secevent+jwt"})


# -- the document itself -------------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    assert SPEC["openapi"].startswith("3.1.")
    validate(SPEC, cls=OpenAPIV31SpecValidator)
    # The validator is not a no-op: no response description, a bad schema type, a dangling $ref.
    no_description = copy.deepcopy(SPEC)
    del no_description["paths"]["/healthz"]["get"]["responses"]["200"]["description"]
    dangling = copy.deepcopy(SPEC)
    dangling["paths"]["/token"]["post"]["responses"]["401"]["$ref"] = "#/components/responses/Nope"
    wrong_type = copy.deepcopy(SPEC)
    wrong_type["components"]["schemas"]["Health"]["type"] = "thing"
    for broken in (no_description, wrong_type):
        with pytest.raises(OpenAPIValidationError):
            validate(broken, cls=OpenAPIV31SpecValidator)
    with pytest.raises(Unresolvable):
        validate(dangling, cls=OpenAPIV31SpecValidator)


def test_every_example_matches_its_schema() -> None:
    checked = 0
    for path, method, op in operations():
        base = ("paths", path, method)
        places = [(*base, "requestBody")] if "requestBody" in op else []
        places += [(*base, "responses", status) for status in op["responses"]]
        for place in places:
            obj, at = deref(place)
            for media_type, media in obj.get("content", {}).items():
                for name in media.get("examples", {}):
                    example, _ = deref((*at, "content", media_type, "examples", name))
                    assert_valid(example["value"], (*at, "content", media_type, "schema"))
                    checked += 1
    for name, schema in SPEC["components"]["schemas"].items():
        for example in schema.get("examples", ()):
            assert_valid(example, ("components", "schemas", name))
            checked += 1
    assert checked >= 30


def test_schemas_reject_what_the_service_never_sends() -> None:
    """The response schemas are closed and exact, so the response checks below can fail."""
    token_400 = ("paths", "/token", "post", "responses", "400", "content", "application/json", "schema")
    assert schema_errors({"error": "invalid_grant", "error_description": "x"}, token_400)
    assert schema_errors({"error": "invalid_request", "error_description": "x", "error_uri": "x"}, token_400)
    assert schema_errors({"error": "invalid_request"}, token_400)
    step_up = {"error": "insufficient_user_authentication", "error_description": "x", "max_age": 60}
    assert schema_errors(step_up, token_400)  # step_up member missing
    ok = ("components", "schemas", "TokenResponse")
    assert schema_errors({"access_token": "a.b.c", "issued_token_type": ACCESS_TOKEN_TYPE}, ok)
    public = {"kty": "EC", "crv": "P-256", "kid": "A" * 43, "alg": "ES256", "use": "sig", "x": "x", "y": "y"}
    assert not schema_errors(public, ("components", "schemas", "JsonWebKey"))
    assert schema_errors({**public, "d": "secret"}, ("components", "schemas", "JsonWebKey"))


def test_enumerations_agree_with_the_code() -> None:
    schemas = SPEC["components"]["schemas"]
    request = schemas["TokenRequest"]["properties"]
    assert set(schemas["TokenType"]["enum"]) == ACCEPTED_INPUT_TOKEN_TYPES
    assert set(request["requested_token_type"]["enum"]) == ISSUABLE_TOKEN_TYPES
    assert set(schemas["TokenResponse"]["properties"]["issued_token_type"]["enum"]) == ISSUABLE_TOKEN_TYPES
    assert request["grant_type"]["const"] == GRANT_TYPE_TOKEN_EXCHANGE
    assert request["client_assertion_type"]["const"] == CLIENT_ASSERTION_TYPE_JWT
    assert {name for name, p in request.items() if p.get("type") == "array"} == REPEATABLE
    # The documented parameters are exactly those refused when repeated; any other is ignored.
    assert set(request) == TOKEN_EXCHANGE_PARAMETERS
    assert set(schemas["TokenStatusRequest"]["properties"]) == TOKEN_STATUS_PARAMETERS
    encoding = SPEC["paths"]["/token"]["post"]["requestBody"]["content"][FORM]["encoding"]
    assert set(encoding) == REPEATABLE and all(e["explode"] for e in encoding.values())
    assert set(schemas["RiskSignal"]["enum"]) == set(DEFAULT_WEIGHTS)
    assert set(schemas["JsonWebKey"]["properties"]["alg"]["enum"]) == set(SUPPORTED_ALGORITHMS)
    assert set(schemas["SetError"]["properties"]["err"]["enum"]) | {"temporarily_unavailable"} == set(
        DESCRIPTIONS
    )
    # Each documented 400 code of the token endpoint is an error class of the code with that status.
    statuses = {
        cls.error: cls.status
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.OAuthError)
    }
    for code in schemas["TokenError"]["allOf"][1]["properties"]["error"]["enum"]:
        assert statuses.get(code) == 400, code
    for code in schemas["TokenStatusError"]["allOf"][1]["properties"]["error"]["enum"]:
        assert statuses.get(code) == 400, code
    assert statuses[schemas["StepUpRequiredError"]["properties"]["error"]["const"]] == 400


# -- routes --------------------------------------------------------------------------------------


def test_every_route_is_documented_with_its_methods(app: Flask, path_app: Flask, ssf_app: Flask) -> None:
    served: set[tuple[str, str]] = set()
    for flask_app in (app, path_app, ssf_app):
        for rule in flask_app.url_map.iter_rules():
            if rule.endpoint == "static":
                continue
            path = documented_path(rule.rule)
            assert path is not None, f"route {rule.rule} is not documented"
            methods = set(rule.methods or ()) - {"HEAD", "OPTIONS"}
            documented = {m.upper() for m in HTTP_METHODS if m in SPEC["paths"][path]}
            assert methods == documented, f"{rule.rule}: served {methods}, documented {documented}"
            # As the document's description says: OPTIONS nowhere (it is a 405), HEAD with GET.
            assert "OPTIONS" not in (rule.methods or ())
            assert ("HEAD" in (rule.methods or ())) == ("GET" in methods)
            served |= {(path, m.lower()) for m in methods}
    assert served == {(path, method) for path, method, _ in operations()}


def test_options_is_a_json_405_with_allow_on_every_route(app: Flask, path_app: Flask, ssf_app: Flask) -> None:
    checked = 0
    for flask_app in (app, path_app, ssf_app):
        client = flask_app.test_client()
        for rule in flask_app.url_map.iter_rules():
            if rule.endpoint == "static":
                continue
            response = client.options(rule.rule)
            path = documented_path(rule.rule)
            assert path is not None
            assert response.status_code == 405, f"OPTIONS {rule.rule}: {response.status_code}"
            for method in (m for m in HTTP_METHODS if m in SPEC["paths"][path]):
                check_response(response, path, method)
            assert set(response.headers["Allow"].split(", ")) == set(rule.methods or ())
            checked += 1
    assert checked >= 15


@pytest.mark.parametrize(
    "path",
    ["/.well-known//jwks.json", "/.well-known//oauth-authorization-server", "/static/review/review.css"],
)
def test_no_redirect_is_built_from_the_host_header(app: Flask, path: str) -> None:
    """Werkzeug's slash merging answered ``//`` paths with a cacheable 308 to an absolute URL made
    from the Host header (an off-site redirect for a spoofed Host), and Flask's static route served
    a file the service never links to: both are plain 404s now."""
    response = app.test_client().get(path, headers={"Host": "evil.example"})
    assert response.status_code == 404
    assert "Location" not in response.headers
    assert response.get_json()["error"] == "not_found"


@pytest.mark.parametrize("path", ["//token", "//introspect", "//revoke", "///token", "//healthz"])
@pytest.mark.parametrize("method", ["GET", "PUT", "POST", "DELETE", "OPTIONS"])
def test_a_double_slash_path_is_not_found_whatever_the_method(app: Flask, path: str, method: str) -> None:
    """No method is served at a ``//`` path, so none is a 405 naming an ``Allow`` that would then
    be a 404 too (RFC 9110 §15.5.6; an outside check found ``GET //token`` a 405 ``Allow: POST``)."""
    # (Werkzeug's test client reads ``//token`` as a URL with a host: the path goes in as it is.)
    response = app.test_client().open(
        "/", method=method, data={"grant_type": "x"}, environ_overrides={"PATH_INFO": path}
    )
    assert response.status_code == 404, (method, path, response.status_code)
    assert "Allow" not in response.headers
    assert response.get_json()["error"] == "not_found"


def test_unknown_metadata_path_is_a_documented_404(app: Flask, path_app: Flask) -> None:
    template = "/.well-known/oauth-authorization-server/{issuer_path}"
    for flask_app, path in (
        (path_app, "/.well-known/oauth-authorization-server/tenant-b"),
        (app, "/.well-known/oauth-authorization-server/tenant-a"),
    ):
        response = flask_app.test_client().get(path)
        body = check_response(response, template, "get")
        assert response.status_code == 404 and body["error"] == "not_found"


def test_every_operation_documents_the_http_servers_431() -> None:
    """The 431 comes from the HTTP server before any Python runs (tests/e2e/test_serving.py sends one):
    documented on every operation as what it is, a bare status with an empty body."""
    for path, method, op in operations():
        assert "431" in op["responses"], f"{method.upper()} {path}: no 431"
        documented, where = deref(("paths", path, method, "responses", "431"))
        assert "content" not in documented, f"{method.upper()} {path}: the 431 has no body"
        length, _ = deref((*where, "headers", "Content-Length"))
        assert length["required"] is True and length["schema"] == {"const": "0"}


def test_routes_depend_on_configuration(app: Flask, path_app: Flask, ssf_app: Flask) -> None:
    def rules(flask_app: Flask) -> set[str]:
        return {r.rule for r in flask_app.url_map.iter_rules() if r.endpoint != "static"}

    assert "/ssf/events" not in rules(app) and "/ssf/events" in rules(ssf_app)
    under_path = ["/token", "/introspect", "/revoke"]
    under_path += ["/.well-known/jwks.json", "/.well-known/openid-configuration"]
    assert rules(path_app) - rules(app) == {
        "/.well-known/oauth-authorization-server/tenant-a",
        *(f"/tenant-a{r}" for r in under_path),
    }


# -- the token endpoint, for real ----------------------------------------------------------------


def test_grant(client: FlaskClient, upstream: RunningServer) -> None:
    form = exchange_form(github_token(upstream), audience=DEPLOY, scope="deploy:write")
    response = client.post("/token", data=form, headers={"X-Request-Id": "deploy-4711"})
    body = check_response(response, "/token", "post")
    assert response.status_code == 200
    assert body["scope"] == "deploy:write" and body["token_type"] == "Bearer"
    assert response.headers["X-Request-Id"] == "deploy-4711"


def test_grant_without_scope_and_with_client_secret_basic(
    client: FlaskClient, upstream: RunningServer
) -> None:
    token = upstream.issuer.kubernetes_token(audience=STS_ISSUER)
    form = exchange_form(token, resource=LEDGER)
    response = client.post("/token", data=form, headers=basic("gateway", GATEWAY_SECRET))
    body = check_response(response, "/token", "post")
    assert response.status_code == 200
    assert "scope" not in body
    # A request id the service does not accept is replaced, not refused.
    response = client.post(
        "/token", data=form, headers={**basic("gateway", GATEWAY_SECRET), "X-Request-Id": "a b"}
    )
    check_response(response, "/token", "post")
    assert uuid.UUID(response.headers["X-Request-Id"])


@pytest.mark.parametrize(
    ("name", "status", "error"),
    [
        ("missing-subject-token", 400, "invalid_request"),
        ("query-string", 400, "invalid_request"),
        ("wrong-content-type", 400, "invalid_request"),
        ("bad-secret", 401, "invalid_client"),
        ("bearer-scheme", 401, "invalid_client"),
        ("grant-type", 400, "unsupported_grant_type"),
        ("audience", 400, "invalid_target"),
        ("scope", 400, "invalid_scope"),
    ],
)
def test_refusal(client: FlaskClient, upstream: RunningServer, name: str, status: int, error: str) -> None:
    token = github_token(upstream)
    path, data, headers, content_type = "/token", exchange_form(token, audience=DEPLOY), {}, FORM
    if name == "missing-subject-token":
        del data["subject_token"]
    elif name == "query-string":
        path = "/token?scope=deploy:read"
    elif name == "wrong-content-type":
        content_type = "text/plain"
    elif name == "bad-secret":
        headers = basic("gateway", "not-the-secret")
    elif name == "bearer-scheme":
        headers = {"Authorization": "Bearer " + token}
    elif name == "grant-type":
        data["grant_type"] = "client_credentials"
    elif name == "audience":
        data["audience"] = "https://elsewhere.example.com"
    elif name == "scope":
        data["scope"] = "deploy:admin"
    if content_type == FORM:
        response = client.post(path, data=data, headers=headers)
    else:
        response = client.post(path, data="grant_type=x", content_type=content_type, headers=headers)
    body = check_response(response, "/token", "post")
    assert (response.status_code, body["error"]) == (status, error)


def test_oversized_body(client: FlaskClient, upstream: RunningServer) -> None:
    form = exchange_form(github_token(upstream), audience=DEPLOY, padding="x" * 20_000)
    response = client.post("/token", data=form)
    body = check_response(response, "/token", "post")
    assert body["error"] == "invalid_request"


def test_temporarily_unavailable_when_upstream_keys_cannot_be_fetched(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    dead = {
        "name": "upstream",
        "issuer": upstream.issuer.issuer_url,
        "jwks_uri": "http://127.0.0.1:1/jwks",  # nothing listens on port 1
        "algorithms": ["RS256"],
        "audiences": [STS_ISSUER],
    }
    client = create_app(make_settings(issuers=[dead])).test_client()
    response = client.post("/token", data=exchange_form(github_token(upstream), audience=DEPLOY))
    body = check_response(response, "/token", "post")
    assert response.status_code == 503 and body["error"] == "temporarily_unavailable"
    assert int(response.headers["Retry-After"]) >= 1


@pytest.mark.parametrize(
    "exc",
    [
        errors.StepUpRequired("risk.step_up", max_age=60, signals=("attestation_drift", "shared_signal")),
        errors.RiskRefused("risk.denied", signals=("shared_signal",)),
        errors.InvalidRequest("subject_token.expired"),
        errors.InvalidRequest("policy.no_rule"),
        errors.UnauthorizedClient("policy.client_not_allowed"),
        errors.InvalidClient("client.unknown"),
        errors.TemporarilyUnavailable("store.unavailable"),
        errors.RateLimited("rate_limit.network", retry_after=7),
        errors.ServerError("internal.unexpected"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_error_bodies_the_pipeline_builds_are_documented(exc: errors.OAuthError) -> None:
    """Refusals that need a whole risk policy or a failing store to provoke: their bodies, as built."""
    _documented, where = deref(("paths", "/token", "post", "responses", str(exc.status)))
    assert_valid(exc.body(), (*where, "content", "application/json", "schema"))
    for name, value in exc.headers().items():
        header, at = deref((*where, "headers", name))
        assert_valid(header_value(value, header["schema"]), (*at, "schema"))
    if isinstance(exc, errors.StepUpRequired):
        assert_valid(exc.body(), ("components", "schemas", "StepUpRequiredError"))
    if isinstance(exc, errors.RiskRefused):
        assert_valid(exc.body(), ("components", "schemas", "RiskDeniedError"))


# -- introspection and revocation ---------------------------------------------------------------


def issued_deploy_token(client: FlaskClient, upstream: RunningServer) -> str:
    response = client.post("/token", data=exchange_form(github_token(upstream), audience=DEPLOY))
    assert response.status_code == 200, response.get_data(as_text=True)
    return str(response.get_json()["access_token"])


@pytest.fixture
def rs_client(make_settings: Callable[..., Settings]) -> FlaskClient:
    """The app with ``gateway`` registered as the resource server of the deploy audience."""
    clients = [{**c, "audiences": [DEPLOY]} if c["client_id"] == "gateway" else c for c in DEFAULT_CLIENTS]
    return create_app(make_settings(clients=clients)).test_client()


def test_introspection(rs_client: FlaskClient, upstream: RunningServer) -> None:
    token = issued_deploy_token(rs_client, upstream)
    gateway = basic("gateway", GATEWAY_SECRET)
    response = rs_client.post("/introspect", data={"token": token}, headers=gateway)
    body = check_response(response, "/introspect", "post")
    assert response.status_code == 200 and body["active"] is True and body["aud"] == DEPLOY
    response = rs_client.post("/introspect", data={"token": token + "x"}, headers=gateway)
    assert check_response(response, "/introspect", "post") == {"active": False}
    response = rs_client.post("/introspect", data={"token": token})
    body = check_response(response, "/introspect", "post")
    assert response.status_code == 401 and body["error"] == "invalid_client"


def test_revocation(rs_client: FlaskClient, upstream: RunningServer) -> None:
    token = issued_deploy_token(rs_client, upstream)
    gateway = basic("gateway", GATEWAY_SECRET)
    response = rs_client.post("/revoke", data={"token": token}, headers=gateway)
    assert check_response(response, "/revoke", "post") is None
    assert response.status_code == 200
    response = rs_client.post("/revoke", data={}, headers=gateway)
    body = check_response(response, "/revoke", "post")
    assert response.status_code == 400 and body["error"] == "invalid_request"


# -- discovery, health, method errors ------------------------------------------------------------


def test_metadata(client: FlaskClient) -> None:
    response = client.get("/.well-known/oauth-authorization-server")
    body = check_response(response, "/.well-known/oauth-authorization-server", "get")
    assert response.status_code == 200 and body["issuer"] == STS_ISSUER
    documented = SPEC["components"]["schemas"]["AuthorizationServerMetadata"]["properties"]
    assert set(body) <= set(documented), set(body) - set(documented)
    # DEFAULT_POLICY's deploy rule needs no client authentication.
    assert "none" in body["token_endpoint_auth_methods_supported"]


def test_metadata_at_the_path_inserted_location(path_app: Flask) -> None:
    path = "/.well-known/oauth-authorization-server/{issuer_path}"
    response = path_app.test_client().get("/.well-known/oauth-authorization-server/tenant-a")
    body = check_response(response, path, "get")
    assert response.status_code == 200 and body["issuer"] == STS_ISSUER + "/tenant-a"


def test_jwks(client: FlaskClient) -> None:
    response = client.get("/.well-known/jwks.json")
    body = check_response(response, "/.well-known/jwks.json", "get")
    assert response.status_code == 200
    assert len(body["keys"]) >= 2  # active and next


DISCOVERY = [
    "/.well-known/jwks.json",
    "/.well-known/oauth-authorization-server",
    "/.well-known/openid-configuration",
]


@pytest.mark.parametrize("path", DISCOVERY)
def test_discovery_documents_answer_a_conditional_request(client: FlaskClient, path: str) -> None:
    """Verifiers polling the JWK Set (and the metadata) get an ETag, and 304 without a body while it
    still names the current document (RFC 9110 §13.1.2); any other tag gets the document."""
    first = client.get(path)
    check_response(first, path, "get")
    tag = first.headers["ETag"]
    again = client.get(path, headers={"If-None-Match": tag})
    check_response(again, path, "get")
    assert again.status_code == 304 and again.headers["ETag"] == tag and again.get_data() == b""
    assert again.headers["Cache-Control"] == first.headers["Cache-Control"]
    other = client.get(path, headers={"If-None-Match": '"stale"'})
    assert other.status_code == 200 and other.get_json() == first.get_json()
    assert client.get(path, headers={"If-None-Match": "*"}).status_code == 304


@pytest.mark.parametrize("path", ["/readyz", "/healthz"])
def test_readiness(client: FlaskClient, make_settings: Callable[..., Any], path: str) -> None:
    response = client.get(path)
    assert check_response(response, path, "get") == {"status": "ok"}
    # A real failure: the configured Redis store is on a port where nothing listens.
    from sts.app import create_app

    broken = create_app(make_settings(store="redis", redis_url="redis://127.0.0.1:1/0")).test_client()
    response = broken.get(path)
    body = check_response(response, path, "get")
    # (The rate limits, kept in the same Redis, are not named twice.)
    assert response.status_code == 503 and body["problems"] == ["store"]
    # Alive all the same: liveness checks no dependency.
    assert check_response(broken.get("/livez"), "/livez", "get") == {"status": "ok"}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("get", "/token", {"POST"}),
        ("get", "/introspect", {"POST"}),
        ("put", "/token", {"POST"}),
        ("options", "/token", {"POST"}),
        ("options", "/revoke", {"POST"}),
        ("post", "/healthz", {"GET", "HEAD"}),
        ("options", "/healthz", {"GET", "HEAD"}),
        ("delete", "/.well-known/jwks.json", {"GET", "HEAD"}),
        ("post", "/.well-known/oauth-authorization-server", {"GET", "HEAD"}),
    ],
)
def test_method_not_allowed(client: FlaskClient, method: str, path: str, allow: set[str]) -> None:
    response = client.open(path, method=method.upper())
    assert response.status_code == 405
    # The 405 is documented on the operation(s) the path has, not on the method that was refused.
    for documented_method in (m for m in HTTP_METHODS if m in SPEC["paths"][path]):
        check_response(response, path, documented_method)
    assert set(response.headers["Allow"].split(", ")) == allow


# -- Shared Signals ------------------------------------------------------------------------------


def test_ssf_events_accepts_a_set(
    ssf_app: Flask, transmitter: RunningServer, upstream: RunningServer
) -> None:
    token = signed_set(transmitter, upstream)
    response = ssf_app.test_client().post("/ssf/events", data=token, content_type=SET_MEDIA_TYPE)
    assert check_response(response, "/ssf/events", "post") is None
    assert response.status_code == 202 and "Content-Type" not in response.headers


@pytest.mark.parametrize("err", ["invalid_audience", "invalid_issuer", "invalid_request"])
def test_ssf_events_refusals(
    ssf_app: Flask, transmitter: RunningServer, upstream: RunningServer, err: str
) -> None:
    content_type = SET_MEDIA_TYPE
    if err == "invalid_audience":
        token = signed_set(transmitter, upstream, aud="https://someone-else.example.com")
    elif err == "invalid_issuer":
        token = signed_set(transmitter, upstream, iss="https://unknown-transmitter.example.com")
    else:
        token, content_type = signed_set(transmitter, upstream), "application/jwt"
    response = ssf_app.test_client().post("/ssf/events", data=token, content_type=content_type)
    body = check_response(response, "/ssf/events", "post")
    assert response.status_code == 400 and body["err"] == err


def test_ssf_events_method_and_absence(ssf_app: Flask, client: FlaskClient) -> None:
    response = ssf_app.test_client().get("/ssf/events")
    check_response(response, "/ssf/events", "post")
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    # Without transmitters the endpoint does not exist.
    response = client.post("/ssf/events", data="a.b.c", content_type=SET_MEDIA_TYPE)
    body = check_response(response, "/ssf/events", "post")
    assert response.status_code == 404 and body["error"] == "not_found"


@pytest.mark.parametrize(
    "exc",
    [
        ReceiverUnavailable("store.unavailable"),
        ReceiverRateLimited("rate_limit.network", retry_after=3),
        SetRefused("access_denied", "subject.issuer_not_allowed"),
    ],
)
def test_ssf_error_bodies_the_receiver_builds_are_documented(exc: SetRefused) -> None:
    documented, where = deref(("paths", "/ssf/events", "post", "responses", str(exc.status)))
    assert_valid(exc.body(), (*where, "content", "application/json", "schema"))
    if isinstance(exc, ReceiverUnavailable):
        assert "Retry-After" in documented["headers"]
        _header, at = deref((*where, "headers", "Retry-After"))
        assert_valid(exc.retry_after, (*at, "schema"))


# -- rate limits (429) ---------------------------------------------------------------------------


def test_rate_limited_responses_are_documented(
    make_settings: Callable[..., Settings], upstream: RunningServer, transmitter: RunningServer
) -> None:
    """A real 429 from every endpoint that has limits validates against the document."""
    entry = {
        "name": "idp",
        "issuer": transmitter.issuer.issuer_url,
        "jwks_uri": transmitter.jwks_uri,
        "algorithms": ["ES256"],
    }
    one = {"network": {"requests": 1, "period": 60}}
    settings = make_settings(
        transmitters=[entry], rate_limits={"token": one, "introspect": one, "revoke": one, "ssf": one}
    )
    client = create_app(settings).test_client()
    gateway = basic("gateway", GATEWAY_SECRET)
    calls: list[tuple[str, Callable[[], TestResponse]]] = [
        (
            "/token",
            lambda: client.post("/token", data=exchange_form(github_token(upstream), audience=DEPLOY)),
        ),
        ("/introspect", lambda: client.post("/introspect", data={"token": "x"}, headers=gateway)),
        ("/revoke", lambda: client.post("/revoke", data={"token": "x"}, headers=gateway)),
        ("/ssf/events", lambda: client.post("/ssf/events", data="a.b.c", content_type=SET_MEDIA_TYPE)),
    ]
    for path, call in calls:
        assert call().status_code != 429
        response = call()
        assert response.status_code == 429, path
        body = check_response(response, path, "post")
        assert int(response.headers["Retry-After"]) >= 1
        assert (body.get("error") or body.get("err")) == "temporarily_unavailable"
