"""Logs and traces (issue 13): W3C ``traceparent``, OpenTelemetry spans, JSON logs, the decision log.

* ``traceparent`` is parsed strictly (W3C Trace Context §3.2, table below); a
  valid one is continued, anything else starts a new trace; the trace id is
  in the audit record, the access log and the decision log, and is passed on
  to the JWKS fetch and the TokenReview call the request causes.
* With tracing on, the real OpenTelemetry SDK (its in-memory exporter, and
  an OTLP/HTTP receiver on loopback) gets a server span per request, child of
  the caller's span, and a span per pipeline stage; stage observers get each
  stage's duration.
* JSON logs: one object per line with the structured fields, the request id
  and the trace id; one decision line per exchange, introspection, revocation
  and SET; never a token or a secret.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sts.adapters.log_format import JsonFormatter, configure_logging
from sts.adapters.token_review import HttpTokenReviewer
from sts.adapters.tracing import Tracing, build_tracing, current, outbound_headers
from sts.app import create_app
from sts.core.stages import TOKEN_STAGES
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import ConfigurationError
from sts.protocol.trace_context import TraceContext, parse_traceparent
from sts.settings import TracingSettings
from sts.settings.load import load_settings
from tests.conftest import DEFAULT_POLICY, GATEWAY_SECRET, STS_ISSUER, exchange_form, settings_for

DEPLOY = "https://deploy.example.com"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SET_MEDIA_TYPE = "application/secevent+jwt"
SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"


# -- traceparent ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (TRACEPARENT, TraceContext(TRACE_ID, PARENT_ID, 1)),
        (f"00-{TRACE_ID}-{PARENT_ID}-00", TraceContext(TRACE_ID, PARENT_ID, 0)),
        (f"  {TRACEPARENT}\t", TraceContext(TRACE_ID, PARENT_ID, 1)),  # optional whitespace around it
        # A later version is read as version 00 where its fields fit (§3.2.4).
        (f"01-{TRACE_ID}-{PARENT_ID}-09", TraceContext(TRACE_ID, PARENT_ID, 9)),
        (f"cc-{TRACE_ID}-{PARENT_ID}-01-what-the-future-holds", TraceContext(TRACE_ID, PARENT_ID, 1)),
        # Invalid: start a new trace.
        (f"00-{TRACE_ID}-{PARENT_ID}-01-extra", None),  # version 00 is exactly 55 characters
        (f"ff-{TRACE_ID}-{PARENT_ID}-01", None),  # version ff is invalid
        (f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", None),  # lower-case hex only
        (f"00-{'0' * 32}-{PARENT_ID}-01", None),  # all-zero trace-id
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),  # all-zero parent-id
        (f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01", None),
        (f"00-{TRACE_ID}-{PARENT_ID}-1", None),
        (f"00-{TRACE_ID}-{PARENT_ID}-0g", None),
        (f"00_{TRACE_ID}_{PARENT_ID}_01", None),
        (f"01-{TRACE_ID}-{PARENT_ID}-01x", None),  # after the flags: a dash or the end
        (f"{TRACEPARENT},{TRACEPARENT}", None),  # a repeated header, joined by the server
        ("", None),
        (None, None),
    ],
)
def test_traceparent_is_parsed_strictly(value: str | None, expected: TraceContext | None) -> None:
    assert parse_traceparent(value) == expected


def test_traceparent_round_trips_and_children_keep_the_trace() -> None:
    parsed = parse_traceparent(TRACEPARENT)
    assert parsed is not None and parsed.traceparent() == TRACEPARENT and parsed.sampled
    child = parsed.child()
    assert child.trace_id == TRACE_ID and child.span_id != PARENT_ID and child.flags == 1
    assert parse_traceparent(child.traceparent()) == child


# -- a recording upstream: JWKS and TokenReview, with the headers they were sent --------------------


class RecordingServer:
    """Serves ``GET`` with ``body`` and ``POST`` with a TokenReview answer; keeps each request's headers."""

    def __init__(self, body: bytes = b'{"keys": []}') -> None:
        self.body = body
        self.seen: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: bytes) -> None:
                server.seen.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._answer(200, server.body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                review = {
                    "status": {
                        "authenticated": True,
                        "user": {"username": "system:serviceaccount:a:b"},
                        "audiences": ["https://sts.test"],
                    }
                }
                self._answer(201, json.dumps(review).encode())

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.http.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def keys_server(upstream: RunningServer) -> Iterator[RecordingServer]:
    server = RecordingServer(json.dumps(upstream.issuer.jwks()).encode())
    yield server
    server.stop()


def recorded_issuer(upstream: RunningServer, keys_server: RecordingServer) -> list[dict[str, Any]]:
    return [
        {
            "name": "upstream",
            "issuer": upstream.issuer.issuer_url,
            "jwks_uri": keys_server.url + "/jwks",
            "algorithms": ["RS256"],
            "audiences": [STS_ISSUER],
            "max_token_age": 3600,
        }
    ]


def deploy_form(upstream: RunningServer) -> dict[str, Any]:
    return exchange_form(upstream.issuer.github_actions_token(audience=STS_ISSUER), audience=DEPLOY)


def last_record(app: Flask, endpoint: str = "token") -> dict[str, Any]:
    record: dict[str, Any] = app.extensions["sts"].audit.recent(1, endpoint=endpoint)[0]
    return record


# -- trace context over HTTP --------------------------------------------------------------------------


def test_an_incoming_trace_is_continued_into_the_record_the_logs_and_the_jwks_fetch(
    tmp_path: Path, upstream: RunningServer, keys_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings_for(tmp_path, upstream, issuers=recorded_issuer(upstream, keys_server)))
    with caplog.at_level(logging.INFO, logger="sts"):
        response = app.test_client().post(
            "/token", data=deploy_form(upstream), headers={"traceparent": TRACEPARENT}
        )
    assert response.status_code == 200
    assert "traceparent" not in response.headers  # W3C does not ask a server to send one back
    assert last_record(app)["details"]["trace_id"] == TRACE_ID
    [access] = [r for r in caplog.records if r.name == "sts.access"]
    [decision] = [r for r in caplog.records if r.name == "sts.decision"]
    assert access.trace_id == TRACE_ID  # type: ignore[attr-defined]
    assert decision.decision["trace_id"] == TRACE_ID  # type: ignore[attr-defined]
    # The JWKS fetch the exchange caused continues the same trace, from this service's span.
    [fetch] = keys_server.seen
    passed = parse_traceparent(fetch["traceparent"])
    assert passed is not None and passed.trace_id == TRACE_ID and passed.span_id != PARENT_ID
    assert passed.flags == 1


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"traceparent": f"00-{TRACE_ID.upper()}-{PARENT_ID}-01"},
        {"traceparent": f"00-{'0' * 32}-{PARENT_ID}-01"},
        {"traceparent": "garbage"},
    ],
    ids=["absent", "upper-case", "zero-trace", "garbage"],
)
def test_an_absent_or_invalid_traceparent_starts_a_new_trace(
    tmp_path: Path, upstream: RunningServer, headers: dict[str, str]
) -> None:
    app = create_app(settings_for(tmp_path, upstream))
    assert app.test_client().post("/token", data=deploy_form(upstream), headers=headers).status_code == 200
    trace_id = last_record(app)["details"]["trace_id"]
    assert len(trace_id) == 32 and set(trace_id) <= set("0123456789abcdef")
    assert trace_id not in {TRACE_ID, TRACE_ID.upper(), "0" * 32}


