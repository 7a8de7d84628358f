"""Hash chains over the audit trail: every record commits to the one before it.

Each writer of the trail (one :class:`~sts.adapters.sql.audit_sink.SqlAuditSink` in one
process) appends to chains of its own, so writers never contend for a shared
head.  A chain is named by a random ``chain_id`` (32 hex digits); its records
are numbered ``seq = 1, 2, 3 ...`` and linked::

    genesis = SHA-256("sts.audit.chain.v1:" || chain_id)                (hex)
    hash[n] = SHA-256(bytes(prev_hash[n]) || JCS({"chain_id": chain_id,
                                                  "record": record[n],
                                                  "seq": n}))           (hex)
    prev_hash[1] = genesis, prev_hash[n] = hash[n-1]

where ``bytes(h)`` is the 32 bytes a hex hash stands for, ``record[n]`` is the
whole decision as stored (the ``record`` column) and JCS is the JSON
Canonicalization Scheme of RFC 8785 (sorted keys, no whitespace, ECMAScript
number formatting, UTF-8).  The canonical text of the record is what the
database stores, so anyone can recompute a hash from an export with any RFC
8785 implementation.

Changing a record changes its hash; deleting one leaves a gap in ``seq``;
moving one breaks the ``prev_hash`` of its new neighbour (``seq`` is inside
the hash).  Deleting the newest records of a chain leaves a shorter, intact
chain: that is what signed checkpoints of the chain heads are for (see
:mod:`sts.core.audit_checkpoint`).  Retention deletes the oldest records of a chain;
the chain's *anchor* (the ``seq`` and hash of the last record removed) is
where verification of the rest starts.

This module is pure: it computes and checks, and reads or writes nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import rfc8785

from .canonical_json import canonical_json
from .terminal_text import printable

#: Prefix of a chain's genesis hash; ``v1`` names the link format above.
GENESIS_PREFIX = b"sts.audit.chain.v1:"
CHAIN_ID = re.compile(r"[0-9a-f]{32}")
HASH = re.compile(r"[0-9a-f]{64}")


def genesis_hash(chain_id: str) -> str:
    """The ``prev_hash`` of a chain's first record."""
    return hashlib.sha256(GENESIS_PREFIX + chain_id.encode("utf-8", "surrogatepass")).hexdigest()


