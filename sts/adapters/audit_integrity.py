"""The audit trail's hash chains read back: ``sts audit verify`` and ``sts audit checkpoint``.

The chains are written by :class:`~sts.adapters.sql.audit_sink.SqlAuditSink` and checked by
:mod:`sts.core.audit_chain`; this module reads them from the database, in one
snapshot (so that writers carrying on meanwhile cannot make an intact trail
look broken), and signs and reads checkpoints: compact JWS (RFC 7515 §7.1)
whose JWT claims (RFC 7519) list every chain's head, signed with the
service's own signing key.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import Key
from joserfc.jws import JWSRegistry
from sqlalchemy import Connection, Engine, func, select

from ..core.audit_chain import (
    AuditTrailBroken,
    BrokenLink,
    ChainStart,
    TrailReport,
    genesis_hash,
    verify_chains,
)
from ..core.audit_checkpoint import (
    CHECKPOINT_TYP,
    CheckpointInvalid,
    TrailFacts,
    below_cutoff,
    checkpoint_claims,
    checkpoint_firsts,
    checkpoint_heads,
    checkpoint_ids,
    checkpoint_trail,
    compares_ids,
    prechain_edited,
    prune_inconsistencies,
)
from ..core.audit_filter import format_time
from ..core.ports import Signer, UnknownKeyId
from .audit_links import chained_rows, link_of, stored_links
from .audit_unchained import Unchained, trail_facts, unchained
from .sql.schema import audit_chains, audit_events

#: A checkpoint lists every chain ever started (one or more per process start): far more than a
#: token's claims, so joserfc's default payload limit (128 000 bytes) is raised for it.
MAX_CHECKPOINT_BYTES = 64 * 1024 * 1024


@contextlib.contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction in which every query sees the same committed state.

    PostgreSQL: ``REPEATABLE READ``, whose snapshot is taken at the first query;
    SQLite (WAL): a read transaction is a snapshot already.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            yield conn


def chain_starts(conn: Connection) -> list[ChainStart]:
    c = audit_chains.c
    starts = []
    for chain_id, anchor_seq, anchor_hash in conn.execute(select(c.chain_id, c.anchor_seq, c.anchor_hash)):
        # Before any prune the anchor is the genesis, which follows from the chain id: the copy
        # stored in ``genesis_hash`` is for readers, and not trusted here.
        start_hash = str(anchor_hash or "") if anchor_seq else genesis_hash(chain_id)
        starts.append(ChainStart(chain_id, int(anchor_seq), start_hash))
    return starts


def verify_prefix(conn: Connection, below_id: int) -> list[BrokenLink]:
    """Verify the chained records with ``id < below_id`` from their chains' anchors: what a prune is
    about to remove, which must be intact (an outside audit had a prune carry an edited record
    out of the trail, after which ``sts audit verify`` said all was well).  The broken links."""
    links = list(stored_links(conn, below_id=below_id)) if below_id > 0 else []
    named = {link.chain_id for link in links}
    starts = [start for start in chain_starts(conn) if start.chain_id in named]
    try:
        verify_chains(starts, links)
    except AuditTrailBroken as exc:
        return exc.report.broken
    return []


def verify_recent(engine: Engine, limit: int = 2000) -> tuple[int, list[BrokenLink]]:
    """Verify the newest ``limit`` chained records (the review page's check, in a fraction of a
    second): how many were checked, and the broken links found.

    Within a chain ids grow with ``seq``, so the newest records of each chain are a run of its
    links: each is checked from its first record's ``prev_hash`` (the genesis for ``seq`` 1), as
    :func:`verify_trail` checks a whole chain.  What this cannot see: a change before the run, a
    deleted prefix or a truncation (``sts audit verify [--checkpoint]`` sees those).  A chain not
    registered, or a record without a chain after the oldest one checked, is broken too.
    """
    c = audit_events.c
    with snapshot(engine) as conn:
        rows = conn.execute(chained_rows(conn).order_by(c.id.desc()).limit(limit)).all()
        links = sorted((link_of(row) for row in rows), key=lambda link: (link.chain_id, link.seq))
        registered = set(conn.execute(select(audit_chains.c.chain_id)).scalars())
        # A record without a chain among (or after) these: the service never writes one (an outside
        # audit had forged records top the timeline while this check said "verified").
        oldest = min((link.record_id for link in links), default=None)
        stray = (
            conn.execute(select(func.min(c.id)).where(c.chain_id.is_(None), c.id > oldest)).scalar()
            if oldest is not None
            else None
        )
    broken: list[BrokenLink] = []
    if stray is not None:
        broken.append(BrokenLink("(none)", None, int(stray), "a record without a chain after chaining began"))
    starts = []
    for chain_id, chain_links in itertools.groupby(links, key=lambda link: link.chain_id):
        first = next(chain_links)
        if chain_id not in registered:
            broken.append(
                BrokenLink(chain_id, first.seq, first.record_id, "chain is not registered in audit_chains")
            )
            continue
        start_hash = genesis_hash(chain_id) if first.seq == 1 else first.prev_hash
        starts.append(ChainStart(chain_id, first.seq - 1, start_hash))
    try:
        verify_chains(starts, [link for link in links if link.chain_id in registered])
    except AuditTrailBroken as exc:
        broken.extend(exc.report.broken)
    return len(links), broken


#: Seconds a record may predate the checkpoint that did not see its chain (clocks of other hosts).
CHECKPOINT_CLOCK_SKEW = 300


def verify_trail(
    engine: Engine, checkpoints: Iterable[Mapping[str, tuple[int, str]] | Checkpoint] = ()
) -> tuple[TrailReport, Unchained]:
    """Verify every chain, and that each chain still reaches the head each checkpoint saw.

    No record may be left below the cutoff the last prune recorded (``audit_trail.pruned_below``).
    With a :class:`Checkpoint` (not only its heads): pruning must explain every chain whose
    anchor is past a record the checkpoint saw (:func:`~sts.core.audit_checkpoint.prune_inconsistencies`),
    and no record may be left below the cutoff it signed, unless SQLite numbered the records
    from 1 again (:func:`_compared`); a chain the checkpoint does not name must hold no record
    older than the checkpoint (less :data:`CHECKPOINT_CLOCK_SKEW`): it would have been named;
    the records without a chain are counted against what it signed of them, and ``audit_trail``
    must count as many written before chaining as it signed.

    Raises :class:`~sts.core.audit_chain.AuditTrailBroken`.
    """
    given = [c if isinstance(c, Checkpoint) else Checkpoint(None, None, dict(c)) for c in checkpoints]
    pins: dict[str, list[tuple[int, str]]] = {}
    for checkpoint in given:
        for chain_id, head in checkpoint.heads.items():
            pins.setdefault(chain_id, []).append(head)
    with snapshot(engine) as conn:
        starts = chain_starts(conn)
        try:
            report = verify_chains(starts, stored_links(conn), checkpoint=pins)
        except AuditTrailBroken as exc:
            report = exc.report
        lowest = conn.execute(select(func.min(audit_events.c.id))).scalar()
        facts = trail_facts(conn)
        signed = [c.trail for c in given if c.trail is not None]
        if facts is None:
            problem = "audit_trail does not hold its one row (deleted, or one added): edited"
            report.broken.append(BrokenLink("(trail)", None, None, problem))
        else:
            report.broken += below_cutoff(facts.pruned_below, lowest, "recorded in audit_trail")
            report.broken += prechain_edited(facts, signed)
        compared = _compared(conn, starts, given)
        for checkpoint, compare in zip(given, compared, strict=True):
            if checkpoint.trail is not None and compare:
                report.broken += below_cutoff(checkpoint.trail.pruned_below, lowest, "signed by a checkpoint")
        report.broken.extend(_beyond_pruning(conn, starts, given, lowest, compared))
        if report.broken:
            report.broken.sort(key=lambda b: (b.chain_id, b.seq or 0))
            raise AuditTrailBroken(report)
        return report, unchained(conn, [*signed, *([facts] if facts is not None else [])])


def _beyond_pruning(
    conn: Connection,
    starts: list[ChainStart],
    checkpoints: list[Checkpoint],
    lowest: int | None,
    compared: list[bool],
) -> list[BrokenLink]:
    """What the checkpoints say that pruning and new chains cannot explain (see :func:`verify_trail`);
    ``compared``: whether each checkpoint's ids are compared (:func:`_compared`)."""
    if not any(c.ids or c.firsts or c.issued_at is not None for c in checkpoints):
        return []
    c = audit_events.c
    oldest: dict[str, Any] = dict(
        conn.execute(
            select(c.chain_id, func.min(c.time)).where(c.chain_id.is_not(None)).group_by(c.chain_id)
        ).all()
    )
    found: list[BrokenLink] = []
    for checkpoint, compare in zip(checkpoints, compared, strict=True):
        if compare:
            found += prune_inconsistencies(
                starts, checkpoint.heads, checkpoint.ids, lowest, checkpoint.firsts
            )
        seen = [
            (chain_id, checkpoint.heads[chain_id][0], record_id)
            for chain_id, record_id in checkpoint.ids.items()
        ]
        seen += [(chain_id, anchor + 1, first) for chain_id, (anchor, first) in checkpoint.firsts.items()]
        renumbered: set[str] = set()
        for chain_id, seq, record_id in sorted(seen, key=lambda point: point[1]):
            # Record ids are not hashed: renumbered records would make a hand-made "prune" look
            # consistent.  A record a checkpoint saw keeps the id it saw while it is there.
            now_id = conn.execute(select(c.id).where(c.chain_id == chain_id, c.seq == seq)).scalar()
            if now_id is not None and int(now_id) != record_id and chain_id not in renumbered:
                renumbered.add(chain_id)
                problem = f"record id is {now_id}, the checkpoint saw {record_id} (records renumbered)"
                found.append(BrokenLink(chain_id, seq, int(now_id), problem))
        if checkpoint.issued_at is None:
            continue
        for chain_id, first in oldest.items():
            if chain_id in checkpoint.heads or not isinstance(first, dt.datetime):
                continue
            when = (first if first.tzinfo else first.replace(tzinfo=dt.UTC)).timestamp()
            if when < checkpoint.issued_at - CHECKPOINT_CLOCK_SKEW:
                problem = (
                    f"holds a record from {format_time(when)}, before a checkpoint that does not name "
                    "the chain (a chain made up, or history moved)"
                )
                found.append(BrokenLink(chain_id, None, None, problem))
    return found