def test_two_traceparent_headers_start_a_new_trace(tmp_path: Path, upstream: RunningServer) -> None:
    app = create_app(settings_for(tmp_path, upstream))
    headers = [("traceparent", TRACEPARENT), ("traceparent", f"00-{'a' * 32}-{PARENT_ID}-01")]
    assert app.test_client().post("/token", data=deploy_form(upstream), headers=headers).status_code == 200
    assert last_record(app)["details"]["trace_id"] not in {TRACE_ID, "a" * 32}


def test_the_token_review_call_carries_the_trace(keys_server: RecordingServer) -> None:
    tracing = Tracing()
    trace = tracing.start_request("req-1", "POST", "/token", parse_traceparent(TRACEPARENT))
    try:
        reviewer = HttpTokenReviewer(keys_server.url)
        assert reviewer.review("a.b.c", ("https://sts.test",)) == "system:serviceaccount:a:b"
    finally:
        tracing.finish_request(trace, 200)
    passed = parse_traceparent(keys_server.seen[-1]["traceparent"])
    assert passed is not None and passed.trace_id == TRACE_ID
    # Outside a request nothing is added, and the context is gone once the request ended.
    assert current.get() is None and outbound_headers() == {}
    HttpTokenReviewer(keys_server.url).review("a.b.c", ())
    assert "traceparent" not in keys_server.seen[-1]


