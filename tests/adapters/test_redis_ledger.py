"""The Redis single-use ledger's claim, commit and confirmation (:mod:`sts.adapters.redis.ledger`).

``reserve`` and ``spend`` write nothing; :meth:`~RedisSingleUseLedger.commit` claims every use in
one script (all or none) before the audit record, and confirms them after it.  These tests drive
the ledger directly against this run's private redis-server; the exchanges through the app, two
instances racing, and Redis failing, are in ``tests/core/test_single_use.py``,
``tests/core/test_dpop.py`` and ``tests/adapters/test_replay_durability.py``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis

from sts.adapters.redis.client import connect as connect_redis
from sts.adapters.redis.key_value import RedisBaselineStore
from sts.adapters.redis.ledger import RedisReplayCache, RedisSingleUseLedger
from sts.core.audit import AuditRecord
from sts.core.baseline import Baseline
from sts.core.ports import (
    CLOCK_MARGIN,
    AlreadyUsed,
    AuditOutcomeUnknown,
    AuditUnavailable,
    BaselineUpdate,
    ReplayWindowLost,
    SingleUse,
    StoreUnavailable,
)


class Trail:
    """An audit sink that keeps what it was given (or refuses, when ``failing``)."""

    def __init__(self) -> None:
        self.records: list[object] = []
        self.failing = False
        self.unknown = False

    def write(self, record: AuditRecord) -> None:
        if self.unknown:
            raise AuditOutcomeUnknown("commit outcome unknown (the test)")
        if self.failing:
            raise AuditUnavailable("refused by the test")
        self.records.append(record)


@pytest.fixture
def client(fresh_redis_url: str) -> Iterator[redis.Redis]:
    made = connect_redis(fresh_redis_url)
    yield made
    made.close()


@pytest.fixture
def trail() -> Trail:
    return Trail()


@pytest.fixture
def ledger(client: redis.Redis, trail: Trail) -> RedisSingleUseLedger:
    return RedisSingleUseLedger(
        client, trail, wait=0.2, baselines=RedisBaselineStore(client), baselines_here=True
    )


def record() -> AuditRecord:
    return cast(AuditRecord, object())


def uses(now: float, *, token: str | None = None, proof: str | None = None) -> tuple[SingleUse, SingleUse]:
    subject = SingleUse("subject_token:upstream", token or secrets.token_hex(8), now + 300, now - 10)
    dpop = SingleUse("dpop:thumbprint", proof or secrets.token_hex(8), now + 60, now - 10)
    return subject, dpop


def prepared(
    ledger: RedisSingleUseLedger, subject: SingleUse, dpop: SingleUse, now: float
) -> list[SingleUse]:
    """What the pipeline hands to ``commit``: the proof's use (from ``spend``), then the reservation."""
    spent = ledger.spend(dpop, now)
    assert spent is not None
    return [spent, ledger.reserve(subject, now)]


def stored(client: redis.Redis, use: SingleUse) -> Any:
    return client.get(f"sts:replay:{use.purpose}:{use.key}")


def test_reserve_and_spend_write_nothing_and_the_commit_records_both(
    ledger: RedisSingleUseLedger, client: redis.Redis, trail: Trail
) -> None:
    now = time.time()
    subject, dpop = uses(now)
    pending = prepared(ledger, subject, dpop, now)
    assert stored(client, subject) is None and stored(client, dpop) is None
    ledger.commit(record(), pending, now)
    assert len(trail.records) == 1
    assert stored(client, subject) == b"1" and stored(client, dpop) == b"1"
    # Kept until the credentials expire, and CLOCK_MARGIN more for instances whose clock is behind
    # (Redis's clock: within a few seconds of ours).
    kept = client.pexpiretime(f"sts:replay:{subject.purpose}:{subject.key}") / 1000
    assert abs(kept - (subject.expires_at + CLOCK_MARGIN)) < 5


def test_used_reads_a_confirmed_use_but_not_a_reservation_in_flight(
    ledger: RedisSingleUseLedger, client: redis.Redis
) -> None:
    """``used`` (the read before a rule's quota): a confirmed use is used; a reservation another
    request holds is not (its commit decides)."""
    now = time.time()
    subject, dpop = uses(now)
    assert ledger.used(subject, now) is False
    claimed = ledger.reserve(subject, now)
    ledger._claim_all([claimed], now)
    assert stored(client, subject).startswith(b"r:") and ledger.used(subject, now) is False
    ledger.cancel([claimed])
    ledger.commit(record(), prepared(ledger, subject, dpop, now), now)
    assert stored(client, subject) == b"1" and ledger.used(subject, now) is True


def test_a_replayed_proof_claims_nothing_and_no_record_is_committed(
    ledger: RedisSingleUseLedger, client: redis.Redis, trail: Trail
) -> None:
    now = time.time()
    subject, dpop = uses(now)
    assert RedisReplayCache(client).first_use(dpop.purpose, dpop.key, dpop.expires_at, now) is True
    pending = prepared(ledger, subject, dpop, now)
    with pytest.raises(AlreadyUsed) as used:
        ledger.commit(record(), pending, now)
    assert used.value.use == pending[0]
    assert trail.records == []
    assert stored(client, subject) is None  # All or none: the token stays usable.