def _compared(conn: Connection, starts: list[ChainStart], checkpoints: list[Checkpoint]) -> list[bool]:
    """Whether the ids left are held to what each checkpoint saw: unless SQLite numbered them from 1
    again after a prune of every record (:func:`~sts.core.audit_checkpoint.compares_ids`)."""
    anchors = {start.chain_id: start.anchor_seq for start in starts}
    sqlite = conn.dialect.name == "sqlite"
    c = audit_events.c
    lowest_chained = (
        conn.execute(select(func.min(c.id)).where(c.chain_id.is_not(None))).scalar()
        if sqlite and checkpoints
        else None
    )
    return [
        compares_ids(
            checkpoint.heads,
            checkpoint.ids,
            checkpoint.firsts,
            anchors,
            sqlite=sqlite,
            lowest_chained_id=None if lowest_chained is None else int(lowest_chained),
        )
        for checkpoint in checkpoints
    ]


def chain_heads(conn: Connection) -> dict[str, tuple[int, str]]:
    """Every chain's last ``(seq, hash)``: its newest record, or its anchor when none is left."""
    c = audit_events.c
    heads = {}
    for start in chain_starts(conn):
        newest = conn.execute(
            select(c.seq, c.hash).where(c.chain_id == start.chain_id).order_by(c.seq.desc()).limit(1)
        ).first()
        if newest is not None and newest.seq > start.anchor_seq:
            heads[start.chain_id] = (int(newest.seq), str(newest.hash))
        else:
            heads[start.chain_id] = (start.anchor_seq, start.anchor_hash)
    return heads


