"""Readiness: the database schema current, the audit database taking commits, the store answering.

Liveness and readiness are different questions.  A process that answers HTTP is
alive; it is *ready* only when it could issue a token now: the audit database
commits a write (a ``SELECT 1`` also answers from a read-only or full database),
the replay store answers and takes a write, and the signing key is loaded.

The database may be down when the service starts.  :class:`DatabaseSchema`
then migrates the schema later, on the first request or readiness check after
the database answers again, so that a process started too early becomes ready
by itself instead of exiting.  A schema older than this version's, with
migrating at start switched off, keeps the process not ready (fail closed) until
``sts db upgrade`` has run.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable

import redis
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from .. import migrations
from ..core.ports import AuditUnavailable, ReplayCache, StoreUnavailable
from ..errors import ConfigurationError
from .keyring import KeyRing
from .sql.audit_sink import SqlAuditSink
from .sql.engines import where
from .sql.files_in_use import SqliteFile
from .sql.write_check import check_grant_tables

log = logging.getLogger(__name__)

#: A check of the replay store at ``now``; raises :class:`StoreUnavailable`.
StoreCheck = Callable[[float], None]

#: Seconds a readiness probe waits for the checks (a hung backend is not ready, not a hung probe).
DEADLINE = 2.0


class _Check:
    """One run of the readiness checks, on the checker's thread (:class:`_Checker`)."""

    def __init__(self, check: Callable[[Callable[[str], None]], list[str]]) -> None:
        self.check = check
        self.done = threading.Event()
        self.result: list[str] = []
        #: The part under way (the problem to report if it does not finish in time).
        self.part = "database"
        self._late = False

    def _at(self, part: str) -> None:
        self.part = part

    def run(self) -> None:
        try:
            self.result = self.check(self._at)
        except Exception as exc:  # noqa: BLE001 - a check that fails is a problem, never a crash
            log.warning("readiness check of %s failed: %s", self.part, describe(exc))
            self.result = [self.part]
        finally:
            self.done.set()

    def late(self) -> bool:
        return self._late

    def mark_late(self) -> None:
        if not self._late:
            log.warning("readiness: the %s check did not answer within the deadline", self.part)
        self._late = True


class _Checker:
    """The daemon thread the readiness checks of a process run on, one after another: a hung
    backend holds it, never a request thread for long, nor the process at exit.  One thread for
    the process's life, so its database connections are the engine's to close (a fork, a dispose),
    as every request thread's are."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Check] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def submit(self, check: _Check) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid():  # none yet, or forked without it
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._work, args=(self._jobs,), name="sts-readiness", daemon=True
                )
                self._pid = os.getpid()
                self._thread.start()
            self._jobs.put(check)

    @staticmethod
    def _work(jobs: queue.SimpleQueue[_Check]) -> None:
        while True:
            jobs.get().run()


def instance_name() -> str:
    """This process, as named in the ``heartbeats`` table and the store's readiness key."""
    return f"{socket.gethostname()}:{os.getpid()}"[:200]


def describe(exc: BaseException) -> str:
    """One line about a database failure: the driver's first line, never the SQL or a password."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    first = lines[0].strip() if lines else ""
    return f"{type(cause).__name__}: {first[:200]}" if first else type(cause).__name__


class DatabaseSchema:
    """The schema, current once the database answers: at start, or as soon as it comes back.

    ``ensure()`` is what requests and readiness checks call: once the schema is
    current it costs one attribute read; before that, one thread at a time tries
    :func:`migrations.ensure` (which upgrades it when ``migrate``, and otherwise only
    checks), at most once per ``retry_interval`` seconds, and the others are told
    "not yet" at once.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        migrate: bool = True,
        retry_interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.migrate = migrate
        self.retry_interval = retry_interval
        self._monotonic = monotonic
        self._ready = False
        self._next_attempt = 0.0
        self._lock = threading.Lock()
        self.last_failure: str | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    def ensure(self) -> bool:
        """True when the schema is current; otherwise try (rate-limited) to make it so."""
        if self._ready:
            return True
        if not self._lock.acquire(blocking=False):
            return False  # Another thread is trying right now.
        try:
            now = self._monotonic()
            if self._ready or now < self._next_attempt:
                return self._ready
            self._next_attempt = now + self.retry_interval
            return self.attempt()
        finally:
            self._lock.release()

    def attempt(self) -> bool:
        """One try at making the schema current; a failure is logged in one line, only when it changes."""
        try:
            migrations.ensure(self.engine, migrate=self.migrate)
        except SQLAlchemyError as exc:
            failure = describe(exc)
            if failure != self.last_failure:
                log.warning(
                    "database %s not answering (%s); not ready until it does", where(self.engine), failure
                )
            self.last_failure = failure
            return False
        except migrations.SchemaError as exc:
            failure = str(exc)
            if failure != self.last_failure:
                log.error("database %s: %s; not ready until then", where(self.engine), failure)
            self.last_failure = failure
            return False
        if self.last_failure is not None:
            log.warning("database %s answers again; schema current", where(self.engine))
        self._ready, self.last_failure = True, None
        return True


