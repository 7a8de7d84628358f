"""The request path's metrics, added up as plain numbers (sts.adapters.metrics_tally): what a scrape
shows is exactly what was observed, across threads, in one process and in multiprocess mode, and
the pipeline's stages reach the histogram once per request with the times the clock gave.

Multiprocess mode changes ``prometheus_client`` for the whole process, so those checks run in a
process of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sts.adapters.metrics import STAGE_BUCKETS, Metrics
from sts.adapters.metrics_exposition import MULTIPROC_ENV, ExpositionCollector, prometheus_text
from sts.adapters.tracing import Tracing
from sts.app import create_app
from sts.core import stages as stage
from sts.core.audit import AuditRecord
from sts.dev.issuer import RunningServer
from sts.settings import Settings
from tests.adapters.test_metrics import DEPLOY, Samples, parse, total
from tests.conftest import STS_ISSUER, exchange_form

STAGES = "sts_pipeline_stage_duration_seconds"


@pytest.fixture
def quick_thread_switches() -> Iterator[None]:
    """Switch threads as often as the interpreter can, so that an unguarded ``+=`` loses counts."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def scrape(metrics: Metrics) -> Samples:
    assert metrics.registry is not None
    return parse(prometheus_text(ExpositionCollector(source=metrics.registry)).decode())


def record(outcome: str = "granted", fired: tuple[str, ...] = ()) -> AuditRecord:
    signals = [{"name": name, "fired": True} for name in fired] + [{"name": "quiet", "fired": False}]
    return AuditRecord(
        event_id="e",
        time=0.0,
        request_id="r",
        endpoint="token",
        outcome=outcome,
        rule="deploy",
        details={"risk": {"mode": "enforce", "signals": signals}},
    )