def test_a_used_token_is_refused_before_its_record_and_the_new_proof_is_not_claimed(
    ledger: RedisSingleUseLedger, client: redis.Redis, trail: Trail
) -> None:
    now = time.time()
    subject, dpop = uses(now)
    ledger.commit(record(), prepared(ledger, subject, dpop, now), now)
    again, fresh_proof = uses(now, token=subject.key)
    pending = prepared(ledger, again, fresh_proof, now)
    with pytest.raises(AlreadyUsed) as used:
        ledger.commit(record(), pending, now)
    assert used.value.use == pending[1]
    assert len(trail.records) == 1
    # The pipeline spends a verified proof of a refused request itself (ProofUses.spend_now).
    assert stored(client, fresh_proof) is None


def test_a_reservation_in_flight_is_waited_for_then_its_outcome_decides(
    ledger: RedisSingleUseLedger, client: redis.Redis, trail: Trail
) -> None:
    now = time.time()
    subject, dpop = uses(now)
    name = f"sts:replay:{subject.purpose}:{subject.key}"
    client.set(name, b"r:another-request", px=60_000)
    pending = prepared(ledger, subject, dpop, now)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="held by a concurrent request") as held:
        ledger.commit(record(), pending, now)
    assert time.monotonic() - started >= ledger.wait * 0.5
    assert 55 <= getattr(held.value, "retry_after", 0) <= 60  # the hold left: when to retry
    assert trail.records == [] and stored(client, dpop) is None
    client.delete(name)  # The other request failed and dropped its reservation: this one takes over.
    ledger.commit(record(), pending, now)
    assert stored(client, subject) == b"1" and len(trail.records) == 1


def test_a_failed_audit_commit_drops_the_reservation_and_the_proof_stays_spent(
    ledger: RedisSingleUseLedger, client: redis.Redis, trail: Trail
) -> None:
    now = time.time()
    subject, dpop = uses(now)
    trail.failing = True
    with pytest.raises(AuditUnavailable):
        ledger.commit(record(), prepared(ledger, subject, dpop, now), now)
    assert stored(client, subject) is None and stored(client, dpop) == b"1"
    trail.failing = False
    _, fresh_proof = uses(now)
    ledger.commit(record(), prepared(ledger, subject, fresh_proof, now), now)
    assert stored(client, subject) == b"1"


def test_an_audit_commit_of_unknown_outcome_keeps_the_token_used(
    ledger: RedisSingleUseLedger, client: redis.Redis, trail: Trail
) -> None:
    """The record may yet be committed (its connection was cut during COMMIT): the reservation is
    confirmed, not dropped, so a retry cannot be granted a second time (the trail showed two grants
    of one single-use token after a PostgreSQL pause)."""
    now = time.time()
    subject, dpop = uses(now)
    trail.unknown = True
    with pytest.raises(AuditOutcomeUnknown):
        ledger.commit(record(), prepared(ledger, subject, dpop, now), now)
    assert stored(client, subject) == b"1" and stored(client, dpop) == b"1"
    trail.unknown = False
    _, fresh_proof = uses(now)
    with pytest.raises(AlreadyUsed):
        ledger.commit(record(), prepared(ledger, subject, fresh_proof, now), now)
    assert trail.records == []


def test_the_confirmation_saves_the_baseline(
    ledger: RedisSingleUseLedger, client: redis.Redis, trail: Trail
) -> None:
    now = time.time()
    subject, dpop = uses(now)
    baseline = Baseline.from_json(None)
    ledger.commit(record(), prepared(ledger, subject, dpop, now), now, BaselineUpdate("id-1", baseline, 600))
    assert RedisBaselineStore(client).load("id-1") == baseline
    assert 590 <= client.ttl("sts:baseline:id-1") <= 600


def test_records_lost_between_the_check_and_the_claim_fail_closed(
    ledger: RedisSingleUseLedger, client: redis.Redis, trail: Trail
) -> None:
    """Redis restarted empty while the request was decided: nothing is committed, the claim names
    the use the lost records may have seen (for the loss's own refusal, not a 503), and the retry
    is refused at the check too."""
    now = time.time()
    subject, dpop = uses(now)
    pending = prepared(ledger, subject, dpop, now)
    # What an empty restart leaves: every key gone (this test's own database of the private server).
    client.delete(*client.keys("*"))
    with pytest.raises(ReplayWindowLost) as lost:
        ledger.commit(record(), pending, now)
    assert lost.value.use in pending
    assert trail.records == [] and stored(client, subject) is None
    with pytest.raises(ReplayWindowLost):
        ledger.reserve(subject, now)
    with pytest.raises(ReplayWindowLost):
        ledger.spend(dpop, now)