def sign_checkpoint(engine: Engine, signer: Signer, issuer: str, now: float) -> tuple[str, int]:
    """A checkpoint of every chain's head now, signed by ``signer``; and how many chains it names."""
    with snapshot(engine) as conn:
        heads = chain_heads(conn)
        ids = head_record_ids(conn, heads)
        firsts = first_record_ids(conn)
        facts = trail_facts(conn)
    claims = checkpoint_claims(issuer, now, heads, ids, firsts=firsts, trail=facts)
    return signer.sign({"typ": CHECKPOINT_TYP}, claims), len(heads)


def head_record_ids(conn: Connection, heads: Mapping[str, tuple[int, str]]) -> dict[str, int]:
    """The record id of each head a record holds (a head only the anchor holds has none)."""
    c = audit_events.c
    ids = {}
    for chain_id, (seq, _hash) in heads.items():
        found = conn.execute(select(c.id).where(c.chain_id == chain_id, c.seq == seq)).scalar()
        if found is not None:
            ids[chain_id] = int(found)
    return ids


def first_record_ids(conn: Connection) -> dict[str, tuple[int, int]]:
    """Each chain's anchor ``seq`` and the id of the record after it (where one is there)."""
    c = audit_events.c
    firsts = {}
    for start in chain_starts(conn):
        after = start.anchor_seq + 1
        found = conn.execute(select(c.id).where(c.chain_id == start.chain_id, c.seq == after)).scalar()
        if found is not None:
            firsts[start.chain_id] = (start.anchor_seq, int(found))
    return firsts


