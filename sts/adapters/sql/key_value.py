"""Small expiring key-value tables: baselines, revoked tokens, the Redis ledger's last epoch.

Each is read and written with single raw statements; the subject state store
(:mod:`sts.adapters.sql.subject_state`) keeps its values the same way.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from ...core.baseline import Baseline, appended_failure, failures_to_json, with_failures
from ...core.ports import StoreUnavailable
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


def failures_upsert_statement(placeholder: str) -> str:
    """Write one identity's recent refusals (the ``failures`` column) and nothing else of a live
    baseline: the row is made if there is none, and an expired baseline under it is replaced by a
    new one (``{}``), never brought back to life.  Parameters ``(store_key(identity), failures,
    expires_at, now)``."""
    p = placeholder
    # Placeholders only: the values are parameters.
    return (
        "INSERT INTO baselines (identity, baseline, failures, expires_at) "  # noqa: S608
        f"VALUES ({p}, '{{}}', {p}, {p}) "
        "ON CONFLICT (identity) DO UPDATE SET failures = excluded.failures, "
        f"baseline = CASE WHEN baselines.expires_at > {p} THEN baselines.baseline "
        "ELSE excluded.baseline END, expires_at = excluded.expires_at"
    )


class KeyValueTable:
    """A small expiring key-value table, read and written with single raw statements.

    ``also``: another column read with the value in the same statement (:meth:`get_with`)."""

    def __init__(
        self, engine: Engine, table: str, column: str, clock: Callable[[], float], *, also: str | None = None
    ) -> None:
        self._raw = RawStatement(engine)
        self._engine = engine
        self._clock = clock
        p = self._raw.placeholder
        self._put = upsert_statement(table, column, p)
        columns = f"{column}, {also}" if also else column
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
        return {i: value for i, (value, *_) in self.get_with(identities).items()}

    def get_with(self, identities: list[str]) -> dict[str, tuple[str, str | None]]:
        """The live values, each with its ``also`` column (None when it is NULL, or without one)."""
        keys = [store_key(i) for i in identities]
        sql = self._get + "(" + ", ".join([self._p] * len(keys)) + f") AND expires_at > {self._p}"
        try:
            rows = self._raw.query(sql, (*keys, self._clock()))
        except self._raw.failures as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        found = {
            str(k): (str(v), str(rest[0]) if rest and rest[0] is not None else None) for k, v, *rest in rows
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


def loads_or_none(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


#: Compare-and-swap tries of :meth:`SqlBaselineStore.add_failure` before giving up (a refusal then
#: goes unrecorded, logged, as when the store is unavailable).
_SWAP_TRIES = 16


class SqlBaselineStore:
    """ports.BaselineStore on the embedded database.

    The identity's recent refusals are the ``failures`` column (revision 0010), which only
    :meth:`save_failures` writes; a grant writes the ``baseline`` column alone, so it never undoes
    a refusal recorded after it read the baseline.  NULL (a row written before 0010, or by a
    version before it): the refusals are those of the baseline's JSON.
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._kv = KeyValueTable(engine, "baselines", "baseline", clock, also="failures")
        self._clock = clock
        self._put_failures = failures_upsert_statement(self._kv.placeholder)
        p = self._kv.placeholder
        same = "IS" if engine.dialect.name == "sqlite" else "IS NOT DISTINCT FROM"
        # Placeholders only: the values are parameters.
        self._read_failures = f"SELECT baseline, failures, expires_at FROM baselines WHERE identity = {p}"  # noqa: S608
        self._insert_failures = (
            "INSERT INTO baselines (identity, baseline, failures, expires_at) "  # noqa: S608
            f"VALUES ({p}, '{{}}', {p}, {p}) ON CONFLICT (identity) DO NOTHING"
        )
        # Placeholders only; the swap happens only if the stored list is still the one read.
        self._swap_failures = (
            f"UPDATE baselines SET failures = {p}, expires_at = {p}, "  # noqa: S608
            f"baseline = CASE WHEN expires_at > {p} THEN baseline ELSE '{{}}' END "
            f"WHERE identity = {p} AND failures {same} {p}"
        )
        #: PostgreSQL: the baseline read with the subject's state, just before (one round trip).
        self._with_states = states_with_baseline(engine)

    def load(self, identity: str) -> Baseline:
        if self._with_states is not None:
            read, value, failures = self._with_states.baseline(store_key(identity))
            if read:
                return with_failures(Baseline.from_json(value), failures)
        found = self._kv.get_with([identity]).get(identity)
        return with_failures(Baseline.from_json(found[0]), found[1]) if found else Baseline()

    def save(self, identity: str, baseline: Baseline, ttl: int) -> None:
        if self._with_states is not None:
            self._with_states.forget()
        self._kv.put(identity, baseline.to_json(), ttl)

    def save_failures(self, identity: str, failures: tuple[float, ...], ttl: int) -> None:
        if self._with_states is not None:
            self._with_states.forget()
        now = self._clock()
        self._kv.run(self._put_failures, (store_key(identity), failures_to_json(failures), now + ttl, now))

    def add_failure(self, identity: str, at: float, ttl: int) -> None:
        """Append ``at`` to the identity's refusals, atomically: the list read is written back only
        if it is still the stored one (compare and swap, tried again otherwise).  Each refusal
        wrote back the list it had read, so refusals at the same instant undid each other (an
        outside re-check kept 4 of 8 sent at once)."""
        if self._with_states is not None:
            self._with_states.forget()
        key = store_key(identity)
        for _ in range(_SWAP_TRIES):
            now = self._clock()
            rows = self._kv.query(self._read_failures, (key,))
            if not rows:  # the first refusal: a row of its own, unless another was made meanwhile
                if self._kv.run(self._insert_failures, (key, failures_to_json((at,)), now + ttl)) == 1:
                    return
                continue
            baseline, old, expires_at = rows[0]
            earlier = with_failures(Baseline.from_json(baseline), old).failures if expires_at > now else ()
            new = failures_to_json(appended_failure(earlier, at))
            if self._kv.run(self._swap_failures, (new, now + ttl, now, key, old)) == 1:
                return
        raise StoreUnavailable("the refusals kept changing")


class SqlRevokedTokens:
    """ports.RevokedTokens on the embedded database."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._kv = KeyValueTable(engine, "revoked_tokens", "revoked", clock)
        self._clock = clock

    def revoke(self, jti: str, expires_at: float) -> None:
        self._kv.put(jti, "1", max(1, int(expires_at - self._clock()) + 1))

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
