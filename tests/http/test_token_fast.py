"""The lean token endpoint (:mod:`sts.http.token_fast`) answers exactly as Flask's route does.

One app, two ways in: the app as served (``POST /token`` answered in front of Flask) and the
same app's Flask chain alone (the token blueprint answers).  Every request of the table goes
both ways; the status line, the headers, the body, the audit record, the access-log line, the
request metrics and the trace must be the same.  Only what is random by design may differ: the
access token's ``jti`` (so the token itself and its length) and a fresh request id.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import pytest
from flask import Flask
from werkzeug.test import EnvironBuilder, run_wsgi_app
from werkzeug.wrappers import Response

from sts.app import create_app
from sts.dev.issuer import RunningServer
from sts.http.body_limit import BodyLimit
from sts.http.token_fast import LeanTokenEndpoint, status_line
from sts.settings import Settings
from tests.conftest import FORM, GATEWAY_SECRET, JWT_TYPE, STS_ISSUER, TOKEN_EXCHANGE
from tests.support.clock import Clock

ISSUER = STS_ISSUER + "/tenant"
TRACEPARENT = "00-" + "4bf92f3577b34da6a3ce929d0e0e4736" + "-" + "00f067aa0ba902b7" + "-01"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TRACE_ID = TRACEPARENT.split("-")[1]
#: Audit fields that differ between two otherwise equal requests: each request sends a fresh
#: subject token, and each record and token has its own id.
VARYING_AUDIT = {"event_id", "issued_jti", "subject_token_jti", "subject_token_sha256"}


@dataclass
class Answered:
    status: str
    headers: list[tuple[str, str]]
    body: bytes
    audit: list[dict[str, Any]]
    access: list[dict[str, Any]]
    metrics: dict[str, float]
    traces: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass
class Ways:
    app: Flask
    lean: Callable[..., Any]
    flask: Callable[..., Any]
    clock: Clock
    upstream: RunningServer
    traces: list[tuple[Any, ...]]


@pytest.fixture
def ways(
    make_settings: Callable[..., Settings],
    upstream: RunningServer,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Ways]:
    settings = make_settings(issuer=ISSUER, dpop_nonce=True)
    app = create_app(settings, clock=clock)
    dispatcher = app.wsgi_app.app  # type: ignore[attr-defined]
    assert isinstance(dispatcher, LeanTokenEndpoint)
    runtime = app.extensions["sts"]
    traces: list[tuple[Any, ...]] = []
    tracing = runtime.tracing
    start, finish = tracing.start_request, tracing.finish_request

    def start_request(request_id: str, method: str, route: str, incoming: Any) -> Any:
        traces.append(("start", request_id, method, route, incoming and incoming.trace_id))
        return start(request_id, method, route, incoming)

    def finish_request(trace: Any, status: int | None) -> None:
        traces.append(("finish", trace.trace_id, status))
        finish(trace, status)

    monkeypatch.setattr(tracing, "start_request", start_request)
    monkeypatch.setattr(tracing, "finish_request", finish_request)
    yield Ways(
        app=app,
        lean=app.wsgi_app,
        flask=BodyLimit(dispatcher.app, settings.max_body_bytes),
        clock=clock,
        upstream=upstream,
        traces=traces,
    )
    runtime.engine.dispose()


def _metrics(app: Flask) -> dict[str, float]:
    registry = app.extensions["sts"].metrics.registry
    return {
        f"{s.labels.get('route')} {s.labels.get('status')}": s.value
        for metric in registry.collect()
        if metric.name == "sts_http_responses"
        for s in metric.samples
        if s.name.endswith("_total")
    }


def send(
    ways: Ways, wsgi: Callable[..., Any], environ: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> Answered:
    before = _metrics(ways.app)
    caplog.clear()
    del ways.traces[:]
    with caplog.at_level(logging.INFO, logger="sts.access"):
        chunks, status, headers = run_wsgi_app(wsgi, environ, buffered=True)
    body = b"".join(chunks)
    request_id = headers["X-Request-Id"]
    after = _metrics(ways.app)
    audit = ways.app.extensions["sts"].audit.recent(limit=1, request_id=request_id)
    access = [
        {
            k: v
            for k, v in vars(r).items()
            if k.startswith("http_") or k in {"client_address", "response_bytes"}
        }
        | {"request_id": r.request_id, "trace_id": r.trace_id}
        for r in caplog.records
        if r.name == "sts.access"
    ]
    delta = {
        key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)
    }
    return Answered(status, list(headers.to_wsgi_list()), body, audit, access, delta, list(ways.traces))


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode("ascii")


@dataclass(frozen=True)
class Case:
    """One request: ``body`` is bytes, a form (dict) or a function of the test's ways (a fresh token)."""

    method: str = "POST"
    path: str = "/token"
    body: bytes | dict[str, str] | Callable[[Ways], dict[str, str]] = b""
    content_type: str | None = FORM
    headers: dict[str, str] = field(default_factory=dict)
    query: str = ""
    chunked: bool = False