def wait_for_schema(
    schema: DatabaseSchema,
    timeout: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    first_delay: float = 0.5,
    max_delay: float = 10.0,
) -> bool:
    """Make the schema current, retrying with exponential backoff for up to ``timeout`` seconds
    while the database does not answer.

    One line per failed attempt (what failed, when the next try is); no traceback.
    Returns False when the database still does not answer: the caller starts anyway,
    not ready, and :meth:`DatabaseSchema.ensure` finishes the job when it answers.
    Also False, at once, when the schema is behind and ``schema.migrate`` is off, or
    cannot be migrated (the reason logged once): not ready until someone acts.
    """
    deadline = monotonic() + max(0.0, timeout)
    delay, attempt = first_delay, 1
    while True:
        try:
            migrations.ensure(schema.engine, migrate=schema.migrate)
        except migrations.SchemaError:
            return schema.attempt()  # Logs why (once) and stays not ready, unless fixed meanwhile.
        except SQLAlchemyError as exc:
            failure = describe(exc)
            left = deadline - monotonic()
            if left <= 0:
                log.warning(
                    "database %s not answering (%s) after %d attempt(s); starting not ready, "
                    "the schema is made current once it answers",
                    where(schema.engine),
                    failure,
                    attempt,
                )
                schema.last_failure = failure
                return False
            pause = min(delay, left)
            log.warning(
                "database %s not answering (%s); attempt %d, retrying in %.1f s",
                where(schema.engine),
                failure,
                attempt,
                pause,
            )
            sleep(pause)
            delay, attempt = min(delay * 2, max_delay), attempt + 1
            continue
        schema.ensure()  # Marks it ready (the tables exist now, so this is one quick check).
        return True


def sql_store_check(replay: ReplayCache, instance: str) -> StoreCheck:
    """The embedded store: a write to its replay table (a readiness key that expires in a minute)."""

    def check(now: float) -> None:
        # Valid from now: a key of this moment, never one a loss of the database's commits could
        # have spent (sts.adapters.sql.ledger_mark), so readiness stays honest after one.
        replay.first_use("readiness", instance, now + 60, now, valid_from=now)

    return check


#: Seconds this host's clock may differ from Redis's before the store is not ready: Redis keeps
#: spent uses by its clock, this process judges expiry by its own (see
#: :data:`sts.adapters.redis.ledger.CLOCK_MARGIN`, five times this).
MAX_CLOCK_SKEW = 60.0


def redis_store_check(
    client: redis.Redis, instance: str, *, prefix: str = "sts", wall_clock: Callable[[], float] = time.time
) -> StoreCheck:
    """Redis: ``TIME`` (which also tells a clock of this host that is off, :data:`MAX_CLOCK_SKEW`),
    then a ``SET`` with a short expiry (refused by a read-only replica or a server out of memory,
    which still answer ``PING``)."""

    def check(_now: float) -> None:
        try:
            seconds, micros = client.time()
            client.set(f"{prefix}:readiness:{instance}", b"1", px=60_000)
        except redis.RedisError as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        # This host's own clock (a test's clock may be moved on purpose).
        skew = wall_clock() - (seconds + micros / 1e6)
        if abs(skew) > MAX_CLOCK_SKEW:
            log.error("this host's clock differs from Redis's by %.0f s: not ready", skew)
            raise StoreUnavailable(f"clock off by {skew:.0f} s from Redis's")

    return check


