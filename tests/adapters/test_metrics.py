"""Prometheus metrics (issue 13): counted right across worker processes, labelled without secrets.

The first tests scrape ``/metrics`` from a real ``sts serve --workers 2`` after real
exchanges over many connections (so that both workers serve), and check the exact
totals, the per-stage histograms and the JWKS fetches; then a worker is killed and
its counts must survive.  The others drive the app in-process (its metrics then live in
a registry of their own) through real failures: a dropped audit table, a Redis that
does not answer, an issuer whose JWKS cannot be fetched.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from sts.adapters import metrics_exposition
from sts.adapters.metrics_exposition import (
    MULTIPROC_ENV,
    ExpositionCollector,
    MetricsServer,
    exposition_registry,
    prometheus_text,
)
from sts.app import create_app
from sts.core import stages as stage
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import ConfigurationError
from sts.settings import Settings
from sts.settings.load import load_settings
from sts.wiring.runtime import Runtime
from tests.conftest import DEFAULT_POLICY, GATEWAY_SECRET, STS_ISSUER, exchange_form
from tests.support.clock import Clock

REPO_ROOT = Path(__file__).resolve().parents[2]
STS = str(Path(sys.executable).with_name("sts"))
DEPLOY = "https://deploy.example.com"
SUBJECT = "repo:acme/app:ref:refs/heads/main"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(exposition: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (n, have), value in samples.items() if n == name and wanted <= have)


# -- a real multi-worker server ------------------------------------------------------------------


class Instance:
    """One ``sts serve`` process with its own directory, ports and (optionally) metrics directory."""

    def __init__(
        self,
        directory: Path,
        upstream: RunningServer,
        *,
        workers: int,
        multiproc_dir: Path | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.port, self.metrics_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        (directory / "policies").mkdir(parents=True)
        policy = {"version": 1, "rules": [DEFAULT_POLICY["rules"][0]]}  # the anonymous "deploy" rule
        (directory / "policies" / "test.yaml").write_text(yaml.safe_dump(policy))
        config = {
            "issuer": self.url,
            "port": self.port,
            "workers": workers,
            "threads": 4,
            "metrics_listen": f"127.0.0.1:{self.metrics_port}",
            "database_url": f"sqlite:///{directory / 'sts.sqlite'}",
            "keys_dir": "keys",
            "policies_dir": "policies",
            "issuers": [
                {
                    "name": "upstream",
                    "issuer": upstream.issuer.issuer_url,
                    "jwks_uri": upstream.jwks_uri,
                    "algorithms": ["RS256"],
                    "audiences": [self.url],
                }
            ],
        }
        (directory / "sts.yaml").write_text(yaml.safe_dump({**config, **(extra or {})}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("STS_") and k != MULTIPROC_ENV}
        if multiproc_dir is not None:
            env[MULTIPROC_ENV] = str(multiproc_dir)
        self.log = directory / "serve.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [STS, "--config", str(directory / "sts.yaml"), "serve"],
                cwd=directory,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        end = time.monotonic() + 30
        while time.monotonic() < end and self.proc.poll() is None:
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"sts serve did not come up:\n{self.log.read_text()}")

    def scrape(self) -> Samples:
        response = requests.get(self.metrics_url, timeout=5)
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.text)

    def post(self, form: dict[str, str]) -> requests.Response:
        # A new connection every time: the kernel spreads connections over the workers.
        return requests.post(f"{self.url}/token", data=form, headers={"Connection": "close"}, timeout=10)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def _form(token: str, **extra: str) -> dict[str, str]:
    return {**exchange_form(token, audience=DEPLOY), **extra}


def _per_worker(directory: Path, server_pid: int) -> dict[int, dict[str, float]]:
    """Each worker's own counters (its ``counter_<pid>.db``), to tell which workers served."""
    workers: dict[int, dict[str, float]] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        if pid == server_pid:
            continue
        counts: dict[str, float] = {}
        for family in MultiProcessCollector.merge([str(path)], accumulate=False):
            for sample in family.samples:
                counts[sample.name] = counts.get(sample.name, 0) + sample.value
        workers[pid] = counts
    return workers


