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
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import Key
from joserfc.jws import JWSRegistry
from sqlalchemy import Connection, Engine, Text, cast, func, select

from ..core.audit import AuditRecord
from ..core.audit_chain import (
    CHECKPOINT_TYP,
    AuditTrailBroken,
    ChainStart,
    CheckpointInvalid,
    StoredLink,
    TrailReport,
    checkpoint_claims,
    checkpoint_heads,
    genesis_hash,
    verify_chains,
)
from ..core.ports import Signer, UnknownKeyId
from .sql.audit_sink import SqlAuditSink
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


def stored_links(conn: Connection, *, batch: int = 2000) -> Iterator[StoredLink]:
    """Every chained record, ordered by ``(chain_id, seq)``, streamed ``batch`` rows at a time."""
    c = audit_events.c
    query = (
        select(*(col for col in c if col.name != "record"), cast(c.record, Text).label("record_text"))
        .where(c.chain_id.is_not(None))
        .order_by(c.chain_id, c.seq)
    )
    for row in conn.execution_options(yield_per=batch).execute(query):
        record, problem = _parse_record(row.record_text)
        yield StoredLink(
            record_id=int(row.id),
            chain_id=row.chain_id,
            seq=int(row.seq) if row.seq is not None else 0,
            prev_hash=row.prev_hash or "",
            hash=row.hash or "",
            record=record,
            column_mismatch=problem or _column_mismatch(row._mapping, record),
        )


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
        return json.loads(text, object_pairs_hook=no_duplicates), None
    except (ValueError, RecursionError) as exc:
        return None, f"record (not JSON: {exc})"[:120]


def _column_mismatch(row: Mapping[Any, Any], record: Any) -> str | None:
    """The first indexed column whose value is not what the record says, or None.

    The sink fills the columns from the record (:meth:`SqlAuditSink._row`); doing it
    again here catches a column edited alone (an ``outcome`` turned from ``refused``
    into ``granted`` changes what a query finds, not the record's hash).
    """
    if not isinstance(record, dict):
        return None  # The hash check reports it.
    try:
        expected = SqlAuditSink._row(AuditRecord(**{k: v for k, v in record.items() if k in _FIELDS}))
    except (TypeError, ValueError, OverflowError, AttributeError):
        return "record (not a decision record)"
    for name, value in expected.items():
        if name != "record" and not _same(row[name], value):
            return name
    return None


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
    c = audit_events.c
    first_chained = conn.execute(select(func.min(c.id)).where(c.chain_id.is_not(None))).scalar()
    total = conn.execute(select(func.count()).where(c.chain_id.is_(None))).scalar() or 0
    if first_chained is None:
        return Unchained(int(total), 0, None)
    after, first_after = conn.execute(
        select(func.count(), func.min(c.id)).where(c.chain_id.is_(None), c.id > first_chained)
    ).one()
    return Unchained(int(total) - int(after or 0), int(after or 0), first_after)


def verify_trail(
    engine: Engine, checkpoints: Iterable[Mapping[str, tuple[int, str]]] = ()
) -> tuple[TrailReport, Unchained]:
    """Verify every chain, and that each chain still reaches the head each checkpoint saw.

    Raises :class:`~sts.core.audit_chain.AuditTrailBroken`.
    """
    pins: dict[str, list[tuple[int, str]]] = {}
    for heads in checkpoints:
        for chain_id, head in heads.items():
            pins.setdefault(chain_id, []).append(head)
    with snapshot(engine) as conn:
        starts = chain_starts(conn)
        report = verify_chains(starts, stored_links(conn), checkpoint=pins)
        return report, unchained(conn)


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
    return signer.sign({"typ": CHECKPOINT_TYP}, checkpoint_claims(issuer, now, heads)), len(heads)


@dataclass(frozen=True)
class Checkpoint:
    issued_at: int | None
    kid: str | None
    heads: dict[str, tuple[int, str]]


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
    return Checkpoint(iat if type(iat) is int else None, kid, checkpoint_heads(claims, issuer))


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