def test_exchanges_on_several_threads_are_each_counted_once_at_scrape_time(
    make_settings: Callable[..., Settings], upstream: RunningServer, quick_thread_switches: None
) -> None:
    """N exchanges served by the app on four threads, scraped while they run and after: the
    decisions, responses, request latencies and every stage count N, with nothing lost."""
    app = create_app(make_settings())
    token = upstream.issuer.github_actions_token(audience=STS_ISSUER)
    threads, each = 4, 6
    statuses: list[int] = []
    scrapes: list[Samples] = []
    runtime = app.extensions["sts"]

    def serve() -> None:
        web = app.test_client()
        for _ in range(each):
            statuses.append(web.post("/token", data=exchange_form(token, audience=DEPLOY)).status_code)
            scrapes.append(scrape(runtime.metrics))

    workers = [threading.Thread(target=serve) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    n = threads * each
    assert statuses == [200] * n
    samples = scrape(runtime.metrics)
    assert total(samples, "sts_decisions_total", endpoint="token", outcome="granted", rule="deploy") == n
    assert total(samples, "sts_http_responses_total", route="/token", status="200") == n
    assert total(samples, "sts_http_request_duration_seconds_count", route="/token") == n
    assert total(samples, "sts_http_request_duration_seconds_bucket", route="/token", le="+Inf") == n
    for name in stage.TOKEN_STAGES:
        assert total(samples, f"{STAGES}_count", route="/token", stage=name) == n, name
        assert total(samples, f"{STAGES}_bucket", route="/token", stage=name, le="+Inf") == n, name
    # A scrape while requests were being served saw some of them, never more than were made.
    seen = [total(s, "sts_decisions_total") for s in scrapes]
    assert all(0 < count <= n for count in seen) and max(seen) == n


def test_observations_from_many_threads_add_up_exactly_while_scraped(quick_thread_switches: None) -> None:
    metrics = Metrics()
    threads, each = 8, 400
    timings = [(name, 0.0003) for name in stage.TOKEN_STAGES]
    done = threading.Event()
    scraped: list[float] = []

    def observe() -> None:
        for i in range(each):
            metrics.observe_stages("/token", timings)
            metrics.observe_request("/token", 200 if i % 4 else 400, 0.002)
            metrics.decided(record(fired=("elevated_privilege",)))

    def keep_scraping() -> None:
        while not done.is_set():
            scraped.append(total(scrape(metrics), "sts_decisions_total"))

    scraper = threading.Thread(target=keep_scraping)
    scraper.start()
    workers = [threading.Thread(target=observe) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    scraper.join()
    n = threads * each
    samples = scrape(metrics)
    assert total(samples, "sts_decisions_total", outcome="granted") == n
    assert total(samples, "sts_risk_signals_fired_total", signal="elevated_privilege", mode="enforce") == n
    assert total(samples, "sts_risk_signals_fired_total") == n  # a signal that did not fire is not counted
    assert total(samples, "sts_http_responses_total", status="200") == n * 3 / 4
    assert total(samples, "sts_http_responses_total", status="400") == n / 4
    assert total(samples, "sts_http_request_duration_seconds_bucket", le="0.0025") == n
    assert total(samples, "sts_http_request_duration_seconds_bucket", le="0.001") == 0
    assert total(samples, "sts_http_request_duration_seconds_sum") == pytest.approx(n * 0.002)
    for name in stage.TOKEN_STAGES:
        assert total(samples, f"{STAGES}_count", stage=name) == n
        assert total(samples, f"{STAGES}_bucket", stage=name, le="0.0005") == n
        assert total(samples, f"{STAGES}_bucket", stage=name, le="0.00025") == 0
    assert scraped == sorted(scraped)  # the totals only grow, whatever the scrapes overlapped with


def test_stage_times_are_the_clocks_differences_and_reach_the_histogram_once_per_request() -> None:
    """One reading of the clock per stage change; the last stage ends with the request."""
    readings = iter([10.0, 10.00005, 10.0002, 10.001, 12.0])
    tracing = Tracing(timer=lambda: next(readings))
    metrics = Metrics()
    tracing.add_stages_observer(metrics.observe_stages)
    seen: list[tuple[str, str, float]] = []
    tracing.add_observer(lambda route, name, seconds: seen.append((route, name, seconds)))
    trace = tracing.start_request("r", "POST", "/token", None)
    tracing.enter(stage.PARSE)
    tracing.enter(stage.ATTEST)
    assert trace.stage == stage.ATTEST
    tracing.enter(stage.POLICY)
    tracing.enter(stage.AUDIT)
    tracing.finish_request(trace, 200)
    tracing.finish_request(trace, 200)  # a second end changes nothing
    assert trace.stage is None
    assert [(name, round(seconds, 6)) for _, name, seconds in seen] == [
        (stage.PARSE, 0.00005),
        (stage.ATTEST, 0.00015),
        (stage.POLICY, 0.0008),
        (stage.AUDIT, 1.999),
    ]
    samples = scrape(metrics)
    # Each in the first bucket that holds it (the buckets are cumulative).
    first_bucket = {stage.PARSE: 0.0001, stage.ATTEST: 0.00025, stage.POLICY: 0.001, stage.AUDIT: 2.5}
    for name, le in first_bucket.items():
        assert total(samples, f"{STAGES}_count", stage=name) == 1
        assert total(samples, f"{STAGES}_bucket", stage=name, le=str(le)) == 1, name
        if le != STAGE_BUCKETS[0]:
            below = STAGE_BUCKETS[STAGE_BUCKETS.index(le) - 1]
            assert total(samples, f"{STAGES}_bucket", stage=name, le=str(below)) == 0, name
    assert total(samples, f"{STAGES}_count", stage=stage.MINT) == 0


_MULTIPROCESS_CHECK = textwrap.dedent(
    """
    import json, math, os, random, sys, threading
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    from sts.adapters.metrics_exposition import enable_multiprocess
    from pathlib import Path

    enable_multiprocess(Path(sys.argv[1]))
    from sts.adapters.metrics import STAGE_BUCKETS, Metrics

    ours, theirs = Metrics(), Metrics()  # the same files: told apart by route
    amounts = [*STAGE_BUCKETS, 0.0, -1.0, 11.0, math.inf, math.nan]
    amounts += [b * f for b in STAGE_BUCKETS for f in (0.999999, 1.000001)]
    amounts += [random.Random(7).expovariate(1000) for _ in range(300)]
    for amount in amounts:
        ours.observe_stage("/ours", "policy", amount)
        theirs.stage_seconds.labels("/theirs", "policy").observe(amount)
        ours.observe_request("/ours", 200, amount)
        theirs.request_seconds.labels("/theirs").observe(amount)
        theirs.responses.labels("/theirs", "200").inc()

    # Several threads, then a forked process: each counted once.
    timings = [("parse", 0.0003), ("mint", 0.002)]
    def observe():
        for _ in range(300):
            ours.observe_stages("/threads", timings)
    workers = [threading.Thread(target=observe) for _ in range(4)]
    sys.setswitchinterval(1e-6)
    [w.start() for w in workers]
    [w.join() for w in workers]
    child = os.fork()
    if child == 0:
        for _ in range(7):
            ours.observe_stages("/threads", timings)
        os._exit(0)
    os.waitpid(child, 0)
    ours.observe_stages("/threads", timings)

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=sys.argv[1])
    samples = [
        [s.name, s.labels, None if s.value != s.value else s.value]
        for family in registry.collect()
        for s in family.samples
    ]
    print(json.dumps(samples))
    """
)


def test_multiprocess_mode_writes_each_observation_through_as_prometheus_client_does(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    out = subprocess.run(
        [sys.executable, "-c", _MULTIPROCESS_CHECK, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    samples = json.loads(out.stdout.strip().splitlines()[-1])

    def series(route: str) -> list[tuple[str, list[tuple[str, str]], float | None]]:
        return sorted(
            (name, sorted((k, v) for k, v in labels.items() if k != "route"), value)
            for name, labels, value in samples
            if labels.get("route") == route
        )

    ours = series("/ours")
    assert ours and ours == series("/theirs")
    threaded = series("/threads")
    n = 4 * 300 + 7 + 1
    for name in ("parse", "mint"):
        counts = [v for s, labels, v in threaded if s == f"{STAGES}_count" and ("stage", name) in labels]
        assert counts == [n], name
    bucket = [v for s, labels, v in threaded if s == f"{STAGES}_bucket" and ("le", "0.0005") in labels]
    assert sorted(bucket) == [0, n]  # mint (2 ms) is not in the 0.5 ms bucket; parse is