@pytest.fixture(scope="module")
def upstream_issuer() -> Iterator[RunningServer]:
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


def test_scrape_after_real_exchanges_counts_every_worker(
    tmp_path: Path, upstream_issuer: RunningServer
) -> None:
    """Done means (issue 13): the counts scraped from a two-worker server are exact."""
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    (multiproc / "counter_999999.db").write_bytes(b"left over from a previous run")
    sts = Instance(tmp_path / "a", upstream_issuer, workers=2, multiproc_dir=multiproc)
    try:
        assert not (multiproc / "counter_999999.db").exists()  # cleaned at start
        issuer = upstream_issuer.issuer
        grants, wrong_audience, wrong_grant_type = 24, 8, 6
        kinds = ["grant"] * grants + ["audience"] * wrong_audience + ["grant_type"] * wrong_grant_type
        random.Random(13).shuffle(kinds)
        refused_at_attest = ""
        for kind in kinds:
            if kind == "audience":
                response = sts.post(_form(issuer.github_actions_token(audience="https://elsewhere.example")))
                assert response.status_code == 400, response.text
                refused_at_attest = response.json()["error"]
            elif kind == "grant_type":
                token = issuer.github_actions_token(audience=sts.url)
                response = sts.post(_form(token, grant_type="password"))
                assert response.json()["error"] == "unsupported_grant_type"
            else:
                response = sts.post(_form(issuer.github_actions_token(audience=sts.url)))
                assert response.status_code == 200, response.text
        # Connections are spread over the workers by the kernel: on a loaded machine one worker
        # (the other still starting, or descheduled) may take all of them.  More grants, counted,
        # until both have served, so that the per-worker checks below have two to check.
        for _ in range(200):
            if (
                len(
                    [c for c in _per_worker(multiproc, sts.proc.pid).values() if c.get("sts_decisions_total")]
                )
                > 1
            ):
                break
            response = sts.post(_form(issuer.github_actions_token(audience=sts.url)))
            assert response.status_code == 200, response.text
            grants += 1
        assert requests.get(f"{sts.url}/metrics", timeout=5).status_code == 404  # not on the service's port

        samples = sts.scrape()
        decisions = "sts_decisions_total"
        assert total(samples, decisions, endpoint="token", outcome="granted", rule="deploy") == grants
        assert total(samples, decisions, outcome="granted", error="") == grants
        assert total(samples, decisions, outcome="refused", error=refused_at_attest) == wrong_audience
        refused = total(samples, decisions, outcome="refused", error="unsupported_grant_type")
        assert refused == wrong_grant_type
        assert total(samples, decisions) == grants + wrong_audience + wrong_grant_type
        requests_seen = grants + wrong_audience + wrong_grant_type
        assert total(samples, "sts_http_request_duration_seconds_count", route="/token") == requests_seen
        assert total(samples, "sts_http_responses_total", route="/token", status="200") == grants
        assert total(samples, "sts_http_responses_total", route="/token", status="400") == (
            wrong_audience + wrong_grant_type
        )

        # Each stage once per request that reached it: a wrong audience stops at attest, a wrong
        # grant type at parse; every request ends with its audit record.
        expected = {
            stage.PARSE: requests_seen,
            stage.CLIENT_AUTH: grants + wrong_audience,
            stage.DPOP: grants + wrong_audience,
            stage.ATTEST: grants + wrong_audience,
            stage.POLICY: grants,
            stage.RISK: grants,
            stage.MINT: grants,
            stage.AUDIT: requests_seen,
        }
        for name, count in expected.items():
            seconds = "sts_pipeline_stage_duration_seconds"
            assert total(samples, f"{seconds}_count", route="/token", stage=name) == count, name
            assert total(samples, f"{seconds}_bucket", route="/token", stage=name, le="+Inf") == count
            assert 0 < total(samples, f"{seconds}_sum", route="/token", stage=name) < 60

        # Both workers served, and each fetched the issuer's keys once (its own cache).
        workers = _per_worker(multiproc, sts.proc.pid)
        served = {pid: c for pid, c in workers.items() if c.get("sts_decisions_total", 0) > 0}
        assert len(served) == 2, workers
        assert sum(c["sts_decisions_total"] for c in served.values()) == requests_seen
        fetches = total(samples, "sts_jwks_fetches_total", issuer="upstream", result="success")
        assert fetches == len(served)
        assert total(samples, "sts_jwks_fetches_total", result="failure") == 0
        assert total(samples, "sts_jwks_keys", issuer="upstream") >= 1
        assert 0 <= total(samples, "sts_jwks_last_success_age_seconds", issuer="upstream") < 60
        assert 0 <= total(samples, "sts_signing_key_age_seconds", state="active") < 120
        assert 0 <= total(samples, "sts_signing_key_age_seconds", state="next") < 120
        assert total(samples, "sts_signing_keys", state="active") == 1
        assert not any(SUBJECT in value for _, labels in samples for _, value in labels)

        # A worker killed outright: what it counted is still counted, and its cache gauges go.
        victim = next(iter(served))
        assert any(multiproc.glob(f"gauge_livemax_{victim}.db"))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{victim}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        after = sts.scrape()
        assert not any(multiproc.glob(f"gauge_livemax_{victim}.db"))  # swept at the scrape
        assert total(after, decisions) == requests_seen
        assert total(after, "sts_pipeline_stage_duration_seconds_count", stage=stage.MINT) == grants
        more = 5
        for _ in range(more):
            response = sts.post(_form(issuer.github_actions_token(audience=sts.url)))
            assert response.status_code == 200, response.text
        final = sts.scrape()
        assert total(final, decisions, outcome="granted") == grants + more
        assert total(final, "sts_pipeline_stage_duration_seconds_count", stage=stage.MINT) == grants + more
    finally:
        assert sts.stop() == 0
    assert multiproc.is_dir()  # a directory the operator named stays (only its files were replaced)