class Readiness:
    """What ``/readyz`` reports: the problems that stop this process from issuing tokens now.

    ``database``: the schema is not current, or the audit database does not commit a
    write; ``store``: the replay store does not answer or take a write; ``rate_limits``:
    the rate-limit store (when limits are on) does not take a count; ``keys``: no
    signing key can be loaded.  A good result is kept for ``cache_seconds``, so that
    frequent probes cost at most one small commit per second and process; a bad one is
    checked again on the next probe, so that recovery shows at once.

    The checks run on a thread of their own, and a probe waits for them at most
    ``deadline`` seconds: a backend that hangs (a frozen database server, a lock held
    on a table) makes the probe answer not ready, naming the check still waiting,
    instead of hanging with it.  While that check waits, later probes answer at once
    from it, and no second check starts.
    """

    def __init__(
        self,
        *,
        schema: DatabaseSchema,
        audit: SqlAuditSink,
        store: StoreCheck,
        store_in_database: bool,
        keyring: KeyRing,
        clock: Callable[[], float],
        instance: str,
        cache_seconds: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        rate_limits: StoreCheck | None = None,
        rate_limits_in: str = "own",
        deadline: float = DEADLINE,
        sqlite_file: SqliteFile | None = None,
    ) -> None:
        self.deadline = deadline
        self.sqlite_file = sqlite_file
        self._file_problem: str | None = None
        self._space_problem: str | None = None
        #: The check under way (its result once there, and the part it is at), and its thread.
        self._running: _Check | None = None
        self._checker = _Checker()
        self.rate_limits = rate_limits
        #: Where the rate limits are kept: ``database`` (PostgreSQL), ``store`` (Redis) or ``own``
        #: (SQLite's file of their own); a failure of that one is not reported twice.
        self.rate_limits_in = rate_limits_in
        self.schema = schema
        self.audit = audit
        self.store = store
        self.store_in_database = store_in_database
        self.keyring = keyring
        self.clock = clock
        self.instance = instance
        self.cache_seconds = cache_seconds
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._good_until = -1.0
        self._last: list[str] = []

    def problems(self) -> list[str]:
        with self._lock:
            if self._monotonic() < self._good_until:
                return []
            running = self._running
            if running is None or running.done.is_set():
                running = self._running = _Check(self._check)
                self._checker.submit(running)
        waited = running.done.wait(self.deadline if not running.late() else 0)
        with self._lock:
            if waited:
                problems = list(running.result)
            else:
                problems = [running.part]
                running.mark_late()
            if not problems:
                self._good_until = self._monotonic() + self.cache_seconds
            if problems != self._last:
                if problems:
                    log.warning("not ready: %s", ", ".join(problems))
                else:
                    log.warning("ready again")
            self._last = problems
            return problems

    def _check(self, at: Callable[[str], None]) -> list[str]:
        now = self.clock()
        problems = []
        at("database")
        database = self.schema.ensure()
        if database:
            try:
                self.audit.check_commit(self.instance, now)
                check_grant_tables(self.audit.engine)
            except AuditUnavailable as exc:
                log.debug("audit database not taking writes: %s", exc)
                database = False
            else:
                files = self.sqlite_file
                problem = files.problem() if files is not None else None
                if problem != self._file_problem:
                    self._file_problem = problem
                    if files is not None and problem is not None:
                        log.error("not ready: %s (%s); restart the service", problem, files.path)
                mark = self.audit.mark
                if problem is None and mark is not None and mark.reopen(now) is not None:
                    # The ledger mark (SQLite: lost commits noticed, so that a single-use token
                    # is not accepted again) cannot be opened: a directory in its place, a
                    # read-only mount.  Every credential is refused meanwhile; tried again.
                    problem = f"the database's ledger mark cannot be opened ({mark.problem})"
                space = files.space_problem() if files is not None and problem is None else None
                if space != self._space_problem:
                    self._space_problem = space
                    if files is not None and space is not None:
                        log.error("not ready: %s (%s)", space, files.path)
                database = problem is None and space is None
        if not database:
            problems.append("database")
        # The embedded store is a table of the same database: checking it again would only
        # repeat the database's failure.
        if database or not self.store_in_database:
            at("store")
            try:
                self.store(now)
            except StoreUnavailable:
                problems.append("store")
        shared = {"database": "database" in problems, "store": "store" in problems}.get(self.rate_limits_in)
        if self.rate_limits is not None and not shared:
            # Every token request passes the rate limits first: a store that cannot count them
            # refuses every one (fail closed), so the process is not ready either.
            at("rate_limits")
            try:
                self.rate_limits(now)
            except StoreUnavailable:
                problems.append("rate_limits")
        at("keys")
        try:
            self.keyring.reload_if_changed(now)
            self.keyring.signer()
            if self.keyring.reload_problem is not None:
                problems.append("keys")
        except ConfigurationError:
            problems.append("keys")
        return problems