@dataclass(frozen=True)
class Checkpoint:
    issued_at: int | None
    kid: str | None
    heads: dict[str, tuple[int, str]]
    #: The heads' record ids (checkpoints signed before they carried them have none).
    ids: dict[str, int] = field(default_factory=dict)
    #: Each chain's anchor seq and the id of the record after it (none before December 2026).
    firsts: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: What it signed of the trail (None before December 2026).
    trail: TrailFacts | None = None


def read_checkpoint(token: str, key_for: Callable[[str | None, str], Key], issuer: str) -> Checkpoint:
    """Verify a checkpoint's signature (RFC 7515 §5.2) with ``key_for(kid, alg)`` and read its heads.

    Raises :class:`~sts.core.audit_chain.CheckpointInvalid`: not a compact JWS, not
    typed :data:`CHECKPOINT_TYP`, signed by no key ``key_for`` knows (it raises
    :class:`UnknownKeyId`), a bad signature, or claims of the wrong shape or issuer.
    """
    token = token.strip()
    if token.count(".") != 2:
        raise CheckpointInvalid("not a compact JWS")
    registry = JWSRegistry(algorithms=[])
    registry.max_payload_length = MAX_CHECKPOINT_BYTES
    try:
        compact = jws.extract_compact(token.encode("ascii"), registry=registry)
    except (JoseError, ValueError, UnicodeError) as exc:
        raise CheckpointInvalid(f"not a compact JWS ({type(exc).__name__})") from None
    header = compact.protected
    alg, kid = header.get("alg"), header.get("kid")
    if header.get("typ") != CHECKPOINT_TYP:
        raise CheckpointInvalid(f"typ is {str(header.get('typ'))[:60]!r}, not {CHECKPOINT_TYP!r}")
    if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
        raise CheckpointInvalid("malformed header")
    try:
        key = key_for(kid, alg)
    except UnknownKeyId as exc:
        raise CheckpointInvalid(f"signed by a key not in the key set: {exc}") from None
    checker = JWSRegistry(algorithms=[alg])
    checker.max_payload_length = MAX_CHECKPOINT_BYTES
    try:
        valid = jws.validate_compact(compact, key, registry=checker)
    except (JoseError, ValueError) as exc:
        raise CheckpointInvalid(f"bad signature ({type(exc).__name__})") from None
    if not valid:
        raise CheckpointInvalid("bad signature")
    try:
        claims = json.loads(compact.payload)
    except ValueError:
        raise CheckpointInvalid("claims are not JSON") from None
    if not isinstance(claims, dict):
        raise CheckpointInvalid("claims are not a JSON object")
    iat = claims.get("iat")
    heads = checkpoint_heads(claims, issuer)
    return Checkpoint(
        iat if type(iat) is int else None,
        kid,
        heads,
        checkpoint_ids(claims),
        checkpoint_firsts(claims),
        checkpoint_trail(claims),
    )


__all__ = [
    "AuditTrailBroken",
    "Checkpoint",
    "CheckpointInvalid",
    "Unchained",
    "chain_heads",
    "read_checkpoint",
    "sign_checkpoint",
    "snapshot",
    "stored_links",
    "trail_facts",
    "unchained",
    "verify_trail",
]
