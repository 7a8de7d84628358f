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
import dataclasses
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
from sqlalchemy import Connection, Engine, Text, and_, cast, func, not_, select

from ..core.audit import AuditRecord
from ..core.audit_chain import (
    CHECKPOINT_TYP,
    AuditTrailBroken,
    BrokenLink,
    ChainStart,
    CheckpointInvalid,
    StoredLink,
    TrailReport,
    checkpoint_claims,
    checkpoint_heads,
    checkpoint_ids,
    genesis_hash,
    prune_inconsistencies,
    verify_chains,
)
from ..core.audit_filter import format_time
from ..core.ports import Signer, UnknownKeyId
from .sql.group_commit import audit_row
from .sql.schema import audit_chains, audit_events

#: A checkpoint lists every chain ever started (one or more per process start): far more than a
#: token's claims, so joserfc's default payload limit (128 000 bytes) is raised for it.
MAX_CHECKPOINT_BYTES = 64 * 1024 * 1024

_FIELDS = frozenset(f.name for f in dataclasses.fields(AuditRecord))


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


def _chained_rows(conn: Connection) -> Any:
    c = audit_events.c
    columns = [*(col for col in c if col.name != "record"), cast(c.record, Text).label("record_text")]
    if conn.dialect.name == "sqlite":
        # SQLite keeps a time as text, and queries compare the text: see _column_mismatch.
        columns.append(cast(c.time, Text).label("time_text"))
    return select(*columns).where(c.chain_id.is_not(None))


def stored_links(conn: Connection, *, batch: int = 2000, below_id: int | None = None) -> Iterator[StoredLink]:
    """Every chained record (with ``below_id``: those with a lower id), ordered by ``(chain_id,
    seq)``, streamed ``batch`` rows at a time."""
    c = audit_events.c
    query = _chained_rows(conn).order_by(c.chain_id, c.seq)
    if below_id is not None:
        query = query.where(c.id < below_id)
    for row in conn.execution_options(yield_per=batch).execute(query):
        yield _link_of(row)


def _link_of(row: Any) -> StoredLink:
    record, problem = _parse_record(row.record_text)
    return StoredLink(
        record_id=int(row.id),
        chain_id=row.chain_id,
        seq=int(row.seq) if row.seq is not None else 0,
        prev_hash=row.prev_hash or "",
        hash=row.hash or "",
        record=record,
        column_mismatch=problem or _column_mismatch(row._mapping, record),
        text=row.record_text,
    )


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
        rows = conn.execute(_chained_rows(conn).order_by(c.id.desc()).limit(limit)).all()
        links = sorted((_link_of(row) for row in rows), key=lambda link: (link.chain_id, link.seq))
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


