"""Small expiring key-value tables: baselines, revoked tokens, the Redis ledger's last epoch.

Each is read and written with single raw statements; the subject state store
(:mod:`sts.adapters.sql.subject_state`) keeps its values the same way.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from ...core.baseline import Baseline, appended_failure, failures_to_json, with_failures
from ...core.baseline_counts import counts_of, stored_counts, with_counts
from ...core.drift import drift_to_json, same_drift, with_drift
from ...core.ports import CLOCK_MARGIN, BaselineUpdate, StoreUnavailable
from .baseline_writes import COUNT_COLUMNS, BaselineWrite
from .expired_rows import ExpiredRows
from .pg_exchange import states_with_baseline
from .statements import RawStatement


def store_key(identity: str) -> str:
    """Identity keys are ``issuer|subject``; a digest keeps oversized or odd ones storable."""
    if len(identity) <= 600 and identity.isprintable():
        return identity
    return "sha256:" + hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()


def upsert_statement(table: str, column: str, placeholder: str) -> str:
    """Insert or replace one identity's value; parameters ``(store_key(identity), value, expires_at)``."""
    p = placeholder
    # Table and column names are constants of this package; values are parameters.
    return (
        f"INSERT INTO {table} (identity, {column}, expires_at) VALUES ({p}, {p}, {p}) "  # noqa: S608
        f"ON CONFLICT (identity) DO UPDATE SET {column} = excluded.{column}, "
        "expires_at = excluded.expires_at"
    )


def baseline_params(update: BaselineUpdate, now: float) -> tuple[Any, ...]:
    """The values of ``update``'s write at ``now`` (:class:`~.baseline_writes.BaselineWrite`):
    ``(store_key(identity), baseline, drift or None, expires_at, grants, window_start,
    window_count, usual_rate, counts_first_seen, at, now)``, ``at`` the grant's time (its ``last_seen``)."""
    baseline = update.baseline
    drift = drift_to_json(baseline) if update.drift_changed else None
    at = baseline.last_seen if baseline.last_seen is not None else now
    expires_at = now + update.ttl
    return (
        store_key(update.identity),
        baseline.to_json(),
        drift,
        expires_at,
        *counts_of(baseline),
        float(at),
        now,
    )


#: How many times the writes of refusals or of a drift state alone name ``now``: for the
#: baseline, its drift state or refusals, and each counter (an expired row's are not kept).
_NOWS = 2 + len(COUNT_COLUMNS)


def failures_upsert_statement(placeholder: str) -> str:
    """Write one identity's recent refusals (the ``failures`` column) and nothing else of a live
    baseline: the row is made if there is none, and an expired baseline under it (with its drift
    state and counters) is replaced by a new one (``{}``), never brought back to life.  Parameters
    ``(store_key(identity), failures, expires_at)`` and ``now`` :data:`_NOWS` times."""
    p = placeholder
    counts = "".join(
        f", {c} = CASE WHEN baselines.expires_at > {p} THEN baselines.{c} END" for c in COUNT_COLUMNS
    )
    # Placeholders and constant column names only: the values are parameters.
    return (
        "INSERT INTO baselines (identity, baseline, failures, expires_at) "  # noqa: S608
        f"VALUES ({p}, '{{}}', {p}, {p}) "
        "ON CONFLICT (identity) DO UPDATE SET failures = excluded.failures, "
        f"baseline = CASE WHEN baselines.expires_at > {p} THEN baselines.baseline "
        f"ELSE excluded.baseline END, drift = CASE WHEN baselines.expires_at > {p} THEN baselines.drift "
        f"END, expires_at = excluded.expires_at{counts}"
    )


