"""Keep-alive connections spread evenly over the workers: a worker with more than its share closes one.

Each worker listens on its own ``SO_REUSEPORT`` socket, and the kernel hands every new
connection to one of them by a hash of the address pair.  With many clients that evens
out; with few it does not.  Of 400 tries of 8 connections over 2 workers here, 22% split
4/4, 44% 5/3, 25% 6/2, 8% 7/1 and 0.5% 8/0, as a fair coin would.  A keep-alive connection
stays with the worker it landed on, so for as long as the clients keep their connections,
the heavy worker's requests queue behind each other while the other worker has time to spare:
that worker's latency sets the tail (p99), and at 7/1 or 8/0 half the machine idles.

So the workers share their counts.  Each counts its *active* connections: those that sent a
request within the last :data:`ACTIVE` seconds, by the client's address and port (an idle
keep-alive connection costs nothing and is not counted).  Every :data:`INTERVAL` seconds it
writes its count into its slot of a small file the workers of one server map into memory
(:class:`SharedCounts`), and reads the others'.  A worker above its share (``ceil(total /
workers)``) and two or more above the lightest worker (a tenth of a share, with many
connections) answers the next request it finishes
with ``Connection: close`` (RFC 9112 §9.6), at most one per interval.  The client opens a new
connection, which the kernel places anew (on the lighter worker half the time with two), and
the counts settle at their fair split within a few intervals.  Every HTTP/1.1 client handles a
close after a complete response: it is how servers end keep-alive connections (nginx's
``keepalive_requests``).  Nothing is closed while the counts are fair, nor with one worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable, Sequence

#: Seconds since its last request within which a connection counts as active.
ACTIVE = 1.0
#: Seconds between two looks at the counts (and at most one close per worker in each).
INTERVAL = 0.25
#: A slot not written for this long belongs to a worker that is gone.
STALE = 2.0
#: One slot: the worker's pid, its count of active connections, when it last wrote (monotonic).
_SLOT = struct.Struct("<iid")
SLOTS = 256
SIZE = _SLOT.size * SLOTS


def surplus(mine: int, others: Sequence[int]) -> bool:
    """Whether a worker with ``mine`` active connections should close one, the other live workers
    having ``others``: it holds more than its share (``ceil(total / workers)``) and more than the
    lightest worker by two, or by a tenth of a share if that is more.  A split as fair as the
    total allows is left alone, and so is the small wobble of many clients' counts (500 and 490
    over 2 workers), which the kernel's hash already keeps near even."""
    if not others:
        return False
    total = mine + sum(others)
    share = total / (len(others) + 1)
    return mine > math.ceil(share) and mine - min(others) >= max(2, share / 10)


def create_file(directory: str | None = None) -> str:
    """A new file for the counts of one server's workers (its parent makes it, and removes it),
    readable by this user only (``mkstemp``), in the temporary directory unless ``directory``."""
    fd, path = tempfile.mkstemp(prefix="sts-workers-", dir=directory)
    try:
        os.ftruncate(fd, SIZE)
    finally:
        os.close(fd)
    return path


class SharedCounts:
    """This worker's slot in the shared file, and the other workers' counts.

    A slot is claimed under an exclusive ``flock`` of the file: the first slot that is free, or
    whose worker stopped writing (:data:`STALE`).  Counts are then written and read without a
    lock: a count read half-written only delays a decision by an interval.
    """

    def __init__(self, path: str, pid: int | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid
        self._fd = os.open(path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, SIZE)
        self._slot: int | None = None

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            if self._slot is not None:
                _SLOT.pack_into(self._map, self._slot * _SLOT.size, 0, 0, 0.0)
            self._map.close()
            os.close(self._fd)

    def publish(self, count: int, now: float) -> list[int]:
        """Write this worker's ``count``; return the counts of the other live workers."""
        if self._slot is None:
            self._slot = self._claim(now)
        _SLOT.pack_into(self._map, self._slot * _SLOT.size, self.pid, count, now)
        others = []
        for index in range(SLOTS):
            pid, theirs, written = _SLOT.unpack_from(self._map, index * _SLOT.size)
            if pid and index != self._slot and now - written < STALE:
                others.append(theirs)
        return others

    def _claim(self, now: float) -> int:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            for index in range(SLOTS):
                pid, _, written = _SLOT.unpack_from(self._map, index * _SLOT.size)
                if pid in (0, self.pid) or now - written >= STALE:
                    _SLOT.pack_into(self._map, index * _SLOT.size, self.pid, 0, now)
                    return index
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        raise RuntimeError(f"more than {SLOTS} workers share one count file")


class ConnectionBalance:
    """One worker's side (see the module docstring); called from its event loop only."""

    def __init__(self, counts: SharedCounts, clock: Callable[[], float] = time.monotonic) -> None:
        self.counts = counts
        self._clock = clock
        #: Client address and port of each active connection, and when it last sent a request.
        self._seen: dict[str, float] = {}
        self._close_one = False
        #: Connections closed to rebalance (for tests and diagnostics).
        self.closed = 0

    def tick(self) -> None:
        """Every :data:`INTERVAL`: forget idle connections, share the count, decide."""
        now = self._clock()
        self._seen = {client: at for client, at in self._seen.items() if now - at < ACTIVE}
        others = self.counts.publish(len(self._seen), now)
        self._close_one = surplus(len(self._seen), others)

    def after_request(self, client: str, http_version: str) -> bool:
        """Note the connection of ``client`` as active; True when its response should close it."""
        if self._close_one and http_version == "1.1":
            self._close_one = False
            self._seen.pop(client, None)
            self.closed += 1
            return True
        self._seen[client] = self._clock()
        return False