def test_stage_observers_get_every_stage_of_an_exchange_in_order(
    tmp_path: Path, upstream: RunningServer
) -> None:
    app = create_app(settings_for(tmp_path, upstream))
    seen: list[tuple[str, str, float]] = []
    app.extensions["sts"].tracing.add_observer(
        lambda route, stage, seconds: seen.append((route, stage, seconds))
    )
    assert app.test_client().post("/token", data=deploy_form(upstream)).status_code == 200
    assert [stage for _, stage, _ in seen] == list(TOKEN_STAGES)
    assert {route for route, _, _ in seen} == {"/token"}
    assert all(0 <= seconds < 10 for _, _, seconds in seen)
    # A refusal ends in the audit stage too, after the stage it was refused in.
    seen.clear()
    assert (
        app.test_client().post("/token", data=exchange_form("not-a-jwt", audience=DEPLOY)).status_code == 400
    )
    assert [stage for _, stage, _ in seen] == ["parse", "client_auth", "dpop", "attest", "audit"]


# -- OpenTelemetry --------------------------------------------------------------------------------------


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def traced_app(
    tmp_path: Path, upstream: RunningServer, exporter: InMemorySpanExporter, **overrides: Any
) -> Flask:
    settings = settings_for(tmp_path, upstream, tracing={"enabled": True}, **overrides)
    return create_app(settings, span_exporter=exporter)


def by_name(spans: tuple[ReadableSpan, ...] | list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def test_spans_per_request_and_per_stage_continue_the_incoming_trace(
    tmp_path: Path, upstream: RunningServer, keys_server: RecordingServer, exporter: InMemorySpanExporter
) -> None:
    app = traced_app(tmp_path, upstream, exporter, issuers=recorded_issuer(upstream, keys_server))
    response = app.test_client().post(
        "/token", data=deploy_form(upstream), headers={"traceparent": TRACEPARENT}
    )
    assert response.status_code == 200
    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"POST /token", *TOKEN_STAGES}
    server = spans["POST /token"]
    assert server.context is not None and server.parent is not None
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert f"{server.parent.span_id:016x}" == PARENT_ID and server.parent.is_remote
    assert server.kind.name == "SERVER"
    attributes = dict(server.attributes or {})
    assert attributes["http.route"] == "/token" and attributes["http.response.status_code"] == 200
    assert attributes["sts.decision"] == "granted" and attributes["sts.rule"] == "deploy"
    assert attributes["sts.request_id"] == response.headers["X-Request-Id"]
    for stage in TOKEN_STAGES:
        span = spans[stage]
        assert span.parent is not None and span.parent.span_id == server.context.span_id
        assert span.context is not None and span.context.trace_id == server.context.trace_id
    # The JWKS fetch names the attest stage's span as its parent.
    passed = parse_traceparent(keys_server.seen[-1]["traceparent"])
    attest = spans["attest"].context
    assert passed is not None and attest is not None and passed.span_id == f"{attest.span_id:016x}"
    # The audit record has the same trace id as the spans.
    assert last_record(app)["details"]["trace_id"] == TRACE_ID


