"""Subject state on the embedded database, cached per process and revalidated through a shared counter."""

from __future__ import annotations

import json
import logging
import mmap
import os
import random
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy import Connection, Engine, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from ...core.ports import CLOCK_MARGIN, StoreUnavailable
from ...core.subject_state import SubjectState
from .engines import transaction
from .expired_rows import ExpiredRows
from .key_value import REMOVAL_EVERY, KeyValueTable, loads_or_none, store_key
from .pg_exchange import states_with_baseline
from .schema import subject_states
from .sqlite_files import open_beside_database

log = logging.getLogger(__name__)

_STATE_CACHE_SIZE = 10_000


class ChangeCounter:
    """A value in a memory-mapped file that every process on this machine sees change at once.

    Writers of subject state store a new random value after each commit; readers
    compare it with the value their cached entries were read under.  Reading it is
    a memory load: no system call, no lock, no GIL hand-off.  Only for SQLite,
    where every writer is on this machine.
    """

    def __init__(self, path: Path) -> None:
        fd = open_beside_database(str(path))  # never through a link (see sqlite_files)
        try:
            if os.fstat(fd).st_size < 8:
                os.pwrite(fd, secrets.token_bytes(8), 0)
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)

    def value(self) -> bytes:
        return bytes(self._map[0:8])

    def changed(self) -> None:
        self._map[0:8] = secrets.token_bytes(8)


class SqlSubjectStateStore:
    """ports.SubjectStateStore on the embedded database.

    On SQLite, reads are cached per process and revalidated against a
    :class:`ChangeCounter` that every write changes, so the exchange's state
    lookup costs no database call while nothing has changed.  A cached entry is
    also re-read after ``max_cache_age`` seconds, so rows that expire by age go.
    """

    def __init__(
        self, engine: Engine, *, clock: Callable[[], float] = time.time, max_cache_age: float = 30.0
    ) -> None:
        self._kv = KeyValueTable(engine, "subject_states", "state", clock)
        #: PostgreSQL: the states read with the identity's baseline, in one round trip.
        self._with_baseline = states_with_baseline(engine)
        self._engine = engine
        self._clock = clock
        self._counter: ChangeCounter | None = None
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        if database and database != ":memory:":
            try:
                self._counter = ChangeCounter(Path(f"{database}.state-generation"))
            except OSError as exc:
                # A directory that cannot be written to: every read goes to the database (which
                # readiness reports on), rather than a crash at start.
                log.warning("subject states are not cached: %s", type(exc).__name__)
        self._cache: OrderedDict[str, tuple[bytes, float, SubjectState]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._max_cache_age = max_cache_age
        self._expired = ExpiredRows(engine, ("subject_states",))

    def get(self, identities: Sequence[str]) -> list[SubjectState]:
        if self._with_baseline is not None:
            keys = [store_key(i) for i in identities]
            by_key = self._with_baseline.states(keys, self._clock())
            return [SubjectState.from_json_dict(loads_or_none(by_key.get(k))) for k in keys]
        if self._counter is None:
            found = self._kv.get(list(identities))
            return [SubjectState.from_json_dict(loads_or_none(found.get(i))) for i in identities]
        # Read the counter before the rows: a write racing with this read changes it, so the
        # entries cached below are re-read next time rather than kept.
        generation, now = self._counter.value(), time.monotonic()
        with self._cache_lock:
            cached = [self._cache.get(i) for i in identities]
        if all(c is not None and c[0] == generation and now - c[1] < self._max_cache_age for c in cached):
            return [c[2] for c in cached if c is not None]
        found = self._kv.get(list(identities))
        states = [SubjectState.from_json_dict(loads_or_none(found.get(i))) for i in identities]
        with self._cache_lock:
            for identity, state in zip(identities, states, strict=True):
                self._cache[identity] = (generation, now, state)
                self._cache.move_to_end(identity)
            while len(self._cache) > _STATE_CACHE_SIZE:
                self._cache.popitem(last=False)
        return states

    def _changed(self) -> None:
        if self._counter is not None:
            self._counter.changed()
        if random.random() < 1 / REMOVAL_EVERY:  # noqa: S311 - housekeeping, not security relevant
            # Written by security events, rarely: a slice of the expired states goes now and then
            # (with ``store: redis`` the grants remove none here).
            self._expired.remove(self._clock() - CLOCK_MARGIN)

    def put(self, identity: str, state: SubjectState, ttl: int) -> None:
        self._kv.put(identity, json.dumps(state.to_json_dict()), ttl)
        self._changed()

    def update(self, identity: str, change: Callable[[SubjectState], SubjectState], ttl: int) -> SubjectState:
        """Read and write in one transaction: SQLite serialises writers (a conflicting one is
        retried by :func:`transaction`); PostgreSQL takes a transaction-scoped advisory lock."""
        key = store_key(identity)
        table = subject_states

        def work(conn: Connection) -> SubjectState:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": key})
            row = conn.execute(
                select(table.c.state).where(table.c.identity == key, table.c.expires_at > self._clock())
            ).first()
            state = change(SubjectState.from_json_dict(loads_or_none(row[0]) if row else None))
            values = {"state": json.dumps(state.to_json_dict()), "expires_at": self._clock() + ttl}
            if conn.execute(update(table).where(table.c.identity == key).values(**values)).rowcount == 0:
                conn.execute(table.insert().values(identity=key, **values))
            return state

        try:
            state = transaction(self._engine, work)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        self._changed()
        return state