def test_each_instance_has_its_own_private_metrics_directory(
    tmp_path: Path, upstream_issuer: RunningServer
) -> None:
    """Without PROMETHEUS_MULTIPROC_DIR each instance makes a private directory and removes it at exit;
    two instances are two scrape targets, each counting only what it served."""
    one = Instance(tmp_path / "one", upstream_issuer, workers=1, multiproc_dir=None)
    two = Instance(tmp_path / "two", upstream_issuer, workers=1, multiproc_dir=None)
    try:
        token = upstream_issuer.issuer.github_actions_token(audience=one.url)
        for _ in range(3):
            assert one.post(_form(token)).status_code == 200
        assert total(one.scrape(), "sts_decisions_total", outcome="granted") == 3
        assert total(two.scrape(), "sts_decisions_total") == 0
        directory = Path(re.findall(r"worker values in (\S+)\)", one.log.read_text())[0])
        assert directory.is_dir() and directory.stat().st_mode & 0o777 == 0o700
        assert any(directory.glob("counter_*.db"))
    finally:
        assert one.stop() == 0
        assert two.stop() == 0
    assert not directory.exists()


def test_metrics_listener_must_be_free(tmp_path: Path, upstream_issuer: RunningServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "policies").mkdir()
        config = {
            "port": _free_port(),
            "metrics_listen": f"127.0.0.1:{port}",
            "database_url": f"sqlite:///{tmp_path / 'sts.sqlite'}",
        }
        (tmp_path / "sts.yaml").write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("STS_") and k != MULTIPROC_ENV}
        result = subprocess.run(
            [STS, "--config", str(tmp_path / "sts.yaml"), "serve"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert f"metrics_listen 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


# -- in-process: failures, signals, JWKS and keys ------------------------------------------------


def runtime(app: Flask) -> Runtime:
    rt: Runtime = app.extensions["sts"]
    return rt


def scrape(app: Flask, **collector: Any) -> Samples:
    rt = runtime(app)
    assert rt.metrics is not None and rt.metrics.registry is not None
    return parse(prometheus_text(ExpositionCollector(source=rt.metrics.registry, **collector)).decode())


def test_decisions_by_endpoint_outcome_error_and_rule(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    app = create_app(make_settings())
    web = app.test_client()
    token = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    for _ in range(2):
        assert web.post("/token", data=exchange_form(token, audience=DEPLOY)).status_code == 200
    refused = web.post("/token", data=exchange_form(token, audience="https://not-granted.example"))
    assert refused.status_code == 400
    introspected = web.post("/introspect", data={"token": "x"}, auth=("gateway", GATEWAY_SECRET))
    assert introspected.status_code == 200
    samples = scrape(app)
    name = "sts_decisions_total"
    assert total(samples, name, endpoint="token", outcome="granted", error="", rule="deploy") == 2
    error = refused.get_json()["error"]
    assert total(samples, name, endpoint="token", outcome="refused", error=error) == 1
    assert total(samples, name, endpoint="introspect", outcome="inactive") == 1
    assert total(samples, name) == 4
    # Every label value comes from the code or the configuration: never a subject or an address.
    values = {value for _, labels in samples for _, value in labels}
    assert not any(SUBJECT in value or "127.0.0.1" in value for value in values)


def test_risk_signals_that_fired_are_counted(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    rule = {**DEFAULT_POLICY["rules"][0], "risk": {"privileged_scopes": ["deploy:write"]}}
    app = create_app(make_settings({"version": 1, "rules": [rule]}))
    web = app.test_client()
    token = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    for scope in ("deploy:read", "deploy:read deploy:write", "deploy:write"):
        web.post("/token", data=exchange_form(token, audience=DEPLOY, scope=scope))
    fired = [
        s["name"]
        for record in runtime(app).audit.recent(3)
        for s in record["details"]["risk"]["signals"]
        if s["fired"]
    ]
    assert fired.count("elevated_privilege") == 2
    samples = scrape(app)
    name = "sts_risk_signals_fired_total"
    assert total(samples, name, signal="elevated_privilege", mode="enforce") == 2
    assert total(samples, name) == len(fired)


def test_audit_failures_are_counted_and_a_withheld_grant_is_not_a_grant(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    app = create_app(make_settings())
    web = app.test_client()
    with runtime(app).engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_events RENAME TO audit_events_away"))
    token = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    assert web.post("/token", data=exchange_form(token, audience=DEPLOY)).status_code == 503
    assert web.post("/token", data=exchange_form(token, grant_type="password")).status_code == 400
    samples = scrape(app)
    assert total(samples, "sts_audit_errors_total", endpoint="token", outcome="granted") == 1
    assert total(samples, "sts_audit_errors_total", endpoint="token", outcome="refused") == 1
    assert total(samples, "sts_decisions_total", outcome="withheld", rule="deploy") == 1
    assert total(samples, "sts_decisions_total", outcome="granted") == 0
    assert total(samples, "sts_decisions_total", outcome="refused", error="unsupported_grant_type") == 1


def test_store_failures_are_counted_by_store_and_operation(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    """A Redis that does not answer (nothing listens on its port): the exchange is refused 503."""
    redis_url = f"redis://127.0.0.1:{_free_port()}/0"
    # Without rate limits the first store the exchange needs is the subject state; with them
    # (the defaults), it is the rate-limit store, on arrival.
    for limits, store, operation in (
        ({"enabled": False}, "subject_state", "get"),
        ({}, "rate_limit", "acquire"),
    ):
        app = create_app(make_settings(store="redis", redis_url=redis_url, rate_limits=limits))
        token = upstream.issuer.github_actions_token(audience=STS_ISSUER)
        response = app.test_client().post("/token", data=exchange_form(token, audience=DEPLOY))
        assert response.status_code == 503
        samples = scrape(app)
        assert total(samples, "sts_store_errors_total", store=store, operation=operation) == 1
        assert total(samples, "sts_store_errors_total") == 1
        assert total(samples, "sts_decisions_total", outcome="refused", error="temporarily_unavailable") == 1


def test_upstream_and_jwks_failures_are_counted(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    dead = f"http://127.0.0.1:{_free_port()}/jwks"
    issuers = [
        {
            "name": "upstream",
            "issuer": upstream.issuer.issuer_url,
            "jwks_uri": dead,
            "algorithms": ["RS256"],
            "audiences": [STS_ISSUER],
        }
    ]
    app = create_app(make_settings(issuers=issuers))
    token = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    response = app.test_client().post("/token", data=exchange_form(token, audience=DEPLOY))
    assert response.status_code == 503
    samples = scrape(app)
    assert total(samples, "sts_upstream_errors_total", kind="issuer_keys", source="upstream") == 1
    assert total(samples, "sts_jwks_fetches_total", issuer="upstream", result="failure") == 1
    assert total(samples, "sts_jwks_fetches_total", result="success") == 0
    assert total(samples, "sts_jwks_keys", issuer="upstream") == 0
    assert ("sts_jwks_last_success_age_seconds", frozenset({("issuer", "upstream")})) not in samples


def test_jwks_cache_state_and_signing_key_ages(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    clock = Clock(1_900_000_000.0)
    app = create_app(make_settings(), clock=clock)
    token = upstream.issuer.github_actions_token(audience=STS_ISSUER, now=clock.now)
    assert app.test_client().post("/token", data=exchange_form(token, audience=DEPLOY)).status_code == 200
    ring = runtime(app).keyring
    samples = scrape(app, key_entries=ring.entries, clock=lambda: clock.now + 42)
    assert total(samples, "sts_jwks_fetches_total", issuer="upstream", result="success") == 1
    assert total(samples, "sts_jwks_keys", issuer="upstream") == len(upstream.issuer.jwks()["keys"])
    assert total(samples, "sts_jwks_last_success_timestamp_seconds", issuer="upstream") == clock.now
    assert total(samples, "sts_jwks_last_success_age_seconds", issuer="upstream") == 42
    # The ring was created at the clock's time: both keys are 42 s old.
    assert total(samples, "sts_signing_key_age_seconds", state="active") == 42
    assert total(samples, "sts_signing_key_age_seconds", state="next") == 42
    assert [total(samples, "sts_signing_keys", state=s) for s in ("active", "next", "retired")] == [1, 1, 0]

    ring.rotate(clock.now + 100, max_token_lifetime=3600)
    later = scrape(app, key_entries=ring.entries, clock=lambda: clock.now + 130)
    assert total(later, "sts_signing_key_age_seconds", state="active") == 30  # signing for 30 s
    assert total(later, "sts_signing_key_age_seconds", state="next") == 30  # published 30 s ago
    assert [total(later, "sts_signing_keys", state=s) for s in ("active", "next", "retired")] == [1, 1, 1]


def test_the_listener_serves_metrics_at_metrics_only(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings())
    assert app.test_client().get("/metrics").status_code == 404  # not on the service's own port
    metrics = runtime(app).metrics
    assert metrics is not None and metrics.registry is not None
    registry = exposition_registry(ExpositionCollector(source=metrics.registry))
    server = MetricsServer("127.0.0.1", 0, registry).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        scraped = requests.get(f"{base}/metrics", timeout=5)
        assert scraped.status_code == 200
        assert "# TYPE sts_decisions_total counter" in scraped.text
        assert "# TYPE sts_pipeline_stage_duration_seconds histogram" in scraped.text
        assert requests.get(f"{base}/", timeout=5).status_code == 404
        assert requests.get(f"{base}/metrics/x", timeout=5).status_code == 404
        assert requests.post(f"{base}/metrics", timeout=5).status_code == 405
        # RFC 9110 §9.1, §9.3.2: HEAD is served, with the length GET sends and no body.
        head = requests.head(f"{base}/metrics", timeout=5)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["Content-Length"]) > 0
        assert requests.options(f"{base}/metrics", timeout=5).headers["Allow"] == "GET, HEAD"
        # No software version in any answer (wsgiref's own: "WSGIServer/0.2 CPython/3.11.7").
        for answer in (scraped, head, requests.get(f"{base}/", timeout=5)):
            assert answer.headers["Server"] == "sts", answer.headers
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            # http.server's own refusal (more than 100 header lines): its status line and headers.
            raw.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n")
            reply = raw.recv(4096).decode("latin-1")
        assert reply.startswith("HTTP/1.0 431") and "\r\nServer: sts\r\n" in reply, reply
    finally:
        server.stop()


def test_the_listener_bounds_its_connections_and_drops_idle_ones(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It runs in the process that supervises the workers: idle or half-sent connections each
    held a thread there for ever (an outside audit held 300 open)."""
    monkeypatch.setattr(metrics_exposition._QuietHandler, "timeout", 2.5)
    # All from one address here: the cap per address is the next test's.
    monkeypatch.setattr(metrics_exposition, "MAX_METRICS_CONNECTIONS_PER_ADDRESS", 100)
    metrics = runtime(create_app(make_settings())).metrics
    assert metrics is not None and metrics.registry is not None
    registry = exposition_registry(ExpositionCollector(source=metrics.registry))
    server = MetricsServer("127.0.0.1", 0, registry).start()
    held: list[socket.socket] = []
    # The threads started here (others, such as an earlier test's, may end meanwhile).
    earlier = set(threading.enumerate())

    def started() -> int:
        return len([t for t in threading.enumerate() if t not in earlier and t.is_alive()])

    try:
        for _ in range(metrics_exposition.MAX_METRICS_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # half a request
            held.append(sock)
        end = time.monotonic() + 1.5  # (before the first of them is dropped)
        # A thread for each, and the timer of its deadline.
        while started() < 2 * len(held) and time.monotonic() < end:
            time.sleep(0.01)
        assert started() == 2 * len(held)
        # One more is closed at once: no thread for it.
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert extra.recv(100) == b""
        extra.close()
        # The idle ones are dropped after the read timeout, and scrapes are served again.
        for sock in held:
            assert sock.recv(100) == b""
        deadline = time.monotonic() + 5
        while True:
            try:
                assert requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).status_code == 200
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_one_address_sending_a_byte_at_a_time_cannot_keep_scrapes_out(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sixteen connections from one client, each sending a byte of its request every few seconds
    (within the read timeout), held every slot: no scrape was answered for as long as it went on
    (an outside audit).  One address holds at most four, and none lasts past its deadline."""
    monkeypatch.setattr(metrics_exposition, "METRICS_CONNECTION_DEADLINE", 1.5, raising=False)
    metrics = runtime(create_app(make_settings())).metrics
    assert metrics is not None and metrics.registry is not None
    server = MetricsServer("127.0.0.1", 0, exposition_registry(ExpositionCollector(source=metrics.registry)))
    server.start()
    held: list[socket.socket] = []
    try:
        # Four addresses (a re-check's), each trying for the listener's every slot.
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
            for _ in range(16):
                sock = socket.create_connection(
                    ("127.0.0.1", server.port), timeout=5, source_address=(source, 0)
                )
                sock.sendall(b"G")
                held.append(sock)
        started = time.monotonic()
        scrape = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)  # another address
        assert scrape.status_code == 200 and time.monotonic() - started < 1.0
        # The four let in are cut at their deadline (1.5 s here), before any read times out (5 s).
        for sock in held:
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        assert time.monotonic() - started < 4
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_a_clients_connections_are_counted_per_ipv4_address_and_ipv6_64() -> None:
    network = metrics_exposition._client_network
    assert network("10.1.2.3") == "10.1.2.3" == network("::ffff:10.1.2.3")
    assert network("2001:db8:1:2::5") == network("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert network("2001:db8:1:3::5") != network("2001:db8:1:2::5")
    assert network("fe80::1%eth0") == "fe80::/64"


def test_metrics_listen_setting(tmp_path: Path) -> None:
    def load(**values: Any) -> Settings:
        return load_settings(config_file=None, environ={}, overrides=values)

    assert load().metrics_address is None
    assert load(metrics_listen="127.0.0.1:9464").metrics_address == ("127.0.0.1", 9464)
    assert load(metrics_listen="[::1]:9464").metrics_address == ("::1", 9464)
    from_env = load_settings(config_file=None, environ={"STS_METRICS_LISTEN": "0.0.0.0:9464"})
    assert from_env.metrics_address == ("0.0.0.0", 9464)
    for bad in ("9464", "localhost", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:0", "http://x:1"):
        with pytest.raises(ConfigurationError, match="metrics_listen"):
            load(metrics_listen=bad)
    # The service's port under any name of any address: ``localhost`` for ``127.0.0.1`` passed the
    # check, and the start then failed to bind with a traceback (an outside audit).
    for same in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "0.0.0.0:8080", "10.9.8.7:8080"):
        with pytest.raises(ConfigurationError, match="metrics_listen: must not be on the service's own port"):
            load(host="127.0.0.1", port=8080, metrics_listen=same)
    assert load(port=8080, metrics_listen="localhost:8081").metrics_address == ("localhost", 8081)


def test_the_compose_file_exposes_metrics_on_the_backend_network_only() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker" / "compose.yaml").read_text())
    for name in ("sts1", "sts2", "sts3"):
        service = compose["services"][name]
        listen = service["environment"]["STS_METRICS_LISTEN"]
        address = load_settings(config_file=None, environ={"STS_METRICS_LISTEN": listen}).metrics_address
        assert address is not None and str(address[1]) in service["expose"]
        assert "ports" not in service and service["networks"] == ["backend"]


# -- the Grafana dashboard -----------------------------------------------------------------------

DASHBOARD = REPO_ROOT / "docker" / "grafana-dashboard.json"
_SERIES = re.compile(r"\b(sts_[a-z0-9_]+)\b(\{[^}]*\})?")
_MATCHER = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
#: Added by Prometheus to every series it scrapes.
_TARGET_LABELS = {"instance", "job"}


def exported_series(app: Flask) -> dict[str, set[str]]:
    """Every series name the service exports, with its label names."""
    rt = runtime(app)
    assert rt.metrics is not None and rt.metrics.registry is not None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExpositionCollector(source=rt.metrics.registry, key_entries=rt.keyring.entries))
    series: dict[str, set[str]] = {}
    labels = {
        "sts_decisions": {"endpoint", "outcome", "error", "rule"},
        "sts_risk_signals_fired": {"signal", "mode"},
        "sts_http_request_duration_seconds": {"route", "le"},
        "sts_http_responses": {"route", "status"},
        "sts_pipeline_stage_duration_seconds": {"route", "stage", "le"},
        "sts_audit_errors": {"endpoint", "outcome"},
        "sts_store_errors": {"store", "operation"},
        "sts_upstream_errors": {"kind", "source"},
        "sts_jwks_fetches": {"issuer", "result"},
        "sts_jwks_keys": {"issuer"},
        "sts_jwks_last_success_timestamp_seconds": {"issuer"},
        "sts_jwks_last_success_age_seconds": {"issuer"},
        "sts_signing_key_age_seconds": {"state"},
        "sts_signing_keys": {"state"},
    }
    for family in registry.collect():
        assert family.name in labels, f"{family.name} is not described in this test"
        for suffix in _SUFFIXES[family.type]:
            series[family.name + suffix] = labels[family.name]
    return series


def test_every_dashboard_panel_queries_metrics_the_service_exports(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> None:
    app = create_app(make_settings())
    token = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    app.test_client().post("/token", data=exchange_form(token, audience=DEPLOY))
    series = exported_series(app)
    assert "sts_jwks_last_success_age_seconds" in series  # computed at scrape time: present once fetched

    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert len(panels) >= 8
    queried: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            found = _SERIES.findall(target["expr"])
            assert found, (panel["title"], target["expr"])
            for name, selector in found:
                assert name in series, (panel["title"], name)
                used = set(_MATCHER.findall(selector)) - _TARGET_LABELS
                assert used <= series[name], (panel["title"], name, used - series[name])
                queried.add(name)
            for grouped in re.findall(r"\bby\s*\(([^)]*)\)", target["expr"]):
                names = {g.strip() for g in grouped.split(",") if g.strip()}
                allowed = set().union(_TARGET_LABELS, *(series[n] for n, _ in found))
                assert names <= allowed, (panel["title"], names - allowed)
    # Every family the issue asks for is on the dashboard.
    for family in (
        "sts_decisions_total",
        "sts_risk_signals_fired_total",
        "sts_http_request_duration_seconds_bucket",
        "sts_pipeline_stage_duration_seconds_bucket",
        "sts_audit_errors_total",
        "sts_store_errors_total",
        "sts_upstream_errors_total",
        "sts_jwks_fetches_total",
        "sts_jwks_keys",
        "sts_jwks_last_success_age_seconds",
        "sts_signing_key_age_seconds",
    ):
        assert family in queried, family
    # The data source is chosen when the dashboard is imported (a variable), never a fixed uid.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_request_path_recording_matches_prometheus_client() -> None:
    """The per-request observations skip ``observe()``'s and ``inc()``'s checks and bisect the
    buckets; what a scrape shows is exactly what ``prometheus_client`` itself records, on every
    bucket edge and between them (and a change of its internals makes this fail)."""
    from sts.adapters.metrics import STAGE_BUCKETS, Metrics

    ours = Metrics()
    theirs = Metrics()
    rng = random.Random(7)
    amounts = [*STAGE_BUCKETS, 0.0, -1.0, 1e-9, 11.0, float("inf"), float("nan")]
    amounts += [b * f for b in STAGE_BUCKETS for f in (0.999999, 1.000001)]
    amounts += [rng.uniform(0, 12) for _ in range(500)] + [rng.expovariate(1000) for _ in range(500)]
    for amount in amounts:
        ours.observe_stage("/token", "policy", amount)
        theirs.stage_seconds.labels("/token", "policy").observe(amount)
        ours.observe_request("/token", 200, amount)
        theirs.request_seconds.labels("/token").observe(amount)
        theirs.responses.labels("/token", "200").inc()

    def samples(metrics: Metrics) -> list[tuple[str, list[tuple[str, str]], float]]:
        assert metrics.registry is not None
        return sorted(
            (s.name, sorted(s.labels.items()), -1.0 if s.value != s.value else s.value)
            for family in metrics.registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        )

    assert samples(ours) == samples(theirs)
    buckets = [s for s in samples(ours) if s[0] == "sts_pipeline_stage_duration_seconds_bucket"]
    assert len(buckets) == len(STAGE_BUCKETS) + 1 and buckets[-1][2] > 0


def test_a_listener_never_started_stops_at_once() -> None:
    """``sts serve`` builds its metrics listener before the application and stops it when that fails
    (a bad policy): stopping one whose thread never ran waited for ever, so the start hung silently
    instead of printing its error (an outside audit)."""
    listener = MetricsServer("127.0.0.1", 0, CollectorRegistry(auto_describe=False))
    port = listener.port
    done = threading.Event()
    threading.Thread(target=lambda: (listener.stop(), done.set()), daemon=True).start()
    assert done.wait(5), "stop() of a listener never started did not return"
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # its socket is closed