def test_without_a_caller_trace_the_request_span_is_a_root_and_refusals_are_recorded(
    tmp_path: Path, upstream: RunningServer, exporter: InMemorySpanExporter
) -> None:
    app = traced_app(tmp_path, upstream, exporter)
    form = exchange_form(
        upstream.issuer.github_actions_token(audience=STS_ISSUER), audience="https://x.example"
    )
    assert app.test_client().post("/token", data=form).status_code == 400
    spans = by_name(exporter.get_finished_spans())
    server = spans["POST /token"]
    assert server.parent is None and server.context is not None
    assert last_record(app)["details"]["trace_id"] == f"{server.context.trace_id:032x}"
    attributes = dict(server.attributes or {})
    assert attributes["sts.decision"] == "refused" and attributes["sts.error"] == "invalid_target"
    assert attributes["sts.reason"] == "policy.target_not_allowed"
    assert "mint" not in spans and "audit" in spans
    # Other endpoints get their server span too.
    exporter.clear()
    assert app.test_client().get("/.well-known/jwks.json").status_code == 200
    assert [s.name for s in exporter.get_finished_spans()] == ["GET /.well-known/jwks.json"]


def test_an_unsampled_caller_trace_is_not_recorded(
    tmp_path: Path, upstream: RunningServer, exporter: InMemorySpanExporter
) -> None:
    app = traced_app(tmp_path, upstream, exporter)
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    assert (
        app.test_client()
        .post("/token", data=deploy_form(upstream), headers={"traceparent": unsampled})
        .status_code
        == 200
    )
    assert exporter.get_finished_spans() == ()
    assert last_record(app)["details"]["trace_id"] == TRACE_ID  # still continued and logged


def test_a_request_made_inside_another_ends_its_own_trace_and_leaves_none_behind(
    tmp_path: Path, upstream: RunningServer, exporter: InMemorySpanExporter
) -> None:
    """Flask shares ``g`` between a request and one made from inside it (tests do this): each
    request still ends its own span, and no trace outlives its request."""
    app = traced_app(tmp_path, upstream, exporter)
    exchange = app.extensions["sts"].exchange
    signer, inner = exchange.signer, []

    def sign_after_an_inner_request() -> Any:
        if not inner:
            inner.append(app.test_client().get("/.well-known/jwks.json").status_code)
        return signer()

    exchange.signer = sign_after_an_inner_request
    assert app.test_client().post("/token", data=deploy_form(upstream)).status_code == 200
    assert inner == [200]
    names = sorted(span.name for span in exporter.get_finished_spans() if span.kind.name == "SERVER")
    assert names == ["GET /.well-known/jwks.json", "POST /token"]
    assert current.get() is None


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on loopback that decodes what it receives (protobuf)."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                receiver.requests.append(message)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1/traces"

    def span_names(self) -> list[str]:
        return [
            span.name
            for request in self.requests
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    def service_names(self) -> set[str]:
        return {
            attribute.value.string_value
            for request in self.requests
            for resource in request.resource_spans
            for attribute in resource.resource.attributes
            if attribute.key == "service.name"
        }


def test_spans_are_exported_over_otlp_http(tmp_path: Path, upstream: RunningServer) -> None:
    receiver = OtlpReceiver()
    try:
        tracing = {"enabled": True, "endpoint": receiver.url, "service_name": "sts-under-test"}
        app = create_app(settings_for(tmp_path, upstream, tracing=tracing))
        assert app.test_client().post("/token", data=deploy_form(upstream)).status_code == 200
        assert app.extensions["sts"].tracing.flush()
        assert sorted(receiver.span_names()) == sorted(["POST /token", *TOKEN_STAGES])
        assert receiver.service_names() == {"sts-under-test"}
    finally:
        receiver.http.shutdown()
        receiver.http.server_close()


def test_tracing_settings_are_checked(tmp_path: Path, upstream: RunningServer) -> None:
    assert build_tracing(TracingSettings()).tracer is None  # off by default: no OpenTelemetry at all
    for bad in (
        {"exporter": "zipkin"},
        {"sample_ratio": 2},
        {"endpoint": "ftp://collector/v1/traces"},
        {"x": 1},
    ):
        with pytest.raises(ConfigurationError, match="tracing"):
            settings_for(tmp_path, upstream, tracing={"enabled": True, **bad})


# -- logs ---------------------------------------------------------------------------------------------


@pytest.fixture
def json_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Everything the ``sts`` loggers write while the test runs, formatted as JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("sts")
    logger.addHandler(handler)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)


def basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def test_json_logs_carry_the_access_and_decision_fields_and_never_a_token(
    tmp_path: Path, upstream: RunningServer, json_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    app = create_app(settings_for(tmp_path, upstream))
    client = app.test_client()
    subject_token = upstream.issuer.kubernetes_token(audience=STS_ISSUER)
    granted = client.post(
        "/token",
        data=exchange_form(subject_token, resource="https://ledger.example.com/api"),
        headers={**basic("gateway", GATEWAY_SECRET), "traceparent": TRACEPARENT, "X-Request-Id": "req-42"},
    )
    assert granted.status_code == 200
    access_token = granted.get_json()["access_token"]
    lines = json_lines()
    access = [line for line in lines if line["logger"] == "sts.access"]
    decisions = [line for line in lines if line["logger"] == "sts.decision"]
    assert len(access) == 1 and len(decisions) == 1
    assert access[0]["http_route"] == "/token" and access[0]["http_status"] == 200
    assert access[0]["request_id"] == "req-42" and access[0]["trace_id"] == TRACE_ID
    assert access[0]["level"] == "INFO" and access[0]["time"].endswith("Z")
    assert decisions[0]["request_id"] == "req-42" and decisions[0]["trace_id"] == TRACE_ID
    decision = decisions[0]["decision"]
    assert decision["endpoint"] == "token" and decision["outcome"] == "granted"
    assert decision["rule"] == "ledger-with-client" and decision["reason"] == "policy.rule_matched"
    assert decision["request_id"] == "req-42" and decision["trace_id"] == TRACE_ID
    assert decision["client_id"] == "gateway"
    assert decision["subject_token_sha256"] == last_record(app)["subject_token_sha256"]
    everything = json.dumps(lines)
    for secret in (subject_token, access_token, GATEWAY_SECRET, subject_token.split(".")[2]):
        assert secret not in everything


def test_one_decision_line_per_introspection_revocation_and_set(
    tmp_path: Path, upstream: RunningServer, json_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    with DevIssuer.serve_ephemeral(alg="ES256", mint_endpoints=False) as transmitter:
        entry = {
            "name": "idp",
            "issuer": transmitter.issuer.issuer_url,
            "jwks_uri": transmitter.jwks_uri,
            "algorithms": ["ES256"],
        }
        app = create_app(settings_for(tmp_path, upstream, transmitters=[entry]))
        client = app.test_client()
        token = client.post("/token", data=deploy_form(upstream)).get_json()["access_token"]
        gateway = basic("gateway", GATEWAY_SECRET)
        assert client.post("/introspect", data={"token": token}, headers=gateway).status_code == 200
        assert client.post("/revoke", data={"token": "not-ours"}, headers=gateway).status_code == 200
        claims = {
            "iss": transmitter.issuer.issuer_url,
            "aud": STS_ISSUER,
            "iat": int(time.time()),
            "jti": uuid.uuid4().hex,
            "sub_id": {"format": "iss_sub", "iss": upstream.issuer.issuer_url, "sub": "repo:acme/app:ref:x"},
            "events": {SESSION_REVOKED: {"event_timestamp": int(time.time()) - 10}},
        }
        set_token = transmitter.issuer.mint(claims, header={"typ": "secevent+jwt"})
        assert client.post("/ssf/events", data=set_token, content_type=SET_MEDIA_TYPE).status_code == 202
    decisions = [
        (line["decision"]["endpoint"], line["decision"]["outcome"])
        for line in json_lines()
        if line["logger"] == "sts.decision"
    ]
    assert decisions == [
        ("token", "granted"),
        ("introspect", "inactive"),
        ("revoke", "ignored"),
        ("ssf", "accepted"),
    ]
    everything = json.dumps(json_lines())
    assert token not in everything and set_token not in everything


def test_a_single_use_grant_is_logged_once_with_its_commit(
    tmp_path: Path, upstream: RunningServer, json_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    """The grant's record is committed with the use of its subject token (the ledger): logged too."""
    rules = [{**rule, "single_use": True} for rule in DEFAULT_POLICY["rules"]]
    app = create_app(settings_for(tmp_path, upstream, {**DEFAULT_POLICY, "rules": rules}))
    form = deploy_form(upstream)
    assert app.test_client().post("/token", data=form).status_code == 200
    assert app.test_client().post("/token", data=form).status_code == 400  # replayed
    outcomes = [
        (line["decision"]["outcome"], line["decision"].get("reason"))
        for line in json_lines()
        if line["logger"] == "sts.decision"
    ]
    assert outcomes == [("granted", "policy.rule_matched"), ("refused", "subject_token.replayed")]


def test_a_decision_whose_record_cannot_be_committed_is_logged_once_as_not_audited(
    tmp_path: Path, upstream: RunningServer, json_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    app = create_app(settings_for(tmp_path, upstream))
    engine = app.extensions["sts"].engine
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE audit_events")  # every audit write now fails
    assert app.test_client().post("/token", data=deploy_form(upstream)).status_code == 503
    lines = [line for line in json_lines() if "decision" in line and isinstance(line["decision"], dict)]
    assert [line["logger"] for line in lines] == ["sts.core.exchange"]
    assert lines[0]["level"] == "ERROR" and lines[0]["message"].startswith("decision not audited")
    assert lines[0]["decision"]["outcome"] == "withheld"


def test_a_refused_clients_own_text_cannot_forge_a_text_log_line(
    tmp_path: Path, upstream: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(settings_for(tmp_path, upstream))
    form = exchange_form("x", client_id="evil\nINFO sts.decision: token granted", client_secret="s")
    with caplog.at_level(logging.INFO, logger="sts.decision"):
        assert app.test_client().post("/token", data=form).status_code == 401
    [line] = [r.getMessage() for r in caplog.records if r.name == "sts.decision"]
    assert "\n" not in line and "token refused invalid_client" in line


def test_configure_logging_chooses_the_format(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json")
        logging.getLogger("sts.test").info("hello %s", "world", extra={"decision": "granted"})
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert (
            line["message"] == "hello world"
            and line["decision"] == "granted"
            and line["logger"] == "sts.test"
        )
        configure_logging("INFO", "text")
        logging.getLogger("sts.test").info("plain")
        assert capsys.readouterr().err.rstrip().endswith("INFO sts.test: plain")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_log_format_setting(tmp_path: Path, upstream: RunningServer) -> None:
    assert settings_for(tmp_path, upstream).log_format == "text"
    assert settings_for(tmp_path, upstream, log_format="json").log_format == "json"
    assert load_settings(None, {"STS_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigurationError, match="log_format"):
        settings_for(tmp_path, upstream, log_format="xml")