def deploy_form(ways: Ways, **params: str) -> dict[str, str]:
    token = ways.upstream.issuer.github_actions_token(audience=STS_ISSUER, now=ways.clock())
    return {"grant_type": TOKEN_EXCHANGE, "subject_token": token, "subject_token_type": JWT_TYPE, **params}


def other_branch_form(ways: Ways) -> dict[str, str]:
    token = ways.upstream.issuer.github_actions_token(
        audience=STS_ISSUER, now=ways.clock(), ref="refs/heads/dev"
    )
    return {"grant_type": TOKEN_EXCHANGE, "subject_token": token, "subject_token_type": JWT_TYPE}


def ledger_form(ways: Ways) -> dict[str, str]:
    token = ways.upstream.issuer.kubernetes_token(audience=STS_ISSUER, now=ways.clock())
    return {"grant_type": TOKEN_EXCHANGE, "subject_token": token, "subject_token_type": JWT_TYPE}


OVERSIZED = b"grant_type=" + b"x" * 70000

CASES: dict[str, Case] = {
    "success": Case(body=deploy_form),
    "success-with-scope": Case(body=lambda w: deploy_form(w, scope="deploy:read deploy:write")),
    "success-under-issuer-path": Case(path="/tenant/token", body=deploy_form),
    "success-with-client": Case(
        body=ledger_form, headers={"Authorization": basic("gateway", GATEWAY_SECRET)}
    ),
    "success-charset": Case(body=deploy_form, content_type=FORM + "; charset=UTF-8"),
    "wrong-client-secret": Case(body=ledger_form, headers={"Authorization": basic("gateway", "wrong")}),
    "malformed-basic": Case(body=ledger_form, headers={"Authorization": "Basic !!!"}),
    "bearer-authorization": Case(body=ledger_form, headers={"Authorization": "Bearer abc"}),
    "no-rule-for-subject": Case(body=other_branch_form),
    "unknown-resource": Case(body=lambda w: deploy_form(w, resource="https://elsewhere.example")),
    "policy-denied-scope": Case(body=lambda w: deploy_form(w, scope="admin")),
    "missing-grant-type": Case(body={"subject_token": "x", "subject_token_type": JWT_TYPE}),
    "unsupported-grant-type": Case(body={"grant_type": "password", "username": "a", "password": "b"}),
    "garbage-subject-token": Case(
        body={"grant_type": TOKEN_EXCHANGE, "subject_token": "not.a.jwt", "subject_token_type": JWT_TYPE}
    ),
    "repeated-parameter": Case(body=b"grant_type=a&grant_type=b&subject_token=x"),
    "empty-values": Case(body=b"grant_type=&subject_token=&subject_token_type=&scope="),
    "no-equals-sign": Case(body=b"grant_type&subject_token&&&"),
    "percent-and-plus": Case(
        body=b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
        b"&subject_token=a+b%zz%e9&subject_token_type=" + JWT_TYPE.encode() + b"&sc%6Fpe=a+b"
    ),
    "non-utf8-body": Case(body=b"grant_type=\xff\xfe&subject_token=\xc3"),
    "nul-bytes": Case(body=b"grant_type=%00&subject_token=\x00"),
    "json-content-type": Case(body=b'{"grant_type": "x"}', content_type="application/json"),
    "no-content-type": Case(body=b"grant_type=x", content_type=None),
    "latin1-charset": Case(body=b"grant_type=x", content_type=FORM + "; charset=latin-1"),
    "multipart": Case(
        body=b'--b\r\nContent-Disposition: form-data; name="grant_type"\r\n\r\nx\r\n--b--\r\n',
        content_type="multipart/form-data; boundary=b",
    ),
    "broken-multipart": Case(body=b"--b\r\nno headers", content_type="multipart/form-data; boundary=b"),
    "oversized-body": Case(body=OVERSIZED),
    "oversized-chunked-body": Case(body=OVERSIZED, chunked=True),
    "chunked-body": Case(body=deploy_form, chunked=True),
    "query-string": Case(body=deploy_form, query="subject_token=leaked&x=%ff"),
    "junk-request-id": Case(body=b"grant_type=x", headers={"X-Request-Id": "../../etc/passwd"}),
    "traceparent": Case(body=deploy_form, headers={"traceparent": TRACEPARENT}),
    "bad-traceparent": Case(body=b"grant_type=x", headers={"traceparent": "00-zz-zz-01"}),
    "forwarded-for": Case(body=b"grant_type=x", headers={"X-Forwarded-For": "198.51.100.7"}),
    "junk-dpop": Case(body=deploy_form, headers={"DPoP": "not-a-proof"}),
    "two-dpop": Case(body=deploy_form, headers={"DPoP": "a.b.c, d.e.f"}),
    "get": Case(method="GET", body=b""),
    "options": Case(method="OPTIONS", body=b""),
    "put": Case(method="PUT", body=b"grant_type=x"),
    "trailing-slash": Case(path="/token/", body=b"grant_type=x"),
    "other-path": Case(path="/tokens", body=b"grant_type=x"),
    "double-slash": Case(path="//token", body=b"grant_type=x"),
    "metadata": Case(method="GET", path="/.well-known/oauth-authorization-server", body=b""),
}


