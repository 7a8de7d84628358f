"""A flood's rate-limit refusals: two audit records per key and period, every refusal counted.

An outside audit flooded ``/token`` with junk from one address: each of its 15,000 ``429``
answers was a full audit record (2.25 KB of trail each, 286 GB a day at that rate).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from sts.adapters.coalesced_refusals import MAX_WINDOWS, CoalescingAuditSink
from sts.core.audit import AuditRecord
from sts.core.ports import AuditUnavailable
from sts.dev.issuer import RunningServer
from sts.settings.load import load_settings
from tests.adapters.test_metrics import scrape, total
from tests.core.test_rate_limits import build, deploy, limits  # noqa: F401 - build is a fixture
from tests.support.clock import Clock


class Trail:
    """An audit sink that keeps what it is given (and can be made to fail)."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []
        self.down = False

    def write(self, record: AuditRecord) -> None:
        if self.down:
            raise AuditUnavailable("down")
        self.records.append(record)


def refusal(at: float, limited: str = "192.0.2.0/24", scope: str = "network", n: int = 0) -> AuditRecord:
    record = AuditRecord(event_id=f"e{at}-{limited}-{n}", time=at, request_id=f"r{at}-{n}", endpoint="token")
    record.refuse("temporarily_unavailable", f"rate_limit.{scope}", limited)
    record.details["rate_limit"] = {"scope": scope, "limited": limited, "limit": "2/60s", "retry_after": 30}
    return record


def other(at: float) -> AuditRecord:
    record = AuditRecord(event_id=f"o{at}", time=at, request_id=f"o{at}", endpoint="token")
    record.refuse("invalid_request", "subject_token.malformed", "")
    return record


def test_one_keys_refusals_are_two_records_per_period_and_every_one_is_counted() -> None:
    trail = Trail()
    sink = CoalescingAuditSink(trail, 10, clock=lambda: 0.0)
    sink.write(refusal(100.0))
    for n in range(1, 6):
        sink.write(refusal(100.0 + n, n=n))  # held: the newest is kept
    sink.write(refusal(101.0, "198.51.100.0/24"))  # another key: its own first record
    sink.write(other(102.0))  # anything else passes straight through
    assert [r.request_id for r in trail.records] == ["r100.0-0", "r101.0-0", "o102.0"]
    sink.write(other(110.5))  # the window has passed: the held record goes first
    assert [r.request_id for r in trail.records][3:] == ["r105.0-5", "o110.5"]
    coalesced = trail.records[3].details["rate_limit"]["coalesced"]
    assert coalesced == {"count": 5, "first": 101.0, "last": 105.0, "window": 10}
    assert trail.records[3].details["rate_limit"]["limited"] == "192.0.2.0/24"
    # The key's next refusal opens a new window, written in full.
    sink.write(refusal(111.0, n=6))
    assert trail.records[-1].request_id == "r111.0-6"
    assert "coalesced" not in trail.records[-1].details["rate_limit"]


def test_a_refusal_after_its_window_writes_the_held_one_before_itself() -> None:
    trail = Trail()
    sink = CoalescingAuditSink(trail, 10, clock=lambda: 0.0)
    for n, at in enumerate((100.0, 101.0, 102.0)):
        sink.write(refusal(at, n=n))
    sink._due = float("inf")  # as if the flush on write had not been due yet (a race)
    sink.write(refusal(112.0, n=3))
    assert [r.request_id for r in trail.records] == ["r100.0-0", "r102.0-2", "r112.0-3"]
    assert trail.records[1].details["rate_limit"]["coalesced"]["count"] == 2


def test_held_records_are_written_by_the_flusher_and_at_exit() -> None:
    trail = Trail()
    sink = CoalescingAuditSink(trail, 0.2, clock=time.time)
    now = time.time()
    for n in range(3):
        sink.write(refusal(now, n=n))
    assert len(trail.records) == 1
    deadline = time.monotonic() + 5
    while len(trail.records) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert trail.records[1].details["rate_limit"]["coalesced"]["count"] == 2  # no further write needed
    sink.write(refusal(time.time(), n=4))
    sink.write(refusal(time.time(), n=5))
    sink.flush()  # what the process does at exit
    assert [r.request_id for r in trail.records][-1].endswith("-5") and len(trail.records) == 4


def test_a_held_record_that_cannot_be_written_fails_no_request(caplog: pytest.LogCaptureFixture) -> None:
    trail = Trail()
    sink = CoalescingAuditSink(trail, 10, clock=lambda: 0.0)
    sink.write(refusal(100.0))
    sink.write(refusal(101.0, n=1))
    trail.down = True
    sink.flush()
    assert "stood for 1 rate-limit refusals" in caplog.text


def test_period_zero_writes_every_refusal_and_too_many_keys_are_written_in_full() -> None:
    trail = Trail()
    sink = CoalescingAuditSink(trail, 0, clock=lambda: 0.0)
    for n in range(3):
        sink.write(refusal(100.0, n=n))
    assert len(trail.records) == 3
    trail = Trail()
    sink = CoalescingAuditSink(trail, 10, clock=lambda: 0.0)
    for n in range(MAX_WINDOWS + 2):
        sink.write(refusal(100.0, limited=f"key-{n}"))
    sink.write(refusal(100.5, limited=f"key-{MAX_WINDOWS + 1}", n=1))  # no window: written as well
    assert len(trail.records) == MAX_WINDOWS + 3


def test_a_flood_over_http_is_audited_in_two_records_and_counted_in_full(
    build: Callable[..., Flask],  # noqa: F811 - the fixture imported above
    upstream: RunningServer,
    clock: Clock,
) -> None:
    app = build(**limits(token={"network": {"requests": 2, "period": 60}}))
    client = app.test_client()
    assert [deploy(client, upstream).status_code for _ in range(2)] == [200, 200]
    assert {deploy(client, upstream).status_code for _ in range(20)} == {429}
    audit = app.extensions["sts"].audit
    refused = [r for r in audit.recent(50) if r["outcome"] == "refused"]
    assert len(refused) == 1 and "coalesced" not in refused[0]["details"]["rate_limit"]
    assert total(scrape(app), "sts_decisions_total", outcome="refused") == 20
    clock.advance(11)
    assert deploy(client, upstream, "198.51.100.7").status_code == 200  # any write flushes
    refused = [r for r in audit.recent(50) if r["outcome"] == "refused"]
    assert len(refused) == 2
    coalesced = refused[0]["details"]["rate_limit"]["coalesced"]
    assert coalesced["count"] == 19 and coalesced["window"] == 10
    assert refused[0]["details"]["rate_limit"]["limited"] == "192.0.2.0/24"


def test_the_setting(tmp_path: Path) -> None:
    config = tmp_path / "sts.yaml"
    config.write_text("rate_limits:\n  coalesce_refusals: 0\n")
    assert load_settings(config).rate_limits.coalesce_refusals == 0
    config.write_text("{}\n")
    assert load_settings(config).rate_limits.coalesce_refusals == 10
