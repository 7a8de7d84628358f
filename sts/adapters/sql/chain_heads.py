"""Where an audit sink appends: the heads of its hash chains (:mod:`sts.core.audit_chain`)."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator

from ...core.audit_chain import genesis_hash
from ...core.ports import AuditUnavailable
from .process_id import current_pid


class ChainHead:
    """One hash chain of an audit sink, and its last *committed* link.

    Used by one thread at a time (see :class:`ChainHeads`), from before its next
    records are linked until their commit has succeeded or failed: so the head
    moves only over committed records, and a record that never commits leaves
    no gap.  When a commit's outcome cannot be known, the chain is abandoned for
    a new one (:meth:`restart`): whatever the old one's last record is, nothing
    follows it.
    """

    __slots__ = ("chain_id", "hash", "pid", "registered", "seq")

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.chain_id = secrets.token_hex(16)
        self.seq = 0
        self.hash = genesis_hash(self.chain_id)
        #: Whether the chain's ``audit_chains`` row is committed (it goes with the first record).
        self.registered = False
        self.pid = current_pid()

    def advance(self, seq: int, digest: str) -> None:
        self.seq, self.hash, self.registered = seq, digest, True


class ChainHeads:
    """The chains of one audit sink: each commit borrows one for as long as it runs.

    Commits on one chain follow each other; commits on different chains run
    side by side.  SQLite runs one write at a time anyway, so a sink there has one
    chain; on PostgreSQL up to ``size``, made when concurrent commits need them.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._made = 0
        self._free: list[ChainHead] = []
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def borrow(self, timeout: float) -> Iterator[ChainHead]:
        """A chain for this thread alone; :class:`AuditUnavailable` if none is free within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._free and self._made >= self._size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AuditUnavailable("timeout waiting for an audit chain")
                self._cond.wait(remaining)
            head = self._free.pop() if self._free else None
            if head is None:
                self._made += 1
        if head is None:
            head = ChainHead()
        elif head.pid != current_pid():
            head.restart()  # A forked child never appends to its parent's chain.
        try:
            yield head
        finally:
            with self._cond:
                self._free.append(head)
                self._cond.notify()