def environ_for(ways: Ways, case: Case, name: str) -> dict[str, Any]:
    body = case.body(ways) if callable(case.body) else case.body
    data = urlencode(body).encode() if isinstance(body, dict) else body
    headers = {"X-Request-Id": f"case-{name}", "User-Agent": "token-fast-test/1", **case.headers}
    environ = EnvironBuilder(
        path=case.path,
        method=case.method,
        query_string=case.query or None,
        data=data if data or case.method == "POST" else None,
        content_type=case.content_type,
        headers=headers,
        environ_base={"REMOTE_ADDR": "203.0.113.9"},
    ).get_environ()
    if case.content_type is None:
        environ.pop("CONTENT_TYPE", None)
    if case.chunked:
        environ.update(
            {
                "wsgi.input": io.BytesIO(data),
                "wsgi.input_terminated": True,
                "CONTENT_LENGTH": "",
                "HTTP_TRANSFER_ENCODING": "chunked",
            }
        )
    return environ


def _normal_headers(answered: Answered, *, token: bool) -> dict[str, str]:
    headers = dict(answered.headers)
    assert len(headers) == len(answered.headers), "a header is repeated"
    if UUID.fullmatch(headers["X-Request-Id"]):
        headers["X-Request-Id"] = "<fresh>"
    if token:
        headers.pop("Content-Length")  # the token's jti is random, and so its length
    return headers


def _normal_body(answered: Answered, *, token: bool) -> Any:
    if not token:
        return answered.body
    body = json.loads(answered.body)
    assert body.pop("access_token").count(".") == 2
    return body


def _normal_audit(answered: Answered) -> list[dict[str, Any]]:
    """The audit records, without what varies; the trace id only says whether it is the caller's."""
    records = []
    for record in answered.audit:
        normal = {k: v for k, v in record.items() if k not in VARYING_AUDIT}
        details = dict(normal.get("details") or {})
        if UUID.fullmatch(normal.get("request_id") or ""):
            normal["request_id"] = "<fresh>"
        if "trace_id" in details:
            details["trace_id"] = details["trace_id"] == TRACE_ID
        normal["details"] = details
        records.append(normal)
    return records


def _audit_differences(lean: Answered, flask: Answered) -> dict[str, Any]:
    """The audit fields that differ between the two answers (empty when they are the same)."""
    assert len(lean.audit) == len(flask.audit)
    differences: dict[str, Any] = {}
    for one, other in zip(_normal_audit(lean), _normal_audit(flask), strict=True):
        for key in one.keys() | other.keys():
            if one.get(key) != other.get(key):
                differences[key] = (one.get(key), other.get(key))
    return differences