def _parse_record(text: str | None) -> tuple[Any, str | None]:
    """The stored record, and what is wrong with its text (a repeated member name: two readers
    could disagree about what it says)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate member name")
        return dict(pairs)

    if text is None:
        return None, "record (empty)"
    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_int=_integer), None
    except (ValueError, RecursionError) as exc:
        return None, f"record (not JSON: {exc})"[:120]


def _integer(literal: str) -> int | float:
    """An integer literal as the writer meant it.  The writer never stores an integer beyond 2**53
    (RFC 8785 refuses them: they become strings), but it writes an integral float of 2**53 or more
    as digits (``1e20`` as ``100000000000000000000``, JCS's number form); read back as an ``int`` it
    would not canonicalise again, and an intact record would look edited."""
    value = int(literal)
    return value if -_SAFE_INTEGER <= value <= _SAFE_INTEGER else float(value)


_SAFE_INTEGER = 2**53 - 1


def _column_mismatch(row: Mapping[Any, Any], record: Any) -> str | None:
    """The first indexed column whose value is not what the record says, or None.

    The sink fills the columns from the record (:func:`~sts.adapters.sql.group_commit.audit_row`); doing it
    again here catches a column edited alone (an ``outcome`` turned from ``refused``
    into ``granted`` changes what a query finds, not the record's hash).
    """
    if not isinstance(record, dict):
        return None  # The hash check reports it.
    try:
        expected = audit_row(AuditRecord(**{k: v for k, v in record.items() if k in _FIELDS}))
    except (TypeError, ValueError, OverflowError, AttributeError):
        return "record (not a decision record)"
    for name, value in expected.items():
        if name != "record" and not _same(row[name], value):
            return name
    text = row.get("time_text")
    if text is not None and text not in _sqlite_time_texts(expected["time"]):
        # The same instant written otherwise (another offset, a "T"): equal as times, but queries
        # by time compare the text, so such a record drops out of time-bounded views.
        return "time"
    return None


def _sqlite_time_texts(when: dt.datetime) -> tuple[str, str]:
    """The texts SQLite holds for ``when``: as the sink writes it (the driver's ``isoformat(" ")``),
    and as SQLAlchemy's SQLite ``DATETIME`` does (UTC, no offset, six-digit microseconds)."""
    naive = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when.isoformat(" "), naive.strftime("%Y-%m-%d %H:%M:%S.%f")


def _same(stored: Any, expected: Any) -> bool:
    if isinstance(stored, dt.datetime) and isinstance(expected, dt.datetime):
        if stored.tzinfo is None:
            stored = stored.replace(tzinfo=dt.UTC)
        return bool(stored == expected)
    return bool(stored == expected)


@dataclass(frozen=True)
class Unchained:
    """Records without a chain: written before chaining began, or inserted by something else.

    ``before`` were written before the first chained record (older versions of the
    service): nothing can vouch for them.  ``after`` came later, which the service
    never does: another writer put them there (or an instance of an older version,
    during an upgrade); ``first_after`` is the id of the first of them.
    """

    before: int
    after: int
    first_after: int | None


def unchained(conn: Connection) -> Unchained:
    """Count the records without a chain.  Before chaining began means both an id below the first
    chained record's and a time before the first chain was registered: a record copied in with a
    low id (or one a prune freed) but a time of its own is not taken for an old one."""
    c = audit_events.c
    first_chained = conn.execute(select(func.min(c.id)).where(c.chain_id.is_not(None))).scalar()
    total = conn.execute(select(func.count()).where(c.chain_id.is_(None))).scalar() or 0
    first_started = conn.execute(select(func.min(audit_chains.c.started_at))).scalar()
    if first_chained is None and first_started is None:
        return Unchained(int(total), 0, None)
    conditions: list[Any] = [c.chain_id.is_(None)]
    if first_chained is not None:
        conditions.append(c.id < first_chained)
    if first_started is not None:
        conditions.append(c.time < dt.datetime.fromtimestamp(float(first_started), tz=dt.UTC))
    old = and_(*conditions)
    before = conn.execute(select(func.count()).where(old)).scalar() or 0
    first_after = conn.execute(select(func.min(c.id)).where(c.chain_id.is_(None), not_(old))).scalar()
    return Unchained(int(before), int(total) - int(before), first_after)


#: Seconds a record may predate the checkpoint that did not see its chain (clocks of other hosts).
CHECKPOINT_CLOCK_SKEW = 300


def verify_trail(
    engine: Engine, checkpoints: Iterable[Mapping[str, tuple[int, str]] | Checkpoint] = ()
) -> tuple[TrailReport, Unchained]:
    """Verify every chain, and that each chain still reaches the head each checkpoint saw.

    With a :class:`Checkpoint` (not only its heads): pruning must explain every chain whose
    checkpointed head is behind its anchor (:func:`~sts.core.audit_chain.prune_inconsistencies`),
    and a chain the checkpoint does not name must hold no record older than the checkpoint
    (less :data:`CHECKPOINT_CLOCK_SKEW`): it would have been named.

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
        report.broken.extend(_beyond_pruning(conn, starts, given))
        if report.broken:
            report.broken.sort(key=lambda b: (b.chain_id, b.seq or 0))
            raise AuditTrailBroken(report)
        return report, unchained(conn)


def _beyond_pruning(
    conn: Connection, starts: list[ChainStart], checkpoints: list[Checkpoint]
) -> list[BrokenLink]:
    """What the checkpoints say that pruning and new chains cannot explain (see :func:`verify_trail`)."""
    if not any(c.ids or c.issued_at is not None for c in checkpoints):
        return []
    c = audit_events.c
    lowest = conn.execute(select(func.min(c.id))).scalar()
    oldest: dict[str, Any] = dict(
        conn.execute(
            select(c.chain_id, func.min(c.time)).where(c.chain_id.is_not(None)).group_by(c.chain_id)
        ).all()
    )
    found: list[BrokenLink] = []
    for checkpoint in checkpoints:
        found += prune_inconsistencies(starts, checkpoint.heads, checkpoint.ids, lowest)
        for chain_id, record_id in checkpoint.ids.items():
            # Record ids are not hashed: renumbered records would make a hand-made "prune" look
            # consistent.  The head a checkpoint saw keeps the id it saw while it is there.
            seq = checkpoint.heads[chain_id][0]
            now_id = conn.execute(select(c.id).where(c.chain_id == chain_id, c.seq == seq)).scalar()
            if now_id is not None and int(now_id) != record_id:
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
    return signer.sign({"typ": CHECKPOINT_TYP}, checkpoint_claims(issuer, now, heads, ids)), len(heads)


def head_record_ids(conn: Connection, heads: Mapping[str, tuple[int, str]]) -> dict[str, int]:
    """The record id of each head a record holds (a head only the anchor holds has none)."""
    c = audit_events.c
    ids = {}
    for chain_id, (seq, _hash) in heads.items():
        found = conn.execute(select(c.id).where(c.chain_id == chain_id, c.seq == seq)).scalar()
        if found is not None:
            ids[chain_id] = int(found)
    return ids


@dataclass(frozen=True)
class Checkpoint:
    issued_at: int | None
    kid: str | None
    heads: dict[str, tuple[int, str]]
    #: The heads' record ids (checkpoints signed before they carried them have none).
    ids: dict[str, int] = field(default_factory=dict)


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
    return Checkpoint(iat if type(iat) is int else None, kid, heads, checkpoint_ids(claims))


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
    "unchained",
    "verify_trail",
]
