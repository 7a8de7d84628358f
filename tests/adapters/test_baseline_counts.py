"""An identity's counters are advanced by the store, on every store (:mod:`sts.core.baseline_counts`).

A grant writes back the baseline it read before it was decided; its count, and the rate window
``unexpected_s2s`` reads, are advanced from the stored ones in the grant's own write, by the rule
of :func:`sts.core.baseline.observe` (the whole exchange, on two instances:
``tests/e2e/test_risk_e2e.py``, ``test_grants_decided_at_the_same_time_each_count``).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, text

from sts.adapters.redis.client import connect as connect_redis
from sts.adapters.redis.key_value import RedisBaselineStore, RedisSubjectStateStore
from sts.adapters.sql.engines import make_engine
from sts.adapters.sql.key_value import SqlBaselineStore
from sts.adapters.sql.subject_state import SqlSubjectStateStore
from sts.core.baseline import Baseline, observe
from sts.core.baseline_counts import (
    RESET,
    advanced,
    counts_of,
    counts_text,
    read_counts_text,
    stored_counts,
    with_counts,
)
from sts.migrations import upgrade
from tests.support.postgres import PgSchema

IDENTITY = "github|repo:acme/app:ref:refs/heads/main"
NOW = float(int(time.time()))
#: How versions before revision 0013 write a grant's baseline (they know no counters' columns).
OLD_GRANT = (
    "INSERT INTO baselines (identity, baseline, expires_at) VALUES (:identity, :baseline, :at) "
    "ON CONFLICT (identity) DO UPDATE SET baseline = excluded.baseline, expires_at = excluded.expires_at"
)


def grant(baseline: Baseline, at: float, network: str = "10.1.2.3") -> Baseline:
    """What a grant at ``at`` writes back, having read ``baseline`` (as the pipeline's ``learn``)."""
    return observe(
        baseline,
        now=at,
        source_ip=network,
        stable_facts={},
        audiences=("https://deploy.example.com",),
        scopes=("deploy:read",),
        depth=0,
        rebaseline=False,
    )


@contextlib.contextmanager
def sql_engine(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A database of ``backend`` at the newest revision."""
    pg_url = request.getfixturevalue("pg").url if backend == "postgresql" else None
    engine = make_engine(pg_url or f"sqlite:///{tmp_path / 'b.sqlite'}")
    upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any, Any]]:
    """(name, baseline store, the engine or the Redis client)."""
    if request.param == "redis":
        client = connect_redis(request.getfixturevalue("fresh_redis_url"))
        yield "redis", RedisBaselineStore(client), client
        client.close()
        return
    if request.param == "postgresql":
        pg: PgSchema = request.getfixturevalue("pg")
        engine = make_engine(pg.url)
    else:
        engine = make_engine(f"sqlite:///{tmp_path / 'b.sqlite'}")
    upgrade(engine)
    yield request.param, SqlBaselineStore(engine), engine
    engine.dispose()


def test_grants_decided_at_the_same_time_each_count(stores: tuple[str, Any, Any]) -> None:
    _, baselines, _ = stores
    for i in range(6):  # a learned workload, one grant a second
        baselines.save(IDENTITY, grant(baselines.load(IDENTITY), NOW + i), 3600, grant=True)
    read = baselines.load(IDENTITY)
    assert (read.count, read.window_count) == (6, 6)
    # Eight grants decided on what was read then, committed one after the other.
    for i in range(8):
        baselines.save(IDENTITY, grant(read, NOW + 6 + i / 10), 3600, drift=False, grant=True)
    after = baselines.load(IDENTITY)
    assert (after.count, after.window_count, after.window_start) == (14, 14, NOW)
    assert after.last_seen == NOW + 6.7  # the rest is the last writer's, as before
    # A burst of 14 in the window: a grant decided now sees it (``unexpected_s2s`` fires at 10).
    assert after.current_rate(NOW + 15) == 15.0


def test_the_first_grants_of_a_new_identity_decided_at_once_each_count(stores: tuple[str, Any, Any]) -> None:
    """Each grant that read no baseline begins one, of its own ``first_seen``: the first written is
    kept, and the others count in it (an outside review: three such grants left a count of 1)."""
    _, baselines, _ = stores
    read = baselines.load(IDENTITY)
    for i in range(3):
        baselines.save(IDENTITY, grant(read, NOW + 0.001 * (2 - i)), 3600, grant=True)  # out of order
    first = baselines.load(IDENTITY)
    assert (first.count, first.window_count, first.first_seen, first.window_start) == (
        3,
        3,
        NOW + 0.002,
        NOW + 0.002,
    )
    baselines.save(IDENTITY, grant(first, NOW + 1), 3600, grant=True)
    assert baselines.load(IDENTITY).count == 4
    # A grant that read none more than a rate window after the baseline began did not race it: it
    # found an expired one (or a reset) and begins anew.
    baselines.save(IDENTITY, grant(Baseline(), NOW + 70), 3600, grant=True)
    assert counts_of(baselines.load(IDENTITY)) == (1, NOW + 70, 1, 0.0, NOW + 70)


def test_a_reset_by_an_older_version_is_not_counted_on(stores: tuple[str, Any, Any]) -> None:
    """An older version's ``sts baseline reset`` writes the baseline alone, and leaves the counters:
    a grant within a minute of the baseline's start took them for the first grants' race and
    counted on (an outside check of a rolling deploy: 5 where 1 was due)."""
    name, baselines, handle = stores
    for i in range(4):
        baselines.save(IDENTITY, grant(baselines.load(IDENTITY), NOW + i), 3600, grant=True)
    reset = Baseline().to_json()
    assert reset.startswith(RESET)
    if name == "redis":  # what that version's reset writes
        handle.set(f"sts:baseline:{IDENTITY}", reset, ex=3600)
    else:
        with handle.begin() as conn:
            conn.execute(
                text("UPDATE baselines SET baseline = :b WHERE identity = :i"), {"b": reset, "i": IDENTITY}
            )
    read = baselines.load(IDENTITY)
    assert read.count == 0
    baselines.save(IDENTITY, grant(read, NOW + 10), 3600, grant=True)
    assert counts_of(baselines.load(IDENTITY)) == (1, NOW + 10, 1, 0.0, NOW + 10)


def test_the_stores_advance_the_counters_as_observe_does(stores: tuple[str, Any, Any]) -> None:
    """Grants one after the other, with gaps that end the rate window, give the counters that
    ``observe`` gives, to the last bit (IEEE doubles in SQLite, PostgreSQL and Lua)."""
    _, baselines, _ = stores
    rng = random.Random(7)
    expected, at = Baseline(), NOW
    for _ in range(40):
        at += rng.choice([0.25, 1.5, 59.0, 61.0, 130.5]) + rng.random() / 7
        baselines.save(IDENTITY, grant(baselines.load(IDENTITY), at), 3600, grant=True)
        expected = grant(expected, at)
    stored = baselines.load(IDENTITY)
    assert counts_of(stored) == counts_of(expected)
    assert stored.usual_rate > 0  # windows ended with grants in them


def test_the_store_advances_the_counters_from_the_stored_ones(stores: tuple[str, Any, Any]) -> None:
    """Two grants decided on one read, the second in a new rate window: the counters are
    ``advanced`` from the stored ones (the window the first began is the one that ended)."""
    _, baselines, _ = stores
    for i in range(3):
        baselines.save(IDENTITY, grant(baselines.load(IDENTITY), NOW + i), 3600, grant=True)
    read = baselines.load(IDENTITY)
    first, second = grant(read, NOW + 30), grant(read, NOW + 90)
    baselines.save(IDENTITY, first, 3600, grant=True)
    baselines.save(IDENTITY, second, 3600, grant=True)
    stored = counts_of(read)
    for own, at in ((first, NOW + 30), (second, NOW + 90)):
        stored = advanced(stored, counts_of(own), at)
    assert counts_of(baselines.load(IDENTITY)) == stored == (5, NOW + 90, 1, 0.8 * 0.0 + 4 * 0.2, NOW)


def test_a_whole_baseline_is_written_as_given(stores: tuple[str, Any, Any]) -> None:
    """An operator's write (``sts baseline``) sets the counters as given, and a grant then counts
    from them."""
    _, baselines, _ = stores
    for i in range(7):
        baselines.save(IDENTITY, grant(baselines.load(IDENTITY), NOW + i), 3600, grant=True)
    baselines.save(IDENTITY, Baseline(), 3600)  # a reset
    assert counts_of(baselines.load(IDENTITY)) == counts_of(Baseline())
    kept = replace(grant(Baseline(), NOW), count=2)
    baselines.save(IDENTITY, kept, 3600)
    assert baselines.load(IDENTITY).count == 2
    baselines.save(IDENTITY, grant(kept, NOW + 1), 3600, grant=True)
    assert baselines.load(IDENTITY).count == 3


def test_counters_of_another_baseline_are_not_advanced(stores: tuple[str, Any, Any]) -> None:
    """Counters stored with another ``first_seen`` count another baseline: a grant writes its own."""
    _, baselines, _ = stores
    for i in range(4):
        baselines.save(IDENTITY, grant(baselines.load(IDENTITY), NOW + i), 3600, grant=True)
    other = grant(Baseline(), NOW + 100)  # a grant that read no baseline, long after this one began
    baselines.save(IDENTITY, other, 3600, grant=True)
    assert counts_of(baselines.load(IDENTITY)) == counts_of(other) == (1, NOW + 100, 1, 0.0, NOW + 100)
    # One that read this one, with another first_seen (an older version's JSON): its own.
    stranger = replace(grant(grant(Baseline(), NOW + 5), NOW + 101), first_seen=NOW + 6)
    baselines.save(IDENTITY, stranger, 3600, grant=True)
    assert counts_of(baselines.load(IDENTITY)) == counts_of(stranger)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_expired_counters_are_not_brought_back(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A refusal recorded in the row of an expired baseline starts a new one: the expired counters
    stay gone.  (Redis expires the keys themselves.)"""
    with sql_engine(backend, tmp_path, request) as engine:
        clock = [NOW]
        baselines = SqlBaselineStore(engine, clock=lambda: clock[0])
        for i in range(6):
            baselines.save(IDENTITY, grant(baselines.load(IDENTITY), NOW + i), 60, grant=True)
        clock[0] = NOW + 120
        baselines.add_failure(IDENTITY, NOW + 120, 60)
        assert counts_of(baselines.load(IDENTITY)) == counts_of(Baseline())
        for i in range(3):
            baselines.save(IDENTITY, grant(baselines.load(IDENTITY), NOW + 121 + i), 60, grant=True)
        clock[0] = NOW + 240
        baselines.save_failures(IDENTITY, (), 60)
        assert baselines.load(IDENTITY).count == 0
        for i in range(3):
            baselines.save(IDENTITY, grant(baselines.load(IDENTITY), NOW + 241 + i), 60, grant=True)
        clock[0] = NOW + 360
        baselines.update_drift(IDENTITY, lambda b: replace(b, facts={"runner_environment": "x"}), 60)
        assert baselines.load(IDENTITY).count == 0
        # A grant into an expired row writes its own counters.
        for i in range(3):
            baselines.save(IDENTITY, grant(baselines.load(IDENTITY), NOW + 361 + i), 60, grant=True)
        clock[0] = NOW + 480
        baselines.save(IDENTITY, grant(Baseline(), NOW + 480), 60, grant=True)
        assert baselines.load(IDENTITY).count == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_baselines_written_by_a_version_before_the_counters(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A version before 0013 writes only the JSON (a rolling deploy): its count, when ahead of the
    columns', is the one read, and a grant decided on it is not advanced from the columns; a new
    baseline it starts in the row of an expired one is not given the expired counters."""
    with sql_engine(backend, tmp_path, request) as engine:
        clock = [NOW]
        baselines = SqlBaselineStore(engine, clock=lambda: clock[0])

        def old_grant(baseline: Baseline, expires_at: float) -> None:
            with engine.begin() as conn:
                conn.execute(
                    text(OLD_GRANT), {"identity": IDENTITY, "baseline": baseline.to_json(), "at": expires_at}
                )

        for i in range(3):
            baselines.save(IDENTITY, grant(baselines.load(IDENTITY), NOW + i), 60, grant=True)
        read = baselines.load(IDENTITY)
        for i in range(4):  # grants of the older version: the JSON's count runs ahead
            read = grant(read, NOW + 3 + i)
            old_grant(read, NOW + 60)
        assert baselines.load(IDENTITY) == read
        assert read.count == 7
        baselines.save(IDENTITY, grant(read, NOW + 8), 60, grant=True)
        assert baselines.load(IDENTITY).count == 8
        # Expired, then a new baseline started by the older version: not given the old counters.
        clock[0] = NOW + 120
        new = grant(Baseline(), NOW + 120)
        old_grant(new, NOW + 180)
        assert baselines.load(IDENTITY) == new
        baselines.save(IDENTITY, grant(new, NOW + 121), 60, grant=True)
        assert counts_of(baselines.load(IDENTITY)) == (2, NOW + 120, 2, 0.0, NOW + 120)


def test_the_read_with_the_subject_state_brings_the_counters(stores: tuple[str, Any, Any]) -> None:
    """PostgreSQL and Redis read the baseline with the subject's state, in one round trip."""
    name, baselines, handle = stores
    states: Any
    if name == "redis":
        states = RedisSubjectStateStore(handle, baselines=baselines)
    else:
        states = SqlSubjectStateStore(handle)
    baselines.save(IDENTITY, grant(Baseline(), NOW), 3600, grant=True)
    read = baselines.load(IDENTITY)
    for i in range(3):
        baselines.save(IDENTITY, grant(read, NOW + 1 + i), 3600, grant=True)  # each on that read
    states.get([IDENTITY])
    assert baselines.load(IDENTITY).count == 4


def test_a_count_past_32_bits(stores: tuple[str, Any, Any]) -> None:
    """PostgreSQL's ``integer`` ends at 2**31 - 1: every grant of such an identity would fail."""
    _, baselines, _ = stores
    baselines.save(IDENTITY, replace(grant(Baseline(), NOW), count=2**31 - 1), 3600)
    baselines.save(IDENTITY, grant(baselines.load(IDENTITY), NOW + 1), 3600, grant=True)
    assert baselines.load(IDENTITY).count == 2**31


@pytest.mark.parametrize("value", ['"yesterday"', "[1]", "{}"])
def test_a_baseline_with_an_unreadable_time_is_a_new_one(stores: tuple[str, Any, Any], value: str) -> None:
    """Read as corrupt (a new baseline, learning), and written over by the next grant: a time not a
    number failed the grant's write (a 500 on Redis, after the record was committed)."""
    name, baselines, handle = stores
    corrupt = grant(Baseline(), NOW).to_json().replace(f'"first_seen":{NOW!r}', f'"first_seen":{value}')
    assert value in corrupt
    if name == "redis":
        handle.set(f"sts:baseline:{IDENTITY}", corrupt)
    else:
        with handle.begin() as conn:
            conn.execute(
                text("INSERT INTO baselines (identity, baseline, expires_at) VALUES (:i, :b, :e)"),
                {"i": IDENTITY, "b": corrupt, "e": NOW + 3600},
            )
    read = baselines.load(IDENTITY)
    assert (read.count, read.first_seen) == (0, None)
    baselines.save(IDENTITY, grant(read, NOW + 1), 3600, grant=True)
    assert baselines.load(IDENTITY).count == 1


@pytest.mark.parametrize("stored", [b"3 1000.0 1 0.0 x", b"3 1000.0 1 0.0", b"a b c d e"])
def test_redis_writes_over_unreadable_counters(fresh_redis_url: str, stored: bytes) -> None:
    """Read as none, as Python reads them: the script failed on them (it confirms single uses too)."""
    client = redis.Redis.from_url(fresh_redis_url)
    client.set(f"sts:counts:{IDENTITY}", stored)
    baselines = RedisBaselineStore(connect_redis(fresh_redis_url))
    assert read_counts_text(stored) is None
    baselines.save(IDENTITY, grant(Baseline(), NOW), 3600, grant=True)
    assert baselines.load(IDENTITY).count == 1
    client.close()


def test_redis_writes_over_a_counters_key_of_another_type(fresh_redis_url: str) -> None:
    client = redis.Redis.from_url(fresh_redis_url)
    client.hset(f"sts:counts:{IDENTITY}", "count", 5)
    baselines = RedisBaselineStore(connect_redis(fresh_redis_url))
    baselines.save(IDENTITY, grant(Baseline(), NOW), 3600, grant=True)
    assert baselines.load(IDENTITY).count == 1
    client.close()


def test_redis_keeps_the_counters_under_a_key_of_their_own(fresh_redis_url: str) -> None:
    client = redis.Redis.from_url(fresh_redis_url)
    baselines = RedisBaselineStore(connect_redis(fresh_redis_url), prefix="t")
    written = grant(Baseline(), NOW + 0.1)
    baselines.save(IDENTITY, written, 3600, grant=True)
    kept = client.get(f"t:counts:{IDENTITY}")
    assert kept is not None and read_counts_text(kept) == counts_of(written)
    assert 3590 < client.ttl(f"t:counts:{IDENTITY}") <= 3600
    client.set(f"t:counts:{IDENTITY}", b"not counters")  # unreadable: the JSON's
    assert baselines.load(IDENTITY) == written
    baselines.save(IDENTITY, grant(written, NOW + 1), 3600, grant=True)
    assert baselines.load(IDENTITY).count == 2
    client.close()


@pytest.mark.parametrize(
    "counts",
    [(0, 0.0, 0, 0.0, None), (3, NOW, 2, 1.2, NOW - 5.5), (10**12, 1e-300, 7, 1 / 3, 0.1)],
)
def test_counters_text_reads_back(counts: tuple[Any, ...]) -> None:
    assert read_counts_text(counts_text(counts)) == counts  # type: ignore[arg-type]
    assert read_counts_text(counts_text(counts).encode()) == counts  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [None, b"", b"1 2 3 4", b"1 2 3 4 5 6", b"a 2 3 4 5", b"\xff 1 2 3 4"])
def test_unreadable_counters_are_none(text: bytes | None) -> None:
    assert read_counts_text(text) is None


def test_counters_are_taken_only_for_their_own_baseline() -> None:
    baseline = grant(grant(Baseline(), NOW), NOW + 1)
    ahead = (5, NOW, 5, 0.0, NOW)
    assert with_counts(baseline, ahead).count == 5
    assert with_counts(baseline, (5, NOW, 5, 0.0, NOW + 61)) is baseline  # another baseline's
    # The first grants' race: each began one; the first written is the one counted in.
    assert with_counts(baseline, (5, NOW, 5, 0.0, NOW + 1)).first_seen == NOW + 1
    assert with_counts(baseline, (1, NOW, 1, 0.0, NOW)) is baseline  # behind the JSON's
    assert with_counts(baseline, None) is baseline
    assert stored_counts((None, 1.0, 1, 0.0, NOW)) is None
    assert stored_counts(("x", 1.0, 1, 0.0, NOW)) is None


def test_advanced_is_observe() -> None:
    """The rule every store runs is ``observe``'s for the counters, from any stored ones."""
    rng = random.Random(11)
    baseline, at = Baseline(), NOW
    for _ in range(300):
        at += rng.choice([0.0, 0.5, 59.999, 60.0, 60.001, 200.0]) + rng.random()
        after = grant(baseline, at)
        assert advanced(counts_of(baseline), counts_of(after), at) == counts_of(after)
        baseline = after
