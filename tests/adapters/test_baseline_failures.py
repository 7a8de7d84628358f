"""An identity's recent refusals are kept apart from its baseline, on every store.

A grant writes back the whole baseline it read when it was decided (with its record); the
refusals are written only by ``add_failure`` and ``save_failures``, so that a grant never undoes
one recorded meanwhile (an outside audit; the whole exchange is in ``tests/e2e/test_risk_e2e.py``,
``test_a_refusal_recorded_while_a_grant_is_decided_survives_the_grant``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from sts.adapters.redis.client import connect as connect_redis
from sts.adapters.redis.key_value import RedisBaselineStore, RedisSubjectStateStore
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.key_value import SqlBaselineStore
from sts.adapters.sql.subject_state import SqlSubjectStateStore
from sts.core.baseline import MAX_FAILURES, Baseline, with_failures
from sts.migrations import upgrade
from tests.support.postgres import PgSchema

IDENTITY = "github|repo:acme/app:ref:refs/heads/main"
NOW = time.time()


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any, Any, Any]]:
    """(name, baseline store, subject state store, the engine or the Redis client)."""
    if request.param == "redis":
        client = connect_redis(request.getfixturevalue("fresh_redis_url"))
        baselines: Any = RedisBaselineStore(client)
        yield "redis", baselines, RedisSubjectStateStore(client, baselines=baselines), client
        client.close()
        return
    if request.param == "postgresql":
        pg: PgSchema = request.getfixturevalue("pg")
        engine = make_engine(pg.url)
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'b.sqlite'}")
    upgrade(engine)
    yield request.param, SqlBaselineStore(engine), SqlSubjectStateStore(engine), engine
    engine.dispose()


def test_a_saved_baseline_leaves_the_refusals_recorded_since_it_was_read(
    stores: tuple[str, Any, Any, Any],
) -> None:
    _, baselines, _, _ = stores
    baselines.save(IDENTITY, Baseline(count=1), 3600)
    read = baselines.load(IDENTITY)  # What a grant reads when it is decided ...
    baselines.save_failures(IDENTITY, (NOW,), 3600)  # ... a refusal meanwhile ...
    baselines.save(IDENTITY, Baseline(count=2, failures=read.failures), 3600)  # ... and its commit.
    assert baselines.load(IDENTITY) == Baseline(count=2, failures=(NOW,))


def test_refusals_without_a_baseline_and_the_reset_of_both(stores: tuple[str, Any, Any, Any]) -> None:
    _, baselines, _, _ = stores
    baselines.save_failures(IDENTITY, (NOW, NOW + 1), 3600)
    assert baselines.load(IDENTITY) == Baseline(failures=(NOW, NOW + 1))  # Still learning.
    baselines.save(IDENTITY, Baseline(count=7), 3600)
    assert baselines.load(IDENTITY) == Baseline(count=7, failures=(NOW, NOW + 1))
    # ``sts baseline reset``: both.
    baselines.save(IDENTITY, Baseline(), 3600)
    baselines.save_failures(IDENTITY, (), 3600)
    assert baselines.load(IDENTITY) == Baseline()


def test_the_read_with_the_subject_state_brings_the_refusals(stores: tuple[str, Any, Any, Any]) -> None:
    """PostgreSQL and Redis read the baseline with the subject's state (one round trip): its
    refusals come in the same read."""
    _, baselines, states, _ = stores
    baselines.save(IDENTITY, Baseline(count=3), 3600)
    baselines.save_failures(IDENTITY, (NOW,), 3600)
    states.get([IDENTITY])
    assert baselines.load(IDENTITY) == Baseline(count=3, failures=(NOW,))


def test_a_baseline_stored_before_the_refusals_were_kept_apart(stores: tuple[str, Any, Any, Any]) -> None:
    """Its refusals are those of its JSON until the first refusal is recorded apart."""
    name, baselines, _, backend = stores
    old = Baseline(count=9, failures=(NOW - 5,))
    if name == "redis":
        backend.set(f"sts:baseline:{IDENTITY}", old.to_json(), ex=3600)
    else:
        baselines.save(IDENTITY, old, 3600)  # The ``baseline`` column alone: ``failures`` is NULL.
    assert baselines.load(IDENTITY) == old
    baselines.save_failures(IDENTITY, (*old.failures, NOW), 3600)
    baselines.save(IDENTITY, old, 3600)  # A grant that read it before.
    assert baselines.load(IDENTITY).failures == (NOW - 5, NOW)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_refusal_does_not_bring_an_expired_baseline_back(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The row of an expired baseline may still be there (nothing deletes it at once): a refusal
    starts a new baseline under it, not the old one again."""
    url = (
        request.getfixturevalue("pg").url if backend == "postgresql" else f"sqlite:///{tmp_path / 'b.sqlite'}"
    )
    engine = make_engine(url)
    upgrade(engine)
    try:
        clock = [NOW]
        baselines = SqlBaselineStore(engine, clock=lambda: clock[0])
        baselines.save(IDENTITY, Baseline(count=40, facts={"runner": "old"}), 60)
        baselines.save_failures(IDENTITY, (NOW,), 60)
        clock[0] = NOW + 120
        assert baselines.load(IDENTITY) == Baseline()
        baselines.save_failures(IDENTITY, (NOW + 120,), 60)
        assert baselines.load(IDENTITY) == Baseline(failures=(NOW + 120,))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM baselines")).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "stored",
    [None, "", "not json", "{}", '"text"', '[1, "x"]', "1e999x"],
)
def test_unreadable_refusals_leave_those_of_the_baseline(stored: str | None) -> None:
    baseline = Baseline(count=2, failures=(NOW,))
    assert with_failures(baseline, stored) is baseline
    assert with_failures(baseline, "[]") == Baseline(count=2)
    assert with_failures(baseline, f"[{NOW}]") is baseline  # The same: nothing copied.