def link_hash(prev_hash: str, chain_id: str, seq: int, record_json: str) -> str:
    """``hash[seq]`` of the record whose canonical (RFC 8785) text is ``record_json``.

    The JCS text of ``{"chain_id": ..., "record": ..., "seq": ...}`` is assembled
    from its parts: RFC 8785 §3.2.3 sorts members by name (``chain_id`` <
    ``record`` < ``seq``), a chain id is hex (no escaping) and ``seq`` a safe
    integer, so the object's canonical form is the canonical forms of its
    members, joined.  The record is canonicalized once and hashed as stored.
    """
    payload = f'{{"chain_id":"{chain_id}","record":{record_json},"seq":{seq}}}'
    return hashlib.sha256(bytes.fromhex(prev_hash) + payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChainStart:
    """Where verification of a chain starts: its genesis, or the anchor left by retention.

    ``anchor_seq`` is 0 and ``anchor_hash`` the genesis hash until records are
    pruned; then they are the ``seq`` and hash of the last record removed.
    """

    chain_id: str
    anchor_seq: int
    anchor_hash: str


@dataclass(frozen=True)
class StoredLink:
    """One chained record as read back: its links, its record, and what its columns say.

    ``record`` is the parsed ``record`` column; ``column_mismatch`` names an
    indexed column whose value differs from what the record says (the reader
    compares them), or is None.
    """

    record_id: int
    chain_id: str
    seq: int
    prev_hash: str
    hash: str
    record: Any
    column_mismatch: str | None = None
    #: The record's text as stored (None: not read), which must be its canonical JSON: what the
    #: hash covers is the text the database's own JSON functions read (summaries, filters).
    text: str | None = None


@dataclass(frozen=True)
class BrokenLink:
    """The first place a chain does not verify: which record, and what is wrong there."""

    chain_id: str
    seq: int | None
    record_id: int | None
    problem: str

    def __str__(self) -> str:
        """One line for ``sts audit verify`` and the review page.  The chain id is read from the
        database, which whoever edits the trail writes: escaped (:func:`printable`), since a
        terminal sequence in it erased the ``BROKEN`` lines and printed a fake verdict (an outside
        audit)."""
        where = f"chain {self.chain_id}"
        if self.seq is not None:
            where += f" seq {self.seq}"
        if self.record_id is not None:
            where += f" (record id {self.record_id})"
        return printable(f"{where}: {self.problem}")


@dataclass(frozen=True)
class ChainHead:
    """The last verified link of a chain (the anchor when no record is left)."""

    seq: int
    hash: str
    records: int


@dataclass
class TrailReport:
    """What a walk of every chain found."""

    heads: dict[str, ChainHead] = field(default_factory=dict)
    broken: list[BrokenLink] = field(default_factory=list)
    #: Checkpoint heads older than a chain's anchor: pruned since, so not checkable any more.
    pruned_past_checkpoint: list[str] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(h.records for h in self.heads.values())


class AuditTrailBroken(Exception):
    """The trail does not verify: ``report.broken`` lists the first broken link of each chain."""

    def __init__(self, report: TrailReport) -> None:
        super().__init__(f"{len(report.broken)} broken chain(s); first: {report.broken[0]}")
        self.report = report


def verify_chains(
    starts: Iterable[ChainStart],
    links: Iterable[StoredLink],
    *,
    checkpoint: Mapping[str, Sequence[tuple[int, str]]] | None = None,
) -> TrailReport:
    """Walk every chain from its start and recompute every hash; raise when any link is broken.

    ``links`` must come ordered by ``(chain_id, seq)``.  Each chain must run
    ``anchor_seq + 1, anchor_seq + 2, ...`` without a gap, each ``prev_hash``
    must be the previous ``hash`` (the anchor's for the first), each ``hash``
    must be recomputed from the record, and each indexed column must agree with
    the record.  A registered chain with no record and no anchor had its
    records deleted; a chain that is not registered was never written by the
    service.  With ``checkpoint`` (chain id → the ``(seq, hash)`` heads that
    signed checkpoints saw), every chain named must still exist and reach each
    such ``seq`` with that hash, so deleting the newest records shows too.

    Returns the report when every chain verifies; raises
    :class:`AuditTrailBroken` (carrying the report) otherwise.
    """
    report = TrailReport()
    known = {s.chain_id: s for s in starts}
    pins = {chain_id: list(heads) for chain_id, heads in (checkpoint or {}).items()}
    seen: set[str] = set()
    for chain_id, chain_links in itertools.groupby(links, key=lambda link: link.chain_id):
        start = known.get(chain_id)
        if start is None or chain_id in seen:
            first = next(chain_links)
            problem = "chain is not registered in audit_chains" if start is None else "records out of order"
            report.broken.append(BrokenLink(chain_id, first.seq, first.record_id, problem))
            continue
        seen.add(chain_id)
        _walk(start, chain_links, pins.get(chain_id, []), report)
    for chain_id, start in known.items():
        if chain_id in seen:
            continue
        if start.anchor_seq == 0:
            report.broken.append(
                BrokenLink(chain_id, None, None, "chain has no records (every record was deleted)")
            )
            continue
        head = ChainHead(start.anchor_seq, start.anchor_hash, 0)
        report.heads[chain_id] = head
        _check_pins(start, head, {}, pins.get(chain_id, []), report)
    for chain_id in pins:
        if chain_id not in known and chain_id not in seen:
            report.broken.append(
                BrokenLink(chain_id, None, None, "chain named by the checkpoint is gone (deleted)")
            )
    report.broken.sort(key=lambda b: (b.chain_id, b.seq or 0))
    if report.broken:
        raise AuditTrailBroken(report)
    return report


def _walk(
    start: ChainStart, links: Iterator[StoredLink], pins: list[tuple[int, str]], report: TrailReport
) -> None:
    chain_id = start.chain_id
    seq, prev, count, last_id = start.anchor_seq, start.anchor_hash, 0, 0
    if not HASH.fullmatch(prev):
        report.broken.append(BrokenLink(chain_id, seq, None, "the chain's anchor hash is malformed (edited)"))
        return
    wanted = {pin_seq for pin_seq, _ in pins}
    seen_at: dict[int, str] = {}

    def broken(link: StoredLink, problem: str) -> None:
        # The rest of this chain is not checked: its first break is what counts.
        report.broken.append(BrokenLink(chain_id, link.seq, link.record_id, problem))

    for link in links:
        if link.seq <= seq:
            problem = (
                f"seq {link.seq} appears again (after seq {seq})"
                if link.seq > start.anchor_seq
                else f"seq {link.seq} is at or before the chain's anchor (seq {start.anchor_seq})"
            )
            return broken(link, problem)
        if link.seq != seq + 1:
            missing = f"seq {seq + 1}" if link.seq == seq + 2 else f"seq {seq + 1} to {link.seq - 1}"
            return broken(link, f"{missing} missing (deleted, or moved)")
        if link.prev_hash != prev:
            return broken(link, "prev_hash is not the hash of the record before it (moved or replaced)")
        if link.column_mismatch is not None and link.column_mismatch.startswith("record"):
            return broken(link, f"{link.column_mismatch} (edited)")
        try:
            text = canonical_json(link.record)
        except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError):
            return broken(link, "the record is not representable as canonical JSON (edited)")
        if link_hash(prev, chain_id, link.seq, text) != link.hash:
            return broken(link, "hash does not match the record (the record was edited)")
        if link.text is not None and link.text != text:
            # Same values, other text (an escape, spacing, member order): what the hash vouches for
            # is not what the database's JSON functions read (an outside audit: "fir\u0065d").
            return broken(link, "the record's text is not its canonical JSON (edited)")
        if link.column_mismatch is not None:
            return broken(link, f"column {link.column_mismatch} differs from the record (edited)")
        if link.record_id <= last_id:
            # The hash does not cover the row's id, but its chain's writer inserted the records
            # in seq order: an id out of that order was changed, which moves the record in the
            # timeline, out of an export's time window, or past pruning.
            return broken(link, f"id {link.record_id} is not after the id of seq {seq} ({last_id}): moved")
        seq, prev, count, last_id = link.seq, link.hash, count + 1, link.record_id
        if seq in wanted:
            seen_at[seq] = prev
    head = ChainHead(seq, prev, count)
    report.heads[chain_id] = head
    _check_pins(start, head, seen_at, pins, report)


def _check_pins(
    start: ChainStart,
    head: ChainHead,
    seen_at: Mapping[int, str],
    pins: list[tuple[int, str]],
    report: TrailReport,
) -> None:
    """Compare a verified chain with the heads checkpoints saw of it."""
    for pin_seq, pin_hash in pins:
        if pin_seq < start.anchor_seq:
            report.pruned_past_checkpoint.append(start.chain_id)
            continue
        found = start.anchor_hash if pin_seq == start.anchor_seq else seen_at.get(pin_seq)
        if head.seq < pin_seq:
            problem = (
                f"chain ends at seq {head.seq} but a checkpoint saw seq {pin_seq} "
                "(the newest records were deleted)"
            )
        elif found != pin_hash:
            problem = "hash differs from the checkpoint's (history rewritten)"
        else:
            continue
        report.broken.append(BrokenLink(start.chain_id, pin_seq, None, problem))
        return
