"""An identity's drift state is kept apart from its baseline, on every store.

A grant writes back the whole baseline it read when it was decided (with its record); the drift
state (confirmed facts, pending values with their probation, confirmations) is written by a grant
only when the grant changed it, and a refused exchange's probation step is a compare and swap
(``update_drift``), so that neither a grant nor another refusal undoes a step recorded meanwhile
(an outside audit; the whole exchange is in ``tests/e2e/test_risk_e2e.py``,
``test_a_probation_step_refused_while_a_grant_is_decided_survives_the_grant``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from sts.adapters.redis.client import connect as connect_redis
from sts.adapters.redis.key_value import RedisBaselineStore, RedisSubjectStateStore
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.key_value import SqlBaselineStore
from sts.adapters.sql.subject_state import SqlSubjectStateStore
from sts.core.baseline import Baseline, PendingFact
from sts.migrations import upgrade
from tests.support.postgres import PgSchema

IDENTITY = "github|repo:acme/app:ref:refs/heads/main"
NOW = time.time()
CONFIRMED = Baseline(count=4, facts={"runner_environment": "github-hosted"})
#: How versions before revision 0012 write a grant's baseline (they know no ``drift`` column).
OLD_GRANT = (
    "INSERT INTO baselines (identity, baseline, expires_at) VALUES (:identity, :baseline, :at) "
    "ON CONFLICT (identity) DO UPDATE SET baseline = excluded.baseline, expires_at = excluded.expires_at"
)


def step(stored: Baseline) -> Baseline:
    """A refused exchange's probation step for ``self-hosted`` (what ``drift.progress`` keeps)."""
    entry = stored.pending.get("runner_environment") or PendingFact("self-hosted", NOW, NOW)
    entry = replace(entry, fresh_count=entry.fresh_count + 1, fresh_since=entry.fresh_since or NOW)
    return replace(stored, pending={**stored.pending, "runner_environment": entry})


def count(baseline: Baseline) -> int:
    pending = baseline.pending.get("runner_environment")
    return pending.fresh_count if pending is not None else 0


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


def test_a_grant_that_did_not_change_the_drift_state_leaves_a_step_recorded_since(
    stores: tuple[str, Any, Any, Any],
) -> None:
    _, baselines, states, _ = stores
    baselines.save(IDENTITY, CONFIRMED, 3600)
    states.get([IDENTITY])  # PostgreSQL and Redis read the baseline with the subject's state.
    read = baselines.load(IDENTITY)  # What a grant reads when it is decided ...
    baselines.update_drift(IDENTITY, step, 3600)  # ... a refused drifted exchange meanwhile ...
    baselines.save(IDENTITY, replace(read, count=5), 3600, drift=False)  # ... and the grant's commit.
    stored = baselines.load(IDENTITY)
    assert (stored.count, stored.facts, count(stored)) == (5, CONFIRMED.facts, 1)
    # A write that changed the drift state (an operator's accept, a grant that confirmed) writes it.
    accepted = replace(read, count=6, facts={"runner_environment": "self-hosted"})
    baselines.save(IDENTITY, accepted, 3600)
    assert baselines.load(IDENTITY) == replace(CONFIRMED, count=6, facts=accepted.facts)


def test_probation_steps_saved_at_the_same_instant_each_count(stores: tuple[str, Any, Any, Any]) -> None:
    """Each refusal saved the baseline it had read with its step: of steps at the same instant,
    one was kept.  ``update_drift`` swaps the drift state only if it is still the one read."""
    _, baselines, _, _ = stores
    baselines.save(IDENTITY, CONFIRMED, 3600)
    newcomer = "github|repo:acme/new:ref:refs/heads/main"  # no row, no key yet: the first ones race too

    def refused(n: int) -> None:
        start.wait(timeout=30)
        for _ in range(3):
            baselines.update_drift(IDENTITY, step, 3600)
            baselines.update_drift(newcomer, step, 3600)
            baselines.save(IDENTITY, replace(CONFIRMED, count=n), 3600, drift=False)  # grants too

    start = threading.Barrier(8)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(refused, range(8)))
    assert count(baselines.load(IDENTITY)) == 24
    assert count(baselines.load(newcomer)) == 24
    assert baselines.load(IDENTITY).facts == CONFIRMED.facts


def test_a_step_that_changes_nothing_writes_nothing(stores: tuple[str, Any, Any, Any]) -> None:
    name, baselines, _, backend = stores
    baselines.update_drift(IDENTITY, lambda stored: replace(stored, count=9), 3600)  # not the drift
    assert baselines.load(IDENTITY) == Baseline()
    if name == "redis":
        assert backend.keys("*") == []
    else:
        with backend.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM baselines")).scalar() == 0