def test_redis_keeps_the_refusals_under_a_key_of_their_own(fresh_redis_url: str) -> None:
    client = connect_redis(fresh_redis_url)
    try:
        RedisBaselineStore(client, prefix="own").save_failures(IDENTITY, (NOW,), 3600)
        assert client.get(f"own:failures:{IDENTITY}") == f"[{NOW!r}]".encode()
        assert 3500 < client.ttl(f"own:failures:{IDENTITY}") <= 3600
        assert client.get(f"own:baseline:{IDENTITY}") is None
    finally:
        client.delete(f"own:failures:{IDENTITY}")
        client.close()


def test_refusals_recorded_at_the_same_instant_each_count(stores: tuple[str, Any, Any, Any]) -> None:
    """Each refusal read the list, added itself and wrote the list back: of 8 sent at once, 4 to 6
    were kept (an outside re-check), and parallel probes stayed under ``max_failures``.
    ``add_failure`` appends atomically (a compare and swap on SQL, ``WATCH``/``MULTI`` on Redis),
    starting from the refusals a baseline of before kept in itself."""
    _, baselines, _, _ = stores
    baselines.save(IDENTITY, Baseline(count=1, failures=(NOW - 5,)), 3600)  # kept in the baseline
    # No baseline: an identity never granted here (a stranger with a valid token of a public issuer)
    # leaves nothing (an outside audit: a row or key per refusal, that nothing reads).
    newcomer = "github|repo:acme/new:ref:refs/heads/main"

    def refuse(n: int) -> None:
        start.wait(timeout=30)
        for i in range(3):
            baselines.add_failure(IDENTITY, NOW + n + i / 10, 3600)
            baselines.add_failure(newcomer, NOW + n + i / 10, 3600)

    start = threading.Barrier(8)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(refuse, range(8)))
    sent = [NOW + n + i / 10 for n in range(8) for i in range(3)]
    assert sorted(baselines.load(IDENTITY).failures) == sorted([NOW - 5, *sent])
    assert baselines.load(newcomer).failures == ()
    # Bounded to the newest MAX_FAILURES, as one refusal after another always was.
    for n in range(MAX_FAILURES):
        baselines.add_failure(IDENTITY, NOW + 100 + n, 3600)
    assert baselines.load(IDENTITY).failures == tuple(NOW + 100 + n for n in range(MAX_FAILURES))


def _seconds_left(name: str, backend: Any) -> tuple[float, float]:
    """(The baseline's seconds to live, its refusals'), as stored."""
    if name == "redis":
        baseline, failures = (backend.pttl(f"sts:{kind}:{IDENTITY}") for kind in ("baseline", "failures"))
        return baseline / 1000, failures / 1000
    with backend.connect() as conn:
        left = float(conn.execute(text("SELECT expires_at FROM baselines")).scalar_one()) - time.time()
    return left, left


def test_a_refusal_does_not_extend_the_baseline_and_outlives_it_nowhere(
    stores: tuple[str, Any, Any, Any],
) -> None:
    """A refusal extended the whole row on SQL (a workload refused daily kept its baseline, and the
    counting of its refusals, for good) and kept the refusals 30 days on Redis for a baseline about
    to expire: the stores disagreed (an outside review).  The baseline lives 30 days after its
    last grant, and its refusals no longer than it, on every store."""
    name, baselines, _, backend = stores
    baselines.save(IDENTITY, Baseline(count=1), 100)
    baselines.add_failure(IDENTITY, time.time(), 30 * 24 * 3600)
    baseline_left, failures_left = _seconds_left(name, backend)
    assert 90 < baseline_left <= 100
    assert 90 < failures_left <= 100
    assert baselines.load(IDENTITY).failures != ()