def _normal_traces(answered: Answered) -> list[tuple[Any, ...]]:
    """The trace calls, with a fresh request id and a fresh trace id (random by design) named."""
    out = []
    for call in answered.traces:
        if call[0] == "start":
            out.append(("start", "<fresh>" if UUID.fullmatch(call[1]) else call[1], *call[2:]))
        else:
            out.append(("finish", call[1] == TRACE_ID, call[2]))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_the_lean_path_answers_as_flask_does(ways: Ways, name: str, caplog: pytest.LogCaptureFixture) -> None:
    case = CASES[name]
    lean = send(ways, ways.lean, environ_for(ways, case, name), caplog)
    flask = send(ways, ways.flask, environ_for(ways, case, name), caplog)

    token = lean.status.startswith("200") and case.path.endswith("token")
    assert lean.status == flask.status
    assert _normal_headers(lean, token=token) == _normal_headers(flask, token=token)
    assert list(dict(lean.headers)) == list(dict(flask.headers)), "the headers come in another order"
    assert _normal_body(lean, token=token) == _normal_body(flask, token=token)
    assert _audit_differences(lean, flask) == {}
    fresh_id = UUID.fullmatch(dict(lean.headers)["X-Request-Id"]) is not None
    for answered in (lean, flask):
        for line in answered.access:
            line.pop("request_id") if fresh_id else None
            line["trace_id"] = line["trace_id"] == TRACE_ID
    assert lean.access == flask.access
    assert len(lean.access) == 1
    assert lean.metrics == flask.metrics
    assert sum(lean.metrics.values()) == 1
    assert _normal_traces(lean) == _normal_traces(flask)
    assert [call[0] for call in lean.traces] == ["start", "finish"]


def test_the_table_covers_every_answer_the_endpoint_gives(
    ways: Ways, caplog: pytest.LogCaptureFixture
) -> None:
    """The table above reaches a success, each class of refusal, and both paths: else it proves little."""
    statuses = set()
    errors = set()
    for name, case in CASES.items():
        answered = send(ways, ways.lean, environ_for(ways, case, name), caplog)
        statuses.add(answered.status)
        if not answered.status.startswith("200"):
            errors.add(json.loads(answered.body)["error"])
    assert {status_line(s) for s in (200, 400, 401, 404, 405)} <= statuses
    assert {"invalid_request", "invalid_client", "unsupported_grant_type", "invalid_dpop_proof"} <= errors
    assert {"not_found", "invalid_scope", "invalid_target"} <= errors, errors


@pytest.mark.parametrize("failure", ["unexpected", "database-not-ready"])
def test_failures_are_answered_alike(
    ways: Ways, failure: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception is ``server_error`` without a trace, logged; a database that is not
    ready refuses before anything is used up: the same on both paths."""
    dispatcher = ways.app.wsgi_app.app  # type: ignore[attr-defined]
    if failure == "unexpected":

        def boom(_wire: Any) -> Any:
            raise RuntimeError("secret detail")

        monkeypatch.setattr(ways.app.extensions["sts"].exchange, "handle", boom)
    else:
        monkeypatch.setattr(dispatcher.endpoint, "database_ready", lambda: False)
    case = Case(body=deploy_form)
    with caplog.at_level(logging.ERROR, logger="sts.http.responses"):
        lean = send(ways, ways.lean, environ_for(ways, case, failure), caplog)
        lean_errors = [r.getMessage() for r in caplog.records if r.name == "sts.http.responses"]
        flask = send(ways, ways.flask, environ_for(ways, case, failure), caplog)
        flask_errors = [r.getMessage() for r in caplog.records if r.name == "sts.http.responses"]
    assert (lean.status, lean.headers, lean.body) == (flask.status, flask.headers, flask.body)
    assert lean.status == (
        "500 INTERNAL SERVER ERROR" if failure == "unexpected" else "503 SERVICE UNAVAILABLE"
    )
    assert b"secret detail" not in lean.body
    assert lean_errors == flask_errors
    assert len(lean_errors) == (1 if failure == "unexpected" else 0)
    assert _audit_differences(lean, flask) == {}
    assert lean.metrics == flask.metrics


@pytest.mark.parametrize("status", [200, 400, 401, 403, 404, 405, 413, 429, 500, 503, 599])
def test_the_status_line_is_werkzeugs(status: int) -> None:
    assert status_line(status) == Response(status=status).status


def test_only_post_to_the_token_routes_takes_the_lean_path(ways: Ways) -> None:
    dispatcher = ways.app.wsgi_app.app  # type: ignore[attr-defined]
    assert sorted(dispatcher.routes) == ["/tenant/token", "/token"]