def test_a_baseline_stored_before_the_drift_state_was_kept_apart(stores: tuple[str, Any, Any, Any]) -> None:
    """Its drift state is that of its JSON (which versions before this one write, and read) until
    the first change recorded apart; each write of the baseline still carries it in its JSON."""
    name, baselines, _, backend = stores
    old = replace(step(CONFIRMED), count=9)
    if name == "redis":
        backend.set(f"sts:baseline:{IDENTITY}", old.to_json(), ex=3600)
    else:
        with backend.begin() as conn:  # As a version before this one writes a grant's baseline.
            conn.execute(text(OLD_GRANT), {"identity": IDENTITY, "baseline": old.to_json(), "at": NOW + 3600})
    assert baselines.load(IDENTITY) == old
    baselines.update_drift(IDENTITY, step, 3600)
    assert count(baselines.load(IDENTITY)) == 2
    baselines.save(IDENTITY, old, 3600, drift=False)  # A grant that read it before.
    assert count(baselines.load(IDENTITY)) == 2


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_expired_drift_state_is_not_brought_back(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The row of an expired baseline may still be there: a grant starts a new baseline under it,
    without the old drift state, and a refusal finds no live baseline to count in (refusals count
    for identities granted here only), leaving the expired state as dead as it was."""
    url = (
        request.getfixturevalue("pg").url if backend == "postgresql" else f"sqlite:///{tmp_path / 'b.sqlite'}"
    )
    engine = make_engine(url)
    upgrade(engine)
    try:
        clock = [NOW]
        baselines = SqlBaselineStore(engine, clock=lambda: clock[0])
        baselines.save(IDENTITY, step(CONFIRMED), 60)
        clock[0] = NOW + 120
        baselines.save(IDENTITY, Baseline(count=1), 60, drift=False)
        assert baselines.load(IDENTITY) == Baseline(count=1)
        baselines.save(IDENTITY, step(CONFIRMED), 60)
        clock[0] = NOW + 240
        baselines.add_failure(IDENTITY, NOW + 240, 60)
        assert baselines.load(IDENTITY) == Baseline()
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_new_baseline_written_by_an_older_version_into_an_expired_row_is_not_given_its_drift_state(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A version before 0012 writes the baseline alone: a new baseline it starts in the row of an
    expired one left the expired drift state beside it, which came back to life, and the value
    from before the expiry was granted, the current one refused (an outside re-check of a rolling
    deploy).  The drift state names its baseline (``first_seen``); another baseline's is not read."""
    url = (
        request.getfixturevalue("pg").url if backend == "postgresql" else f"sqlite:///{tmp_path / 'b.sqlite'}"
    )
    engine = make_engine(url)
    upgrade(engine)
    try:
        clock = [NOW]
        baselines = SqlBaselineStore(engine, clock=lambda: clock[0])
        before = replace(
            CONFIRMED, first_seen=NOW - 86_400, confirmed={"runner_environment": {"how": "first_seen"}}
        )
        baselines.save(IDENTITY, before, 60)  # the drift column written too
        clock[0] = NOW + 120  # expired
        after = Baseline(count=1, first_seen=NOW + 120, facts={"runner_environment": "self-hosted"})
        with engine.begin() as conn:  # as a version before 0012 writes a grant's baseline
            conn.execute(
                text(OLD_GRANT), {"identity": IDENTITY, "baseline": after.to_json(), "at": NOW + 180}
            )
        assert baselines.load(IDENTITY) == after
        # A drift state of the same baseline is still read (a probation step recorded apart).
        baselines.update_drift(IDENTITY, step, 60)
        assert count(baselines.load(IDENTITY)) == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("stored", [None, "", "not json", "{}", '"text"', '{"facts": []}', "1e999x"])
def test_an_unreadable_drift_state_leaves_the_baseline_own(stored: str | None) -> None:
    from sts.core.drift import drift_to_json, with_drift

    baseline = step(CONFIRMED)
    assert with_drift(baseline, stored) is baseline
    assert with_drift(baseline, drift_to_json(CONFIRMED)) == CONFIRMED
    assert with_drift(baseline, drift_to_json(baseline)) is baseline  # The same: nothing copied.


def test_redis_keeps_the_drift_state_under_a_key_of_its_own(fresh_redis_url: str) -> None:
    from sts.core.drift import drift_to_json

    client = connect_redis(fresh_redis_url)
    try:
        RedisBaselineStore(client, prefix="own").update_drift(IDENTITY, step, 3600)
        assert client.get(f"own:drift:{IDENTITY}") == drift_to_json(step(Baseline())).encode()
        assert 3500 < client.ttl(f"own:drift:{IDENTITY}") <= 3600
        assert client.get(f"own:baseline:{IDENTITY}") is None
    finally:
        client.delete(f"own:drift:{IDENTITY}")
        client.close()