class KeyValueTable:
    """A small expiring key-value table, read and written with single raw statements.

    ``also``: other columns read with the value in the same statement (:meth:`get_with`)."""

    def __init__(
        self,
        engine: Engine,
        table: str,
        column: str,
        clock: Callable[[], float],
        *,
        also: tuple[str, ...] = (),
    ) -> None:
        self._raw = RawStatement(engine)
        self._engine = engine
        self._clock = clock
        p = self._raw.placeholder
        self._put = upsert_statement(table, column, p)
        columns = ", ".join((column, *also))
        # Table and column names are constants of this package; values are parameters.
        self._get = f"SELECT identity, {columns} FROM {table} WHERE identity IN "  # noqa: S608
        self._table, self._p = table, p
        self.placeholder = p

    def put(self, identity: str, value: str, ttl: int) -> None:
        try:
            self._raw.run(self._put, (store_key(identity), value, self._clock() + ttl))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def get(self, identities: list[str]) -> dict[str, str]:
        return {i: value for i, (value, _) in self.get_with(identities).items()}

    def get_with(self, identities: list[str]) -> dict[str, tuple[str, tuple[str | None, ...]]]:
        """The live values, each with its ``also`` columns (None where NULL)."""
        keys = [store_key(i) for i in identities]
        sql = self._get + "(" + ", ".join([self._p] * len(keys)) + f") AND expires_at > {self._p}"
        try:
            rows = self._raw.query(sql, (*keys, self._clock()))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        found = {
            str(k): (str(v), tuple(str(r) if r is not None else None for r in rest)) for k, v, *rest in rows
        }
        return {i: found[k] for i, k in zip(identities, keys, strict=True) if k in found}

    def run(self, sql: str, params: tuple[object, ...]) -> int:
        """Run one more writing statement of this table; its row count."""
        try:
            return self._raw.run(sql, params)
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def query(self, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        """Run one more reading statement of this table."""
        try:
            return self._raw.query(sql, params)
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None


#: How many writes of the rare kinds (a revocation, a subject state) there are per removal of
#: expired rows (:class:`~.expired_rows.ExpiredRows`) they make.
REMOVAL_EVERY = 100


def loads_or_none(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


#: Compare-and-swap tries of :meth:`SqlBaselineStore.add_failure` and
#: :meth:`SqlBaselineStore.update_drift` before giving up (the refusal or the probation step then
#: goes unrecorded, logged, as when the store is unavailable).
_SWAP_TRIES = 32


def _after_a_lost_swap(attempt: int) -> None:
    """A short random pause after a lost compare and swap, longer with each: writers that keep
    colliding spread out (of 8 threads refusing at one instant, one lost 16 swaps in a row now and
    then, in a CI run)."""
    time.sleep(random.uniform(0, 0.0005 * min(attempt + 1, 8)))  # noqa: S311 - not security relevant


class SqlBaselineStore:
    """ports.BaselineStore on the embedded database.

    Two parts of an identity's baseline have columns of their own, which a grant (it writes back
    the baseline it read before it was decided) never writes over with what it read:

    * its recent refusals, the ``failures`` column (revision 0010), written only by
      :meth:`add_failure` and :meth:`save_failures`;
    * its drift state (stable facts, pending values with their probation, confirmations), the
      ``drift`` column (revision 0012), written by a grant only when it changed it
      (:func:`baseline_upsert_statement`), by a refusal's probation step (:meth:`update_drift`,
      compare and swap) and by :meth:`save`.

    * its counters (grant count, rate window: :mod:`sts.core.baseline_counts`) and the
      ``first_seen`` of the baseline they count, five columns (revision 0013), which a grant's
      statement advances from the stored ones (:class:`~.baseline_writes.BaselineWrite`), so
      that grants decided at once each count.

    NULL (a row written before those revisions, or by a version before them): the part is the
    one of the baseline's JSON, which every write of the baseline carries too.
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._kv = KeyValueTable(
            engine, "baselines", "baseline", clock, also=("failures", "drift", *COUNT_COLUMNS)
        )
        self._clock = clock
        p = self._kv.placeholder
        self._put = BaselineWrite(p, grant=False)
        self._put_grant = BaselineWrite(p, grant=True)
        self._put_failures = failures_upsert_statement(p)
        same = "IS" if engine.dialect.name == "sqlite" else "IS NOT DISTINCT FROM"
        live = f"CASE WHEN expires_at > {p} THEN"
        # Placeholders only: the values are parameters.
        self._read = (
            f"SELECT baseline, failures, drift, {', '.join(COUNT_COLUMNS)}, expires_at "  # noqa: S608
            f"FROM baselines WHERE identity = {p}"
        )
        self._insert_drift = (
            "INSERT INTO baselines (identity, baseline, drift, expires_at) "  # noqa: S608
            f"VALUES ({p}, '{{}}', {p}, {p}) ON CONFLICT (identity) DO NOTHING"
        )
        counts = "".join(f", {c} = {live} {c} END" for c in COUNT_COLUMNS)
        # Placeholders and column names only; each swap happens only if the stored part is still
        # the one read.  An expired row's other parts are not brought back to life.
        # A refusal leaves the row's expiry as it is: a baseline lives as long after its last grant
        # whatever the refusals since (as with Redis; an outside review found the stores apart).
        self._swap_failures = (
            f"UPDATE baselines SET failures = {p}, "  # noqa: S608
            f"baseline = {live} baseline ELSE '{{}}' END, drift = {live} drift END{counts} "
            f"WHERE identity = {p} AND failures {same} {p}"
        )
        self._swap_drift = (
            f"UPDATE baselines SET drift = {p}, expires_at = {p}, "  # noqa: S608
            f"baseline = {live} baseline ELSE '{{}}' END, failures = {live} failures END{counts} "
            f"WHERE identity = {p} AND drift {same} {p}"
        )
        #: PostgreSQL: the baseline read with the subject's state, just before (one round trip).
        self._with_states = states_with_baseline(engine)

    def load(self, identity: str) -> Baseline:
        if self._with_states is not None:
            read, value, failures, drift, counts = self._with_states.baseline(store_key(identity))
            if read:
                return _merged(value, failures, drift, *counts)
        found = self._kv.get_with([identity]).get(identity)
        return _merged(found[0], *found[1]) if found else Baseline()

    def save(
        self, identity: str, baseline: Baseline, ttl: int, *, drift: bool = True, grant: bool = False
    ) -> None:
        if self._with_states is not None:
            self._with_states.forget()
        update = BaselineUpdate(identity, baseline, ttl, drift_changed=drift)
        write = self._put_grant if grant else self._put
        self._kv.run(write.sql, write.params(baseline_params(update, self._clock())))

    def save_failures(self, identity: str, failures: tuple[float, ...], ttl: int) -> None:
        if self._with_states is not None:
            self._with_states.forget()
        now = self._clock()
        kept = failures_to_json(failures)
        self._kv.run(self._put_failures, (store_key(identity), kept, now + ttl, *[now] * _NOWS))

    def add_failure(self, identity: str, at: float, ttl: int) -> None:
        """Append ``at`` to the identity's refusals, atomically: the list read is written back only
        if it is still the stored one (compare and swap, tried again otherwise).  Each refusal
        wrote back the list it had read, so refusals at the same instant undid each other (an
        outside re-check kept 4 of 8 sent at once)."""
        if self._with_states is not None:
            self._with_states.forget()
        key = store_key(identity)
        for attempt in range(_SWAP_TRIES):
            now = self._clock()
            rows = self._kv.query(self._read, (key,))
            if not rows or rows[0][-1] <= now:
                return  # no live baseline: an identity never granted here (see the port)
            baseline, old = rows[0][0], rows[0][1]
            earlier = with_failures(Baseline.from_json(baseline), old).failures
            new = failures_to_json(appended_failure(earlier, at))
            if self._kv.run(self._swap_failures, (new, *[now] * _NOWS, key, old)) == 1:
                return
            _after_a_lost_swap(attempt)
        raise StoreUnavailable("the refusals kept changing")

    def update_drift(self, identity: str, change: Callable[[Baseline], Baseline], ttl: int) -> None:
        """Replace the drift state with that of ``change`` of the stored baseline, if the ``drift``
        column is still the one read (compare and swap, tried again otherwise).  A refused
        exchange's probation step was saved with the whole baseline it had read, and a grant or
        another refusal in between undid it, or was undone (an outside audit)."""
        if self._with_states is not None:
            self._with_states.forget()
        key = store_key(identity)
        for attempt in range(_SWAP_TRIES):
            now = self._clock()
            rows = self._kv.query(self._read, (key,))
            live = bool(rows) and rows[0][-1] > now
            stored = _merged(*rows[0][:-1]) if live else Baseline()
            changed = change(stored)
            if same_drift(changed, stored):
                return
            new = drift_to_json(changed)
            if not rows:  # a row of its own, unless another was made meanwhile
                if self._kv.run(self._insert_drift, (key, new, now + ttl)) == 1:
                    return
                continue
            if self._kv.run(self._swap_drift, (new, now + ttl, *[now] * _NOWS, key, rows[0][2])) == 1:
                return
            _after_a_lost_swap(attempt)
        raise StoreUnavailable("the drift state kept changing")


def _merged(baseline: str | None, failures: str | None, drift: str | None, *counts: Any) -> Baseline:
    """The baseline stored as ``baseline`` with the parts kept apart from it (NULL: its own):
    its refusals, its drift state and its counters."""
    merged = with_counts(Baseline.from_json(baseline), stored_counts(counts))
    return with_drift(with_failures(merged, failures), drift)


class SqlRevokedTokens:
    """ports.RevokedTokens on the embedded database.

    Each revocation, one time in :data:`REMOVAL_EVERY`, also removes the expired revocations of
    a slice of the table (:class:`~.expired_rows.ExpiredRows`): with ``store: redis`` the
    grants remove none here, and ``/revoke`` lets every client add rows."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._kv = KeyValueTable(engine, "revoked_tokens", "revoked", clock)
        self._clock = clock
        self._expired = ExpiredRows(engine, ("revoked_tokens",))

    def revoke(self, jti: str, expires_at: float) -> None:
        now = self._clock()
        self._kv.put(jti, "1", max(1, int(expires_at - now) + 1))
        if random.random() < 1 / REMOVAL_EVERY:  # noqa: S311 - housekeeping, not security relevant
            self._expired.remove(now - CLOCK_MARGIN)

    def revoked(self, jti: str) -> bool:
        return bool(self._kv.get([jti]))


#: How long the last known epoch of a replay store is remembered (a store unused for longer is new).
_EPOCH_MEMORY_TTL = 366 * 24 * 3600


class SqlLedgerEpochMemory:
    """Remembers, in the durable database, which epoch of the Redis replay store was last seen.

    A process that starts after Redis restarted empty has no memory of its own of
    the old epoch; this is how it still knows the records were lost (see
    :class:`sts.adapters.redis.epoch.LedgerEpoch`).
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._kv = KeyValueTable(engine, "ledger_epochs", "epoch", clock)

    def load(self, name: str) -> str | None:
        return self._kv.get([name]).get(name)

    def save(self, name: str, epoch_id: str) -> None:
        self._kv.put(name, epoch_id, _EPOCH_MEMORY_TTL)
